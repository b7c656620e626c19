"""DoRA inside the fused paths (Triton kernels, their cuBLAS safety net, oneDNN) against the
direct reference: outputs and every gradient (x, bias, A, B, magnitude).

The fused paths take n from the algebra (``dora_weight_norm``) and apply m/n inside the
kernels: F2's epilogue, B1's dy (with m's gradient reduced there from the saved output)
and B2's K-loop. The reference materialises W + s·B·A for its norm and lets autograd
differentiate (m/n)⊙z: two different computations. Tolerances are test_lora_kernels.py's
(fp32 1e-5, bf16 2e-2 of the largest reference value); the magnitude is moved ±10% off n so
that m/n ≠ 1 and a missing scale is an error of order 0.1.
"""
import pytest
import torch

from lorakernels.dora import row_sq_norms
from lorakernels.functional import dora_weight_norm
from lorakernels.lora_call import LoRACall
from lorakernels.ops.lora_linear import fused_lora_linear
from lorakernels.ops.onednn_lora_linear import ONEDNN_AVAILABLE, onednn_lora_linear
from lorakernels.reference import dora_linear_reference
from test_lora_kernels import DEVICE, REL_TOL, assert_rel_close, case_inputs, large_variant
from conftest import use_settings

GRADS = ("dx", "dbias", "dA", "dB", "dm")


def dora_inputs(M, K, variant, r, dtype, bias, nf4=False):
    """x, the kernels' weight, the reference's dense weight, bias, A, B, magnitude, dy, parts."""
    case = case_inputs(M, K, variant, r, dtype, bias=bias, nf4=nf4, nf4_fused_max_rows=M,
                       b_std=0.3)
    magnitude = case.weight.float().norm(dim=1) * (1 + 0.1 * case.make(case.weight.shape[0]))
    return (case.x, case.kernel_weight, case.weight, case.bias, case.lora_A, case.lora_B,
            magnitude, case.dy, case.parts)


def check_against_reference(run, M, K, variant, r, dtype, bias, nf4=False):
    """``run(x, weight, bias, A, B, scaling, parts, magnitude, norm)`` vs the direct reference."""
    x, kernel_weight, weight, b, lora_A, lora_B, magnitude, dy, parts = dora_inputs(
        M, K, variant, r, dtype, bias, nf4)
    scaling = 2.0 / r
    norm = dora_weight_norm(kernel_weight, row_sq_norms(kernel_weight), lora_A, lora_B, scaling,
                            parts)
    leaves = [t.clone().requires_grad_() if t is not None else None
              for t in (x, b, lora_A, lora_B, magnitude)]
    y = run(leaves[0], kernel_weight, leaves[1], leaves[2], leaves[3], scaling, parts, leaves[4],
            norm)
    y.backward(dy)

    ref_leaves = [t.detach().float().clone().requires_grad_() if t is not None else None
                  for t in (x, b, lora_A, lora_B, magnitude)]
    rx, rb, rA, rB, rm = ref_leaves
    y_ref = dora_linear_reference(rx, weight.float(), rb,
                                  LoRACall(rA, rB, scaling, parts=parts, magnitude=rm))
    y_ref.backward(dy.float())

    rel = REL_TOL[dtype]
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert_rel_close(y, y_ref, rel, "y")
    for name, got, want in zip(GRADS, leaves, ref_leaves):
        if got is not None:
            assert got.grad.dtype == got.dtype, name
            assert_rel_close(got.grad, want.grad, rel, name)


def dora_call(lora_A, lora_B, scaling, parts, magnitude, norm, dropout_p=0.0):
    return LoRACall(lora_A, lora_B, scaling, dropout_p, parts, magnitude, norm)


def triton_dora(x, weight, bias, *dora):
    return fused_lora_linear(x, weight, bias, dora_call(*dora))


def onednn_dora(x, weight, bias, *dora):
    return onednn_lora_linear(x, weight, bias, dora_call(*dora))


@pytest.mark.parametrize("gemm", ["fused", "cublas"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", ["plain", "qkv_q_and_v", "gate_up"])
def test_triton_dora_matches_the_direct_reference(monkeypatch, gemm, bias, dtype, variant):
    # 129 rows: B1's m-gradient is reduced across several row blocks.
    use_settings(monkeypatch, gemm=gemm)
    check_against_reference(triton_dora, 129, 96, variant, 8, dtype, bias)


@pytest.mark.skipif(DEVICE != "cuda", reason="large shapes need a GPU")
@pytest.mark.parametrize("gemm", ["fused", "cublas"])
@pytest.mark.parametrize("M", [333, 4096])
@pytest.mark.parametrize("variant", ["plain", "qkv_q_and_v"])
def test_triton_dora_large_shapes_on_gpu(monkeypatch, gemm, M, variant):
    use_settings(monkeypatch, gemm=gemm)
    with large_variant(variant) as name:
        check_against_reference(triton_dora, M, 3072, name, 16, torch.bfloat16, False)


def test_triton_dora_on_an_nf4_base():
    check_against_reference(triton_dora, 16, 128, "gqa_unequal_k_off", 4, torch.bfloat16,
                            bias=False, nf4=True)


def test_triton_dora_in_deterministic_mode_is_bit_reproducible():
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        check_against_reference(triton_dora, 129, 96, "qkv_q_and_v", 8, torch.float32, True)
        x, weight, _, b, lora_A, lora_B, magnitude, dy, parts = dora_inputs(
            129, 96, "plain", 8, torch.float32, True)
        norm = dora_weight_norm(weight, row_sq_norms(weight), lora_A, lora_B, 0.25)
        grads = []
        for _ in range(2):
            m = magnitude.clone().requires_grad_()
            triton_dora(x, weight, b, lora_A, lora_B, 0.25, None, m, norm).backward(dy)
            grads.append(m.grad)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert torch.equal(*grads)


ON_ONEDNN = pytest.mark.skipif(DEVICE != "cpu" or not ONEDNN_AVAILABLE,
                               reason="the oneDNN path is for CPU tensors, in a build with it")


@ON_ONEDNN
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("variant", ["plain", "qkv_q_and_v", "gate_up"])
def test_onednn_dora_matches_the_direct_reference(bias, variant):
    check_against_reference(onednn_dora, 129, 96, variant, 8, torch.float32, bias)


@pytest.mark.parametrize("run", [triton_dora, pytest.param(onednn_dora, marks=ON_ONEDNN)],
                         ids=["triton", "onednn"])
def test_a_zero_magnitude_column_gets_a_finite_zero_gradient(run):
    """y keeps no unscaled copy: a column with m_j = 0 has lost z, so dm_j is 0 (documented)."""
    x, weight, _, b, lora_A, lora_B, magnitude, dy, _ = dora_inputs(
        33, 64, "plain", 4, torch.float32, True)
    magnitude[3] = 0.0
    m = magnitude.clone().requires_grad_()
    norm = dora_weight_norm(weight, row_sq_norms(weight), lora_A, lora_B, 0.5)
    y = run(x, weight, b, lora_A, lora_B, 0.5, None, m, norm)
    y.backward(dy)
    torch.testing.assert_close(y[:, 3], b[3].expand(33))
    assert torch.isfinite(m.grad).all() and m.grad[3] == 0 and (m.grad != 0).sum() == 39


@pytest.mark.parametrize("run", [fused_lora_linear,
                                 pytest.param(onednn_lora_linear, marks=ON_ONEDNN)],
                         ids=["triton", "onednn"])
def test_fused_dora_refuses_dropout(run):
    x, weight, _, _, lora_A, lora_B, magnitude, _, _ = dora_inputs(8, 32, "plain", 4, torch.float32,
                                                                   False)
    norm = magnitude.clone()
    args = (7,) if run is fused_lora_linear else ()
    with pytest.raises(ValueError, match="lora_dropout 0"):
        run(x, weight, None, dora_call(lora_A, lora_B, 0.5, None, magnitude, norm, 0.1), *args)
