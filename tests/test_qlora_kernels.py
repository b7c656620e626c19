"""QLoRA on the kernels: an NF4 base weight read in the GEMM's K-loop (few rows) or dequantised
into the shared scratch buffer (many rows), forward and backward, against the eager reference.

The reference gets the eagerly dequantised weight, so tolerances are test_lora_kernels.py's
(fp32 1e-5, bf16 2e-2): the in-K-loop tiles are rounded to the input dtype exactly as the
dequantisation kernel rounds, and a wrong nibble, absmax or orientation gives errors of order one.
"""
import dataclasses

import pytest
import torch

from lorakernels.functional import base_linear, lora_linear
from lorakernels.lora_call import LoRACall
from lorakernels.nf4 import NF4_FUSED_MAX_ROWS, dequantize_nf4_reference, quantize_nf4
from lorakernels.ops.nf4_matmul import nf4_matmul
from test_lora_kernels import DEVICE, REL_TOL, assert_rel_close, run_case
from conftest import use_settings

PATHS = {"in_k_loop": 1 << 30, "dequantised": 0}  # NF4Weight.fused_max_rows forcing each path


@pytest.fixture(params=sorted(PATHS))
def nf4_path(request):
    """The fused_max_rows that forces this path."""
    return PATHS[request.param]


@pytest.mark.parametrize("variant", ["plain", "gqa_unequal_k_off", "gate_up"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_over_nf4_both_paths(nf4_path, variant, dtype):
    run_case(7, 96, variant, 8, dtype, 0.1, nf4=True, nf4_fused_max_rows=nf4_path)


def test_default_dispatch_on_rows_and_odd_inner_dimension():
    run_case(5, 40, "qkv_q_and_v", 4, torch.bfloat16, 0.0, lead=(2,), nf4=True)  # 10 rows: K-loop
    run_case(129, 64, "plain", 16, torch.float32, 0.05, nf4=True)                # 129: dequantised


def _nf4_case(rows, n, k, dtype, seed=0, fused_max_rows=NF4_FUSED_MAX_ROWS):
    gen = torch.Generator().manual_seed(seed)
    q = quantize_nf4((torch.randn(n, k, generator=gen) * k ** -0.5).to(DEVICE).to(dtype))
    q = dataclasses.replace(q, fused_max_rows=fused_max_rows)
    x = torch.randn(rows, k, generator=gen).to(DEVICE).to(dtype)
    return q, x


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_base_linear_over_nf4(monkeypatch, nf4_path, backend, dtype):
    """No LoRA (a frozen 4-bit layer): y and dx equal the dense dequantised layer's."""
    use_settings(monkeypatch, backend=backend)
    q, x = _nf4_case(9, 48, 64, dtype, fused_max_rows=nf4_path)
    bias = torch.randn(48, device=DEVICE).to(dtype).requires_grad_()
    dense = dequantize_nf4_reference(q, dtype).float()
    xi = x.clone().requires_grad_()
    y = base_linear(xi, q, bias)
    dy = torch.randn_like(y)
    y.backward(dy)
    xr, br = x.float().requires_grad_(), bias.detach().float().requires_grad_()
    y_ref = torch.nn.functional.linear(xr, dense, br)
    y_ref.backward(dy.float())
    assert y.dtype == dtype
    for name, got, want in (("y", y, y_ref), ("dx", xi.grad, xr.grad),
                            ("dbias", bias.grad, br.grad)):
        assert_rel_close(got, want, REL_TOL[dtype], name)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_no_dense_weight_is_kept_for_backward(monkeypatch, nf4_path, backend):
    """Autograd holds x, S and the like, never a dequantised [N, K] weight: QLoRA's memory."""
    use_settings(monkeypatch, backend=backend)
    n, k, r = 64, 128, 4  # N·K = 8192 elements: no activation here has that many
    q, x = _nf4_case(3, n, k, torch.float32, fused_max_rows=nf4_path)
    lora_A = torch.randn(r, k, device=DEVICE, requires_grad=True)
    lora_B = torch.randn(n, r, device=DEVICE, requires_grad=True)
    saved = []

    def pack(tensor):
        saved.append((tuple(tensor.shape), tensor.dtype))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lora_linear(x, q, None, LoRACall(lora_A, lora_B, 1.0)) + base_linear(x, q, None)
    y.sum().backward()
    assert saved, "the hook saw nothing: the test would pass vacuously"
    dense = [s for s in saved if s[1].is_floating_point and torch.Size(s[0]).numel() >= n * k]
    assert not dense, f"dense weight-sized tensors saved for backward: {dense}"


def test_scratch_buffer_grows_and_stays_correct():
    """Layers of different sizes share one buffer: a smaller layer after a larger one (and back)."""
    small, x_small = _nf4_case(5, 32, 64, torch.float32, seed=1, fused_max_rows=0)
    large, x_large = _nf4_case(5, 96, 128, torch.float32, seed=2, fused_max_rows=0)
    for q, x in ((small, x_small), (large, x_large), (small, x_small)):
        got = nf4_matmul(x, q, transposed=True)
        assert_rel_close(got, x @ dequantize_nf4_reference(q, torch.float32).t(), 1e-5, "y")


def test_nf4_weight_dtype_must_match_input():
    q, x = _nf4_case(3, 32, 64, torch.bfloat16)
    with pytest.raises(TypeError, match="must match"):
        lora_linear(x.float(), q, None, LoRACall(torch.randn(4, 64), torch.randn(32, 4), 1.0))


@pytest.mark.skipif(DEVICE != "cuda", reason="Phi-3-mini shapes need a GPU")
@pytest.mark.parametrize("rows", [16, 333, 4096])
def test_phi3_mini_shapes_on_gpu(rows):
    """qkv 3072 → 9216 in bf16 on the default dispatch (K-loop at 16 rows, dequantised above)."""
    q, x = _nf4_case(rows, 9216, 3072, torch.bfloat16)
    lora_A = (torch.randn(16, 3072, device=DEVICE) / 3072 ** 0.5).requires_grad_()
    lora_B = torch.randn(9216, 16, device=DEVICE).requires_grad_()
    xi = x.clone().requires_grad_()
    y = lora_linear(xi, q, None, LoRACall(lora_A, lora_B, 2.0))
    dy = torch.randn_like(y)
    y.backward(dy)
    ref = [t.detach().float().requires_grad_() for t in (x, lora_A, lora_B)]
    y_ref = lora_linear(ref[0], dequantize_nf4_reference(q, torch.float32), None,
                        LoRACall(ref[1], ref[2], 2.0))
    y_ref.backward(dy.float())
    assert_rel_close(y, y_ref, REL_TOL[torch.bfloat16], "y")
    for name, got, want in zip(("dx", "dA", "dB"), (xi, lora_A, lora_B), ref):
        assert_rel_close(got.grad, want.grad, REL_TOL[torch.bfloat16], name)
