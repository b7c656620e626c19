"""Packed attention without a mask: each packed row re-batched into its conversations.

A packed batch [B, T] holds conversations side by side (``segment_ids``, padding its own
segment). Instead of one masked [T, T] attention per row, the conversations are gathered
into a [S, L] batch (S conversations, L the longest) and attended with ``is_causal=True``:
no mask is built or read, and the work across conversations is never computed. Slots past
a conversation's end repeat its last token; they sit after every real query of that
conversation, so causal attention never lets a real query see them, and their outputs are
dropped. Only when a conversation is longer than the sliding window does a [L, L] window
mask (the same for every conversation) come back.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass
class ConversationBatch:
    """Where each conversation of a packed batch sits: built once per batch, shared by every layer.

    gather: [S·L] flat token index (b·T + t) of each slot; scatter: [B·T] slot of each token;
    window_mask: [L, L] causal ∧ inside the window, or None when no conversation reaches it.
    """

    batch: int
    length: int
    conversations: int
    longest: int
    gather: torch.Tensor
    scatter: torch.Tensor
    window_mask: Optional[torch.Tensor]


def conversation_batch(segment_ids: torch.Tensor,
                       sliding_window: Optional[int]) -> ConversationBatch:
    """The layout of ``segment_ids`` [B, T]: a new conversation where the id changes or a row
    starts."""
    B, T = segment_ids.shape
    flat = segment_ids.reshape(-1)
    starts_here = torch.ones_like(flat, dtype=torch.bool)
    starts_here[1:] = flat[1:] != flat[:-1]
    starts_here[::T] = True
    starts = starts_here.nonzero().squeeze(1)
    lengths = torch.diff(starts, append=starts.new_tensor([B * T]))
    longest = int(lengths.max())  # one host sync per batch, not per layer
    offsets = torch.arange(longest, device=flat.device)
    gather = starts[:, None] + torch.minimum(offsets[None, :], lengths[:, None] - 1)
    slot = torch.arange(starts.numel() * longest, device=flat.device).view(-1, longest)
    # Token order is (conversation, offset) order.
    scatter = slot[offsets[None, :] < lengths[:, None]]
    window_mask = None
    if sliding_window is not None and longest > sliding_window:
        distance = offsets[:, None] - offsets[None, :]
        window_mask = (distance >= 0) & (distance < sliding_window)
    return ConversationBatch(B, T, starts.numel(), longest, gather.reshape(-1), scatter,
                             window_mask)


def conversation_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           layout: ConversationBatch) -> torch.Tensor:
    """Causal attention within each conversation: q [B, Hq, T, D], k, v [B, Hk, T, D] →
    [B, Hq, T, D].

    Equal to SDPA under ``reference.attention_mask(T, T, segment_ids, window)``, forward
    and backward (index_select's backward is a scatter-add into the packed layout).
    """
    B, T, S, L = layout.batch, layout.length, layout.conversations, layout.longest

    def regroup(x):  # [B, H, T, D] → [S, H, L, D]
        H, D = x.shape[1], x.shape[3]
        rows = x.transpose(1, 2).reshape(B * T, H, D).index_select(0, layout.gather)
        return rows.view(S, L, H, D).transpose(1, 2)

    out = F.scaled_dot_product_attention(
        regroup(q), regroup(k), regroup(v), attn_mask=layout.window_mask,
        is_causal=layout.window_mask is None, enable_gqa=k.shape[1] != q.shape[1])
    H, D = out.shape[1], out.shape[3]
    packed = out.transpose(1, 2).reshape(S * L, H, D).index_select(0, layout.scatter)
    return packed.view(B, T, H, D).transpose(1, 2)
