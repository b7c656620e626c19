"""A shape-only twin of FlexAttention's compiled kernels, for fake tensors.

A memory plan (``training/memory_plan.py``) runs the CUDA code path on fake tensors
(``FakeTensorMode``) on any machine. Every Triton kernel of ours is a torch custom op
whose fake implementation allocates what the real launch does (``ops/*.py``), so those
need no twin; FlexAttention's kernels are compiled by torch, and its fake outputs leave
out the backward's delta, so ``ops/flex_attention.py`` sends fake inputs here: the
tensors its kernels allocate, and nothing computed.
"""
import torch


class PlannedFlexAttention(torch.autograd.Function):
    """FlexAttention's compiled kernels' tensors: out and the fp32 logsumexp forward; the
    fp32 delta (Σ out⊙dout) and dq, dk, dv backward (dk, dv per key head)."""

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


def planned_flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``ops.flex_attention.flex_packed_attention``'s allocations: [B, Hq, T, D]."""
    return PlannedFlexAttention.apply(q, k, v)
