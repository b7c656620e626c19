"""Attention for the model: a plan decided once per batch, then run by every layer.

Which kernel runs is ``settings.current().attention`` (``LORAKERNELS_ATTENTION`` by
default): ``auto`` takes FlexAttention on the CUDA path when the batch needs a mask
(packing, or a window shorter than the keys) and SDPA otherwise; ``flex`` takes it for
every uncached forward (on CPU forward only, compiled: for tests); ``sdpa`` never. On SDPA a
packed batch is re-batched into its conversations (measured faster than the masked call on
CPU: docs/attention.md), one sequence longer than the window runs in blocks of queries
against their window's keys, and only a few queries of a KV cache get ``attention_mask``'s
mask: no path builds a [T, T] tensor for a whole sequence.
"""
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from . import settings
from .reference import attention_mask, attention_reference

if TYPE_CHECKING:
    from .ops.conversation_attention import ConversationBatch


@dataclass
class AttentionPlan:
    """How one forward's attention runs, decided once per batch and shared by every layer.

    kind: ``causal`` (SDPA, is_causal, or one query seeing every key), ``masked`` (SDPA
    under ``mask`` [B or 1, 1, Tq, Tk]: a few queries of a KV cache), ``conversations``
    (each packed row re-batched into its conversations, causal SDPA, no mask:
    ``ops/conversation_attention.py``), ``windowed`` (rows longer than ``window``: blocks
    of queries against their window's keys, the same file) or ``flex`` (FlexAttention
    under ``block_mask``: ``ops/flex_attention.py``).
    """

    kind: str
    mask: Optional[torch.Tensor] = None
    conversations: Optional["ConversationBatch"] = None
    block_mask: Optional[object] = None
    window: Optional[int] = None


def attention_plan(segment_ids: Optional[torch.Tensor], query_len: int, key_len: int,
                   sliding_window: Optional[int], device: torch.device,
                   cached: bool = False) -> AttentionPlan:
    """The plan for queries that are the last ``query_len`` of ``key_len`` positions.

    ``segment_ids`` [B, T]: packed conversations (attention never crosses them), or None.
    ``cached``: keys come from a KV cache (generation), which always runs SDPA.
    """
    current = settings.current()
    window_matters = sliding_window is not None and sliding_window < key_len
    needs_mask = segment_ids is not None or window_matters
    uncached = not cached and query_len == key_len
    flex = current.attention == "flex" or (current.attention == "auto" and needs_mask
                                           and current.on_cuda_path(device))
    if uncached and flex:
        from .ops.flex_attention import packed_block_mask

        return AttentionPlan("flex", block_mask=packed_block_mask(segment_ids, key_len,
                                                                  sliding_window, device))
    if uncached and segment_ids is not None:
        from .ops.conversation_attention import conversation_batch

        return AttentionPlan("conversations",
                             conversations=conversation_batch(segment_ids, sliding_window))
    if window_matters and segment_ids is None and query_len == key_len:
        return AttentionPlan("windowed", window=sliding_window)
    mask = attention_mask(query_len, key_len, segment_ids, sliding_window, device)
    return AttentionPlan("causal" if mask is None else "masked", mask=mask)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              plan: Optional[AttentionPlan] = None) -> torch.Tensor:
    """Scaled dot-product attention as ``plan`` says: q [B, Hq, Tq, D], k, v [B, Hk, Tk, D]
    (Hk divides Hq: grouped-query heads) → [B, Hq, Tq, D]. No plan: causal attention."""
    if plan is None or plan.kind in ("causal", "masked"):
        return attention_reference(q, k, v, None if plan is None else plan.mask)
    if plan.kind == "conversations":
        from .ops.conversation_attention import conversation_attention

        return conversation_attention(q, k, v, plan.conversations)
    if plan.kind == "windowed":
        from .ops.conversation_attention import windowed_attention

        return windowed_attention(q, k, v, plan.window)
    from .ops.flex_attention import flex_packed_attention

    return flex_packed_attention(q, k, v, plan.block_mask)
