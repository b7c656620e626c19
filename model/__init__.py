"""A hand-written Phi-3 and Phi-4 (one architecture): mini-4k, mini-128k / 3.5-mini (LongRoPE),
medium (GQA), Phi-4 and Phi-4-mini (partial rotary, tied embeddings).

``Phi3ForCausalLM`` is imported on first use, so the config and presets load without torch.
"""
from .config import PRESETS, Phi3Config

__all__ = ["PRESETS", "Phi3Config", "Phi3ForCausalLM"]


def __getattr__(name: str):
    if name == "Phi3ForCausalLM":
        from .phi3 import Phi3ForCausalLM

        return Phi3ForCausalLM
    raise AttributeError(f"module 'model' has no attribute {name!r}")
