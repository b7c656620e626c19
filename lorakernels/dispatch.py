"""The one place where a LoRA linear layer's forward chooses its implementation.

``LORAKERNELS_BACKEND`` selects it, read at every call so tests can switch it:
``auto`` (default) uses the Triton kernels for CUDA tensors, the oneDNN path for
fp32 CPU tensors (``ops/onednn_lora_linear.py``) and the eager reference
otherwise; ``triton`` forces the kernels (on CPU tensors too, under
``TRITON_INTERPRET=1``); ``onednn`` the oneDNN path wherever it applies (fp32 CPU
tensors; the reference elsewhere); ``eager`` forces the reference.

The frozen weight is a dense tensor or an NF4Weight (QLoRA's 4-bit base): the
Triton and eager backends take either; the oneDNN path is for dense weights only.
"""
import os
from typing import Optional

import torch
import torch.nn.functional as F

from .nf4 import NF4Weight
from .nf4_linear import nf4_linear
from .ops.onednn_lora_linear import onednn_lora_linear, uses_onednn
from .parts import LoraParts
from .reference import FrozenWeight, lora_linear_reference, merged_lora_linear_reference

BACKEND_ENV = "LORAKERNELS_BACKEND"
BACKENDS = ("auto", "triton", "onednn", "eager")


def selected_backend(x: torch.Tensor) -> str:
    """'triton', 'onednn' or 'eager' for this input, from ``LORAKERNELS_BACKEND``."""
    choice = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(
            f"{BACKEND_ENV}={os.environ[BACKEND_ENV]!r} is not one of {', '.join(BACKENDS)}"
        )
    if choice == "auto":
        return "triton" if x.is_cuda else "onednn" if uses_onednn(x) else "eager"
    return choice


def base_linear(x: torch.Tensor, weight: FrozenWeight, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x·Wᵀ + b without LoRA: F.linear, or for an NF4 weight a dequantising linear on the selected backend."""
    if not isinstance(weight, NF4Weight):
        return F.linear(x, weight, bias)
    if selected_backend(x) == "triton" and x.numel() > 0:
        from .ops.lora_linear import nf4_matmul
        from .ops.triton_utils import on_device

        with on_device(x):
            return nf4_linear(x, weight, bias, nf4_matmul)
    return nf4_linear(x, weight, bias)


def lora_linear(
    x: torch.Tensor,
    weight: FrozenWeight,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    parts: Optional[LoraParts] = None,
) -> torch.Tensor:
    """y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ, on the selected backend.

    x: [..., K], weight: [N, K] (any strides, or NF4), A: [r·G, K], B: [N_lora, r].
    ``parts`` describes a fused projection with one A/B pair per enabled part;
    ``None`` means one pair over the whole output. Dropout is active only when
    ``training`` and ``dropout_p > 0``.
    """
    dropout_active = training and dropout_p > 0
    backend = selected_backend(x)
    dense = not isinstance(weight, NF4Weight)
    if backend == "onednn" and dense and x.numel() > 0 and uses_onednn(x, weight, lora_A, lora_B):
        return onednn_lora_linear(x, weight, bias, lora_A, lora_B, scaling,
                                  dropout_p if dropout_active else 0.0, parts)
    if backend == "triton" and x.numel() > 0:
        from .ops.lora_linear import fused_lora_linear  # imports Triton only when used

        # Drawn from torch's CPU generator: torch.manual_seed makes it reproducible, no GPU sync.
        seed = int(torch.randint(0, 2**31 - 1, ())) if dropout_active else 0
        return fused_lora_linear(
            x, weight, bias, lora_A, lora_B, scaling,
            dropout_p if dropout_active else 0.0, seed, parts,
        )
    lora_input = F.dropout(x, dropout_p, training=True) if dropout_active else None
    if parts is None:
        return lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, lora_input)
    return merged_lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, parts, lora_input)
