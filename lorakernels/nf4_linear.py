"""A frozen linear over an NF4 weight: y = x·Ŵᵀ + b, Ŵ the dequantised W, recomputed in backward.

Autograd would otherwise keep each layer's dequantised weight alive from forward to
backward: a dense copy of the whole model. Here only the 4-bit weight is kept, and the
backward's dx = dy·Ŵ dequantises again. ``matmul(a, weight, transposed)`` computes a·Ŵᵀ
(transposed) or a·Ŵ: the eager reference below, or the Triton path's ``nf4_matmul``.
"""
from typing import Callable, Optional

import torch

from .nf4 import NF4Weight, dequantize_nf4_reference

NF4Matmul = Callable[[torch.Tensor, NF4Weight, bool], torch.Tensor]


def nf4_matmul_reference(a: torch.Tensor, weight: NF4Weight, transposed: bool) -> torch.Tensor:
    """a·Ŵᵀ or a·Ŵ, Ŵ dequantised eagerly into the weight's dtype (rounded once, as the kernels)."""
    dense = dequantize_nf4_reference(weight, weight.dtype)
    return a @ (dense.t() if transposed else dense)


class FrozenNF4Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight: NF4Weight, bias, matmul: NF4Matmul):
        if x.dtype != weight.dtype:
            raise TypeError(f"x is {x.dtype} but the NF4 weight dequantises to {weight.dtype}; "
                            "they must match")
        n, k = weight.shape
        y = matmul(x.reshape(-1, k), weight, True)
        if bias is not None:
            y = y + bias
        ctx.weight, ctx.matmul, ctx.x_shape = weight, matmul, x.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.view(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, dy):
        n, _ = ctx.weight.shape
        dy2 = dy.reshape(-1, n)
        dx = db = None
        if ctx.needs_input_grad[0]:
            dx = ctx.matmul(dy2, ctx.weight, False).view(ctx.x_shape)
        if ctx.needs_input_grad[2]:
            db = dy2.sum(0).to(ctx.bias_dtype)
        return dx, None, db, None


def nf4_linear(x: torch.Tensor, weight: NF4Weight, bias: Optional[torch.Tensor],
               matmul: NF4Matmul = nf4_matmul_reference) -> torch.Tensor:
    """x·Ŵᵀ + b, keeping only the 4-bit weight for backward."""
    return FrozenNF4Linear.apply(x, weight, bias, matmul)
