"""The adapter side of one LoRA linear call, bundled: what every backend's LoRA linear takes.

    y = x·Wᵀ + b + s·(D⊙x·Aᵀ)·B̂ᵀ        (LoRA)
    y = (m/n)⊙(x·Wᵀ + s·(x·Aᵀ)·B̂ᵀ) + b  (DoRA, with ``magnitude`` m and ``norm`` n)

The call's tensors x, W and b stay separate arguments, so a launcher reads
``(x, weight, bias, lora)``.
"""
from dataclasses import dataclass
from typing import Optional

import torch

from .parts import LoRAParts


@dataclass(frozen=True)
class LoRACall:
    """lora_A [r·G, K] and lora_B [N_lora, r] (G enabled parts of ``parts``; None: one pair over
    the whole output), the scale s and the dropout probability in force (0 outside training).

    DoRA: ``magnitude`` m [N], and ``norm`` n [N] (fp32, a constant for autograd) once the
    front door has computed it (``functional.dora_weight_norm``).
    """

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    dropout_p: float = 0.0
    parts: Optional[LoRAParts] = None
    magnitude: Optional[torch.Tensor] = None
    norm: Optional[torch.Tensor] = None

    def __post_init__(self):
        # Python floats: the kernels take them as fp32 scalars whatever the caller passed.
        object.__setattr__(self, "scaling", float(self.scaling))
        object.__setattr__(self, "dropout_p", float(self.dropout_p))

    @property
    def is_dora(self) -> bool:
        return self.magnitude is not None

    @property
    def rank(self) -> int:
        """r: the rank of each A/B pair."""
        return self.lora_A.shape[0] // (1 if self.parts is None else self.parts.num_enabled)
