"""The safety net against cuBLAS: F2 and B2 as torch's GEMM plus a small low-rank epilogue.

    out = x·w (+ bias)            torch (cuBLAS on a GPU)
    out += s·(p·q̂ᵀ) ⊙ D           ``_lowrank_epilogue_kernel``, in place

With DoRA's column scale c the bias moves into the epilogue, out = c⊙(out + s·(p·q̂ᵀ)) + bias,
and B2's scale on dy's columns is one elementwise product before the GEMM (dy⊙c).

The epilogue computes its tile with ``gemm_lowrank``'s own helpers (``lowrank_tile``: the
B̂ gather of fused projections, the mask's bits), so the low-rank term is the fused
kernel's exactly; only the rounding differs (out is rounded after the base GEMM and again
after the epilogue, where the fused kernel rounds once).

Which path F2 and B2 take (``lowrank_gemm``) is ``settings.current().gemm``
(``LORAKERNELS_GEMM`` by default). ``auto``: on CUDA, for a dense weight, the first call per
(role, M bucket, N, K, dtype, dropout) times both paths and keeps the faster for the
process (logged once at debug level); on CPU (the interpreter), for an NF4 weight's 4-bit
tiles, with the backend forced to ``triton`` or under
torch.use_deterministic_algorithms(True), the fused kernel. ``fused`` / ``cublas`` force
one path (an NF4 weight's 4-bit tiles always run fused: torch has no GEMM for them).
"""
import logging
from typing import Callable, Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import settings
from .gemm_lowrank import NF4Operand, gemm_lowrank, lowrank_tile, m_bucket
from .triton_utils import INTERPRETING, autotune_configs, dot_precision

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- kernel


@triton.jit(do_not_specialize=["M"])
def _lowrank_epilogue_kernel(
    out_ptr, p_ptr, q_ptr, q_row_ptr, q_off_ptr, mask_ptr, col_scale_ptr, bias_ptr,
    M, N, R, Q_RANK, scaling, M_BUCKET, stride_om, stride_on, stride_q_row, stride_q_rank,
    P: tl.constexpr, HAS_DROPOUT: tl.constexpr, GATHER_Q: tl.constexpr,
    HAS_COL_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
    CAST_FP32: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[M, N] = c⊙(out + s·(p[M, R]·q̂[N, R]ᵀ) ⊙ D[M, N]) + bias, in out's dtype, in fp32
    (c, bias: HAS_COL_SCALE, HAS_BIAS; else 1 and 0)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = lowrank_tile(p_ptr, q_ptr, q_row_ptr, q_off_ptr, rows, cols, M, N, R, Q_RANK,
                       stride_q_row, stride_q_rank, scaling, mask_ptr, P, HAS_DROPOUT,
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


def add_lowrank(out: torch.Tensor, p: torch.Tensor, q: torch.Tensor,
                q_index: Optional[Tuple[torch.Tensor, torch.Tensor]], q_rank: int, block_r: int,
                scaling: float, dropout_p: float = 0.0, mask: Optional[torch.Tensor] = None,
                col_scale: Optional[torch.Tensor] = None,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out [M, N] = c⊙(out + s·(p·q̂ᵀ)⊙D) + bias in place; the arguments as ``gemm_lowrank``
    takes them (c = ``col_scale``, 1 when None)."""
    M, N = out.shape
    q_row, q_off = q_index if q_index is not None else (q, q)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
    _lowrank_epilogue[grid](
        out, p, q, q_row, q_off, mask if mask is not None else out,
        col_scale if col_scale is not None else out, bias if bias is not None else out,
        M, N, p.shape[1], q_rank, scaling, m_bucket(M), out.stride(0), out.stride(1),
        q.stride(0), q.stride(1), P=dropout_p, HAS_DROPOUT=dropout_p > 0,
        GATHER_Q=q_index is not None, HAS_COL_SCALE=col_scale is not None,
        HAS_BIAS=bias is not None, CAST_FP32=INTERPRETING, PRECISION=dot_precision(out.dtype),
        BLOCK_R=block_r,
    )
    return out


def cublas_lowrank(x: torch.Tensor, w: torch.Tensor, p: torch.Tensor, q: torch.Tensor,
                   q_index: Optional[Tuple[torch.Tensor, torch.Tensor]], q_rank: int,
                   block_r: int, scaling: float, bias: Optional[torch.Tensor] = None,
                   dropout_p: float = 0.0, mask: Optional[torch.Tensor] = None,
                   col_scale: Optional[torch.Tensor] = None,
                   k_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``gemm_lowrank``'s result for a dense w: torch's GEMM (+ bias), then ``add_lowrank``."""
    if k_scale is not None:
        x = (x * k_scale).to(x.dtype)
    if col_scale is not None:  # the bias comes after the scale: the epilogue adds it
        return add_lowrank(x @ w, p, q, q_index, q_rank, block_r, scaling, dropout_p, mask,
                           col_scale, bias)
    out = x @ w if bias is None else torch.addmm(bias.to(x.dtype), x, w)
    return add_lowrank(out, p, q, q_index, q_rank, block_r, scaling, dropout_p, mask)


# ----------------------------------------------------------------------------- the chooser


# (role, M bucket, N, K, dtype, dropout, DoRA) -> "fused" or "cublas", for the process.
_CHOICES: Dict[tuple, str] = {}
PATHS = {"fused": gemm_lowrank, "cublas": cublas_lowrank}


def _times(x: torch.Tensor) -> bool:
    """Whether ``auto`` may time the two paths: on a GPU, unless the fused path is forced or
    torch's deterministic mode asks that results not depend on a timing (the paths round
    differently)."""
    return (x.is_cuda and settings.current().backend != "triton"
            and not torch.are_deterministic_algorithms_enabled())


def time_ms(fn: Callable[[], torch.Tensor]) -> float:
    """A path's time in ms: a few reps (the first call also autotunes the fused kernel)."""
    return triton.testing.do_bench(fn, warmup=5, rep=20)


def pick_gemm(role: str, x: torch.Tensor, w, dropout_p: float, scaled: bool,
              candidates: Dict[str, Callable[[], torch.Tensor]]) -> str:
    """"fused" or "cublas" for this call; under ``auto`` on a GPU, timed once per key."""
    if isinstance(w, NF4Operand):
        return "fused"
    mode = settings.current().gemm
    if mode != "auto":
        return mode
    if not _times(x):
        return "fused"
    M, K = x.shape
    key = (role, m_bucket(M), w.shape[1], K, x.dtype, dropout_p > 0, scaled)
    choice = _CHOICES.get(key)
    if choice is None:
        times = {name: time_ms(fn) for name, fn in candidates.items()}
        choice = _CHOICES[key] = min(times, key=times.get)
        log.debug("%s %s: %s (%s)", role, key[1:], choice,
                  ", ".join(f"{name} {ms:.3f} ms" for name, ms in times.items()))
    return choice


def lowrank_gemm(role: str, x: torch.Tensor, w, p: torch.Tensor, q: torch.Tensor,
                 q_index: Optional[Tuple[torch.Tensor, torch.Tensor]], q_rank: int,
                 block_r: int, scaling: float, bias: Optional[torch.Tensor] = None,
                 dropout_p: float = 0.0, mask: Optional[torch.Tensor] = None,
                 col_scale: Optional[torch.Tensor] = None,
                 k_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F2 (role "F2") or B2 ("B2"): ``gemm_lowrank``'s result by the path ``pick_gemm`` picks."""
    args = (x, w, p, q, q_index, q_rank, block_r, scaling, bias, dropout_p, mask, col_scale,
            k_scale)
    candidates = {name: (lambda fn=fn: fn(*args)) for name, fn in PATHS.items()}
    scaled = col_scale is not None or k_scale is not None
    return PATHS[pick_gemm(role, x, w, dropout_p, scaled, candidates)](*args)
