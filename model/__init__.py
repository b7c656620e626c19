"""The hand-written Phi-3 family: mini-4k, mini-128k / 3.5-mini (LongRoPE), medium (GQA)."""
from .config import PRESETS, Phi3Config
from .phi3 import Phi3ForCausalLM

__all__ = ["PRESETS", "Phi3Config", "Phi3ForCausalLM"]
