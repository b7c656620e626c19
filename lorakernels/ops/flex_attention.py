"""Packed, windowed, grouped-query attention with ``torch.nn.attention.flex_attention``.

The mask is never materialised: ``packed_mask_mod`` says whether query q sees key k
(causal ∧ same segment ∧ inside the sliding window), and ``create_block_mask`` turns it
into a BlockMask that lists, per 128 × 128 tile, whether it is empty (skipped), full
(no mask work) or partial. The BlockMask is built once per batch and shared by every
layer, forward and backward. Grouped-query heads are flex's ``enable_gqa``.

``flex_attention`` runs compiled (``torch.compile(..., dynamic=False)``): one graph per
(T, head layout, dtype); the segment ids are tensors the mask reads, so a new batch of the
same shape reuses the compiled kernel. Torch has no FlexAttention backward on CPU: there
it runs forward only (the tests' path); CPU training takes the SDPA paths.
"""
from typing import Callable, Optional

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.nn.attention.flex_attention import BlockMask, flex_attention

BLOCK = 128  # FlexAttention's tile, queries and keys

_compiled_flex: Optional[Callable] = None


def packed_mask_mod(segment_ids: Optional[torch.Tensor], sliding_window: Optional[int]) -> Callable:
    """mask_mod(b, h, q, k) → bool: causal, within one segment of ``segment_ids`` [B, T] (None: one
    segment per row), and 0 <= q - k < ``sliding_window`` (None: no window)."""

    def mask_mod(b, h, q, k):
        visible = q >= k
        if sliding_window is not None:
            visible = visible & (q - k < sliding_window)
        if segment_ids is not None:
            visible = visible & (segment_ids[b, q] == segment_ids[b, k])
        return visible

    return mask_mod


def conversation_runs(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] → [B, T] index of the token starting each token's conversation: a new one where
    the id changes or a row starts (as ops/conversation_attention.py reads a packed row)."""
    T = segment_ids.shape[1]
    starts_here = torch.ones_like(segment_ids, dtype=torch.bool)
    starts_here[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    positions = torch.arange(T, device=segment_ids.device).expand_as(segment_ids)
    return torch.where(starts_here, positions, 0).cummax(dim=1).values


def first_visible_keys(segment_ids: Optional[torch.Tensor], length: int,
                       sliding_window: Optional[int], device) -> torch.Tensor:
    """[B or 1, T]: the first key query q sees. Keys first..q are visible, the rest not, so
    one integer per query describes the whole mask row (never a [T, T] anything)."""
    queries = torch.arange(length, device=device)[None, :]
    first = (conversation_runs(segment_ids) if segment_ids is not None
             else torch.zeros_like(queries))
    if sliding_window is not None:
        first = torch.maximum(first, queries - sliding_window + 1)
    return first


def _ranges(start: torch.Tensor, count: torch.Tensor, blocks: int) -> torch.Tensor:
    """[..., blocks] int32 rows start, start + 1, ... (the first ``count`` entries matter)."""
    cols = torch.arange(blocks, device=start.device)
    return (start[..., None] + cols).clamp(max=blocks - 1).to(torch.int32).where(
        cols < count[..., None], 0)


def packed_block_mask(segment_ids: Optional[torch.Tensor], length: int,
                      sliding_window: Optional[int], device: torch.device) -> BlockMask:
    """The BlockMask of ``packed_mask_mod`` for [B, T] = segment_ids' shape ([1, length] without).

    Built from each 128-query block's first and last query (``first_visible_keys``), not by
    evaluating the mask at T² points as ``create_block_mask`` does (17 GB at 131,072 tokens):
    query block i sees key blocks first(q0) // 128 .. i, of which ceil(first(q1) / 128) .. i - 1
    are full; the rest are partial, where the kernel evaluates ``packed_mask_mod``. Equal to
    ``create_block_mask``'s (tests/test_attention.py).
    """
    if sliding_window is not None and sliding_window >= length:
        sliding_window = None  # the window is the sequence: no term to evaluate
    with torch.no_grad():
        runs = None if segment_ids is None else conversation_runs(segment_ids)
        first = first_visible_keys(segment_ids, length, sliding_window, device)
        blocks = -(-length // BLOCK)
        row = torch.arange(blocks, device=first.device)
        last_query = (row * BLOCK + BLOCK - 1).clamp(max=length - 1)
        seen_from = first[:, row * BLOCK] // BLOCK
        whole_rows = row * BLOCK + BLOCK <= length  # torch pads the last block: never full
        full_from = torch.where(whole_rows, -(-first[:, last_query] // BLOCK), row)
        full_count = (row - full_from).clamp(min=0)
        partial_before = torch.minimum(full_from, row) - seen_from
        partial = _ranges(seen_from, partial_before, blocks)
        partial.scatter_(-1, partial_before[..., None], row.to(torch.int32).expand_as(
            partial_before)[..., None])
        full = _ranges(full_from, full_count, blocks)
        return BlockMask.from_kv_blocks(
            (partial_before + 1).to(torch.int32)[:, None], partial[:, None],
            full_count.to(torch.int32)[:, None], full[:, None], BLOCK_SIZE=BLOCK,
            mask_mod=packed_mask_mod(runs, sliding_window), seq_lengths=(length, length))


def computed_fraction(block_mask: BlockMask) -> float:
    """Fraction of the (query block, key block) tiles of the full T × T square that flex
    computes."""
    tiles = block_mask.kv_num_blocks.sum()
    if block_mask.full_kv_num_blocks is not None:
        tiles = tiles + block_mask.full_kv_num_blocks.sum()
    rows, cols = block_mask.kv_num_blocks.shape[-1], block_mask.kv_indices.shape[-1]
    batches = block_mask.kv_num_blocks.shape[0] * block_mask.kv_num_blocks.shape[1]
    return float(tiles) / (batches * rows * cols)


class PlannedFlexAttention(torch.autograd.Function):
    """FlexAttention's kernels' tensors for fake inputs (a memory plan): out and the fp32
    logsumexp forward; the fp32 delta (Σ out⊙dout) and dq, dk, dv backward (dk, dv per key
    head). Its kernels are compiled by torch, not custom ops of ours, and their fake outputs
    leave out the backward's delta: this counts what they allocate, computing nothing."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(q.shape)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        _delta = q.new_empty(q.shape[:-1], dtype=torch.float32)  # alive while the kernel runs
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def flex_packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          block_mask: BlockMask) -> torch.Tensor:
    """q [B, Hq, T, D], k, v [B, Hk, T, D] → [B, Hq, T, D] under ``block_mask``."""
    global _compiled_flex
    if is_fake(q):  # a memory plan: the compiled kernels' allocations only
        return PlannedFlexAttention.apply(q, k, v)
    if not q.is_cuda:
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            raise RuntimeError("attention flex on CPU runs the forward only: torch has "
                               "no FlexAttention backward on CPU; train on CPU with auto or sdpa")
        q, k, v = q.detach(), k.detach(), v.detach()  # flex refuses leaves that require grad
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != q.shape[1])
