"""Fused LoRA linear: y = x·Wᵀ + b + s·(D⊙x·Aᵀ)·Bᵀ in two launches forward, three backward.

Notation: x [M, K], W [N, K] frozen (read by strides, never copied), A [R, K],
B [N_lora, r], s the scale, D the dropout mask scaled by 1/(1-p), drawn from a
seed with Philox wherever it is needed and never stored. A fused projection with
G LoRA parts stacks their A's (R = r·G); output column n uses B row ``b_row[n]``
against S columns ``b_off[n] .. b_off[n]+r`` (its part's), so one launch covers
every part, including N-tiles that straddle two parts.

Forward
  F1 ``_lora_shrink_kernel``: S = (D⊙x)·Aᵀ [M, R] fp32; reads x once.
  F2 ``_gemm_lowrank_kernel``: y = x·Wᵀ + b + s·S·B̂ᵀ, the low-rank product in the
     base GEMM's epilogue (R/K extra work), y written once.
Backward
  B1 ``_lora_grad_s_b_kernel``: one pass over dy gives dS = s·dy·B̂ and
     dB = s·dyᵀ·S (reduced over M with fp32 atomics).
  B2 ``_gemm_lowrank_kernel`` again: dx = dy·W + D⊙(dS·A).
  B3 ``_lora_grad_a_kernel``: dA = dSᵀ·(D⊙x).
Saved for backward: x, S and the seed.
"""
import dataclasses
import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..parts import LoraParts
from ..nf4 import NF4Weight
from .nf4_dequant import dequantize_nf4_to_scratch, nf4_gather
from .triton_utils import (INTERPRETING, autotune_configs, cast_to, dot_precision,
                           max_shared_memory, next_block, on_device)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _dropout_scale(seed, rows, cols, n_cols, P: tl.constexpr):
    """[rows, cols] block of D: 1/(1-p) where kept, 0 where dropped.

    Element (m, k) always draws Philox counter m·n_cols + k (mod 2^32), so the
    forward and both backward kernels regenerate the same mask.
    """
    offsets = (rows[:, None] * n_cols + cols[None, :]).to(tl.uint32)
    keep = tl.rand(seed, offsets) >= P
    return tl.where(keep, 1.0 / (1.0 - P), 0.0)


@triton.jit
def _expanded_b_offsets(row_ptr, off_ptr, cols, ranks, N, RANK, stride_row, stride_rank,
                        GATHER: tl.constexpr):
    """Offsets and mask of a [BLOCK_N, BLOCK_R] tile of B̂, B expanded to every output column.

    B̂[n, j] = B[b_row[n], j - b_off[n]] for j in [b_off[n], b_off[n] + RANK), else 0
    (and 0 for columns of parts without LoRA, whose b_row is -1). Without GATHER,
    b_row[n] = n and b_off[n] = 0: one A/B pair over the whole output.
    """
    if GATHER:
        b_rows = tl.load(row_ptr + cols, mask=cols < N, other=-1)
        b_offs = tl.load(off_ptr + cols, mask=cols < N, other=0)
    else:
        b_rows = tl.where(cols < N, cols, -1)
        b_offs = tl.zeros_like(cols)
    local = ranks[None, :] - b_offs[:, None]
    mask = (b_rows >= 0)[:, None] & (local >= 0) & (local < RANK)
    return b_rows[:, None] * stride_row + local * stride_rank, mask


@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, s_ptr, M, K, R, stride_xm, stride_xk, stride_ar, stride_ak, seed, M_BUCKET,
    P: tl.constexpr, HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """S[M, R] = (D⊙x)·Aᵀ in fp32."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=(rows[:, None] < M) & (cols[None, :] < K), other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            x = x * _dropout_scale(seed, rows, cols, K, P)
        a = tl.load(a_ptr + ranks[None, :] * stride_ar + cols[:, None] * stride_ak,
                    mask=(ranks[None, :] < R) & (cols[:, None] < K), other=0.0).to(tl.float32)
        acc = tl.dot(x, a, acc, input_precision=PRECISION)
    tl.store(s_ptr + rows[:, None] * R + ranks[None, :], acc,
             mask=(rows[:, None] < M) & (ranks[None, :] < R))


@triton.jit
def _gemm_lowrank_kernel(
    x_ptr, w_ptr, absmax_q_ptr, absmax_scale_ptr, out_ptr, p_ptr, q_ptr, q_row_ptr, q_off_ptr,
    bias_ptr, M, N, K, R, Q_RANK, scaling, seed, absmax_offset, M_BUCKET,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_om, stride_on, stride_q_row, stride_q_rank,
    P: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_BIAS: tl.constexpr, GATHER_Q: tl.constexpr,
    HAS_LOWRANK: tl.constexpr, W_NF4: tl.constexpr,
    CAST_FP32: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[M, N] = x[M, K]·w[K, N] + bias + s·(p[M, R]·q̂[N, R]ᵀ) ⊙ D[M, N].

    Forward (F2): x, w = Wᵀ, p = S, q̂ = B̂. Backward (B2): x = dy, w = W, p = dS, q̂ = Aᵀ.
    With W_NF4, w_ptr is an NF4 weight's packed codes (absmax beside it) and each w tile
    is dequantised in registers, rounded to x's dtype exactly as the dequantisation kernel
    does: small M, where reading 4-bit weights beats a dequantise-then-GEMM pass.
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
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows_in[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=ks[None, :] < K, other=0.0)
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

    if HAS_LOWRANK:  # the low-rank term, an [M, R]·[R, N] product on this tile
        ranks = tl.arange(0, BLOCK_R)
        p = tl.load(p_ptr + rows[:, None] * R + ranks[None, :],
                    mask=(rows[:, None] < M) & (ranks[None, :] < R), other=0.0)
        q_offsets, q_mask = _expanded_b_offsets(q_row_ptr, q_off_ptr, cols, ranks, N, Q_RANK,
                                                stride_q_row, stride_q_rank, GATHER_Q)
        q = tl.trans(tl.load(q_ptr + q_offsets, mask=q_mask, other=0.0))
        if CAST_FP32:
            lowrank = tl.dot(p, q.to(tl.float32), input_precision=PRECISION)
        else:
            lowrank = tl.dot(p.to(x_ptr.dtype.element_ty), q.to(x_ptr.dtype.element_ty),
                             input_precision=PRECISION)
        if HAS_DROPOUT:
            lowrank = lowrank * _dropout_scale(seed, rows, cols, N, P)
        acc += scaling * lowrank
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def _lora_grad_s_b_kernel(
    dy_ptr, s_ptr, b_ptr, b_row_ptr, b_off_ptr, ds_ptr, db_ptr,
    M, N, R, RANK, scaling, M_BUCKET,
    stride_dym, stride_dyn, stride_b_row, stride_b_rank,
    GATHER_B: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One pass over dy: dS[M, R] = s·dy·B̂ and dB += s·dyᵀ·S (fp32, atomics across row blocks)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    row_ok = rows[:, None] < M
    s = tl.load(s_ptr + rows[:, None] * R + ranks[None, :], mask=row_ok & (ranks[None, :] < R),
                other=0.0)
    ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyn,
                     mask=row_ok & (cols[None, :] < N), other=0.0).to(tl.float32)
        b_offsets, b_mask = _expanded_b_offsets(b_row_ptr, b_off_ptr, cols, ranks, N, RANK,
                                                stride_b_row, stride_b_rank, GATHER_B)
        b = tl.load(b_ptr + b_offsets, mask=b_mask, other=0.0).to(tl.float32)
        ds = tl.dot(dy, b, ds, input_precision=PRECISION)
        db = tl.dot(tl.trans(dy), s, input_precision=PRECISION)
        # dB is contiguous [N_lora, RANK]: the same offsets as B's with its strides.
        db_offsets, _ = _expanded_b_offsets(b_row_ptr, b_off_ptr, cols, ranks, N, RANK,
                                            RANK, 1, GATHER_B)
        tl.atomic_add(db_ptr + db_offsets, db * scaling, mask=b_mask)
    tl.store(ds_ptr + rows[:, None] * R + ranks[None, :], ds * scaling,
             mask=row_ok & (ranks[None, :] < R))


@triton.jit
def _lora_grad_a_kernel(
    ds_ptr, x_ptr, da_ptr, M, K, R, stride_xm, stride_xk, seed, M_BUCKET,
    P: tl.constexpr, HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dA[R, K] = dSᵀ·(D⊙x) in fp32."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    ranks = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=(rows[:, None] < M) & (cols[None, :] < K), other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            x = x * _dropout_scale(seed, rows, cols, K, P)
        ds = tl.load(ds_ptr + rows[:, None] * R + ranks[None, :],
                     mask=(rows[:, None] < M) & (ranks[None, :] < R), other=0.0)
        acc = tl.dot(tl.trans(ds), x, acc, input_precision=PRECISION)
    tl.store(da_ptr + ranks[:, None] * K + cols[None, :], acc,
             mask=(ranks[:, None] < R) & (cols[None, :] < K))


@triton.jit
def _dropout_mask_kernel(out_ptr, M, K, seed, P: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], _dropout_scale(seed, rows, cols, K, P),
             mask=(rows[:, None] < M) & (cols[None, :] < K))


# ----------------------------------------------------------------------------- autotuning


# An NF4 w tile is gathered per element: a packed byte, an int8 absmax and an fp32 scale
# staged per element is the bound (compiling for sm_90 stages 3.3-3.5 bytes).
NF4_STAGED_BYTES = 6


def _gemm_shared_memory(config: triton.Config, elem_bytes: int, block_r: int,
                        nf4: bool = False) -> int:
    """Bytes of shared memory: the pipelined x and w tiles, or the epilogue's p and q tiles.

    The epilogue reuses the pipeline's buffers; compiling for sm_90 and sm_86 gives
    exactly the pipeline term for every dense config here, and at most it for NF4
    (see tests/test_gpu_compile.py).
    """
    kw = config.kwargs
    w_bytes = NF4_STAGED_BYTES if nf4 else elem_bytes
    pipeline = config.num_stages * (kw["BLOCK_M"] * elem_bytes + kw["BLOCK_N"] * w_bytes) * kw["BLOCK_K"]
    epilogue = (kw["BLOCK_M"] + kw["BLOCK_N"]) * block_r * elem_bytes
    return max(pipeline, epilogue)


def _prune_gemm_configs(configs, named_args, **kwargs):
    """Drop configs whose shared memory exceeds this device's (consumer GPUs have ~99 KB)."""
    args = {**named_args, **kwargs}
    x = args["x_ptr"]
    limit = max_shared_memory(x.device)

    def shared(config):
        return _gemm_shared_memory(config, x.element_size(), args["BLOCK_R"], args["W_NF4"])

    return [c for c in configs if shared(c) <= limit] or [min(configs, key=shared)]


def _gemm_config(bm, bn, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                         num_warps=warps, num_stages=stages)


GEMM_CONFIGS = autotune_configs(
    [
        _gemm_config(128, 256, 64, 8, 3),  # ~147 KB in bf16: Hopper / A100-class only
        _gemm_config(128, 128, 64, 4, 4),  # ~131 KB
        _gemm_config(128, 128, 64, 8, 3),  # ~98 KB: fits consumer GPUs
        _gemm_config(128, 128, 32, 4, 4),
        _gemm_config(64, 128, 32, 4, 4),
        _gemm_config(128, 64, 32, 4, 4),
        _gemm_config(64, 64, 32, 4, 4),
        _gemm_config(16, 64, 128, 4, 4),  # few rows (generation, NF4 read in the K-loop)
        _gemm_config(32, 128, 64, 4, 4),
    ],
    [_gemm_config(32, 32, 32, 4, 1)],
)

# Skinny, memory-bound kernels (F1, B1, B3). All fit 99 KB of shared memory on sm_86
# as well as sm_90 (tests/gpu_compile_check.py); (64, 128) with 3 stages needs 128 KB.
ROW_CONFIGS = autotune_configs(
    [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bn}, num_warps=w, num_stages=s)
     for bm, bn, w, s in [(32, 64, 4, 3), (64, 64, 4, 3), (32, 128, 4, 3), (64, 128, 8, 2),
                          (128, 64, 8, 2)]],
    [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)],
)

# Keys hold every argument that changes the kernel's cost: the role (stride_wk tells F2's
# Wᵀ from B2's W), dropout, bias and the part gather, not only the shape.
_gemm_lowrank = triton.autotune(
    GEMM_CONFIGS,
    key=["M_BUCKET", "N", "K", "stride_wk", "BLOCK_R", "HAS_DROPOUT", "HAS_BIAS", "GATHER_Q",
         "HAS_LOWRANK", "W_NF4", "CAST_FP32"],
    prune_configs_by={"early_config_prune": _prune_gemm_configs},
)(_gemm_lowrank_kernel)
_lora_shrink = triton.autotune(ROW_CONFIGS, key=["M_BUCKET", "K", "BLOCK_R", "HAS_DROPOUT"])(
    _lora_shrink_kernel)
_lora_grad_s_b = triton.autotune(ROW_CONFIGS, key=["M_BUCKET", "N", "BLOCK_R", "GATHER_B"],
                                 reset_to_zero=["db_ptr"])(_lora_grad_s_b_kernel)
_lora_grad_a = triton.autotune(ROW_CONFIGS, key=["M_BUCKET", "K", "BLOCK_R", "HAS_DROPOUT"])(
    _lora_grad_a_kernel)


# ----------------------------------------------------------------------------- launchers


def _m_bucket(m: int) -> int:
    """Autotune per power-of-two bucket of tokens, not per exact batch size."""
    return triton.next_power_of_2(m)


@functools.lru_cache(maxsize=256)
def _b_index(parts: LoraParts, rank: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per output column: its row of B (-1 in parts without LoRA) and the first S column of its part."""
    b_row = torch.full((parts.out_features,), -1, dtype=torch.int32)
    b_off = torch.zeros(parts.out_features, dtype=torch.int32)
    for g, ((out_start, out_end), (b_start, b_end)) in enumerate(
        zip(parts.enabled_out_cols, parts.enabled_b_rows)
    ):
        b_row[out_start:out_end] = torch.arange(b_start, b_end, dtype=torch.int32)
        b_off[out_start:out_end] = g * rank
    return b_row.to(device), b_off.to(device)


class _Layout:
    """What the kernels need to know about B: its expansion to output columns, per call."""

    def __init__(self, parts: Optional[LoraParts], lora_A: torch.Tensor, lora_B: torch.Tensor):
        self.R = lora_A.shape[0]
        self.block_r = next_block(self.R)
        if parts is None:
            self.rank, self.b_index = self.R, None
        else:
            self.rank = self.R // parts.num_enabled
            self.b_index = _b_index(parts, self.rank, lora_B.device)

    def b_index_pointers(self, placeholder: torch.Tensor):
        """(b_row, b_off) for a kernel; any tensor stands in when there is nothing to gather."""
        return self.b_index if self.b_index is not None else (placeholder, placeholder)


def lora_shrink(x: torch.Tensor, lora_A: torch.Tensor, layout: _Layout, dropout_p: float,
                seed: int) -> torch.Tensor:
    """F1: S = (D⊙x)·Aᵀ, [M, R] fp32."""
    M, K = x.shape
    s = torch.empty((M, layout.R), device=x.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)  # noqa: E731
    _lora_shrink[grid](
        x, lora_A, s, M, K, layout.R, x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1),
        seed, _m_bucket(M), P=dropout_p, HAS_DROPOUT=dropout_p > 0,
        PRECISION=dot_precision(x.dtype), BLOCK_R=layout.block_r,
    )
    return s


@dataclasses.dataclass(frozen=True)
class NF4Operand:
    """An NF4 weight W [N_w, K_w] as the GEMM's right operand w [K, N]: Wᵀ or W, read by strides."""
    weight: NF4Weight
    transposed: bool  # Wᵀ: the forward's x·Wᵀ; W: the backward's dy·W

    @property
    def shape(self) -> Tuple[int, int]:
        n_w, k_w = self.weight.shape
        return (k_w, n_w) if self.transposed else (n_w, k_w)

    def stride(self, dim: int) -> int:
        strides = (self.weight.shape[1], 1)  # the row-major W the codes were packed from
        return strides[1 - dim] if self.transposed else strides[dim]


def gemm_lowrank(x: torch.Tensor, w, p: Optional[torch.Tensor], q: Optional[torch.Tensor],
                 q_index: Optional[Tuple[torch.Tensor, torch.Tensor]], q_rank: int,
                 block_r: int, scaling: float, bias: Optional[torch.Tensor] = None,
                 dropout_p: float = 0.0, seed: int = 0) -> torch.Tensor:
    """F2 / B2: out = x·w + bias + s·(p·q̂ᵀ)⊙D, with x [M, K], w [K, N] (a strided view).

    q̂ [N, R] is q itself, or with ``q_index`` = (row, offset) per output column,
    q expanded to the output columns (B̂ of a fused projection). ``p=None``: no
    low-rank term. ``w`` may be an NF4Operand, dequantised tile by tile in the K-loop.
    """
    M, K = x.shape
    N = w.shape[1]
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    nf4 = w.weight if isinstance(w, NF4Operand) else None
    w_data, absmax_q, absmax_scale, offset = (
        (nf4.packed, nf4.absmax_q, nf4.absmax_scale, nf4.absmax_offset) if nf4 is not None
        else (w, out, out, 0.0))
    has_lowrank = p is not None
    if not has_lowrank:
        p = q = out  # placeholders: the kernel never reads them
    q_row, q_off = q_index if q_index is not None else (q, q)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _gemm_lowrank[grid](
        x, w_data, absmax_q, absmax_scale, out, p, q, q_row, q_off,
        bias if bias is not None else out,
        M, N, K, p.shape[1], q_rank, scaling, seed, float(offset), _m_bucket(M),
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1),
        q.stride(0), q.stride(1),
        P=dropout_p, HAS_DROPOUT=dropout_p > 0, HAS_BIAS=bias is not None,
        GATHER_Q=q_index is not None, HAS_LOWRANK=has_lowrank, W_NF4=nf4 is not None,
        CAST_FP32=INTERPRETING, PRECISION=dot_precision(x.dtype), BLOCK_R=block_r,
    )
    return out


def lora_grad_s_b(dy: torch.Tensor, s: torch.Tensor, lora_B: torch.Tensor, layout: _Layout,
                  scaling: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """B1: dS = s·dy·B̂ [M, R] and dB = s·dyᵀ·S [N_lora, r], both fp32."""
    M, N = dy.shape
    ds = torch.empty((M, layout.R), device=dy.device, dtype=torch.float32)
    db = torch.zeros(lora_B.shape, device=dy.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)  # noqa: E731
    b_row, b_off = layout.b_index_pointers(lora_B)
    _lora_grad_s_b[grid](
        dy, s, lora_B, b_row, b_off, ds, db, M, N, layout.R, layout.rank, scaling,
        _m_bucket(M), dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1),
        GATHER_B=layout.b_index is not None, PRECISION=dot_precision(dy.dtype), BLOCK_R=layout.block_r,
    )
    return ds, db


def lora_grad_a(ds: torch.Tensor, x: torch.Tensor, layout: _Layout, dropout_p: float,
                seed: int) -> torch.Tensor:
    """B3: dA = dSᵀ·(D⊙x), [R, K] fp32."""
    M, K = x.shape
    da = torch.empty((layout.R, K), device=x.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(K, meta["BLOCK_K"]),)  # noqa: E731
    _lora_grad_a[grid](
        ds, x, da, M, K, layout.R, x.stride(0), x.stride(1), seed, _m_bucket(M),
        P=dropout_p, HAS_DROPOUT=dropout_p > 0, PRECISION=dot_precision(x.dtype),
        BLOCK_R=layout.block_r,
    )
    return da


def dropout_mask(rows: int, cols: int, dropout_p: float, seed: int,
                 device: torch.device) -> torch.Tensor:
    """D materialised, [rows, cols] fp32: the exact mask the kernels draw for this seed.

    For tests and the reference only; the kernels never store it.
    """
    out = torch.empty((rows, cols), device=device, dtype=torch.float32)
    grid = (triton.cdiv(rows, 32), triton.cdiv(cols, 32))
    _dropout_mask_kernel[grid](out, rows, cols, seed, P=dropout_p, BLOCK_M=32, BLOCK_K=32)
    return out


# ----------------------------------------------------------------------------- autograd


def _check_inputs(x, weight, bias, lora_A, lora_B, parts):
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"fused LoRA kernels support float16, bfloat16 and float32 inputs, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"x is {x.dtype} but the base weight is {weight.dtype}; they must match")
    if lora_A.dtype not in SUPPORTED_DTYPES or lora_B.dtype != lora_A.dtype:
        raise TypeError(f"lora_A ({lora_A.dtype}) and lora_B ({lora_B.dtype}) must share a float dtype")
    weight_data = weight.packed if isinstance(weight, NF4Weight) else weight
    tensors = [t for t in (x, weight_data, bias, lora_A, lora_B) if t is not None]
    if not (x.is_cuda or INTERPRETING) or any(t.device != x.device for t in tensors):
        raise RuntimeError(
            "the triton backend needs all tensors on one CUDA device (or CPU under "
            f"TRITON_INTERPRET=1); got {sorted({str(t.device) for t in tensors})}"
        )
    N, K = weight.shape
    n_lora = N if parts is None else parts.lora_out_features
    groups = 1 if parts is None else parts.num_enabled
    if x.shape[-1] != K or lora_A.shape[1] != K or lora_A.shape[0] % groups:
        raise ValueError(
            f"shape mismatch: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
            f"lora_A {tuple(lora_A.shape)} (expected [r·{groups}, {K}])"
        )
    if tuple(lora_B.shape) != (n_lora, lora_A.shape[0] // groups):
        raise ValueError(
            f"lora_B is {tuple(lora_B.shape)}, expected ({n_lora}, {lora_A.shape[0] // groups})"
        )
    if parts is not None and parts.out_features != N:
        raise ValueError(f"parts cover {parts.out_features} outputs, weight has {N}")


# Up to this many rows, an NF4 weight is read as 4-bit tiles inside the GEMM's K-loop (the
# product is memory-bound: a quarter of the bytes); above, it is dequantised once into the
# shared scratch buffer and the dense kernels run on it (compute-bound: dequantising per tile
# would repeat the work M/BLOCK_M times). benchmarks/bench_qlora.py measures the crossover.
NF4_FUSED_MAX_ROWS = 64


def _gemm_weight(weight, rows: int, transposed: bool):
    """The base GEMM's w for ``rows`` rows of input: Wᵀ or W, as a view or NF4 tiles or a dequantised copy."""
    if isinstance(weight, NF4Weight):
        if rows <= NF4_FUSED_MAX_ROWS:
            return NF4Operand(weight, transposed)
        weight = dequantize_nf4_to_scratch(weight)
    return weight.t() if transposed else weight


def nf4_matmul(a: torch.Tensor, weight: NF4Weight, transposed: bool) -> torch.Tensor:
    """a·Wᵀ (transposed) or a·W for a 2-D ``a`` and an NF4 weight, on the Triton path."""
    w = _gemm_weight(weight, a.shape[0], transposed)
    if isinstance(w, NF4Operand):
        return gemm_lowrank(a, w, None, None, None, 0, next_block(0), 0.0)
    return a @ w


class FusedLoraLinear(torch.autograd.Function):
    """The fused kernels behind autograd. A dense W is frozen unless it asks for a gradient;
    an NF4Weight is always frozen and is dequantised again in backward, never kept dense."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, parts):
        _check_inputs(x, weight, bias, lora_A, lora_B, parts)
        K, N = weight.shape[1], weight.shape[0]
        x2 = x.reshape(-1, K)
        layout = _Layout(parts, lora_A, lora_B)
        s = lora_shrink(x2, lora_A, layout, dropout_p, seed)
        y = gemm_lowrank(x2, _gemm_weight(weight, x2.shape[0], True), s, lora_B, layout.b_index,
                         layout.rank, layout.block_r, scaling, bias)
        nf4 = isinstance(weight, NF4Weight)
        ctx.save_for_backward(x2, None if nf4 else weight, lora_A, lora_B, s)
        ctx.nf4_weight = weight if nf4 else None
        ctx.layout, ctx.scaling, ctx.dropout_p, ctx.seed = layout, scaling, dropout_p, seed
        ctx.x_shape = x.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.view(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, lora_A, lora_B, s = ctx.saved_tensors
        weight = ctx.nf4_weight if weight is None else weight
        layout, scaling, p, seed = ctx.layout, ctx.scaling, ctx.dropout_p, ctx.seed
        need_dx, need_dw, need_db, need_da, need_dB = ctx.needs_input_grad[:5]
        dy2 = dy.reshape(-1, weight.shape[0])
        dx = dw = db = da = dB = None
        ds, dB32 = lora_grad_s_b(dy2, s, lora_B, layout, scaling)
        if need_dx:
            dx = gemm_lowrank(dy2, _gemm_weight(weight, dy2.shape[0], False), ds, lora_A.t(),
                              None, layout.R, layout.block_r, 1.0, dropout_p=p,
                              seed=seed).view(ctx.x_shape)
        if need_da:
            da = lora_grad_a(ds, x2, layout, p, seed).to(lora_A.dtype)
        if need_dB:
            dB = dB32.to(lora_B.dtype)
        if need_dw:
            dw = (dy2.t() @ x2).to(weight.dtype)
        if need_db:
            db = dy2.sum(0).to(ctx.bias_dtype)
        return dx, dw, db, da, dB, None, None, None, None


def fused_lora_linear(x: torch.Tensor, weight, bias: Optional[torch.Tensor],
                      lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                      dropout_p: float = 0.0, seed: int = 0,
                      parts: Optional[LoraParts] = None) -> torch.Tensor:
    """y = x·Wᵀ + b + s·(D⊙x·Aᵀ)·B̂ᵀ on the Triton kernels; D is drawn from ``seed`` when p > 0.

    ``weight``: a dense tensor [N, K] or an NF4Weight of that shape.
    """
    with on_device(x):
        return FusedLoraLinear.apply(x, weight, bias, lora_A, lora_B, float(scaling),
                                     float(dropout_p), int(seed), parts)
