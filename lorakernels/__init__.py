"""lorakernels: fused LoRA for Phi-3, usable exactly where loralib is.

    import lorakernels as lora
    layer = lora.Linear(3072, 3072, r=16, lora_alpha=32)
"""
from . import settings
from .functional import lora_linear
from .lora_call import LoRACall
from .layers import Conv1d, Conv2d, Conv3d, Embedding, Linear, MergedLinear
from .lora_layer import LoRALayer
from .nf4 import NF4Weight, quantize_nf4
from .nf4_layers import NF4Linear, NF4MergedLinear
from .params import lora_state_dict, mark_only_lora_as_trainable
from .parts import LoRAParts

__all__ = [
    "Conv1d", "Conv2d", "Conv3d", "Embedding", "Linear", "LoRACall", "LoRALayer", "LoRAParts",
    "MergedLinear", "NF4Linear", "NF4MergedLinear", "NF4Weight", "lora_linear", "quantize_nf4",
    "lora_state_dict", "mark_only_lora_as_trainable", "settings",
]
__version__ = "0.1.0"
