"""The base GEMM with the low-rank term fused in, shared by the LoRA kernels and the NF4 base.

    out[M, N] = c ⊙ (x[M, K]·w[K, N] + s·(p[M, R]·q̂[N, R]ᵀ) ⊙ D[M, N]) + bias

One Triton kernel, three uses: the LoRA forward's F2 (x·Wᵀ plus s·S·B̂ᵀ), the LoRA
backward's B2 (dy·W plus D⊙(dS·A)), and, without the low-rank term, a frozen 4-bit
layer's x·Ŵᵀ or dy·Ŵ (``nf4_matmul``). DoRA adds two per-column scales: c [N] on the
output (F2's m/n) and one on x's columns, the reduction index (B2's dy⊙(m/n)), so
neither a scaled weight nor a scaled copy of dy is ever written. ``w`` is a strided view
of a dense weight or an ``NF4Operand``, whose 4-bit tiles are dequantised in registers
inside the K-loop. The low-rank term (``LowRank``, ``lowrank_tile``) is ``lowrank_term.py``'s;
its dropout mask D is read back from the bits F1 wrote (``dropout_bits.py``).
"""
import dataclasses
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..nf4 import NF4Weight
from .lowrank_term import NO_LOWRANK_BLOCK_R, LowRank, lowrank_tile
from .nf4_dequant import nf4_gather
from .triton_utils import (INTERPRETING, MAX_CONFIGS, autotune_configs, cast_to, dot_precision,
                           m_bucket, max_shared_memory)


# ----------------------------------------------------------------------------- kernel


# M changes every batch: specialising it (== 1, divisible by 16) would compile new
# variants; the autotuner keys on M_BUCKET instead.
@triton.jit(do_not_specialize=["M"])
def _gemm_lowrank_kernel(
    # Pointers: the GEMM's operands (w: dense, or NF4 codes with their absmax), its output,
    # the low-rank term's p, q and q̂'s gather, then bias, D's bits and DoRA's two scales
    x_ptr, w_ptr, absmax_q_ptr, absmax_scale_ptr, out_ptr,
    p_ptr, q_ptr, q_row_ptr, q_off_ptr,
    bias_ptr, mask_ptr, col_scale_ptr, k_scale_ptr,
    # Shapes
    M, N, K, R, Q_RANK,
    # Scalars
    scaling, absmax_offset,
    # Autotune key: M rounded up to a power of two
    M_BUCKET,
    # Strides
    stride_xm, stride_xk, stride_wk, stride_wn, stride_om, stride_on, stride_q_row, stride_q_rank,
    # Meta-parameters: which terms are present
    P: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_BIAS: tl.constexpr, GATHER_Q: tl.constexpr,
    HAS_LOWRANK: tl.constexpr, W_NF4: tl.constexpr, HAS_COL_SCALE: tl.constexpr,
    HAS_K_SCALE: tl.constexpr,
    # Meta-parameters: arithmetic and tiles
    CAST_FP32: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[M, N] = c ⊙ (x[M, K]·w[K, N] + s·(p[M, R]·q̂[N, R]ᵀ) ⊙ D[M, N]) + bias.

    D comes from mask_ptr's packed bits (``dropout_kept``). Forward (F2): x, w = Wᵀ, p = S,
    q̂ = B̂. Backward (B2): x = dy, w = W, p = dS, q̂ = Aᵀ.
    HAS_COL_SCALE: c from col_scale_ptr [N] (else 1). HAS_K_SCALE: each x tile's columns
    are scaled by k_scale_ptr [K] and rounded back to x's dtype before the dot.
    With W_NF4, w_ptr is an NF4 weight's packed codes (absmax beside it) and each w tile
    is dequantised in registers, rounded to x's dtype exactly as the dequantisation kernel
    does: small M, where reading 4-bit weights beats a dequantise-then-GEMM pass.
    W_NF4 stays a branch of this kernel, not a kernel of its own: the two would share
    everything but the one load of w's tile (program order, the low-rank start, the K-loop's
    x tile and dot, the epilogue), and a copy would have to be kept in step with it.
    """
    # Grouped program order: GROUP_M row blocks share each column block of w in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group_id = pid // (GROUP_M * num_n)
    first_m = group_id * GROUP_M
    group_size = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size)
    pid_n = (pid % (GROUP_M * num_n)) // group_size

    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    # Wrapped indices need no row/column masks in the K-loop; the store masks them.
    rows_in = rows % M
    cols_in = cols % N
    # One fp32 accumulator: the K-loop starts from the low-rank term (LoRAFusion's order),
    # so no second [BLOCK_M, BLOCK_N] tile lives across the loop (that one spilled).
    if HAS_LOWRANK:
        acc = lowrank_tile(p_ptr, q_ptr, q_row_ptr, q_off_ptr, mask_ptr, rows, cols, M, N, R,
                           Q_RANK, stride_q_row, stride_q_rank, scaling, P, HAS_DROPOUT,
                           GATHER_Q, CAST_FP32, PRECISION, BLOCK_R, x_ptr.dtype.element_ty)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows_in[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=ks[None, :] < K, other=0.0)
        if HAS_K_SCALE:
            k_scale = tl.load(k_scale_ptr + ks, mask=ks < K, other=0.0)
            x = (x.to(tl.float32) * k_scale[None, :]).to(x_ptr.dtype.element_ty)
        w_offsets = ks[:, None] * stride_wk + cols_in[None, :] * stride_wn
        if W_NF4:
            w = nf4_gather(w_ptr, absmax_q_ptr, absmax_scale_ptr, absmax_offset, w_offsets,
                           ks[:, None] < K)
            w = cast_to(w, x_ptr.dtype.element_ty, CAST_FP32)  # CAST_FP32: interpreting
        else:
            w = tl.load(w_ptr + w_offsets, mask=ks[:, None] < K, other=0.0)
        if CAST_FP32:  # the interpreter's bf16 dot is wrong
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)

    if HAS_COL_SCALE:
        acc *= tl.load(col_scale_ptr + cols, mask=cols < N, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


# ----------------------------------------------------------------------------- autotuning


# An NF4 w tile is gathered per element: a packed byte, an int8 absmax and an fp32 scale
# staged per element is the bound (compiling for sm_90 stages 3.3-3.5 bytes).
NF4_STAGED_BYTES = 6


def _gemm_shared_memory(config: triton.Config, elem_bytes: int, block_r: int,
                        nf4: bool = False) -> int:
    """Bytes of shared memory: the pipelined x and w tiles plus the low-rank term's q̂ tile.

    The two phases are added: the low-rank product now runs before the K-loop and its
    q̂ tile (the dot's shared operand; p stays in registers) is not reused by the
    pipeline. Compiling for sm_90 gives exactly this for dense configs and at most it
    for NF4 (tests/gpu_compile_check.py checks).
    """
    kw = config.kwargs
    w_bytes = NF4_STAGED_BYTES if nf4 else elem_bytes
    tile_bytes = kw["BLOCK_M"] * elem_bytes + kw["BLOCK_N"] * w_bytes
    pipeline = config.num_stages * tile_bytes * kw["BLOCK_K"]
    lowrank = kw["BLOCK_N"] * block_r * elem_bytes
    return pipeline + lowrank


def fitting_configs(configs, limit: int, elem_bytes: int, block_r: int, nf4: bool):
    """The first MAX_CONFIGS configs (in preference order) whose shared memory fits ``limit``.

    On sm_90 these are a role's Hopper set; tests/gpu_compile_check.py compiles exactly
    these per target and fails when one spills there.
    """
    def shared(config):
        return _gemm_shared_memory(config, elem_bytes, block_r, nf4)

    return [c for c in configs if shared(c) <= limit][:MAX_CONFIGS] or [min(configs, key=shared)]


def _prune_gemm_configs(configs, named_args, **kwargs):
    """This device's share of a role's configs (consumer GPUs have ~99 KB of shared memory)."""
    args = {**named_args, **kwargs}
    x = args["x_ptr"]
    return fitting_configs(configs, max_shared_memory(x.device), x.element_size(),
                           args["BLOCK_R"], args["W_NF4"])


def _gemm_config(bm, bn, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                         num_warps=warps, num_stages=stages)


# Preference order: on sm_90 the first four fit and form the Hopper set (none spills, see
# benchmarks/results/kernel_resources.md); ~99 KB GPUs get the next four that fit.
GEMM_CONFIGS = autotune_configs(
    [
        _gemm_config(128, 256, 64, 8, 4),  # LoRAFusion's tile: ~224 KB in bf16, Hopper only
        _gemm_config(128, 128, 64, 8, 3),
        _gemm_config(128, 128, 64, 4, 4),
        _gemm_config(16, 64, 128, 4, 4),  # few rows (generation)
        _gemm_config(128, 128, 32, 8, 4),  # with 4 warps, B2 with dropout spilled on sm_86
        _gemm_config(128, 64, 32, 4, 4),
        _gemm_config(64, 64, 32, 4, 4),
    ],
    _gemm_config(128, 128, 64, 8, 3),
    [_gemm_config(32, 32, 32, 4, 1)],
)
# An NF4 w is read in the K-loop only for few rows (NF4Weight.fused_max_rows), and its
# in-register dequantisation leaves room for smaller tiles only: larger ones spill.
NF4_GEMM_CONFIGS = autotune_configs(
    [
        _gemm_config(64, 128, 32, 8, 4),
        _gemm_config(64, 64, 32, 4, 4),
        _gemm_config(32, 64, 32, 4, 4),
        _gemm_config(16, 64, 128, 4, 2),
    ],
    _gemm_config(64, 64, 32, 4, 4),
    [_gemm_config(32, 32, 32, 4, 1)],
)


def _autotuned(configs):
    # Keys hold every argument that changes the kernel's cost: the role (stride_wk tells
    # F2's Wᵀ from B2's W), dropout, bias and the part gather, not only the shape.
    return triton.autotune(
        configs,
        key=["M_BUCKET", "N", "K", "stride_wk", "BLOCK_R", "HAS_DROPOUT", "HAS_BIAS",
             "GATHER_Q", "HAS_LOWRANK", "W_NF4", "HAS_COL_SCALE", "HAS_K_SCALE", "CAST_FP32"],
        prune_configs_by={"early_config_prune": _prune_gemm_configs},
    )(_gemm_lowrank_kernel)


_gemm_lowrank = _autotuned(GEMM_CONFIGS)
_gemm_lowrank_nf4 = _autotuned(NF4_GEMM_CONFIGS)


# ----------------------------------------------------------------------------- launcher


@dataclasses.dataclass(frozen=True)
class NF4Operand:
    """An NF4 weight W [N_w, K_w] as the GEMM's right operand w [K, N]: Wᵀ or W, by strides."""
    weight: NF4Weight
    transposed: bool  # Wᵀ: the forward's x·Wᵀ; W: the backward's dy·W

    @property
    def shape(self) -> Tuple[int, int]:
        n_w, k_w = self.weight.shape
        return (k_w, n_w) if self.transposed else (n_w, k_w)

    def stride(self, dim: int) -> int:
        strides = (self.weight.shape[1], 1)  # the row-major W the codes were packed from
        return strides[1 - dim] if self.transposed else strides[dim]


def fused_gemm(x: torch.Tensor, w, lowrank: Optional[LowRank] = None,
               bias: Optional[torch.Tensor] = None, col_scale: Optional[torch.Tensor] = None,
               k_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F2 / B2 in one kernel: out = c⊙(x·w + s·(p·q̂ᵀ)⊙D) + bias, x [M, K], w [K, N].

    ``w``: a strided view of a dense weight, or an NF4Operand, dequantised tile by tile in
    the K-loop. ``lowrank`` None: no low-rank term (the NF4 base linear). ``col_scale``:
    c [N] fp32 (DoRA's m/n in F2); ``k_scale``: [K] fp32 scaling x's columns (DoRA's m/n on
    dy in B2); None: 1.
    """
    nf4 = w.weight if isinstance(w, NF4Operand) else None
    w_data = nf4.packed if nf4 is not None else w
    nf4_tensors = [nf4.absmax_q, nf4.absmax_scale] if nf4 is not None else [None, None]
    lowrank_tensors = lowrank.tensors() if lowrank is not None else [None] * 5
    scalars = ([float(nf4.absmax_offset) if nf4 is not None else 0.0]
               + ([lowrank.scaling, lowrank.dropout_p] if lowrank is not None else [0.0, 0.0]))
    nf4_shape = [*nf4.shape, int(w.transposed)] if nf4 is not None else []
    return fused_gemm_op(x, w_data, [*nf4_tensors, *lowrank_tensors, bias, col_scale, k_scale],
                         scalars, nf4_shape)


def _unpacked(x: torch.Tensor, w_data: torch.Tensor, tensors: List[Optional[torch.Tensor]],
              scalars: List[float], nf4_shape: List[int]):
    """``fused_gemm``'s arguments back from the op's: (w, lowrank, bias, col_scale, k_scale)."""
    absmax_q, absmax_scale, *lowrank_tensors = tensors[:7]
    bias, col_scale, k_scale = tensors[7:]
    offset, scaling, dropout_p = scalars
    w = w_data
    if nf4_shape:
        n_w, k_w, transposed = nf4_shape
        weight = NF4Weight(w_data, absmax_q, absmax_scale, offset, (n_w, k_w), x.dtype)
        w = NF4Operand(weight, bool(transposed))
    lowrank = None if lowrank_tensors[0] is None else LowRank.of(lowrank_tensors, scaling,
                                                                  dropout_p)
    return w, lowrank, bias, col_scale, k_scale


def _gemm_output(x: torch.Tensor, w_data: torch.Tensor, tensors: List[Optional[torch.Tensor]],
                 scalars: List[float], nf4_shape: List[int]) -> torch.Tensor:
    """out [M, N] in x's dtype: what the kernel writes (and all a fake tensor gets)."""
    w = _unpacked(x, w_data, tensors, scalars, nf4_shape)[0]
    return torch.empty((x.shape[0], w.shape[1]), device=x.device, dtype=x.dtype)


@torch.library.custom_op("lorakernels::fused_gemm", mutates_args=())
def fused_gemm_op(x: torch.Tensor, w_data: torch.Tensor, tensors: List[Optional[torch.Tensor]],
                  scalars: List[float], nf4_shape: List[int]) -> torch.Tensor:
    """``fused_gemm`` with its arguments as tensors and numbers: w_data (a dense w, or an NF4
    weight's codes), tensors [absmax_q, absmax_scale, *LowRank.tensors(), bias, col_scale,
    k_scale], scalars [absmax_offset, scaling, dropout_p], nf4_shape [N_w, K_w, transposed]
    (empty for a dense w)."""
    out = _gemm_output(x, w_data, tensors, scalars, nf4_shape)
    _launch_fused_gemm(x, out, *_unpacked(x, w_data, tensors, scalars, nf4_shape))
    return out


fused_gemm_op.register_fake(_gemm_output)


def _launch_fused_gemm(x: torch.Tensor, out: torch.Tensor, w, lowrank: Optional[LowRank],
                       bias: Optional[torch.Tensor], col_scale: Optional[torch.Tensor],
                       k_scale: Optional[torch.Tensor]) -> None:
    M, K = x.shape
    N = w.shape[1]
    if M == 0 or N == 0:
        return
    nf4 = w.weight if isinstance(w, NF4Operand) else None
    w_data, absmax_q, absmax_scale, offset = (
        (nf4.packed, nf4.absmax_q, nf4.absmax_scale, nf4.absmax_offset) if nf4 is not None
        else (w, out, out, 0.0))
    has_lowrank = lowrank is not None
    # Without a low-rank term, out stands in for its tensors: the kernel never reads them.
    term = lowrank if has_lowrank else LowRank(out, out, scaling=0.0)
    q_row, q_off = term.q_index_pointers(term.q)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    kernel = _gemm_lowrank_nf4 if nf4 is not None else _gemm_lowrank
    kernel[grid](
        # Pointers
        x, w_data, absmax_q, absmax_scale, out, term.p, term.q, q_row, q_off,
        bias if bias is not None else out, term.mask if term.mask is not None else out,
        col_scale if col_scale is not None else out, k_scale if k_scale is not None else out,
        # Shapes
        M, N, K, term.p.shape[1], term.q.shape[1] if has_lowrank else 0,
        # Scalars
        term.scaling, float(offset),
        # Autotune key
        m_bucket(M),
        # Strides
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1),
        term.q.stride(0), term.q.stride(1),
        # Meta-parameters
        P=term.dropout_p, HAS_DROPOUT=term.dropout_p > 0, HAS_BIAS=bias is not None,
        GATHER_Q=term.q_index is not None, HAS_LOWRANK=has_lowrank, W_NF4=nf4 is not None,
        HAS_COL_SCALE=col_scale is not None, HAS_K_SCALE=k_scale is not None,
        CAST_FP32=INTERPRETING, PRECISION=dot_precision(x.dtype),
        BLOCK_R=term.block_r if has_lowrank else NO_LOWRANK_BLOCK_R,
    )
