"""QLoRA's layers: ``Linear`` and ``MergedLinear`` whose frozen weight is held in NF4.

The dense ``weight`` parameter is replaced by three buffers, ``weight_packed``,
``weight_absmax_q`` and ``weight_absmax_scale`` (lorakernels/nf4.py's layout, about
0.52 bytes a weight), so they move with ``.to()`` but are never trained. The fp32
scales are stored as their int32 bits, so ``model.to(torch.bfloat16)`` cannot round
them; it makes the layer's products come out in bf16 instead. The absmax offset,
a float, travels in ``state_dict`` as the module's extra state. LoRA parameters
keep the dense layers' names, shapes and initialisation: an adapter trained over
the 4-bit base is the same PEFT / loralib file and loads onto the bf16 base.
The forward dequantises where it is cheapest (``lorakernels/ops/nf4_matmul.py``; a layer's
``nf4_fused_max_rows`` moves the crossover); merging the update into 4-bit weights is
refused (merge over the bf16 base instead).
"""
import dataclasses
import math
from typing import Tuple

import torch
import torch.nn as nn

from .layers import Linear, MergedLinear
from .nf4 import ABSMAX_BLOCK_SIZE, BLOCK_SIZE, NF4_FUSED_MAX_ROWS, NF4Weight, quantize_nf4


class NF4Layer:
    """Mixin for a Linear subclass: the frozen weight as NF4 buffers instead of a parameter."""

    nf4_fused_max_rows: int = NF4_FUSED_MAX_ROWS  # per layer: see NF4Weight.fused_max_rows
    weight_absmax_offset: float
    weight_shape: Tuple[int, int]
    weight_dtype: torch.dtype

    def _replace_weight_with_nf4(self, dtype: torch.dtype) -> None:
        """Drop the dense parameter; hold empty NF4 buffers of its size on its device."""
        dense = self._parameters.pop("weight")
        if self.fan_in_fan_out:
            raise ValueError("NF4 layers need fan_in_fan_out=False (weights stored [out, in])")
        numel = dense.numel()
        if numel % BLOCK_SIZE:
            raise ValueError(f"an NF4 weight needs a multiple of {BLOCK_SIZE} elements; "
                             f"[{self.out_features}, {self.in_features}] has {numel}")
        n_blocks = numel // BLOCK_SIZE
        empty = dict(packed=(numel // 2, torch.uint8), absmax_q=(n_blocks, torch.int8),
                     absmax_scale=(math.ceil(n_blocks / ABSMAX_BLOCK_SIZE), torch.int32))
        for name, (size, buffer_dtype) in empty.items():
            self.register_buffer(f"weight_{name}", torch.empty(size, dtype=buffer_dtype,
                                                               device=dense.device))
        self.weight_absmax_offset = 0.0
        self.weight_shape = (self.out_features, self.in_features)
        self.weight_dtype = dtype

    def _finish_nf4_init(self, dtype: torch.dtype, device) -> None:
        """Built on meta (no dense weight is ever allocated): swap in NF4 buffers, then move to
        ``device``."""
        self._replace_weight_with_nf4(dtype)
        if device is None or torch.device(device).type != "meta":
            self.to_empty(device=device or "cpu")
            self.reset_lora_parameters()
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    @property
    def nf4_weight(self) -> NF4Weight:
        return NF4Weight(self.weight_packed, self.weight_absmax_q,
                         self.weight_absmax_scale.view(torch.float32), self.weight_absmax_offset,
                         self.weight_shape, self.weight_dtype, self.nf4_fused_max_rows)

    def set_nf4_weight(self, q: NF4Weight) -> None:
        """Take a quantised weight of this layer's shape (its tensors, on their device)."""
        if tuple(q.shape) != self.weight_shape:
            raise ValueError(f"NF4 weight of shape {tuple(q.shape)} for a layer of weight shape "
                             f"{self.weight_shape}")
        self.weight_packed, self.weight_absmax_q = q.packed, q.absmax_q
        self.weight_absmax_scale = q.absmax_scale.view(torch.int32)  # the fp32 bits
        self.weight_absmax_offset, self.weight_dtype = q.absmax_offset, q.dtype
        self.nf4_fused_max_rows = q.fused_max_rows

    def get_extra_state(self) -> dict:
        """The absmax offset, a Python float (reading a buffer each forward would sync the GPU)."""
        return {"absmax_offset": self.weight_absmax_offset}

    def set_extra_state(self, state: dict) -> None:
        self.weight_absmax_offset = float(state["absmax_offset"])

    def _apply(self, fn, recurse=True):
        """``.to(dtype)``, ``.half()``, ...: products follow the new dtype (the codes cannot
        change)."""
        probe = fn(torch.empty(0, dtype=self.weight_dtype, device=self.weight_packed.device))
        module = super()._apply(fn, recurse)
        self.weight_dtype = probe.dtype
        return module

    def quantize_weight(self, dense: torch.Tensor, dtype: torch.dtype) -> None:
        """NF4 from a dense [out, in] weight; the layer's products come out in ``dtype``."""
        self.set_nf4_weight(dataclasses.replace(quantize_nf4(dense), dtype=dtype,
                                                fused_max_rows=self.nf4_fused_max_rows))

    def _oriented_weight(self) -> NF4Weight:
        return self.nf4_weight

    def set_merged(self, merged: bool) -> None:
        if merged and self.has_lora:
            raise ValueError("cannot merge LoRA into a 4-bit (NF4) weight: load the base in "
                             "bf16 and merge there (merge.py)")
        self.merged = merged

    def extra_repr(self) -> str:
        return super().extra_repr() + ", weight=nf4"


class NF4Linear(NF4Layer, Linear):
    """``lorakernels.Linear`` over an NF4 weight. ``r=0``: a frozen 4-bit linear layer.

    Built empty (fill it with ``quantize_weight`` or ``set_nf4_weight``), or from a
    dense layer with ``from_linear``. LoRA parameters are fp32, as ``apply_lora``'s.
    """

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.bfloat16,
                 device=None, **kwargs):
        kwargs.setdefault("merge_weights", False)
        Linear.__init__(self, in_features, out_features, device="meta", **kwargs)
        self._finish_nf4_init(dtype, device)

    @classmethod
    def from_linear(cls, layer: nn.Linear, **lora_options) -> "NF4Linear":
        """``layer``'s weight quantised, its bias kept, LoRA (``r``, ``lora_alpha``, ...) added."""
        nf4 = cls(layer.in_features, layer.out_features, dtype=layer.weight.dtype,
                  device=layer.weight.device, bias=layer.bias is not None, **lora_options)
        nf4.quantize_weight(layer.weight.detach(), layer.weight.dtype)
        nf4.bias = layer.bias
        if nf4.use_dora:
            nf4.reset_dora_magnitude()
        return nf4


class NF4MergedLinear(NF4Layer, MergedLinear):
    """``lorakernels.MergedLinear`` (one LoRA pair per part) over an NF4 weight, built empty."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.bfloat16,
                 device=None, **kwargs):
        kwargs.setdefault("merge_weights", False)
        MergedLinear.__init__(self, in_features, out_features, device="meta", **kwargs)
        self._finish_nf4_init(dtype, device)
