"""What every LoRA layer shares, apart from its torch layer: rank, alpha, dropout, merge state.

A plain mixin, as loralib's: each layer subclasses the torch layer it adapts and this,
so code that only needs to know "is this a LoRA layer, and is its update live?"
(``functional.lm_head_loss``, the adapter files) depends on nothing else.
"""
import math

import torch
import torch.nn as nn


class LoRALayer:
    """Mixin holding what every LoRA layer shares: rank, alpha, dropout, merge state.

    Subclasses create ``lora_A``/``lora_B`` when they have a low-rank path and
    implement ``delta_weight()``: the scaled update in the frozen weight's layout.
    """

    def __init__(
        self,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        merge_weights: bool,
        use_rslora: bool = False,
    ):
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueError(f"r must be a non-negative integer, got {r!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_dropout = nn.Dropout(p=lora_dropout)
        self.use_rslora = use_rslora
        if r > 0:
            self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.merged = False
        self.merge_weights = merge_weights

    @property
    def has_lora(self) -> bool:
        return "lora_A" in self._parameters

    @property
    def lora_base_weight(self) -> nn.Parameter:
        """The frozen weight the update merges into."""
        return self.weight

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def set_merged(self, merged: bool) -> None:
        """Add the low-rank update into the frozen weight, or take it out again."""
        if self.merged != merged:
            if self.has_lora:
                weight = self.lora_base_weight
                with torch.no_grad():
                    delta = self.delta_weight().to(weight.dtype)
                    weight.data += delta if merged else -delta
            self.merged = merged

    def train(self, mode: bool = True):
        """Unmerge on ``train()``, merge on ``eval()`` (when ``merge_weights``)."""
        super().train(mode)
        if self.merge_weights:
            self.set_merged(not mode)
        return self
