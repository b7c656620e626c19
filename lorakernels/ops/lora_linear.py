"""Fused LoRA linear: y = x·Wᵀ + b + s·(D⊙x·Aᵀ)·Bᵀ in two launches forward, three backward.

Notation: x [M, K], W [N, K] frozen (read by strides, never copied), A [R, K],
B [N_lora, r], s the scale, D the dropout mask scaled by 1/(1-p), drawn from a
seed with Philox once, by F1, and kept as bits (M·K/8 bytes) for B2 and B3.
A fused projection with G LoRA parts stacks their A's (R = r·G); output column n
uses B row ``b_row[n]`` against S columns ``b_off[n] .. b_off[n]+r`` (its part's), so
one launch covers every part, including N-tiles that straddle two parts.

Forward
  F1 ``_lora_shrink_kernel``: S = (D⊙x)·Aᵀ [M, R] fp32; reads x once, writes D's bits.
  F2 ``fused_gemm`` (ops/fused_gemm.py): y = x·Wᵀ + b + s·S·B̂ᵀ, the low-rank
     product fused into the base GEMM (R/K extra work), y written once; or, where
     it times faster on a GPU, torch's GEMM plus a low-rank epilogue kernel
     (ops/cublas_epilogue.py; ops/gemm_path.py chooses, the same for B2).
Backward
  B1 ``_lora_grad_s_b_kernel``: one pass over dy gives dS = s·dy·B̂ and
     dB = s·dyᵀ·S (reduced over M with relaxed fp32 atomics).
  B2 ``fused_gemm`` again: dx = dy·W + D⊙(dS·A).
  B3 ``_lora_grad_a_kernel``: dA = dSᵀ·(D⊙x), split over M (at least two programs
     per SM) into partials summed in a fixed order.
DoRA (p = 0) adds a per-column scale c = m/n: F2 writes y = c⊙(x·Wᵀ + s·S·B̂ᵀ) + b, B1
scales dy by c and reduces m's gradient Σ dy⊙(y − b)/m from the saved y, B2 scales dy's
columns in its K-loop; B3 is unchanged (it reads dS).
Under torch.use_deterministic_algorithms(True), B1 and B3 run one pinned config and
dB is summed from per-row-block partials too: dA and dB are bit-reproducible run to run.
Saved for backward: x, S and D's bits (``dropout_bits.py`` says why bits). An NF4 base
weight is read as the GEMM's operand ``ops/nf4_matmul.py`` chooses (4-bit tiles or a
dequantised copy, by rows).
"""
import dataclasses
import functools
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..dora import column_scale, magnitude_grad
from ..lora_call import LoRACall
from ..nf4 import NF4Weight
from ..parts import LoRAParts
from .dropout_bits import dropout_kept, dropout_scale, pack_kept
from .gemm_path import gemm_on_chosen_path
from .lowrank_term import LowRank, expanded_b_offsets
from .nf4_matmul import gemm_operand
from .triton_utils import (INTERPRETING, autotune_configs, dot_precision, m_bucket, next_block,
                           on_device, pinned_config)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------- kernels


# The seed changes every step and M every batch: specialising either (== 1, divisible
# by 16) would compile new variants; the autotuner keys on M_BUCKET instead.
@triton.jit(do_not_specialize=["seed", "M"])
def _lora_shrink_kernel(
    # Pointers
    x_ptr, a_ptr, s_ptr, mask_ptr,
    # Shapes
    M, K, R,
    # Strides
    stride_xm, stride_xk, stride_ar, stride_ak,
    # Scalars: the dropout mask's Philox seed
    seed,
    # Autotune key: M rounded up to a power of two
    M_BUCKET,
    # Meta-parameters
    P: tl.constexpr, HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """S[M, R] = (D⊙x)·Aᵀ in fp32; with dropout, D drawn here and its bits written to mask_ptr."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=(rows[:, None] < M) & (cols[None, :] < K), other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            scale = dropout_scale(seed, rows, cols, K, P)
            x = x * scale
            words = k0 // 32 + tl.arange(0, BLOCK_K // 32)
            n_words = tl.cdiv(K, 32)
            tl.store(mask_ptr + rows[:, None] * n_words + words[None, :], pack_kept(scale),
                     mask=(rows[:, None] < M) & (words[None, :] < n_words))
        a = tl.load(a_ptr + ranks[None, :] * stride_ar + cols[:, None] * stride_ak,
                    mask=(ranks[None, :] < R) & (cols[:, None] < K), other=0.0).to(tl.float32)
        acc = tl.dot(x, a, acc, input_precision=PRECISION)
    tl.store(s_ptr + rows[:, None] * R + ranks[None, :], acc,
             mask=(rows[:, None] < M) & (ranks[None, :] < R))


@triton.jit(do_not_specialize=["M"])
def _lora_grad_s_b_kernel(
    # Pointers: inputs dy, S, B and B̂'s gather; outputs dS, dB; DoRA's c, y, bias and dm
    dy_ptr, s_ptr, b_ptr, b_row_ptr, b_off_ptr, ds_ptr, db_ptr,
    col_scale_ptr, y_ptr, bias_ptr, dm_ptr,
    # Shapes
    M, N, R, RANK,
    # Scalars
    scaling,
    # Autotune key: M rounded up to a power of two
    M_BUCKET,
    # Strides
    stride_dym, stride_dyn, stride_b_row, stride_b_rank, stride_db_part, stride_ym, stride_yn,
    # Meta-parameters
    GATHER_B: tl.constexpr, DETERMINISTIC: tl.constexpr, DORA: tl.constexpr,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One pass over dy: dS[M, R] = s·dy·B̂ and dB += s·dyᵀ·S (fp32, atomics across row blocks).

    The atomics are relaxed (a reduction needs no ordering; the default acq_rel fenced
    every update) and each program starts at its own column block, so programs do not
    all hit the same dB rows at once. DETERMINISTIC: each row block stores its partial
    dB at db_ptr + pid·stride_db_part instead, for the launcher to sum in order.
    DORA: dy is first scaled by c = m/n per column (col_scale_ptr), and the same pass
    reduces Σ_i dy·(y − bias) per column, y the forward's output, into dm_ptr [N]
    (partials [row blocks, N] when DETERMINISTIC): m_j·dm_j, see ``dora.magnitude_grad``.
    """
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    row_ok = rows[:, None] < M
    s = tl.load(s_ptr + rows[:, None] * R + ranks[None, :], mask=row_ok & (ranks[None, :] < R),
                other=0.0)
    ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    num_n = tl.cdiv(N, BLOCK_N)
    for step in range(0, num_n):
        cols = ((pid + step) % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyn,
                     mask=row_ok & (cols[None, :] < N), other=0.0).to(tl.float32)
        if DORA:
            y = tl.load(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn,
                        mask=row_ok & (cols[None, :] < N), other=0.0).to(tl.float32)
            if HAS_BIAS:  # rows past M: dy is 0 there, whatever y - bias is
                y -= tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
            dm = tl.sum(dy * y, axis=0)
            if DETERMINISTIC:
                tl.store(dm_ptr + pid.to(tl.int64) * N + cols, dm, mask=cols < N)
            else:
                tl.atomic_add(dm_ptr + cols, dm, mask=cols < N, sem="relaxed")
            dy *= tl.load(col_scale_ptr + cols, mask=cols < N, other=0.0)[None, :]
        b_offsets, b_mask = expanded_b_offsets(b_row_ptr, b_off_ptr, cols, ranks, N, RANK,
                                                stride_b_row, stride_b_rank, GATHER_B)
        b = tl.load(b_ptr + b_offsets, mask=b_mask, other=0.0).to(tl.float32)
        ds = tl.dot(dy, b, ds, input_precision=PRECISION)
        db = tl.dot(tl.trans(dy), s, input_precision=PRECISION)
        # dB is contiguous [N_lora, RANK]: the same offsets as B's with its strides.
        db_offsets, _ = expanded_b_offsets(b_row_ptr, b_off_ptr, cols, ranks, N, RANK,
                                            RANK, 1, GATHER_B)
        if DETERMINISTIC:
            tl.store(db_ptr + pid.to(tl.int64) * stride_db_part + db_offsets, db * scaling,
                     mask=b_mask)
        else:
            tl.atomic_add(db_ptr + db_offsets, db * scaling, mask=b_mask, sem="relaxed")
    tl.store(ds_ptr + rows[:, None] * R + ranks[None, :], ds * scaling,
             mask=row_ok & (ranks[None, :] < R))


@triton.jit(do_not_specialize=["M"])
def _lora_grad_a_kernel(
    # Pointers
    ds_ptr, x_ptr, mask_ptr, da_ptr,
    # Shapes
    M, K, R,
    # Strides
    stride_xm, stride_xk,
    # Scalars: rows of M per split (program axis 1)
    rows_per_split,
    # Autotune key: M rounded up to a power of two
    M_BUCKET,
    # Meta-parameters
    P: tl.constexpr, HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Partial dA[split, R, K] = dSᵀ·(D⊙x) in fp32 over one split's rows (program axis 1)."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    split = tl.program_id(1)
    ranks = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    first = split * rows_per_split
    for m0 in range(first, tl.minimum(first + rows_per_split, M), BLOCK_M):
        rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=(rows[:, None] < M) & (cols[None, :] < K), other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            kept = dropout_kept(mask_ptr, rows, cols, M, K)
            x = tl.where(kept, x * (1.0 / (1.0 - P)), 0.0)
        ds = tl.load(ds_ptr + rows[:, None] * R + ranks[None, :],
                     mask=(rows[:, None] < M) & (ranks[None, :] < R), other=0.0)
        acc = tl.dot(tl.trans(ds), x, acc, input_precision=PRECISION)
    tl.store(da_ptr + split.to(tl.int64) * R * K + ranks[:, None] * K + cols[None, :], acc,
             mask=(ranks[:, None] < R) & (cols[None, :] < K))


@triton.jit(do_not_specialize=["seed"])
def _dropout_mask_kernel(out_ptr, M, K, seed, P: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], dropout_scale(seed, rows, cols, K, P),
             mask=(rows[:, None] < M) & (cols[None, :] < K))


# ----------------------------------------------------------------------------- autotuning


def _row_config(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bn}, num_warps=warps,
                         num_stages=stages)


# Skinny, memory-bound kernels (F1, B1, B3). All fit 99 KB of shared memory on sm_86
# as well as sm_90 and none spills (tests/gpu_compile_check.py); (64, 128) with 3 stages
# needs 128 KB, and (32, 128) with 4 warps spilled in B1.
_ROW_DEFAULT, _ROW_INTERPRETED = _row_config(64, 64, 4, 3), [_row_config(32, 32, 4, 1)]
ROW_CONFIGS = autotune_configs(
    [_row_config(32, 64, 4, 3), _row_config(64, 64, 4, 3), _row_config(64, 128, 8, 2),
     _row_config(128, 64, 8, 2)],
    _ROW_DEFAULT, _ROW_INTERPRETED,
)
ROW_PINNED = pinned_config(_ROW_DEFAULT, _ROW_INTERPRETED)


_lora_shrink = triton.autotune(ROW_CONFIGS, key=["M_BUCKET", "K", "BLOCK_R", "HAS_DROPOUT"])(
    _lora_shrink_kernel)
# B1 with DoRA holds y's tile beside dy's: (64, 128) with 8 warps spilled 8 bytes on sm_90.
DORA_B1_CONFIGS = [c for c in ROW_CONFIGS
                   if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) != (64, 128)]


def _autotuned_b1(configs):
    return triton.autotune(configs, key=["M_BUCKET", "N", "BLOCK_R", "GATHER_B"],
                           reset_to_zero=["db_ptr", "dm_ptr"])(_lora_grad_s_b_kernel)


_lora_grad_s_b, _lora_grad_s_b_dora = _autotuned_b1(ROW_CONFIGS), _autotuned_b1(DORA_B1_CONFIGS)
_lora_grad_a = triton.autotune(ROW_CONFIGS, key=["M_BUCKET", "K", "BLOCK_R", "HAS_DROPOUT"])(
    _lora_grad_a_kernel)


# ----------------------------------------------------------------------------- launchers


@functools.lru_cache(maxsize=256)
def _b_index(parts: LoRAParts, rank: int,
             device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per output column: its row of B (-1 in parts without LoRA) and the first S column of its
    part."""
    b_row = torch.full((parts.out_features,), -1, dtype=torch.int32)
    b_off = torch.zeros(parts.out_features, dtype=torch.int32)
    for pair in parts.slices(rank):
        b_row[pair.out_cols] = torch.arange(pair.b_rows.start, pair.b_rows.stop, dtype=torch.int32)
        b_off[pair.out_cols] = pair.a_rows.start
    return b_row.to(device), b_off.to(device)


def reset_b_index() -> None:
    """Forget the cached B̂ gathers (a memory plan starts with none, as a new process, and
    leaves no fake tensor behind)."""
    _b_index.cache_clear()


class _Layout:
    """What the kernels need to know about B: its expansion to output columns, per call."""

    def __init__(self, R: int, rank: int,
                 b_index: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        self.R = R
        self.block_r = next_block(R)
        self.rank = rank
        self.b_index = b_index

    @classmethod
    def of(cls, lora: LoRACall) -> "_Layout":
        b_index = (None if lora.parts is None
                   else _b_index(lora.parts, lora.rank, lora.lora_B.device))
        return cls(lora.lora_A.shape[0], lora.rank, b_index)

    def b_index_pointers(self, placeholder: torch.Tensor):
        """(b_row, b_off) for a kernel; any tensor stands in when there is nothing to gather."""
        return self.b_index if self.b_index is not None else (placeholder, placeholder)


def lora_shrink(x: torch.Tensor, lora_A: torch.Tensor, dropout_p: float,
                seed: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """F1: S = (D⊙x)·Aᵀ, [M, R] fp32, and D's bits [M, ceil(K/32)] int32 (None without dropout)."""
    s, mask = lora_shrink_op(x, lora_A, dropout_p, seed)
    return s, mask if dropout_p > 0 else None


def _shrink_outputs(x: torch.Tensor, lora_A: torch.Tensor, dropout_p: float,
                    seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    M, K = x.shape
    s = torch.empty((M, lora_A.shape[0]), device=x.device, dtype=torch.float32)
    mask_shape = (M, triton.cdiv(K, 32)) if dropout_p > 0 else (0,)  # (0,): no bytes, no mask
    return s, torch.empty(mask_shape, device=x.device, dtype=torch.int32)


@torch.library.custom_op("lorakernels::lora_shrink", mutates_args=())
def lora_shrink_op(x: torch.Tensor, lora_A: torch.Tensor, dropout_p: float,
                   seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """F1 behind a torch op: (S, D's bits); the bits are an empty tensor without dropout."""
    s, mask = _shrink_outputs(x, lora_A, dropout_p, seed)
    if not (x.is_cuda or INTERPRETING):  # the real op only: fake tensors run no kernel
        raise RuntimeError(_device_error([x, lora_A]))
    M, K = x.shape
    R = lora_A.shape[0]
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)  # noqa: E731
    _lora_shrink[grid](
        x, lora_A, s, mask if dropout_p > 0 else s,  # pointers
        M, K, R,  # shapes
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1),  # strides
        seed, m_bucket(M),
        P=dropout_p, HAS_DROPOUT=dropout_p > 0, PRECISION=dot_precision(x.dtype),
        BLOCK_R=next_block(R),
    )
    return s, mask


lora_shrink_op.register_fake(_shrink_outputs)


def _launch(autotuned, grid, *args, **kwargs):
    """Through the autotuner; under torch.use_deterministic_algorithms, with the pinned
    config instead, so that the order of a reduction never depends on a timing."""
    if not torch.are_deterministic_algorithms_enabled():
        return autotuned[grid](*args, **kwargs)
    meta = ROW_PINNED
    autotuned.fn[grid(meta.kwargs)](*args, **kwargs, **meta.kwargs, num_warps=meta.num_warps,
                                    num_stages=meta.num_stages)


@dataclasses.dataclass
class DoRAColumns:
    """What DoRA adds to the LoRA backward: c = m/n [N] fp32, the forward's output y [M, N]
    (z = (y - bias)/c, so no unscaled copy is kept) and the bias, or None."""
    col_scale: torch.Tensor
    output: torch.Tensor
    bias: Optional[torch.Tensor]


def lora_grad_s_b(dy: torch.Tensor, s: torch.Tensor, lora_B: torch.Tensor, layout: _Layout,
                  scaling: float, dora: Optional[DoRAColumns] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """B1: dS = s·dz·B̂ [M, R], dB = s·dzᵀ·S [N_lora, r] and, with ``dora``, Σ_i dy⊙(y − bias)
    [N] (None without), all fp32; dz = dy, or dy⊙c with ``dora``.

    dB is reduced over row blocks with atomics, or, in torch's deterministic mode, from
    per-row-block partials summed in a fixed order (bit-reproducible run to run).
    """
    deterministic = torch.are_deterministic_algorithms_enabled()
    b_row, b_off = layout.b_index if layout.b_index is not None else (None, None)
    columns = [dora.col_scale, dora.output, dora.bias] if dora else [None, None, None]
    ds, db, dm = lora_grad_s_b_op(dy, s, lora_B, [b_row, b_off, *columns], scaling, layout.rank,
                                  deterministic)
    if deterministic:
        return ds, db.sum(0), dm.sum(0) if dora else None
    return ds, db[0], dm[0] if dora else None


def _grad_s_b_outputs(dy: torch.Tensor, s: torch.Tensor, lora_B: torch.Tensor,
                      tensors: List[Optional[torch.Tensor]], scaling: float, rank: int,
                      deterministic: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    M, N = dy.shape
    blocks = triton.cdiv(M, ROW_PINNED.kwargs["BLOCK_M"]) if deterministic else 1
    ds = torch.empty((M, s.shape[1]), device=dy.device, dtype=torch.float32)
    db = torch.zeros((blocks, *lora_B.shape), device=dy.device, dtype=torch.float32)
    dora = tensors[2] is not None
    dm = torch.zeros((blocks, N) if dora else (0,), device=dy.device, dtype=torch.float32)
    return ds, db, dm


@torch.library.custom_op("lorakernels::lora_grad_s_b", mutates_args=())
def lora_grad_s_b_op(dy: torch.Tensor, s: torch.Tensor, lora_B: torch.Tensor,
                     tensors: List[Optional[torch.Tensor]], scaling: float, rank: int,
                     deterministic: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """B1 behind a torch op: tensors [b_row, b_off, col_scale, output, bias] (DoRA's three
    None without DoRA) → (dS, dB's partials [blocks, N_lora, r], DoRA's Σ dy⊙(y − bias)
    partials [blocks, N] or an empty tensor); one block unless ``deterministic``."""
    ds, db, dm = _grad_s_b_outputs(dy, s, lora_B, tensors, scaling, rank, deterministic)
    b_row, b_off, col_scale, output, bias = tensors
    M, N = dy.shape
    R = s.shape[1]
    dora = col_scale is not None
    y = output if dora else dy
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)  # noqa: E731
    gather = b_row is not None
    has_bias = dora and bias is not None
    _launch(
        _lora_grad_s_b_dora if dora else _lora_grad_s_b, grid,
        # Pointers (db stands in for DoRA's tensors without DoRA)
        dy, s, lora_B, b_row if gather else lora_B, b_off if gather else lora_B, ds, db,
        col_scale if dora else db, y, bias if has_bias else db, dm if dora else db,
        M, N, R, rank, scaling, m_bucket(M),  # shapes, scalars, autotune key
        # Strides
        dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1), lora_B.numel(),
        y.stride(0), y.stride(1),
        GATHER_B=gather, DETERMINISTIC=deterministic, DORA=dora,
        HAS_BIAS=has_bias, PRECISION=dot_precision(dy.dtype), BLOCK_R=next_block(R),
    )
    return ds, db, dm


lora_grad_s_b_op.register_fake(_grad_s_b_outputs)


# B3's largest BLOCK_M and BLOCK_K: a split's rows are a multiple of every BLOCK_M.
B3_MAX_BLOCK = 128


def b3_splits(M: int, K: int, programs: int) -> Tuple[int, int]:
    """(splits, rows per split) so that B3 launches at least ``programs`` programs.

    K/BLOCK_K programs alone leave most SMs idle (24-48 for K = 3072 on 132 SMs), so M is
    split too, each split writing its own partial dA, summed in a fixed order (no atomics).
    """
    wanted = triton.cdiv(programs, triton.cdiv(K, B3_MAX_BLOCK))
    splits = max(1, min(wanted, triton.cdiv(M, B3_MAX_BLOCK)))
    rows = triton.cdiv(triton.cdiv(M, splits), B3_MAX_BLOCK) * B3_MAX_BLOCK
    return triton.cdiv(M, rows), rows


def _b3_programs(device: torch.device) -> int:
    """Two programs per SM (132 SMs, an H100's, without a GPU)."""
    if device.type != "cuda":
        return 2 * 132
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def lora_grad_a(ds: torch.Tensor, x: torch.Tensor, layout: _Layout, dropout_p: float,
                mask: Optional[torch.Tensor]) -> torch.Tensor:
    """B3: dA = dSᵀ·(D⊙x), [R, K] fp32: split over M, the partials summed in order."""
    partials = lora_grad_a_op(ds, x, dropout_p, mask)
    return partials[0] if partials.shape[0] == 1 else partials.sum(0)


def _grad_a_partials(ds: torch.Tensor, x: torch.Tensor, dropout_p: float,
                     mask: Optional[torch.Tensor]) -> torch.Tensor:
    M, K = x.shape
    splits, _ = b3_splits(M, K, _b3_programs(x.device))
    return torch.empty((splits, ds.shape[1], K), device=x.device, dtype=torch.float32)


@torch.library.custom_op("lorakernels::lora_grad_a", mutates_args=())
def lora_grad_a_op(ds: torch.Tensor, x: torch.Tensor, dropout_p: float,
                   mask: Optional[torch.Tensor]) -> torch.Tensor:
    """B3 behind a torch op: dA's partials [splits, R, K] fp32, one per split of M."""
    partials = _grad_a_partials(ds, x, dropout_p, mask)
    M, K = x.shape
    splits, rows = b3_splits(M, K, _b3_programs(x.device))
    R = ds.shape[1]
    grid = lambda meta: (triton.cdiv(K, meta["BLOCK_K"]), splits)  # noqa: E731
    _launch(
        _lora_grad_a, grid,
        ds, x, mask if mask is not None else ds, partials,  # pointers
        M, K, R, x.stride(0), x.stride(1), rows, m_bucket(M),
        P=dropout_p, HAS_DROPOUT=dropout_p > 0, PRECISION=dot_precision(x.dtype),
        BLOCK_R=next_block(R),
    )
    return partials


lora_grad_a_op.register_fake(_grad_a_partials)


def dropout_mask(rows: int, cols: int, dropout_p: float, seed: int,
                 device: torch.device) -> torch.Tensor:
    """D materialised, [rows, cols] fp32: the exact mask F1 draws for this seed.

    For tests and the reference only; the kernels keep D as bits.
    """
    out = torch.empty((rows, cols), device=device, dtype=torch.float32)
    grid = (triton.cdiv(rows, 32), triton.cdiv(cols, 32))
    _dropout_mask_kernel[grid](out, rows, cols, seed, P=dropout_p, BLOCK_M=32, BLOCK_K=32)
    return out


# ----------------------------------------------------------------------------- autograd


def _device_error(tensors) -> str:
    return ("the triton backend needs all tensors on one CUDA device (or CPU under "
            f"TRITON_INTERPRET=1); got {sorted({str(t.device) for t in tensors})}")


def _check_inputs(x, weight, bias, lora: LoRACall):
    lora_A, lora_B, parts = lora.lora_A, lora.lora_B, lora.parts
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError("fused LoRA kernels support float16, bfloat16 and float32 inputs, "
                        f"got {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"x is {x.dtype} but the base weight is {weight.dtype}; they must match")
    if lora_A.dtype not in SUPPORTED_DTYPES or lora_B.dtype != lora_A.dtype:
        raise TypeError(f"lora_A ({lora_A.dtype}) and lora_B ({lora_B.dtype}) must share a "
                        "float dtype")
    weight_data = weight.packed if isinstance(weight, NF4Weight) else weight
    tensors = [t for t in (x, weight_data, bias, lora_A, lora_B) if t is not None]
    if any(t.device != x.device for t in tensors):
        raise RuntimeError(_device_error(tensors))
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


# LoRALinearFunction.apply's inputs, in order; backward returns a gradient (or None) for each.
# lora_A, lora_B and the magnitude are in ``lora`` too, and passed on their own as well:
# autograd differentiates only the tensors that apply is given directly.
_INPUTS = ("x", "weight", "bias", "lora_A", "lora_B", "magnitude", "lora", "seed")


@dataclasses.dataclass(frozen=True)
class _SavedTensors:
    """The forward's tensors that backward reads, through ctx.save_for_backward (None where a
    call has none: no dropout mask, no DoRA, an NF4 weight, which is never kept dense)."""
    x: torch.Tensor  # [M, K]
    weight: Optional[torch.Tensor]
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    s: torch.Tensor  # S [M, R] fp32
    mask: Optional[torch.Tensor]  # D's bits
    output: Optional[torch.Tensor]  # DoRA: y, from which m's gradient is read
    magnitude: Optional[torch.Tensor]
    col_scale: Optional[torch.Tensor]  # DoRA: c = m/n
    bias: Optional[torch.Tensor]  # DoRA: z = (y - bias)/c

    def save(self, ctx) -> None:
        ctx.save_for_backward(*(getattr(self, f.name) for f in dataclasses.fields(self)))

    @classmethod
    def of(cls, ctx) -> "_SavedTensors":
        return cls(*ctx.saved_tensors)


@dataclasses.dataclass(frozen=True)
class _ForwardFacts:
    """What backward needs to know about the forward besides its tensors."""
    layout: _Layout
    scaling: float
    dropout_p: float
    x_shape: torch.Size
    bias_dtype: Optional[torch.dtype]
    nf4_weight: Optional[NF4Weight]


class LoRALinearFunction(torch.autograd.Function):
    """The fused kernels behind autograd. A dense W is frozen unless it asks for a gradient;
    an NF4Weight is always frozen and is dequantised again in backward, never kept dense.

    With a DoRA ``magnitude`` m [N] and ``lora.norm`` n [N] (fp32, a constant), y = c⊙z + b
    with c = m/n and z the LoRA product: c is F2's epilogue scale; backward scales dy by c in
    B1 and in B2's K-loop and reduces m's gradient in B1 from the saved output."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, lora: LoRACall, seed: int):
        _check_inputs(x, weight, bias, lora)
        K, N = weight.shape[1], weight.shape[0]
        x2 = x.reshape(-1, K)
        layout = _Layout.of(lora)
        dora = magnitude is not None
        col_scale = None
        if dora:
            if lora.dropout_p > 0:
                raise ValueError("the fused DoRA path is for lora_dropout 0 (functional."
                                 "dora_linear runs dropout as (x − h)·Wᵀ plus DoRA of h)")
            col_scale = column_scale(magnitude, lora.norm)
        s, mask = lora_shrink(x2, lora_A, lora.dropout_p, seed)
        f2 = LowRank(s, lora_B, lora.scaling, layout.b_index)
        y = gemm_on_chosen_path("F2", x2, gemm_operand(weight, x2.shape[0], True), f2, bias,
                                col_scale=col_scale)
        nf4 = isinstance(weight, NF4Weight)
        _SavedTensors(x2, None if nf4 else weight, lora_A, lora_B, s, mask,
                      y if dora else None, magnitude, col_scale, bias if dora else None).save(ctx)
        ctx.facts = _ForwardFacts(layout, lora.scaling, lora.dropout_p, x.shape,
                                  None if bias is None else bias.dtype, weight if nf4 else None)
        return y.view(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, dy):
        saved, facts = _SavedTensors.of(ctx), ctx.facts
        needs = dict(zip(_INPUTS, ctx.needs_input_grad))
        weight = facts.nf4_weight if saved.weight is None else saved.weight
        dy2 = dy.reshape(-1, weight.shape[0])
        dora = (None if saved.magnitude is None
                else DoRAColumns(saved.col_scale, saved.output, saved.bias))
        ds, dB32, dm_dot = lora_grad_s_b(dy2, saved.s, saved.lora_B, facts.layout, facts.scaling,
                                         dora)
        grads = {}
        if needs["x"]:
            b2 = LowRank(ds, saved.lora_A.t(), dropout_p=facts.dropout_p, mask=saved.mask)
            dx = gemm_on_chosen_path("B2", dy2, gemm_operand(weight, dy2.shape[0], False), b2,
                                     k_scale=saved.col_scale)
            grads["x"] = dx.view(facts.x_shape)
        if needs["lora_A"]:
            da = lora_grad_a(ds, saved.x, facts.layout, facts.dropout_p, saved.mask)
            grads["lora_A"] = da.to(saved.lora_A.dtype)
        if needs["lora_B"]:
            grads["lora_B"] = dB32.to(saved.lora_B.dtype)
        if needs["weight"]:
            dz = dy2 if dora is None else (dy2 * saved.col_scale).to(dy2.dtype)
            grads["weight"] = (dz.t() @ saved.x).to(weight.dtype)
        if needs["bias"]:
            grads["bias"] = dy2.sum(0).to(facts.bias_dtype)
        if dora is not None and needs["magnitude"]:
            grads["magnitude"] = magnitude_grad(dm_dot, saved.magnitude)
        return tuple(grads.get(name) for name in _INPUTS)


def fused_lora_linear(x: torch.Tensor, weight, bias: Optional[torch.Tensor], lora: LoRACall,
                      seed: int = 0) -> torch.Tensor:
    """y = x·Wᵀ + b + s·(D⊙x·Aᵀ)·B̂ᵀ on the Triton kernels; D is drawn from ``seed`` when p > 0.

    ``weight``: a dense tensor [N, K] or an NF4Weight of that shape. DoRA (``lora.magnitude``
    m and ``lora.norm`` n, [N]; p = 0 only): y = (m/n)⊙(x·Wᵀ + s·(x·Aᵀ)·B̂ᵀ) + b.
    """
    with on_device(x):
        return LoRALinearFunction.apply(x, weight, bias, lora.lora_A, lora.lora_B,
                                        lora.magnitude, lora, int(seed))
