"""The cuBLAS path of F2 and B2: torch's GEMM, then the low-rank term added by a small kernel.

    out = x·w (+ bias)            torch (cuBLAS on a GPU)
    out += s·(p·q̂ᵀ) ⊙ D           ``_lowrank_epilogue_kernel``, in place

With DoRA's column scale c the bias moves into the epilogue, out = c⊙(out + s·(p·q̂ᵀ)) + bias,
and B2's scale on dy's columns is one elementwise product before the GEMM (dy⊙c).

The epilogue computes its tile with the fused GEMM's own helper (``lowrank_tile``: the
B̂ gather of fused projections, the mask's bits), so the low-rank term is the fused
kernel's exactly; only the rounding differs (out is rounded after the base GEMM and again
after the epilogue, where the fused kernel rounds once). Which of the two paths runs is
``gemm_path.py``'s choice.
"""
from typing import List, Optional

import torch
import triton
import triton.language as tl

from .lowrank_term import LowRank, lowrank_tile
from .triton_utils import INTERPRETING, autotune_configs, dot_precision, m_bucket


# ----------------------------------------------------------------------------- kernel


@triton.jit(do_not_specialize=["M"])
def _lowrank_epilogue_kernel(
    # Pointers
    out_ptr, p_ptr, q_ptr, q_row_ptr, q_off_ptr, mask_ptr, col_scale_ptr, bias_ptr,
    # Shapes
    M, N, R, Q_RANK,
    # Scalars
    scaling,
    # Autotune key: M rounded up to a power of two
    M_BUCKET,
    # Strides
    stride_om, stride_on, stride_q_row, stride_q_rank,
    # Meta-parameters
    P: tl.constexpr, HAS_DROPOUT: tl.constexpr, GATHER_Q: tl.constexpr,
    HAS_COL_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
    CAST_FP32: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[M, N] = c⊙(out + s·(p[M, R]·q̂[N, R]ᵀ) ⊙ D[M, N]) + bias, in out's dtype, in fp32
    (c, bias: HAS_COL_SCALE, HAS_BIAS; else 1 and 0)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = lowrank_tile(p_ptr, q_ptr, q_row_ptr, q_off_ptr, mask_ptr, rows, cols, M, N, R,
                       Q_RANK, stride_q_row, stride_q_rank, scaling, P, HAS_DROPOUT,
                       GATHER_Q, CAST_FP32, PRECISION, BLOCK_R, out_ptr.dtype.element_ty)
    offsets = rows[:, None] * stride_om + cols[None, :] * stride_on
    in_bounds = (rows[:, None] < M) & (cols[None, :] < N)
    acc += tl.load(out_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    if HAS_COL_SCALE:
        acc *= tl.load(col_scale_ptr + cols, mask=cols < N, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=in_bounds)


def _epilogue_config(bm, bn, warps):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=1)


# Memory-bound (one read and one write of out; p and q̂ are small): BLOCK_N a multiple
# of 32 for the mask's words. Each compiles spill-free for sm_90 and sm_86
# (tests/gpu_compile_check.py).
EPILOGUE_CONFIGS = autotune_configs(
    [_epilogue_config(64, 128, 4), _epilogue_config(128, 128, 8), _epilogue_config(64, 64, 4)],
    _epilogue_config(64, 128, 4),
    [_epilogue_config(32, 32, 4)],
)
_lowrank_epilogue = triton.autotune(
    EPILOGUE_CONFIGS, key=["M_BUCKET", "N", "BLOCK_R", "HAS_DROPOUT", "GATHER_Q", "HAS_COL_SCALE",
                           "HAS_BIAS", "CAST_FP32"],
    restore_value=["out_ptr"],  # in place: each timed config starts from the same out
)(_lowrank_epilogue_kernel)


# ----------------------------------------------------------------------------- launchers


def add_lowrank(out: torch.Tensor, lowrank: LowRank, col_scale: Optional[torch.Tensor] = None,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out [M, N] = c⊙(out + s·(p·q̂ᵀ)⊙D) + bias in place (c = ``col_scale``, 1 when None)."""
    add_lowrank_op(out, [*lowrank.tensors(), col_scale, bias],
                   [lowrank.scaling, lowrank.dropout_p])
    return out


@torch.library.custom_op("lorakernels::add_lowrank", mutates_args=("out",))
def add_lowrank_op(out: torch.Tensor, tensors: List[Optional[torch.Tensor]],
                   scalars: List[float]) -> None:
    """``add_lowrank`` with its arguments as tensors and numbers: tensors
    [*LowRank.tensors(), col_scale, bias], scalars [scaling, dropout_p]."""
    lowrank = LowRank.of(tensors[:5], *scalars)
    col_scale, bias = tensors[5:]
    M, N = out.shape
    if M == 0 or N == 0:
        return
    p, q = lowrank.p, lowrank.q
    q_row, q_off = lowrank.q_index_pointers(q)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
    _lowrank_epilogue[grid](
        # Pointers
        out, p, q, q_row, q_off, lowrank.mask if lowrank.mask is not None else out,
        col_scale if col_scale is not None else out, bias if bias is not None else out,
        # Shapes, scalars, autotune key
        M, N, p.shape[1], q.shape[1], lowrank.scaling, m_bucket(M),
        # Strides
        out.stride(0), out.stride(1), q.stride(0), q.stride(1),
        # Meta-parameters
        P=lowrank.dropout_p, HAS_DROPOUT=lowrank.dropout_p > 0,
        GATHER_Q=lowrank.q_index is not None, HAS_COL_SCALE=col_scale is not None,
        HAS_BIAS=bias is not None, CAST_FP32=INTERPRETING, PRECISION=dot_precision(out.dtype),
        BLOCK_R=lowrank.block_r,
    )


@add_lowrank_op.register_fake
def _add_lowrank_fake(out, tensors, scalars) -> None:
    """In place: it allocates nothing."""


def cublas_plus_epilogue(x: torch.Tensor, w: torch.Tensor, lowrank: LowRank,
                         bias: Optional[torch.Tensor] = None,
                         col_scale: Optional[torch.Tensor] = None,
                         k_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``fused_gemm``'s result for a dense w: torch's GEMM (+ bias), then ``add_lowrank``."""
    if k_scale is not None:
        x = (x * k_scale).to(x.dtype)
    if col_scale is not None:  # the bias comes after the scale: the epilogue adds it
        return add_lowrank(x @ w, lowrank, col_scale, bias)
    out = x @ w if bias is None else torch.addmm(bias.to(x.dtype), x, w)
    return add_lowrank(out, lowrank)
