"""DoRA: the column norm by algebra against the direct norm, our layers against PEFT's DoRA
(outputs and every gradient), merge, NF4 bases, adapter files both ways, train.py --use-dora."""
import json
import subprocess
import sys
import warnings
from pathlib import Path

import peft
import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

import lorakernels as lora
from lorakernels.adapters import (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, load_peft_adapter,
                                  save_peft_adapter)
from lorakernels.dora import row_sq_norms
from lorakernels.functional import dora_weight_norm, lm_head_loss
from lorakernels.nf4 import dequantize_nf4_reference
from lorakernels.nf4_layers import NF4Linear
from lorakernels.parts import LoRAParts
from lorakernels.lora_call import LoRACall
from lorakernels.reference import dora_linear_reference, dora_weight_norm_reference
from model import Phi3ForCausalLM
from model.build import load_model
from model.lora import DEFAULT_TARGETS, apply_lora
from conftest import subprocess_timeout, use_settings

IN, OUT, R, ALPHA = 48, 40, 4, 8


def phi3_like(n: int, k: int, r: int, groups: int, dtype: torch.dtype, seed: int = 0):
    """W, A, B at Phi-3-mini's magnitudes: W entries ~0.02, A as kaiming, B after some training."""
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(n, k, generator=g) * 0.02).to(dtype)
    lora_A = (torch.rand(r * groups, k, generator=g) * 2 - 1) / k ** 0.5
    lora_B = torch.randn(n, r, generator=g) * 1e-2
    return weight, lora_A, lora_B


@pytest.mark.parametrize("dtype, rtol", [
    # fp32: n² is a sum of fp32 terms with n² ≈ ‖W_j‖², so n is right to a few fp32 ulps.
    (torch.float32, 2e-6),
    # bf16 W: W·Aᵀ runs in bf16 (A rounded to bf16, the product rounded to bf16), an error of
    # ~2⁻⁸ of the cross term 2s·B_j·(W·Aᵀ)_j only; that term is ~1% of ‖W_j‖² here, so n
    # (half the relative error of n²) is good to ~2⁻⁸·1%/2 ≈ 2e-5. ‖W_j‖² is exact in fp32.
    (torch.bfloat16, 5e-5),
])
@pytest.mark.parametrize("fused", [False, True], ids=["one-pair", "per-part"])
def test_norm_algebra_matches_the_direct_norm(dtype, rtol, fused):
    n, k, r = 384, 1024, 16
    parts = LoRAParts((256, 64, 64), (True, False, True)) if fused else None
    weight, lora_A, lora_B = phi3_like(n, k, r, 2 if fused else 1, dtype)
    if fused:
        lora_B = lora_B[:parts.lora_out_features]
    scaling = 2.0
    direct = dora_weight_norm_reference(weight, lora_A, lora_B, scaling, parts)
    algebra = dora_weight_norm(weight, row_sq_norms(weight), lora_A, lora_B, scaling, parts)
    assert algebra.dtype == torch.float32
    update = (direct - torch.linalg.vector_norm(weight.float(), dim=1)).abs() / direct
    assert update.max() > 100 * rtol  # B·A moves n (~1%) far beyond the tolerance
    torch.testing.assert_close(algebra, direct, rtol=rtol, atol=0)


class Proj(nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.proj = nn.Linear(IN, OUT, bias=bias)


def trained_peft_dora(dropout: float, bias: bool, dtype: torch.dtype, seed: int = 0):
    """PEFT's DoRA on one linear, with A, B and the magnitude moved off their initial values."""
    torch.manual_seed(seed)
    base = Proj(bias).to(dtype)
    model = peft.get_peft_model(base, peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=dropout,
                                                      target_modules=["proj"], use_dora=True))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.1)
        layer.lora_magnitude_vector["default"].weight.mul_(1 + 0.1 * torch.randn(OUT))
    return model, layer


def our_twin(layer, dropout: float) -> lora.Linear:
    """Our DoRA Linear over PEFT's weights (fp32 adapters over the base's dtype, as apply_lora)."""
    base = layer.base_layer
    ours = lora.Linear(IN, OUT, r=R, lora_alpha=ALPHA, lora_dropout=dropout, use_dora=True,
                       bias=base.bias is not None, merge_weights=False)
    ours.weight, ours.bias = base.weight, base.bias
    ours.lora_A = nn.Parameter(layer.lora_A["default"].weight.detach().clone())
    ours.lora_B = nn.Parameter(layer.lora_B["default"].weight.detach().clone())
    ours.lora_magnitude = nn.Parameter(
        layer.lora_magnitude_vector["default"].weight.detach().clone())
    return ours


def forward_backward(layer, x, params, seed):
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)  # the same dropout mask on both sides: one draw of x's shape each
    y = layer(x)
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return [y, x.grad] + [p.grad for p in params]


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["p0", "p0.3"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)],
                         ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["auto", "eager", "triton"])  # triton: the interpreter on CPU
def test_linear_matches_peft_forward_and_gradients(monkeypatch, dropout, bias, dtype, tol, backend):
    use_settings(monkeypatch, backend=backend)
    model, peft_layer = trained_peft_dora(dropout, bias, dtype)
    ours = our_twin(peft_layer, dropout)
    model.train(), ours.train()
    x = torch.randn(2, 7, IN).to(dtype)
    theirs_params = [peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight,
                     peft_layer.lora_magnitude_vector["default"].weight]
    expected = forward_backward(peft_layer, x, theirs_params, seed=5)
    actual = forward_backward(ours, x, [ours.lora_A, ours.lora_B, ours.lora_magnitude], seed=5)
    for name, a, e in zip(("y", "dx", "dA", "dB", "dm"), actual, expected):
        assert a.dtype == e.dtype, name
        torch.testing.assert_close(a, e, rtol=tol, atol=tol,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_magnitude_starts_at_the_weight_norm_as_peft():
    model, peft_layer = trained_peft_dora(0.0, True, torch.float32)
    fresh = lora.Linear(IN, OUT, r=R, use_dora=True)
    torch.testing.assert_close(fresh.lora_magnitude, fresh.weight.norm(dim=1))
    peft_fresh = peft.get_peft_model(Proj(True), peft.LoraConfig(r=R, target_modules=["proj"],
                                                                  use_dora=True))
    layer = peft_fresh.base_model.model.proj
    torch.testing.assert_close(layer.lora_magnitude_vector["default"].weight,
                               layer.base_layer.weight.norm(dim=1))


def test_per_part_dora_matches_the_direct_reference():
    parts = dict(split_sizes=(24, 8, 8), enable_lora=(True, False, True))
    layer = lora.MergedLinear(IN, OUT, r=R, lora_alpha=ALPHA, use_dora=True, **parts)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
        layer.lora_magnitude.mul_(1.2)
    x = torch.randn(5, IN, requires_grad=True)
    y = layer(x)
    expected = dora_linear_reference(x, layer.weight, layer.bias, LoRACall(
        layer.lora_A, layer.lora_B, layer.scaling, parts=layer.lora_parts,
        magnitude=layer.lora_magnitude))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(y.sum(), [x, layer.lora_A, layer.lora_B, layer.lora_magnitude])
    expected_grads = torch.autograd.grad(expected.sum(),
                                         [x, layer.lora_A, layer.lora_B, layer.lora_magnitude])
    for a, e in zip(grads, expected_grads):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [
    lambda: lora.Linear(IN, OUT, r=R, lora_alpha=ALPHA, use_dora=True),
    lambda: lora.Linear(IN, OUT, r=R, lora_alpha=ALPHA, use_dora=True, fan_in_fan_out=True),
    lambda: lora.MergedLinear(IN, OUT, r=R, lora_alpha=ALPHA, use_dora=True,
                              split_sizes=(24, 8, 8), enable_lora=(True, False, True)),
], ids=["linear", "fan-in-fan-out", "per-part"])
def test_merge_equals_unmerged_and_unmerge_restores(make):
    layer = make()
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
        layer.lora_magnitude.mul_(1.2)
    weight = layer.weight.detach().clone()
    x = torch.randn(5, IN)
    layer.train()
    unmerged = layer(x)
    layer.eval()
    assert layer.merged
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    layer.train()
    torch.testing.assert_close(layer.weight, weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)


def test_merge_equals_peft_merge():
    model, peft_layer = trained_peft_dora(0.0, True, torch.float32)
    ours = our_twin(peft_layer, 0.0)
    ours.set_merged(True)
    peft_layer.merge()
    torch.testing.assert_close(ours.weight, peft_layer.base_layer.weight, rtol=1e-6, atol=1e-6)


def test_nf4_base_takes_norms_from_the_dequantised_weight():
    dense = nn.Linear(64, 128, bias=False)
    layer = NF4Linear.from_linear(dense, r=R, lora_alpha=ALPHA, use_dora=True)
    weight = dequantize_nf4_reference(layer.nf4_weight, torch.float32)
    torch.testing.assert_close(layer.lora_magnitude, weight.norm(dim=1))
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    x = torch.randn(3, 64)
    expected = dora_linear_reference(x, weight, None, LoRACall(
        layer.lora_A, layer.lora_B, layer.scaling, magnitude=layer.lora_magnitude))
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_dora_needs_a_low_rank_path():
    with pytest.raises(ValueError, match="use_dora needs a low-rank path"):
        lora.Linear(IN, OUT, r=0, use_dora=True)


# ----------------------------------------------------------------------------- adapter files

ROOT = Path(__file__).resolve().parents[1]
# test_adapters' small Phi-3 checkpoint saved by transformers, and its helpers.
from test_adapters import checkpoint, hf_base, ids, logits  # noqa: E402, F401 (fixtures)

TARGETS = DEFAULT_TARGETS + ("lm_head",)
MAGNITUDE_KEY = "base_model.model.model.layers.0.self_attn.qkv_proj.lora_magnitude_vector"


def move_off_init(model: nn.Module, seed: int) -> None:
    """B random and each magnitude scaled per row, so every DoRA term shows in the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
            elif "lora_magnitude" in name:
                param.mul_(1 + 0.2 * torch.randn(param.shape, generator=generator))


def dora_model(checkpoint, seed=None) -> Phi3ForCausalLM:
    model = Phi3ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    apply_lora(model, r=R, lora_alpha=ALPHA, targets=TARGETS, use_dora=True)
    if seed is not None:
        move_off_init(model, seed)
    return model.eval()


def test_our_dora_adapter_loads_in_peft(checkpoint, tmp_path, ids):
    model = dora_model(checkpoint, seed=0)
    save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=checkpoint)
    assert json.loads((tmp_path / "adapter" / ADAPTER_CONFIG_FILE).read_text())["use_dora"] is True
    with safe_open(str(tmp_path / "adapter" / ADAPTER_WEIGHTS_FILE), "pt") as reader:
        assert tuple(reader.get_slice(MAGNITUDE_KEY).get_shape()) == (128,)
        assert len(list(reader.keys())) == 3 * (2 * len(DEFAULT_TARGETS) + 1)  # A, B, m per layer
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(hf_base(checkpoint), tmp_path / "adapter").eval()
    assert not [w for w in caught if "missing" in str(w.message).lower()
                or "unexpected" in str(w.message).lower()]
    torch.testing.assert_close(logits(model, ids), logits(theirs, ids), rtol=1e-4, atol=1e-4)


def test_peft_dora_adapter_loads_in_ours(checkpoint, tmp_path, ids):
    theirs = peft.get_peft_model(hf_base(checkpoint), peft.LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=list(TARGETS), use_dora=True, task_type="CAUSAL_LM"))
    move_off_init(theirs, seed=3)
    with warnings.catch_warnings():
        # "Setting save_embedding_layers to True": lm_head is a target
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path / "peft")
    model = dora_model(checkpoint)
    load_peft_adapter(model, tmp_path / "peft")
    torch.testing.assert_close(logits(model, ids), logits(theirs.eval(), ids), rtol=1e-4, atol=1e-4)


def test_use_dora_must_match_the_file(checkpoint, tmp_path):
    save_peft_adapter(dora_model(checkpoint), tmp_path / "adapter")
    plain = Phi3ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    apply_lora(plain, r=R, lora_alpha=ALPHA, targets=TARGETS)
    with pytest.raises(ValueError, match="use_dora: file True, model False"):
        load_peft_adapter(plain, tmp_path / "adapter")


def test_lora_state_dict_carries_the_magnitude(checkpoint):
    model = dora_model(checkpoint)
    keys = lora.lora_state_dict(model)
    assert "model.layers.0.self_attn.qkv_proj.lora_magnitude" in keys
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())


def test_dora_refuses_embedding_targets(checkpoint):
    model = Phi3ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    with pytest.raises(ValueError, match="linear targets only"):
        apply_lora(model, targets=("qkv_proj", "embed_tokens"), use_dora=True)


def test_train_py_use_dora_adapter_loads_in_peft(tmp_path):
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--data", str(ROOT / "examples" / "chat.jsonl"),
         "--output", str(run), "--use-dora", "--max-steps", "2", "--device", "cpu",
         "--max-seq-len", "64", "--lora-r", "4", "--seed", "3"],
        capture_output=True, text=True, cwd=ROOT, timeout=subprocess_timeout(600))
    assert result.returncode == 0, result.stderr
    assert json.loads((run / "final" / ADAPTER_CONFIG_FILE).read_text())["use_dora"] is True
    base, _ = load_model("phi3-tiny", torch.float32, torch.device("cpu"), 3)
    base.save_pretrained(tmp_path / "base")
    theirs = peft.PeftModel.from_pretrained(hf_base(tmp_path / "base"), run / "final").eval()
    ours, _ = load_model("phi3-tiny", torch.float32, torch.device("cpu"), 3, adapter=run / "final")
    ids = torch.randint(0, 1000, (1, 12))
    torch.testing.assert_close(logits(ours.eval(), ids), logits(theirs, ids), rtol=1e-4, atol=1e-4)


def test_lm_head_loss_of_a_dora_head_is_its_logits_loss():
    head = lora.Linear(IN, 96, r=R, lora_alpha=ALPHA, use_dora=True, bias=False)
    with torch.no_grad():
        head.lora_B.normal_(0, 0.1)
        head.lora_magnitude.mul_(1.3)
    hidden, labels = torch.randn(6, IN), torch.randint(0, 96, (6,))
    expected = nn.functional.cross_entropy(head(hidden), labels, reduction="sum")
    torch.testing.assert_close(lm_head_loss(head, hidden, labels), expected)


def test_resume_with_dora_is_exact(data, tmp_path):
    """Magnitudes are saved and restored with A and B: a resumed DoRA run ends bit for bit where
    an uninterrupted one does (CPU, fp32, dropout on: masks are a function of seed and step)."""
    from training.config import TrainConfig
    from training.loop import train

    def run(output, **overrides):
        options = dict(data=data, output=str(output), device="cpu", max_seq_len=64, batch_size=2,
                       lr=3e-3, lora_r=4, lora_alpha=8, lora_dropout=0.1, max_steps=4, seed=3,
                       use_dora=True)
        train(TrainConfig(**{**options, **overrides}), log=lambda _: None)

    run(tmp_path / "straight")
    run(tmp_path / "split", save_every=2)
    run(tmp_path / "resumed", resume=str(tmp_path / "split" / "checkpoint-2"))
    with safe_open(str(tmp_path / "straight" / "final" / "lora.safetensors"), "pt") as expected, \
            safe_open(str(tmp_path / "resumed" / "final" / "lora.safetensors"), "pt") as resumed:
        keys = list(expected.keys())
        assert any(key.endswith("lora_magnitude") for key in keys)
        assert set(keys) == set(resumed.keys())
        for key in keys:
            assert torch.equal(expected.get_tensor(key), resumed.get_tensor(key)), key
