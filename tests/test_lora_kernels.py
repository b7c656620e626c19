"""The fused Triton LoRA kernels against lorakernels.reference: outputs and every gradient.

On CPU these run under TRITON_INTERPRET=1 (tests/conftest.py) with small shapes.
Tolerances, as max |kernel - reference| over max |reference|:
- fp32: 1e-5 (only the order of fp32 accumulation differs; K ≤ 160 terms);
- bf16/fp16: 2e-2 against an fp32 reference on the same (rounded) inputs: the
  kernel rounds its output once (2^-9 relative) and feeds the epilogue's low-rank
  product bf16 operands (S and B each rounded by 2^-9), plus TF32 on a GPU.
A wrong mask, part layout or missing term gives errors of order one.
"""
import contextlib
import dataclasses
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import lorakernels as lora
from lorakernels.nf4 import NF4_FUSED_MAX_ROWS, dequantize_nf4_reference, quantize_nf4
import triton

from lorakernels.lora_call import LoRACall
from lorakernels.ops import lora_linear as lora_linear_ops
from lorakernels.ops.lora_linear import b3_splits, dropout_mask, fused_lora_linear
from lorakernels.reference import lora_linear_reference, merged_lora_linear_reference
from conftest import subprocess_timeout, use_settings

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}

# name -> (out_features, parts); None = one A/B pair over the whole output (plain or PEFT-style
# fused).
VARIANTS = {
    "plain": (40, None),
    "qkv_q_and_v": (48, lora.LoRAParts((16, 16, 16), (True, False, True))),
    "gqa_unequal_all": (64, lora.LoRAParts((40, 12, 12), (True, True, True))),
    "gqa_unequal_k_off": (64, lora.LoRAParts((40, 12, 12), (True, False, True))),
    "gate_up": (80, lora.LoRAParts((40, 40), (True, True))),
}


def assert_rel_close(actual, expected, rel, what):
    error = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert error <= rel * scale + 1e-6, f"{what}: max error {error:.3g} vs scale {scale:.3g}"


def case_inputs(M, K, variant, r, dtype, lead=(), bias=True, nf4=False,
                nf4_fused_max_rows=NF4_FUSED_MAX_ROWS, b_std=1.0) -> SimpleNamespace:
    """One case's random tensors: x, the kernels' weight, the reference's dense weight, bias,
    A, B, dy, the variant's parts, and ``make`` (its generator) for anything more.
    ``nf4``: the kernels' weight quantised, the reference given its eager dequantisation."""
    N, parts = VARIANTS[variant]
    groups = 1 if parts is None else parts.num_enabled
    n_lora = N if parts is None else parts.lora_out_features
    gen = torch.Generator().manual_seed(M * 1000 + r)
    make = lambda *shape, s=1.0: (torch.randn(*shape, generator=gen) * s).to(DEVICE)  # noqa: E731
    x = make(*lead, M, K).to(dtype)
    weight = make(N, K, s=K ** -0.5).to(dtype)
    kernel_weight = weight
    if nf4:
        kernel_weight = dataclasses.replace(quantize_nf4(weight), fused_max_rows=nf4_fused_max_rows)
        weight = dequantize_nf4_reference(kernel_weight, dtype)
    b = make(N).to(dtype) if bias else None
    lora_A, lora_B = make(r * groups, K, s=K ** -0.5), make(n_lora, r, s=b_std)
    dy = make(*lead, M, N).to(dtype)
    return SimpleNamespace(x=x, kernel_weight=kernel_weight, weight=weight, bias=b, lora_A=lora_A,
                           lora_B=lora_B, dy=dy, parts=parts, make=make)


def run_case(M, K, variant, r, dtype, dropout_p, lead=(), seed=1234, bias=True, nf4=False,
             nf4_fused_max_rows=NF4_FUSED_MAX_ROWS):
    """Kernels vs the fp32 reference; ``nf4``: the base weight quantised, the reference given
    its eager dequantisation (so the test checks the kernels' use of it, not NF4's error);
    ``nf4_fused_max_rows``: where the kernels switch from 4-bit tiles to a dequantised copy."""
    case = case_inputs(M, K, variant, r, dtype, lead, bias, nf4, nf4_fused_max_rows)
    x, kernel_weight, weight, b = case.x, case.kernel_weight, case.weight, case.bias
    lora_A, lora_B, dy, parts = case.lora_A, case.lora_B, case.dy, case.parts
    scaling = 2.0 / r

    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, b, lora_A, lora_B)]
    y = fused_lora_linear(leaves[0], kernel_weight, leaves[1],
                          LoRACall(leaves[2], leaves[3], scaling, dropout_p, parts), seed)
    y.backward(dy)

    # The reference in fp32 on the same inputs, with exactly the kernel's dropout mask.
    ref_leaves = [t.detach().float().clone().requires_grad_() if t is not None else None
                  for t in (x, b, lora_A, lora_B)]
    rx, rb, rA, rB = ref_leaves
    mask = dropout_mask(rx.reshape(-1, K).shape[0], K, dropout_p, seed, rx.device).view(rx.shape) \
        if dropout_p > 0 else 1.0
    if parts is None:
        y_ref = lora_linear_reference(rx, weight.float(), rb, rA, rB, scaling, lora_input=rx * mask)
    else:
        y_ref = merged_lora_linear_reference(rx, weight.float(), rb, rA, rB, scaling, parts,
                                             lora_input=rx * mask)
    y_ref.backward(dy.float())

    rel = REL_TOL[dtype]
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert_rel_close(y, y_ref, rel, "y")
    for name, got, want in zip(("dx", "dbias", "dA", "dB"), leaves, ref_leaves):
        if got is not None:
            assert got.grad.dtype == got.dtype
            assert_rel_close(got.grad, want.grad, rel, name)


@pytest.mark.parametrize("M", [1, 7, 129])
@pytest.mark.parametrize("r", [1, 8, 16, 64])
def test_plain_fp32_shapes_and_ranks(M, r):
    run_case(M, 96, "plain", r, torch.float32, 0.0)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_variants_dtypes_dropout(variant, dtype, dropout_p):
    run_case(7, 96, variant, 8, dtype, dropout_p)


@pytest.mark.parametrize("variant", ["plain", "gqa_unequal_k_off"])
def test_many_rows_with_dropout_bf16(variant):
    run_case(129, 96, variant, 16, torch.bfloat16, 0.05)


def test_fp16_and_leading_dims_without_bias():
    run_case(5, 96, "qkv_q_and_v", 4, torch.float16, 0.2, lead=(2, 3), bias=False)


def test_odd_inner_dimension():
    run_case(7, 40, "gqa_unequal_k_off", 8, torch.float32, 0.3)


def test_same_seed_same_output_and_mask_rate():
    x = torch.randn(64, 64, device=DEVICE)
    w, a, b = (torch.randn(32, 64, device=DEVICE), torch.randn(8, 64, device=DEVICE),
               torch.randn(32, 8, device=DEVICE))
    lora = LoRACall(a, b, 1.0, 0.3)
    y1 = fused_lora_linear(x, w, None, lora, seed=7)
    y2 = fused_lora_linear(x, w, None, lora, seed=7)
    y3 = fused_lora_linear(x, w, None, lora, seed=8)
    assert torch.equal(y1, y2) and not torch.allclose(y1, y3)
    dropped = (dropout_mask(64, 64, 0.3, 7, x.device) == 0).float().mean().item()
    assert abs(dropped - 0.3) < 0.05


def test_trainable_base_weight_gets_its_gradient():
    x = torch.randn(9, 32, device=DEVICE)
    w = torch.randn(16, 32, device=DEVICE, requires_grad=True)
    a, b = torch.randn(4, 32, device=DEVICE), torch.randn(16, 4, device=DEVICE)
    fused_lora_linear(x, w, None, LoRACall(a, b, 0.5)).sum().backward()
    w_ref = w.detach().clone().requires_grad_()
    lora_linear_reference(x, w_ref, None, a, b, 0.5).sum().backward()
    assert_rel_close(w.grad, w_ref.grad, 1e-5, "dW")


@pytest.mark.parametrize("layer_kind", ["linear_fan_in_fan_out", "merged_gqa"])
def test_layers_route_through_the_kernels(monkeypatch, layer_kind):
    """LORAKERNELS_BACKEND=triton: a layer's output and gradients equal the eager backend's."""
    torch.manual_seed(0)
    if layer_kind == "merged_gqa":
        layer = lora.MergedLinear(32, 48, r=4, lora_alpha=8, enable_lora=[True, False, True],
                                  split_sizes=[32, 8, 8])
    else:
        layer = lora.Linear(32, 24, r=4, lora_alpha=8, fan_in_fan_out=True)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.to(DEVICE)
    x = torch.randn(2, 3, 32, device=DEVICE)
    results = {}
    for backend in ("eager", "triton"):
        use_settings(monkeypatch, backend=backend)
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.square().sum().backward()
        results[backend] = (y.detach(), xi.grad, layer.lora_A.grad.clone(),
                            layer.lora_B.grad.clone())
        layer.zero_grad()
    for name, got, want in zip(("y", "dx", "dA", "dB"), results["triton"], results["eager"]):
        assert_rel_close(got, want, 1e-5, name)


def test_dispatch_dropout_is_reproducible_from_torch_seed(monkeypatch):
    use_settings(monkeypatch, backend="triton")
    layer = lora.Linear(32, 16, r=4, lora_dropout=0.5).to(DEVICE)
    x = torch.randn(8, 32, device=DEVICE)
    torch.manual_seed(3)
    y1 = layer(x)
    torch.manual_seed(3)
    y2 = layer(x)
    assert torch.equal(y1, y2)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(x_dtype=torch.float64), TypeError, "support float16, bfloat16 and float32"),
        (dict(w_dtype=torch.float16), TypeError, "must match"),
        (dict(a_shape=(4, 31)), ValueError, "shape mismatch"),
        (dict(b_shape=(15, 4)), ValueError, r"lora_B is \(15, 4\), expected \(16, 4\)"),
    ],
)
def test_clear_errors(change, error, message):
    x = torch.randn(3, 32, dtype=change.get("x_dtype", torch.float32), device=DEVICE)
    w = torch.randn(16, 32, dtype=change.get("w_dtype", x.dtype), device=DEVICE)
    a = torch.randn(*change.get("a_shape", (4, 32)), device=DEVICE)
    b = torch.randn(*change.get("b_shape", (16, 4)), device=DEVICE)
    with pytest.raises(error, match=message):
        fused_lora_linear(x, w, None, LoRACall(a, b, 1.0))


@pytest.mark.skipif(DEVICE != "cuda", reason="large shapes need a GPU")
@pytest.mark.parametrize("M", [1, 333, 4096])
@pytest.mark.parametrize("variant", ["plain", "qkv_q_and_v", "gqa_unequal_k_off"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_large_shapes_on_gpu(M, variant, dtype):
    with large_variant(variant) as name:
        run_case(M, 3072, name, 16, dtype, 0.05)


@contextlib.contextmanager
def large_variant(variant: str, scale: int = 64):
    """``variant`` with every part ×``scale`` (qkv 3072 → (1024·3), GQA (2560, 768, 768)),
    registered in VARIANTS under the name this yields while the block runs."""
    N, parts = VARIANTS[variant]
    big_parts = None if parts is None else lora.LoRAParts(
        tuple(s * scale for s in parts.split_sizes), parts.enabled)
    name = f"{variant}_large"
    VARIANTS[name] = (N * scale, big_parts)
    try:
        yield name
    finally:
        del VARIANTS[name]


def test_autotune_off_pins_one_config_per_role_and_seed_is_not_specialised():
    """LORAKERNELS_AUTOTUNE=0 (read at import, compiled path): each role has its default only."""
    code = ("from lorakernels.ops import fused_gemm as g, lora_linear as l\n"
            "print(len(g.GEMM_CONFIGS), len(g.NF4_GEMM_CONFIGS), len(l.ROW_CONFIGS))\n"
            "print(all(k.params[k.arg_names.index('seed')].do_not_specialize for k in "
            "(l._lora_shrink_kernel, l._dropout_mask_kernel)))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    counts = [subprocess.run([sys.executable, "-c", code],
                             env={**env, "LORAKERNELS_AUTOTUNE": value},
                             capture_output=True, text=True, check=True,
                             timeout=subprocess_timeout(120)).stdout.split()
              for value in ("0", "1")]
    assert counts[0] == ["1", "1", "1", "True"]
    assert all(1 < int(n) for n in counts[1][:3]) and counts[1][3] == "True"


@pytest.mark.parametrize("M, K", [(4096, 3072), (16384, 8192), (4096, 9216), (1, 3072), (700, 96)])
def test_b3_splits_rows_to_fill_the_gpu(M, K):
    """B3 launches >= 2 programs per SM (264 on 132 SMs) where M allows, any BLOCK_K."""
    splits, rows = b3_splits(M, K, 264)
    assert rows % 128 == 0 and (splits - 1) * rows < M <= splits * rows
    if M >= 4096:
        assert splits * triton.cdiv(K, 128) >= 264


def test_deterministic_mode_reduces_dA_and_dB_from_partials(monkeypatch):
    """torch.use_deterministic_algorithms(True): pinned configs, dB from per-block partials."""
    monkeypatch.setattr(lora_linear_ops, "B3_MAX_BLOCK", 32)
    monkeypatch.setattr(lora_linear_ops, "_b3_programs", lambda device: 64)
    torch.manual_seed(0)
    x, w = torch.randn(129, 96, device=DEVICE), torch.randn(40, 96, device=DEVICE)
    a0, b0 = torch.randn(8, 96, device=DEVICE), torch.randn(40, 8, device=DEVICE)
    grads = []
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        for _ in range(2):
            a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
            y = fused_lora_linear(x, w, None, LoRACall(a, b, 0.5, 0.1), seed=3)
            y.square().sum().backward()
            grads.append((a.grad, b.grad))
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert all(torch.equal(g1, g2) for g1, g2 in zip(*grads))
    a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    x_dropped = x * dropout_mask(129, 96, 0.1, 3, x.device)
    lora_linear_reference(x, w, None, a, b, 0.5, lora_input=x_dropped).square().sum().backward()
    assert_rel_close(grads[0][0], a.grad, 1e-4, "dA")
    assert_rel_close(grads[0][1], b.grad, 1e-4, "dB")
