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
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

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


def packed_block_mask(segment_ids: Optional[torch.Tensor], length: int,
                      sliding_window: Optional[int], device: torch.device) -> BlockMask:
    """The BlockMask of ``packed_mask_mod`` for [B, T] = segment_ids' shape ([1, length]
    without)."""
    if sliding_window is not None and sliding_window >= length:
        sliding_window = None  # the window is the sequence: no term to evaluate
    batch = 1 if segment_ids is None else segment_ids.shape[0]
    with torch.no_grad():
        return create_block_mask(packed_mask_mod(segment_ids, sliding_window), batch, None,
                                 length, length, device=device)


def computed_fraction(block_mask: BlockMask) -> float:
    """Fraction of the (query block, key block) tiles of the full T × T square that flex
    computes."""
    tiles = block_mask.kv_num_blocks.sum()
    if block_mask.full_kv_num_blocks is not None:
        tiles = tiles + block_mask.full_kv_num_blocks.sum()
    rows, cols = block_mask.kv_num_blocks.shape[-1], block_mask.kv_indices.shape[-1]
    batches = block_mask.kv_num_blocks.shape[0] * block_mask.kv_num_blocks.shape[1]
    return float(tiles) / (batches * rows * cols)


def flex_packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          block_mask: BlockMask) -> torch.Tensor:
    """q [B, Hq, T, D], k, v [B, Hk, T, D] → [B, Hq, T, D] under ``block_mask``."""
    global _compiled_flex
    if is_fake(q):  # a memory plan: the compiled kernels' allocations only
        from ..planned_kernels import planned_flex_attention

        return planned_flex_attention(q, k, v)
    if not q.is_cuda:
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            raise RuntimeError("attention flex on CPU runs the forward only: torch has "
                               "no FlexAttention backward on CPU; train on CPU with auto or sdpa")
        q, k, v = q.detach(), k.detach(), v.detach()  # flex refuses leaves that require grad
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != q.shape[1])
