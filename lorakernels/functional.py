"""The one front door to every op: each call reads the backend once, then runs it.

The backend is ``settings.current().backend`` (``LORAKERNELS_BACKEND`` by default; change it
for a block with ``settings.override(backend=...)``): ``auto`` uses the Triton kernels on the
CUDA path, the oneDNN path for fp32 CPU tensors (``ops/onednn_lora_linear.py``; LoRA
linears only) and the eager reference (``reference.py``) otherwise; ``triton`` forces the
kernels (on CPU tensors too, under ``TRITON_INTERPRET=1``); ``onednn`` the oneDNN path
wherever it applies (fp32 CPU tensors; the reference elsewhere); ``eager`` the reference.
Attention has a module of its own, ``attention.py``.

The model (``model/phi3.py``) calls only these functions. Triton is imported only when a
kernel runs, so the eager and oneDNN backends work where Triton is not installed.

The frozen weight of a linear is a dense tensor or an NF4Weight (QLoRA's 4-bit base): the
Triton and eager backends take either; the oneDNN path is for dense weights only.
"""
import dataclasses
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import settings
from .dora import column_norm
from .lora_call import LoRACall
from .lora_layer import LoRALayer
from .nf4 import NF4Weight
from .nf4_linear import nf4_linear
from .ops.linear_cross_entropy import linear_cross_entropy
from .ops.onednn_lora_linear import linear as onednn_linear
from .ops.onednn_lora_linear import onednn_lora_linear, uses_onednn
from .parts import LoRAParts
from .reference import (BaseWeight, base_linear_reference, dora_linear_reference,
                        lora_linear_reference, merged_lora_linear_reference, rms_norm_reference,
                        rope_reference, swiglu_reference)

IGNORE_INDEX = -100  # labels that carry no loss (prompts, padding), as in PyTorch and transformers


def selected_backend(x: torch.Tensor) -> str:
    """'triton', 'onednn' or 'eager' for this input, as the current settings say."""
    current = settings.current()
    if current.backend == "auto":
        if current.on_cuda_path(x.device):
            return "triton"
        return "onednn" if uses_onednn(x) else "eager"
    return current.backend


def _on_triton(x: torch.Tensor) -> bool:
    return selected_backend(x) == "triton" and x.numel() > 0


def base_linear(x: torch.Tensor, weight: BaseWeight, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x·Wᵀ + b without LoRA: F.linear, or for an NF4 weight a dequantising linear."""
    if not isinstance(weight, NF4Weight):
        return F.linear(x, weight, bias)
    if _on_triton(x):
        from .ops.nf4_matmul import nf4_matmul
        from .ops.triton_utils import on_device

        with on_device(x):
            return nf4_linear(x, weight, bias, nf4_matmul)
    return base_linear_reference(x, weight, bias)


def _fast_lora_linear(x: torch.Tensor, weight: BaseWeight, bias: Optional[torch.Tensor],
                      lora: LoRACall) -> Optional[torch.Tensor]:
    """The oneDNN or Triton LoRA linear (DoRA with ``lora.magnitude``) where the backend has
    one; None where the reference runs."""
    backend = selected_backend(x)
    dense = not isinstance(weight, NF4Weight)
    if (backend == "onednn" and dense and x.numel() > 0
            and uses_onednn(x, weight, lora.lora_A, lora.lora_B)):
        return onednn_lora_linear(x, weight, bias, lora)
    if backend == "triton" and x.numel() > 0:
        from .ops.lora_linear import fused_lora_linear

        # Drawn from torch's CPU generator: torch.manual_seed makes it reproducible, no GPU sync.
        seed = int(torch.randint(0, 2**31 - 1, ())) if lora.dropout_p > 0 else 0
        return fused_lora_linear(x, weight, bias, lora, seed)
    return None


def lora_linear(x: torch.Tensor, weight: BaseWeight, bias: Optional[torch.Tensor],
                lora: LoRACall) -> torch.Tensor:
    """y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ.

    x: [..., K], weight: [N, K] (any strides, or NF4), lora: A [r·G, K], B [N_lora, r], the
    scale, ``lora.dropout_p`` (the probability in force: a layer passes 0 outside training)
    and ``lora.parts``, a fused projection with one A/B pair per enabled part (None: one
    pair over the whole output).
    """
    fast = _fast_lora_linear(x, weight, bias, lora)
    if fast is not None:
        return fast
    p = lora.dropout_p
    lora_input = F.dropout(x, p, training=True) if p > 0 else None
    if lora.parts is None:
        return lora_linear_reference(x, weight, bias, lora.lora_A, lora.lora_B, lora.scaling,
                                     lora_input)
    return merged_lora_linear_reference(x, weight, bias, lora.lora_A, lora.lora_B, lora.scaling,
                                        lora.parts, lora_input)


def dora_weight_norm(
    weight: BaseWeight,
    weight_sq_norms: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    parts: Optional[LoRAParts] = None,
) -> torch.Tensor:
    """DoRA's n_j = ‖W_j + s·(B·A)_j‖ [N] in fp32, without an [N, K] temporary (``dora.py``).

    weight_sq_norms: ‖W_j‖² [N], fp32, kept by the caller while W is frozen. A·Wᵀ is the
    base GEMM of A's r·G rows, so it runs where the LoRA layer's base GEMM does (oneDNN
    for fp32 CPU tensors; NF4 included).
    """
    a = lora_A.detach().to(weight.dtype)
    with torch.no_grad():
        if selected_backend(a) == "onednn" and not isinstance(weight, NF4Weight) \
                and uses_onednn(a, weight):
            weight_a = onednn_linear(weight, a).t()  # W·Aᵀ: oneDNN's faster orientation
        else:
            weight_a = base_linear(a, weight, None)
    return column_norm(weight_sq_norms, weight_a, lora_A, lora_B, scaling, parts)


def dora_linear(x: torch.Tensor, weight: BaseWeight, bias: Optional[torch.Tensor],
                lora: LoRACall, weight_sq_norms: torch.Tensor) -> torch.Tensor:
    """DoRA (PEFT's semantics): y = (m/n)⊙(x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b without dropout.

    Shapes as ``lora_linear``; ``lora.magnitude`` m: [N]; weight_sq_norms: ‖W_j‖² [N] (fp32);
    n is computed here (``dora_weight_norm``). n is a constant in backward, so the gradients
    are LoRA's with dy scaled by m/n per column, plus dm = Σ dy⊙z / n. Without dropout the
    oneDNN and Triton paths are ``lora_linear``'s with m/n applied inside them (oneDNN's GEMM
    post-op or F2's epilogue; dy scaled in B1 and B2). With dropout, PEFT's formula adds
    (m/n − 1)⊙(h·Wᵀ), h = dropout(x): a second base GEMM. It is computed as
    (x − h)·Wᵀ + b plus DoRA of h without dropout (the same fast paths): equal in exact
    arithmetic, and two base GEMMs each way, as PEFT's.
    """
    p = lora.dropout_p
    norm = dora_weight_norm(weight, weight_sq_norms, lora.lora_A, lora.lora_B, lora.scaling,
                            lora.parts)
    h = F.dropout(x, p, training=True) if p > 0 else x
    without_dropout = dataclasses.replace(lora, dropout_p=0.0, norm=norm)
    fast = _fast_lora_linear(h, weight, None if p > 0 else bias, without_dropout)
    if fast is None:
        return dora_linear_reference(x, weight, bias, without_dropout, h if p > 0 else None)
    return fast if p == 0 else base_linear(x - h, weight, bias) + fast


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Phi-3's RMSNorm: x [..., N], weight [N] → [..., N]."""
    if selected_backend(x) == "triton":
        from .ops import rms_norm as kernels

        return kernels.rms_norm(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding of q [B, Hq, T, D] and k [B, Hk, T, D]; cos/sin [B, T, R]
    rotate the first R <= D dims of each head, the rest pass through."""
    if selected_backend(q) == "triton":
        from .ops import rope as kernels

        return kernels.apply_rope(q, k, cos, sin)
    return rope_reference(q, k, cos, sin)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """up · silu(gate) for a fused projection's output gate_up [..., 2I] (gate first) → [..., I]."""
    if selected_backend(gate_up) == "triton":
        from .ops import swiglu as kernels

        return kernels.swiglu(gate_up)
    return swiglu_reference(gate_up)


def lm_head_loss(head: nn.Linear, hidden: torch.Tensor, labels: torch.Tensor,
                 ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Summed cross entropy of ``head(hidden)`` against ``labels``: hidden [N, H], labels [N].

    Chunk by chunk (``ops/linear_cross_entropy.py``), so the [N, vocab] logits are never
    held in full; the head's bias and a LoRA head's live update are part of it, and a
    ``fan_in_fan_out`` head's [H, V] weight is read transposed. A LoRA head with dropout
    in training, a DoRA head or one with a LoRA bias takes the plain logits path (the
    chunked loss draws no dropout and knows no magnitude).
    """
    lora = None
    if isinstance(head, LoRALayer) and head.has_lora:
        live = not head.merged
        plain_only = (head.training and head.lora_dropout.p > 0) or getattr(head, "use_dora", False)
        if (live and plain_only) or "lora_B_bias" in head._parameters:
            return F.cross_entropy(head(hidden).float(), labels, ignore_index=ignore_index,
                                   reduction="sum")
        lora = (head.lora_A, head.lora_B, head.scaling) if live else None
    weight = head.weight.t() if getattr(head, "fan_in_fan_out", False) else head.weight
    return linear_cross_entropy(hidden, weight, labels, ignore_index=ignore_index, lora=lora,
                                bias=head.bias)

