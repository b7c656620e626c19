"""QLoRA's 4-bit base for Phi-3: every decoder linear layer in NF4.

The embedding, the norms and the LM head stay dense, as in QLoRA with bitsandbytes
(the head's 32064 outputs are about 2.6% of Phi-3-mini's weights, and its
precision shows directly in the logits).
"""
from typing import Optional

import torch
import torch.nn as nn

from lorakernels import LoRALayer
from lorakernels.nf4_layers import NF4Layer, NF4Linear

from .config import QUANTIZE_CHOICES



def uses_nf4(quantize: Optional[str]) -> bool:
    """Whether ``quantize`` asks for NF4: True for 'nf4', False for None or 'none'; anything
    else is an error naming the choices."""
    if quantize not in (None,) + QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    return quantize == "nf4"


def quantize_decoder_linears(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Swap each decoder layer's nn.Linear for an NF4Linear whose products come out in ``dtype``.

    A weight in memory is quantised now and its dense copy dropped, layer by layer; on
    the meta device the NF4 layer stays empty for the checkpoint loader to fill tensor by
    tensor (``model.loading``), so a dense copy of the model never exists.
    """
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, module in list(parent.named_children()):
                if isinstance(module, NF4Layer) or not isinstance(module, nn.Linear):
                    continue
                if isinstance(module, LoRALayer):
                    raise ValueError("quantize the base before adding LoRA (apply_lora)")
                nf4 = NF4Linear(module.in_features, module.out_features, dtype=dtype,
                                device=module.weight.device, bias=module.bias is not None)
                if module.weight.device.type != "meta":
                    nf4.quantize_weight(module.weight.detach(), dtype)
                nf4.bias = module.bias
                setattr(parent, name, nf4)
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, NF4Layer) for m in model.modules())
