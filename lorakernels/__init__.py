"""lorakernels: fused LoRA for Phi-3, usable exactly where loralib is.

    import lorakernels as lora
    layer = lora.Linear(3072, 3072, r=16, lora_alpha=32)

The names below are imported on first use, so ``lorakernels.settings`` loads without torch.
"""
import importlib

# Public name -> the module that defines it.
_EXPORTS = {
    "lora_linear": "functional",
    **dict.fromkeys(["Conv1d", "Conv2d", "Conv3d", "ConvLoRA", "Embedding", "Linear",
                     "MergedLinear"], "layers"),
    "LoRACall": "lora_call",
    "LoRALayer": "lora_layer",
    "NF4Weight": "nf4", "quantize_nf4": "nf4",
    "NF4Linear": "nf4_layers", "NF4MergedLinear": "nf4_layers",
    "lora_state_dict": "params", "mark_only_lora_as_trainable": "params",
    "LoRAParts": "parts",
}

__all__ = sorted([*_EXPORTS, "settings"])
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    if name == "settings":
        return importlib.import_module(".settings", __name__)
    raise AttributeError(f"module 'lorakernels' has no attribute {name!r}")
