"""Eager PyTorch reference for LoRA linear layers: the ground truth every kernel is tested against.

    y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ

Written for clarity, not speed. Dropout is not drawn here: the caller passes the
already dropped-out input as ``lora_input`` (``None`` means no dropout), so a test
can hand the reference exactly the mask a kernel drew.

As in PEFT, the low-rank path runs in the LoRA parameters' dtype (fp32 adapters
over a bf16 base stay fp32), is added to the base output in the wider of the two
dtypes, and the sum is rounded once to the base output's dtype.

The frozen weight may be an NF4Weight: it is dequantised eagerly (and again in backward,
see ``nf4_linear``), then used as the dense weight would be.
"""
from typing import Optional, Union

import torch
import torch.nn.functional as F

from .nf4 import NF4Weight
from .nf4_linear import nf4_linear
from .parts import LoraParts

FrozenWeight = Union[torch.Tensor, NF4Weight]


def base_linear_reference(x: torch.Tensor, weight: FrozenWeight,
                          bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x·Wᵀ + b for a dense or an NF4 weight."""
    if isinstance(weight, NF4Weight):
        return nf4_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def lora_delta(
    lora_input: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float
) -> torch.Tensor:
    """s·(h·Aᵀ)·Bᵀ for h: [..., K], A: [r, K], B: [N, r] → [..., N]."""
    h = lora_input.to(lora_A.dtype)
    return (h @ lora_A.t()) @ lora_B.t() * scaling


def lora_linear_reference(
    x: torch.Tensor,
    weight: FrozenWeight,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    lora_input: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One A/B pair over the whole output. x: [..., K], W: [N, K], A: [r, K], B: [N, r]."""
    base = base_linear_reference(x, weight, bias)
    delta = lora_delta(x if lora_input is None else lora_input, lora_A, lora_B, scaling)
    return (base + delta).to(base.dtype)


def merged_lora_linear_reference(
    x: torch.Tensor,
    weight: FrozenWeight,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    parts: LoraParts,
    lora_input: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """A fused projection with one A/B pair per enabled part.

    A: [r·G, K] (G enabled parts, stacked), B: [sum of enabled part sizes, r].
    Disabled parts get no low-rank term.
    """
    base = base_linear_reference(x, weight, bias)
    h = x if lora_input is None else lora_input
    rank = lora_A.shape[0] // parts.num_enabled
    delta = base.new_zeros(base.shape, dtype=torch.promote_types(base.dtype, lora_A.dtype))
    for g, ((out_start, out_end), (b_start, b_end)) in enumerate(
        zip(parts.enabled_out_cols, parts.enabled_b_rows)
    ):
        part_A = lora_A[g * rank : (g + 1) * rank]
        part_B = lora_B[b_start:b_end]
        delta[..., out_start:out_end] = lora_delta(h, part_A, part_B, scaling)
    return (base + delta).to(base.dtype)
