"""LoRA linear for fp32 CPU tensors: oneDNN's GEMM for the base, the low-rank path by hand.

    y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ

Why not ``F.linear``: on CPUs where MKL's sgemm takes a generic code path (AMD Zen
among them) oneDNN's inner product runs the same fp32 GEMM faster, with the same math and
the same fp32 accumulation (docs/settings.md: what it gives on train.py's step).

Why an ``autograd.Function`` rather than the eager reference: it does less. The
scale s and the dropout factor 1/(1-p) multiply S = h·Aᵀ [M, r], not the [M, N]
product; the low-rank term is accumulated into the base output by ``addmm_``
and the low-rank input gradient into the base one inside the oneDNN call (its
``add`` post-op); the dropout mask is a bool drawn from 32-bit integers
(``dropped_mask``: under half the cost of ``torch.rand`` or ``bernoulli_`` on CPU),
kept for backward instead of a scaled copy.
Saved for backward: x, the dropped-out input h (x itself without dropout), the
mask and S; with DoRA's column scale also the output (m's gradient is read from it).
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..dora import column_scale, magnitude_grad
from ..lora_call import LoRACall
from ..parts import pair_slices

# Whether this torch build has oneDNN's linear op (x86 and aarch64 builds do).
ONEDNN_AVAILABLE = (torch.backends.mkldnn.is_available()
                    and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _linear_pointwise_binary_fake(x, other, weight, bias, attr):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# torch 2.13 gives the plain op a fake (shape-only) implementation but not the fused post-op
# one: the memory plan (training/memory_plan.py) runs this path on fake tensors. A torch that
# has one already (its own Meta kernel) keeps it.
if ONEDNN_AVAILABLE and not torch._C._dispatch_has_kernel_for_dispatch_key(
        "mkldnn::_linear_pointwise.binary", "Meta"):
    try:
        torch.library.register_fake("mkldnn::_linear_pointwise.binary",
                                    _linear_pointwise_binary_fake)
    except RuntimeError:  # registered already (by torch's inductor, or a reload): keep that
        pass


def uses_onednn(*tensors: torch.Tensor) -> bool:
    """True when every tensor is an fp32 CPU tensor and oneDNN is there to multiply them."""
    return ONEDNN_AVAILABLE and all(t.device.type == "cpu" and t.dtype == torch.float32
                                    for t in tensors)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           add: Optional[torch.Tensor] = None,
           col_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x·Wᵀ + b + add, or (x·Wᵀ + b)⊙c with ``col_scale`` c [N], for x [M, K], W [N, K] (any
    strides), add [M, N]; no autograd.

    oneDNN for fp32 CPU tensors (``add`` or the scale fused as a post-op), ``F.linear``
    otherwise.
    """
    if add is not None and col_scale is not None:
        raise ValueError("linear fuses one post-op: add or col_scale, not both")
    if not (uses_onednn(x, weight) and x.shape[0] > 0):
        out = F.linear(x, weight, bias)
        if add is not None:
            return out.add_(add)
        return out if col_scale is None else out.mul_(col_scale)
    if add is not None:
        return torch.ops.mkldnn._linear_pointwise.binary(x, add, weight, bias, "add")
    if col_scale is not None:
        return torch.ops.mkldnn._linear_pointwise.binary(x, col_scale.view(1, -1), weight, bias,
                                                         "mul")
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a·b for a [M, K], b [K, N], through ``linear`` (oneDNN for fp32 CPU tensors)."""
    return linear(a, b.t())


def dropped_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """Bool mask, True where dropout zeroes an element: each independently with probability p
    (to 2⁻³², finer than torch.rand's 2⁻²⁴). Two elements per 64-bit draw, each a uniform
    int32 compared with p's threshold: 2.5× faster than torch.rand on CPU (3M elements:
    6.9 ms against 17.2)."""
    numel = math.prod(shape)
    bits = torch.empty((numel + 1) // 2, dtype=torch.int64, device=device).random_(-2**63, None)
    threshold = round(p * 2**32) - 2**31
    return (bits.view(torch.int32)[:numel] < threshold).view(shape)


# OneDNNLoRALinearFunction.apply's inputs, in order; backward returns a gradient (or None) for
# each. lora_A, lora_B and the magnitude are in ``lora`` too, and passed on their own as well:
# autograd differentiates only the tensors that apply is given directly.
_INPUTS = ("x", "weight", "bias", "lora_A", "lora_B", "magnitude", "lora")


class OneDNNLoRALinearFunction(torch.autograd.Function):
    """x [M, K], W [N, K] frozen or not, b [N] or None, A [r·G, K], B [N_lora, r] → y [M, N].

    With DoRA's ``magnitude`` m and ``lora.norm`` n [N] (p = 0): y = (m/n)⊙z + b, the scale a
    post-op of the base GEMM and applied to B's rows; backward takes m's gradient from the
    saved y (``dora.magnitude_grad``) and runs the LoRA backward on dy⊙(m/n)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, lora: LoRACall):
        dropout_p = lora.dropout_p
        slices = pair_slices(lora.parts, weight.shape[0], lora.rank)
        dropped = dropped_mask(x.shape, dropout_p, x.device) if dropout_p > 0 else None
        h = x if dropped is None else x.masked_fill(dropped, 0.0)
        low_rank_scale = lora.scaling / (1.0 - dropout_p)  # the dropout factor rides on S, not h
        S = linear(h, lora_A).mul_(low_rank_scale)
        dora = magnitude is not None
        col_scale = None
        if not dora:
            y = linear(x, weight, bias)
            for cols, b_rows, a_rows in slices:
                y[:, cols].addmm_(S[:, a_rows], lora_B[b_rows].t())
        else:
            if dropout_p > 0:
                raise ValueError("the oneDNN DoRA path is for lora_dropout 0 (functional."
                                 "dora_linear runs dropout as (x − h)·Wᵀ plus DoRA of h)")
            # c⊙(x·Wᵀ) in the GEMM's post-op, c⊙(S·Bᵀ) as S·(c⊙B)ᵀ: no pass over y for c.
            col_scale = column_scale(magnitude, lora.norm)
            y = linear(x, weight, col_scale=col_scale)
            for cols, b_rows, a_rows in slices:
                y[:, cols].addmm_(S[:, a_rows], (lora_B[b_rows] * col_scale[cols, None]).t())
            if bias is not None:
                y.add_(bias)
        ctx.save_for_backward(x, h, dropped, S, weight, lora_A, lora_B, bias,
                              y if dora else None, magnitude, col_scale)
        ctx.slices, ctx.low_rank_scale = slices, low_rank_scale
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, h, dropped, S, weight, lora_A, lora_B, bias, y, magnitude, col_scale = ctx.saved_tensors
        needs = dict(zip(_INPUTS, ctx.needs_input_grad))
        grads = {}
        if needs["bias"]:
            grads["bias"] = dy.sum(0)
        if magnitude is not None:
            # One [M, N] buffer serves m's product, then dz: a fresh one costs page faults.
            dz = torch.mul(dy, y)
            if needs["magnitude"]:
                dot = dz.sum(0)
                grads["magnitude"] = magnitude_grad(dot if bias is None else dot - bias * dy.sum(0),
                                                    magnitude)
            dy = torch.mul(dy, col_scale, out=dz)  # dz: what the LoRA product z receives
        # d(h·Aᵀ): the gradient of S = (h·Aᵀ)·scale, per part's columns of dy.
        dS = torch.cat([matmul(dy[:, cols], lora_B[b_rows]) for cols, b_rows, _ in ctx.slices],
                       dim=1)
        if needs["lora_B"]:  # torch.mm: oneDNN is slower than MKL with dy transposed
            grads["lora_B"] = torch.cat([dy[:, cols].t() @ S[:, a_rows]
                                         for cols, _, a_rows in ctx.slices])
        dS.mul_(ctx.low_rank_scale)
        if needs["lora_A"]:
            grads["lora_A"] = matmul(dS.t(), h)
        if needs["x"]:
            dh = matmul(dS, lora_A)
            if dropped is not None:
                dh.masked_fill_(dropped, 0.0)
            grads["x"] = linear(dy, weight.t(), add=dh)
        if needs["weight"]:
            grads["weight"] = dy.t() @ x
        return tuple(grads.get(name) for name in _INPUTS)


def onednn_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       lora: LoRACall) -> torch.Tensor:
    """``lora_linear`` for fp32 CPU tensors of any leading shape: x [..., K] → [..., N];
    with DoRA's ``lora.magnitude`` and ``lora.norm`` (p = 0), ``dora_linear``."""
    x2 = x.reshape(-1, x.shape[-1])
    y = OneDNNLoRALinearFunction.apply(x2, weight, bias, lora.lora_A, lora.lora_B,
                                       lora.magnitude, lora)
    return y.view(*x.shape[:-1], weight.shape[0])
