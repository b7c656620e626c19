"""A frozen linear over an NF4 weight: y = x·Ŵᵀ + b, Ŵ the dequantised W, recomputed in backward.

Autograd would otherwise keep each layer's dequantised weight alive from forward to
backward: a dense copy of the whole model. Here only the 4-bit weight is kept, and the
backward's dx = dy·Ŵ dequantises again. ``matmul(a, weight, transposed)`` computes a·Ŵᵀ
(transposed) or a·Ŵ: ``reference.nf4_matmul_reference`` or the Triton path's ``nf4_matmul``.
"""
from typing import Callable, Optional

import torch

from .nf4 import NF4Weight

NF4Matmul = Callable[[torch.Tensor, NF4Weight, bool], torch.Tensor]


class NF4LinearFunction(torch.autograd.Function):
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
               matmul: NF4Matmul) -> torch.Tensor:
    """x·Ŵᵀ + b, keeping only the 4-bit weight for backward."""
    return NF4LinearFunction.apply(x, weight, bias, matmul)
