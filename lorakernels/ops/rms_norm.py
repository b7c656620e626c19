"""Fused RMSNorm: y = w · (x·rsqrt(mean(x²) + eps)), one launch forward, one backward.

Numerics are Phi3RMSNorm's (``reference.rms_norm_reference``) rounding point for rounding point:
the norm is computed in fp32, rounded to x's dtype, then multiplied by the
weight in fp32 and rounded once to the result dtype (x's and w's promoted). A
product of two bf16 or fp16 values is exact in fp32, so that is exactly what
eager PyTorch does; only the fp32 reduction order of mean(x²) differs.

Forward  ``_rms_norm_forward_kernel``: BLOCK_M rows per program (several when
         rows are short), each row whole in one BLOCK_N tile; stores y and rstd.
Backward ``_rms_norm_backward_kernel``: a fixed number of programs (one per SM)
         each walks a contiguous run of rows, writes dx and accumulates its
         share of dw = Σ_rows dy·normed in fp32 registers; the [programs, N]
         partial sums are reduced by one torch ``sum`` (deterministic, no atomics).
Saved for backward: x and the per-row rstd (fp32), plus a reference to w.
"""
from typing import Tuple

import torch
import triton
import triton.language as tl

from .triton_utils import INTERPRETING, cast_to, num_warps_for, on_device, round_to

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# A row is one register tile. ptxas (sm_90): no spills up to 8192 (Phi-3-medium's 5120),
# 32 bytes in the backward at 16384, about 0.5 KB at 32768; longer rows are refused.
MAX_ROW = 32768


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _rms_norm_forward_kernel(
    # Pointers
    x_ptr, w_ptr, y_ptr, rstd_ptr,
    # Shapes
    n_rows, n_cols,
    # Scalars
    eps,
    # Strides
    stride_xm, stride_xn, stride_ym, stride_yn,
    # Meta-parameters
    EMULATE_BF16_RTNE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """y[m] = w·round_x(x[m]·rstd[m]) rounded to y's dtype; rstd[m] = rsqrt(mean(x[m]²) + eps)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols < n_cols)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask,
                other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    # Phi3RMSNorm's ``normed.to(x.dtype)``: round to x's dtype before the weight.
    normed = round_to(x * rstd[:, None], x_ptr.dtype.element_ty, EMULATE_BF16_RTNE)
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    y = cast_to(w[None, :] * normed, y_ptr.dtype.element_ty, EMULATE_BF16_RTNE)
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn, y, mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _rms_norm_backward_kernel(
    # Pointers
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr,
    # Shapes
    n_rows, n_cols, rows_per_program,
    # Strides
    stride_dym, stride_dyn, stride_xm, stride_xn, stride_dxm, stride_dxn,
    # Meta-parameters
    COMPUTE_DW: tl.constexpr, EMULATE_BF16_RTNE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dx = rstd·(dn - n·mean(dn·n)) with n = x·rstd, dn = dy·w; dw_partial[pid] = Σ dy·round_x(n).

    The rounding of n to x's dtype passes the gradient straight through (as
    autograd's cast does); everything here is fp32 and rounded once at the store.
    """
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask,
                    other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyn, mask=mask,
                     other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        normed = x * rstd[:, None]
        if COMPUTE_DW:
            dw += dy * round_to(normed, x_ptr.dtype.element_ty, EMULATE_BF16_RTNE)
        dn = dy * w[None, :]
        mean_dn_n = tl.sum(dn * normed, axis=1) / n_cols
        dx = (dn - normed * mean_dn_n[:, None]) * rstd[:, None]
        tl.store(dx_ptr + rows[:, None] * stride_dxm + cols[None, :] * stride_dxn,
                 cast_to(dx, dx_ptr.dtype.element_ty, EMULATE_BF16_RTNE), mask=mask)
    if COMPUTE_DW:
        tl.store(dw_partial_ptr + pid * n_cols + cols, tl.sum(dw, axis=0), mask=col_ok)


# ----------------------------------------------------------------------------- launchers


def rms_norm_settings(n_cols: int) -> Tuple[dict, int]:
    """(constexprs, num_warps): the whole row in one power-of-two block, several short rows a
    program."""
    block_n = triton.next_power_of_2(n_cols)
    if block_n > MAX_ROW:
        raise ValueError(f"rms_norm supports rows of at most {MAX_ROW} elements, got {n_cols}")
    block_m = max(1, min(16, 2048 // block_n))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n), num_warps_for(block_m * block_n)


def _backward_programs(device: torch.device, n_tiles: int) -> int:
    """One program per SM keeps the dw partials to [SMs, N]; the interpreter runs a few."""
    if device.type == "cuda":
        programs = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        programs = 4
    return max(1, min(programs, n_tiles))


def _forward_outputs(x: torch.Tensor, weight: torch.Tensor, eps: float
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    M, N = x.shape
    y = torch.empty((M, N), device=x.device, dtype=torch.promote_types(x.dtype, weight.dtype))
    return y, torch.empty(M, device=x.device, dtype=torch.float32)


@torch.library.custom_op("lorakernels::rms_norm_forward", mutates_args=())
def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """x [M, N] (any strides), weight [N] → y [M, N] in promote(x, w) dtype, rstd [M] fp32."""
    y, rstd = _forward_outputs(x, weight, eps)
    M, N = x.shape
    if M == 0:
        return y, rstd
    _check_device(x, weight)
    meta, warps = rms_norm_settings(N)
    grid = (triton.cdiv(M, meta["BLOCK_M"]),)
    with on_device(x):
        _rms_norm_forward_kernel[grid](
            x, weight, y, rstd, M, N, eps, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
            EMULATE_BF16_RTNE=INTERPRETING, num_warps=warps, **meta,
        )
    return y, rstd


def _backward_programs_of(x: torch.Tensor) -> Tuple[int, int]:
    """(programs, rows per program) of the backward for x [M, N]."""
    M, N = x.shape
    block_m = rms_norm_settings(N)[0]["BLOCK_M"]
    n_tiles = triton.cdiv(M, block_m)
    rows_per_program = triton.cdiv(n_tiles, _backward_programs(x.device, n_tiles)) * block_m
    return triton.cdiv(M, rows_per_program), rows_per_program


def _backward_outputs(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                      rstd: torch.Tensor, compute_dw: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    M, N = x.shape
    dx = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0:
        return dx, torch.zeros((1, N) if compute_dw else (1,), device=x.device,
                               dtype=torch.float32)
    programs = _backward_programs_of(x)[0]
    partial = torch.empty((programs, N) if compute_dw else (1,), device=x.device,
                          dtype=torch.float32)
    return dx, partial


@torch.library.custom_op("lorakernels::rms_norm_backward", mutates_args=())
def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                      compute_dw: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """dy, x [M, N] (any strides), rstd [M] → dx [M, N] in x's dtype and dw's per-program
    partial sums [programs, N] fp32 (a placeholder [1] without ``compute_dw``)."""
    dx, partial = _backward_outputs(dy, x, weight, rstd, compute_dw)
    M, N = x.shape
    if M == 0:
        return dx, partial
    meta, warps = rms_norm_settings(N)
    programs, rows_per_program = _backward_programs_of(x)
    with on_device(x):
        _rms_norm_backward_kernel[(programs,)](
            dy, x, weight, rstd, dx, partial, M, N, rows_per_program,
            dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), dx.stride(0), dx.stride(1),
            COMPUTE_DW=compute_dw, EMULATE_BF16_RTNE=INTERPRETING, num_warps=warps, **meta,
        )
    return dx, partial


# Fake tensors (a memory plan, torch.compile's tracing): the outputs, allocated as above.
rms_norm_forward.register_fake(_forward_outputs)
rms_norm_backward.register_fake(_backward_outputs)


# ----------------------------------------------------------------------------- autograd


def _check_device(x: torch.Tensor, weight: torch.Tensor):
    """Where the kernels run: checked by the real op only (fake tensors run nothing)."""
    if not (x.is_cuda or INTERPRETING) or weight.device != x.device:
        raise RuntimeError(
            "rms_norm needs x and weight on one CUDA device (or CPU under TRITON_INTERPRET=1); "
            f"got x on {x.device}, weight on {weight.device}")


def _check_inputs(x: torch.Tensor, weight: torch.Tensor):
    for name, t in (("x", x), ("weight", weight)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"rms_norm supports float16, bfloat16 and float32; {name} is {t.dtype}")
    if x.dim() == 0:
        raise ValueError("rms_norm needs x [..., N], got a scalar")
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rms_norm: x {tuple(x.shape)} needs weight [{x.shape[-1]}], "
                         f"got weight {tuple(weight.shape)}")


def _save_for_backward(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _rms_norm_grad(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    need_dw = ctx.needs_input_grad[1]
    dx, partial = rms_norm_backward(dy, x, weight, rstd, need_dw)
    return dx, partial.sum(0).to(weight.dtype) if need_dw else None, None


# Saved for backward: x, rstd and a reference to w.
rms_norm_forward.register_autograd(_rms_norm_grad, setup_context=_save_for_backward)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Phi3RMSNorm on the Triton kernels: x [..., N], weight [N] → [..., N]."""
    _check_inputs(x, weight)
    y, _ = rms_norm_forward(x.reshape(-1, x.shape[-1]), weight, float(eps))
    return y.view(x.shape)
