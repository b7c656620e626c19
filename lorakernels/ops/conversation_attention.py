"""Packed attention without a mask: each packed row re-batched into its conversations.

A packed batch [B, T] holds conversations side by side (``segment_ids``, padding its own
segment). Instead of one masked [T, T] attention per row, the conversations are gathered
into a [S, L] batch (S conversations, L the longest) and attended with ``is_causal=True``:
no mask is built or read, and the work across conversations is never computed. Slots past
a conversation's end repeat its last token; they sit after every real query of that
conversation, so causal attention never lets a real query see them, and their outputs are
dropped. A conversation longer than the sliding window runs ``windowed_attention``: its
queries in blocks, each block attending to its window's keys under a [block, block + window]
mask, so no [L, L] tensor exists at any length (131,072 tokens: a 17 GB mask as bool).
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass
class ConversationBatch:
    """Where each conversation of a packed batch sits: built once per batch, shared by every layer.

    gather: [S·L] flat token index (b·T + t) of each slot; scatter: [B·T] slot of each token;
    window: the sliding window when a conversation is longer, else None (plain causal).
    """

    batch: int
    length: int
    conversations: int
    longest: int
    gather: torch.Tensor
    scatter: torch.Tensor
    window: Optional[int]

    @property
    def one_per_row(self) -> bool:
        """Each row is one conversation: the layout is the batch itself, nothing to gather."""
        return self.conversations == self.batch and self.longest == self.length


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
    window = sliding_window if sliding_window is not None and longest > sliding_window else None
    return ConversationBatch(B, T, starts.numel(), longest, gather.reshape(-1), scatter, window)


def conversation_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           layout: ConversationBatch) -> torch.Tensor:
    """Causal attention within each conversation: q [B, Hq, T, D], k, v [B, Hk, T, D] →
    [B, Hq, T, D].

    Equal to SDPA under ``reference.attention_mask(T, T, segment_ids, window)``, forward
    and backward (index_select's backward is a scatter-add into the packed layout).
    """
    if layout.one_per_row:
        return _causal(q, k, v, layout.window)
    B, T, S, L = layout.batch, layout.length, layout.conversations, layout.longest

    def regroup(x):  # [B, H, T, D] → [S, H, L, D]
        H, D = x.shape[1], x.shape[3]
        rows = x.transpose(1, 2).reshape(B * T, H, D).index_select(0, layout.gather)
        return rows.view(S, L, H, D).transpose(1, 2)

    out = _causal(regroup(q), regroup(k), regroup(v), layout.window)
    H, D = out.shape[1], out.shape[3]
    packed = out.transpose(1, 2).reshape(S * L, H, D).index_select(0, layout.scatter)
    return packed.view(B, T, H, D).transpose(1, 2)


def _causal(q, k, v, window: Optional[int]) -> torch.Tensor:
    if window is not None:
        return windowed_attention(q, k, v, window)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                          enable_gqa=k.shape[1] != q.shape[1])


MIN_QUERY_BLOCK = 128  # below this a block's SDPA call costs more than its work


def query_blocks(length: int, window: int):
    """(queries, keys, mask) per block of queries: slices of the sequence and the block's
    [queries, keys] bool mask of 0 <= q - k < window.

    Blocks of a quarter window: each computes its queries against window + block keys, 80 %
    of them inside the window (a block of a whole window would waste half). Every block
    past the first has the same layout, so one mask serves all (sliced for the two ends).
    """
    size = max(window // 4, MIN_QUERY_BLOCK)
    reach = window - 1  # keys before a block's first query that it sees
    distance = torch.arange(size)[:, None] + reach - torch.arange(size + reach)[None, :]
    mask = (distance >= 0) & (distance < window)
    for start in range(0, length, size):
        queries = slice(start, min(start + size, length))
        keys = slice(max(0, start - reach), queries.stop)
        cut = reach - (start - keys.start)  # the first block has fewer keys before it
        yield queries, keys, mask[:queries.stop - start, cut:cut + keys.stop - keys.start]


def _block(q, k, v, mask: torch.Tensor) -> torch.Tensor:
    """One block: q [B, Hq, Q, D] against its window's k, v [B, Hk, K, D] under mask [Q, K]."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.device),
                                          enable_gqa=k.shape[1] != q.shape[1])


class WindowedAttention(torch.autograd.Function):
    """Sliding-window causal attention by blocks of queries; the backward recomputes each
    block's attention and backpropagates it alone (one block's scores live at a time)."""

    @staticmethod
    def forward(ctx, q, k, v, window: int):
        ctx.save_for_backward(q, k, v)
        ctx.window = window
        out = q.new_empty(q.shape)
        for queries, keys, mask in query_blocks(q.shape[2], window):
            out[:, :, queries] = _block(q[:, :, queries], k[:, :, keys], v[:, :, keys], mask)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        dq = torch.empty_like(q)
        # A key is in up to two blocks' windows: sum its gradients in fp32, round once.
        dk, dv = (torch.zeros_like(t, dtype=torch.float32) for t in (k, v))
        for queries, keys, mask in query_blocks(q.shape[2], ctx.window):
            inputs = [t[:, :, span].detach().requires_grad_()
                      for t, span in ((q, queries), (k, keys), (v, keys))]
            with torch.enable_grad():
                out = _block(*inputs, mask)
                gq, gk, gv = torch.autograd.grad(out, inputs, grad_out[:, :, queries])
            dq[:, :, queries] = gq
            dk[:, :, keys] += gk
            dv[:, :, keys] += gv
        return dq, dk.to(k.dtype), dv.to(v.dtype), None


def windowed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       window: int) -> torch.Tensor:
    """Causal attention where query t sees keys t - window + 1 .. t: q [B, Hq, T, D],
    k, v [B, Hk, T, D] → [B, Hq, T, D]. Equal to SDPA under ``reference.attention_mask``."""
    return WindowedAttention.apply(q, k, v, window)
