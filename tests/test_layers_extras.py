"""What goes beyond loralib: unequal split sizes, rsLoRA, clear errors, the backend switch."""

import pytest
import torch
import torch.nn.functional as F

import lorakernels as lora
from lorakernels.functional import selected_backend
from lorakernels.ops.onednn_lora_linear import ONEDNN_AVAILABLE
from lorakernels.reference import lora_linear_reference, merged_lora_linear_reference
from conftest import use_settings


def test_unequal_split_sizes_equal_separate_linear_layers():
    """A GQA qkv (16, 4, 4) with LoRA on q and v equals three separate projections."""
    torch.manual_seed(0)
    sizes, enabled, r = (16, 4, 4), (True, False, True), 3
    fused = lora.MergedLinear(12, 24, r=r, lora_alpha=6, enable_lora=enabled, split_sizes=sizes)
    assert fused.lora_A.shape == (2 * r, 12) and fused.lora_B.shape == (20, r)
    with torch.no_grad():
        fused.lora_B.normal_()
    q = lora.Linear(12, 16, r=r, lora_alpha=6)
    k = lora.Linear(12, 4)
    v = lora.Linear(12, 4, r=r, lora_alpha=6)
    with torch.no_grad():
        for part, rows in ((q, slice(0, 16)), (k, slice(16, 20)), (v, slice(20, 24))):
            part.weight.copy_(fused.weight[rows])
            part.bias.copy_(fused.bias[rows])
        q.lora_A.copy_(fused.lora_A[:r]), q.lora_B.copy_(fused.lora_B[:16])
        v.lora_A.copy_(fused.lora_A[r:]), v.lora_B.copy_(fused.lora_B[16:])
    x = torch.randn(2, 5, 12)
    expected = torch.cat([q(x), k(x), v(x)], dim=-1)
    torch.testing.assert_close(fused(x), expected)
    fused.eval()
    torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-5)


def test_phi3_medium_qkv_shapes():
    layer = lora.MergedLinear(
        64, 96, r=4, enable_lora=[True, True, True], split_sizes=[64, 16, 16], bias=False
    )
    assert layer.lora_B.shape == (96, 4) and layer.lora_A.shape == (12, 64)


def test_rslora_scaling():
    assert lora.Linear(8, 8, r=16, lora_alpha=32).scaling == 2.0
    assert lora.Linear(8, 8, r=16, lora_alpha=32, use_rslora=True).scaling == 8.0
    assert lora.MergedLinear(8, 8, r=4, lora_alpha=2, enable_lora=[True],
                             use_rslora=True).scaling == 1.0


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: lora.Linear(4, 4, r=-1), "r must be a non-negative integer"),
        (lambda: lora.Embedding(4, 4, r=-2), "r must be a non-negative integer"),
        (lambda: lora.Linear(4, 4, r=2, lora_dropout=1.0), r"lora_dropout must be in \[0, 1\)"),
        (lambda: lora.Linear(4, 4, r=2, lora_dropout=-0.1), r"lora_dropout must be in \[0, 1\)"),
        (lambda: lora.MergedLinear(4, 10, r=2, enable_lora=[True, False, True]),
         "must divide out_features"),
        (lambda: lora.MergedLinear(4, 10, r=2, enable_lora=[True, True], split_sizes=[4, 4]),
         "sum to 8, not out_features"),
        (lambda: lora.MergedLinear(4, 10, r=2, enable_lora=[True, True], split_sizes=[5, 4, 1]),
         "same length"),
        (lambda: lora.MergedLinear(4, 10, r=2, enable_lora=[True, True], split_sizes=[12, -2]),
         "positive"),
        (lambda: lora.Conv2d(2, 2, (3, 3), r=1), "kernel_size must be an int"),
    ],
)
def test_impossible_arguments_raise_value_error(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize("helper", [lora.mark_only_lora_as_trainable, lora.lora_state_dict])
def test_unknown_bias_mode_is_a_value_error(helper):
    with pytest.raises(ValueError, match="bias must be one of none, all, lora_only"):
        helper(lora.Linear(4, 4, r=1), bias="some")


def test_reference_matches_the_formula_with_a_dropout_mask():
    torch.manual_seed(0)
    x, w, b = (torch.randn(7, 12, dtype=torch.float64), torch.randn(5, 12, dtype=torch.float64),
               torch.randn(5, dtype=torch.float64))
    a, bb = torch.randn(3, 12, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    mask = (torch.rand(7, 12) > 0.25).double() / 0.75
    y = lora_linear_reference(x, w, b, a, bb, 0.5, lora_input=x * mask)
    expected = x @ w.T + b + 0.5 * ((x * mask) @ a.T) @ bb.T
    torch.testing.assert_close(y, expected)


def test_merged_reference_equals_linear_with_the_padded_update():
    torch.manual_seed(0)
    parts = lora.LoRAParts((6, 2, 2), (False, True, True))
    x, w = torch.randn(4, 8, dtype=torch.float64), torch.randn(10, 8, dtype=torch.float64)
    a, b = torch.randn(2 * 3, 8, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    padded = torch.zeros(10, 8, dtype=torch.float64)
    padded[6:8] = b[:2] @ a[:3]
    padded[8:10] = b[2:] @ a[3:]
    y = merged_lora_linear_reference(x, w, None, a, b, 2.0, parts)
    torch.testing.assert_close(y, x @ (w + 2.0 * padded).T)


def test_reference_keeps_fp32_adapters_over_a_bf16_base_like_peft():
    torch.manual_seed(0)
    x, w = torch.randn(4, 16).bfloat16(), torch.randn(8, 16).bfloat16()
    a, b = torch.randn(2, 16), torch.randn(8, 2)
    y = lora_linear_reference(x, w, None, a, b, 1.0)
    assert y.dtype == torch.bfloat16
    expected = (F.linear(x, w).float() + (x.float() @ a.T) @ b.T).bfloat16()
    torch.testing.assert_close(y, expected)


def test_backend_switch(monkeypatch):
    x = torch.zeros(1)
    use_settings(monkeypatch, backend="auto")
    # auto on CPU tensors: oneDNN for fp32 (where torch has it), the reference otherwise
    assert selected_backend(x) == ("onednn" if ONEDNN_AVAILABLE else "eager")
    assert selected_backend(x.bfloat16()) == "eager"
    use_settings(monkeypatch, backend="triton")
    assert selected_backend(x) == "triton"
