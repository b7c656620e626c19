"""The low-rank term s·(p·q̂ᵀ)⊙D that F2 and B2 add to a GEMM: its arguments and its tile.

Both GEMM paths compute it with ``lowrank_tile``: the fused GEMM (``fused_gemm.py``) before
its K-loop, the cuBLAS path's epilogue (``cublas_epilogue.py``) after torch's GEMM. So the
two paths' low-rank terms are the same code; only their rounding differs.
"""
import dataclasses
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .dropout_bits import dropout_kept
from .triton_utils import next_block

# A GEMM without a low-rank term still compiles one BLOCK_R.
NO_LOWRANK_BLOCK_R = next_block(0)


@dataclasses.dataclass(frozen=True)
class LowRank:
    """s·(p·q̂ᵀ)⊙D for an output [M, N]: p [M, R] fp32, q̂ [N, R].

    q̂ is ``q`` itself ([N, R], any strides), or with ``q_index`` = (row, offset), int32 [N]
    each, q [N_lora, r] expanded to every output column: q̂[n, j] = q[row[n], j - offset[n]]
    for j in [offset[n], offset[n] + r), else 0 (and 0 where row[n] is -1): B̂ of a fused
    projection. ``mask``: D's packed bits [M, ceil(N/32)] int32, as F1 wrote them, exactly
    when ``dropout_p`` > 0 (D is 1/(1-p) where kept, 0 where dropped).
    """

    p: torch.Tensor
    q: torch.Tensor
    scaling: float = 1.0
    q_index: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    dropout_p: float = 0.0
    mask: Optional[torch.Tensor] = None

    def __post_init__(self):
        if (self.dropout_p > 0) != (self.mask is not None):
            raise ValueError(f"a low-rank term with dropout_p {self.dropout_p} takes D's bits as "
                             "mask exactly when dropout_p > 0")

    @property
    def block_r(self) -> int:
        """The kernels' BLOCK_R: a power of two covering R."""
        return next_block(self.p.shape[1])

    def tensors(self) -> List[Optional[torch.Tensor]]:
        """[p, q, row, offset, mask]: what a torch custom op takes (no dataclass crosses it)."""
        row, offset = self.q_index if self.q_index is not None else (None, None)
        return [self.p, self.q, row, offset, self.mask]

    @classmethod
    def of(cls, tensors: List[Optional[torch.Tensor]], scaling: float,
           dropout_p: float) -> "LowRank":
        """The term back from ``tensors()`` and its two scalars."""
        p, q, row, offset, mask = tensors
        q_index = None if row is None else (row, offset)
        return cls(p, q, scaling, q_index, dropout_p, mask)

    def q_index_pointers(self, placeholder: torch.Tensor):
        """(row, offset) for a kernel; any tensor stands in when there is nothing to gather."""
        return self.q_index if self.q_index is not None else (placeholder, placeholder)


@triton.jit
def expanded_b_offsets(
    # Pointers: B̂'s gather, b_row and b_off per output column
    row_ptr, off_ptr,
    # The tile: its output columns and ranks
    cols, ranks,
    # Shapes
    N, RANK,
    # Strides of B
    stride_row, stride_rank,
    # Meta-parameters
    GATHER: tl.constexpr,
):
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
def lowrank_tile(
    # Pointers
    p_ptr, q_ptr, q_row_ptr, q_off_ptr, mask_ptr,
    # The tile: its rows and columns of the output
    rows, cols,
    # Shapes
    M, N, R, Q_RANK,
    # Strides
    stride_q_row, stride_q_rank,
    # Scalars
    scaling,
    # Meta-parameters
    P: tl.constexpr, HAS_DROPOUT: tl.constexpr, GATHER_Q: tl.constexpr, CAST_FP32: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, dtype: tl.constexpr,
):
    """s·(p·q̂ᵀ)⊙D on one [BLOCK_M, BLOCK_N] tile, fp32: an [M, R]·[R, N] product."""
    ranks = tl.arange(0, BLOCK_R)
    p = tl.load(p_ptr + rows[:, None] * R + ranks[None, :],
                mask=(rows[:, None] < M) & (ranks[None, :] < R), other=0.0)
    q_offsets, q_mask = expanded_b_offsets(q_row_ptr, q_off_ptr, cols, ranks, N, Q_RANK,
                                           stride_q_row, stride_q_rank, GATHER_Q)
    q = tl.trans(tl.load(q_ptr + q_offsets, mask=q_mask, other=0.0))
    if CAST_FP32:
        lowrank = tl.dot(p, q.to(tl.float32), input_precision=PRECISION)
    else:
        lowrank = tl.dot(p.to(dtype), q.to(dtype), input_precision=PRECISION)
    if HAS_DROPOUT:
        kept = dropout_kept(mask_ptr, rows, cols, M, N)
        return tl.where(kept, (scaling / (1.0 - P)) * lowrank, 0.0)
    return scaling * lowrank
