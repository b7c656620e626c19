"""Which parameters train and which are saved: loralib's two helpers, same semantics.

``bias`` is ``"none"`` (LoRA parameters only), ``"all"`` (every parameter whose
name contains ``bias``) or ``"lora_only"`` (biases of LoRA layers).
"""
from typing import Dict

import torch
import torch.nn as nn

from .layers import LoRALayer

BIAS_MODES = ("none", "all", "lora_only")


def _check_bias_mode(bias: str) -> None:
    if bias not in BIAS_MODES:
        raise ValueError(f"bias must be one of {', '.join(BIAS_MODES)}, got {bias!r}")


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """Freeze every parameter whose name lacks ``lora_``, then unfreeze biases per ``bias``."""
    _check_bias_mode(bias)
    for name, param in model.named_parameters():
        if "lora_" not in name:
            param.requires_grad = False
    if bias == "all":
        for name, param in model.named_parameters():
            if "bias" in name:
                param.requires_grad = True
    elif bias == "lora_only":
        for module in model.modules():
            if isinstance(module, LoRALayer) and getattr(module, "bias", None) is not None:
                module.bias.requires_grad = True


def lora_state_dict(model: nn.Module, bias: str = "none") -> Dict[str, torch.Tensor]:
    """The LoRA entries of ``model.state_dict()`` (and biases per ``bias``)."""
    _check_bias_mode(bias)
    state = model.state_dict()
    if bias == "none":
        return {k: v for k, v in state.items() if "lora_" in k}
    if bias == "all":
        return {k: v for k, v in state.items() if "lora_" in k or "bias" in k}
    selected = {}
    for key, value in state.items():
        if "lora_" in key:
            selected[key] = value
            bias_key = key.split("lora_")[0] + "bias"
            if bias_key in state:
                selected[bias_key] = state[bias_key]
    return selected
