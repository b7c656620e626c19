"""LoRA layers, a drop-in for ``import loralib as lora`` (loralib 0.1.2).

Each layer subclasses the torch layer it adapts, so ``weight`` and ``bias`` keep
their names and a pretrained state dict loads unchanged; ``lora_A``/``lora_B``
have loralib's names, shapes, initialisation and scaling, so state dicts move
between loralib models and ours in both directions. ``eval()`` merges the
low-rank update into the frozen weight, ``train()`` takes it out again.

Beyond loralib: ``MergedLinear(split_sizes=...)`` for fused projections with
unequal parts (grouped-query qkv), ``use_rslora`` (scaling alpha/sqrt(r)),
``use_dora`` (DoRA on Linear and MergedLinear: a trainable ``lora_magnitude`` [out]),
Conv1d/Conv3d with shapes that work for any kernel size, dropout honoured by the
conv layers, and clear ``ValueError``s for impossible arguments.
"""
import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dora import row_sq_norms
from .functional import base_linear, dora_linear, dora_weight_norm, lora_linear
from .lora_call import LoRACall
from .lora_layer import LoRALayer
from .parts import LoRAParts, pair_slices


class Linear(LoRALayer, nn.Linear):
    """``nn.Linear`` plus ``s·(dropout(x)·Aᵀ)·Bᵀ``. A: [r, in], B: [out, r]."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        fan_in_fan_out: bool = False,
        merge_weights: bool = True,
        use_rslora: bool = False,
        lora_parts: Optional[LoRAParts] = None,
        use_dora: bool = False,
        lora_bias: bool = False,
        **kwargs,
    ):
        """``lora_parts``: one A/B pair per enabled part of a fused projection (see
        ``MergedLinear``); None: one pair over the whole output. ``use_dora``: DoRA, with
        one magnitude per output row (PEFT's ``lora_magnitude_vector``), fused or not.
        ``lora_bias``: B gets a bias ``lora_B_bias`` [out] (PEFT's ``lora_B.bias``), scaled
        as B is and added to the layer's bias, merged or not."""
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        LoRALayer.__init__(self, r, lora_alpha, lora_dropout, merge_weights, use_rslora)
        self.fan_in_fan_out = False  # the weight is [out, in] until the transpose below
        self.lora_parts = lora_parts
        self.use_dora = use_dora
        pairs = 1 if lora_parts is None else lora_parts.num_enabled
        lora_out = out_features if lora_parts is None else lora_parts.lora_out_features
        if r > 0 and pairs > 0:
            self.lora_A = nn.Parameter(self.weight.new_zeros((r * pairs, in_features)))
            self.lora_B = nn.Parameter(self.weight.new_zeros((lora_out, r)))
            if use_dora:
                self.lora_magnitude = nn.Parameter(self.weight.new_zeros(out_features))
            if lora_bias:
                self.lora_B_bias = nn.Parameter(self.weight.new_zeros(out_features))
            self.weight.requires_grad = False
        elif use_dora or lora_bias:
            option = "use_dora" if use_dora else "lora_bias"
            raise ValueError(f"{option} needs a low-rank path (r > 0 and a part with LoRA)")
        if lora_bias and (use_dora or lora_parts is not None):
            raise ValueError("lora_bias works with one A/B pair and without DoRA, as in PEFT")
        self._dora_sq_norms = None  # (key of the weight they belong to, ‖W_j‖² [out])
        self._dora_merge_norm = None  # n at merge time, to unmerge exactly as PEFT does
        self.reset_parameters()
        if fan_in_fan_out:
            self.weight.data = self.weight.data.transpose(0, 1)
            self.fan_in_fan_out = True

    def reset_parameters(self):
        nn.Linear.reset_parameters(self)
        self.reset_lora_parameters()

    def reset_lora_parameters(self):
        """A as nn.Linear's default init, B zero: training starts from the base model."""
        if self.has_lora:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)
            if "lora_B_bias" in self._parameters:
                nn.init.zeros_(self.lora_B_bias)
            if self.use_dora:
                self.reset_dora_magnitude()

    def reset_dora_magnitude(self):
        """m = n, the row norms of W + s·B·A, as PEFT initialises it; again whenever W is replaced.

        Nothing to compute on the meta device: layers built there get it with their weight.
        """
        if self.lora_magnitude.is_meta:
            return
        with torch.no_grad():
            self.lora_magnitude.copy_(self.dora_weight_norm())

    def _oriented_weight(self) -> torch.Tensor:
        """The weight as [out, in], a view whatever ``fan_in_fan_out`` says."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def _weight_sq_norms(self) -> torch.Tensor:
        """‖W_j‖² [out] in fp32, recomputed only when the frozen weight changes (load,
        ``.to()``)."""
        weight = self._oriented_weight()
        tensor = weight if isinstance(weight, torch.Tensor) else weight.packed
        key = (tensor.data_ptr(), tensor._version, tensor.device, weight.dtype)
        if self._dora_sq_norms is None or self._dora_sq_norms[0] != key:
            with torch.no_grad():
                self._dora_sq_norms = (key, row_sq_norms(weight))
        return self._dora_sq_norms[1]

    def dora_weight_norm(self) -> torch.Tensor:
        """DoRA's n_j = ‖W_j + s·(B·A)_j‖ [out] in fp32, by algebra (no [out, in] temporary)."""
        return dora_weight_norm(self._oriented_weight(), self._weight_sq_norms(), self.lora_A,
                                self.lora_B, self.scaling, self.lora_parts)

    def _low_rank_product(self) -> torch.Tensor:
        """Each pair's B_g·A_g in its output rows, zeros in parts without LoRA: [out, in]."""
        product = self.lora_B.new_zeros((self.out_features, self.in_features))
        for pair in pair_slices(self.lora_parts, self.out_features, self.r):
            product[pair.out_cols] = self.lora_B[pair.b_rows] @ self.lora_A[pair.a_rows]
        return product

    def delta_weight(self) -> torch.Tensor:
        delta = self._low_rank_product() * self.scaling
        return delta.t() if self.fan_in_fan_out else delta

    def set_merged(self, merged: bool) -> None:
        """DoRA merges as PEFT: W ← (m/n)⊙(W + ΔW) with n of the unmerged weight, kept to
        unmerge."""
        if not (self.use_dora and self.has_lora) or self.merged == merged:
            return super().set_merged(merged)
        weight = self._oriented_weight()
        with torch.no_grad():
            delta = self._low_rank_product() * self.scaling
            if merged:
                self._dora_merge_norm = torch.linalg.vector_norm(weight + delta, dim=1)
            factor = (self.lora_magnitude / self._dora_merge_norm).unsqueeze(1)
            new = factor * (weight + delta) if merged else weight / factor - delta
            weight.copy_(new.to(weight.dtype))
        self.merged = merged

    def live_bias(self) -> Optional[torch.Tensor]:
        """The layer's bias plus s·``lora_B_bias`` (never merged into the weight), in its dtype."""
        lora_bias = self._parameters.get("lora_B_bias")
        if lora_bias is None:
            return self.bias
        extra = lora_bias * self.scaling
        if self.bias is None:
            return extra.to(self.weight.dtype)
        return (self.bias + extra).to(self.bias.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._oriented_weight()
        bias = self.live_bias()
        if not self.has_lora or self.merged:
            return base_linear(x, weight, bias)
        lora = LoRACall(self.lora_A, self.lora_B, self.scaling,
                        self.lora_dropout.p if self.training else 0.0, self.lora_parts,
                        magnitude=self.lora_magnitude if self.use_dora else None)
        if self.use_dora:
            return dora_linear(x, weight, bias, lora, self._weight_sq_norms())
        return lora_linear(x, weight, bias, lora)


class MergedLinear(Linear):
    """One ``nn.Linear`` holding several projections (e.g. q, k, v), LoRA per part.

    ``enable_lora`` says which parts adapt; parts are equal (loralib) unless
    ``split_sizes`` gives their sizes. A: [r·G, in] and B: [sum of enabled part
    sizes, r] for G enabled parts, stacked in part order as in loralib. With
    ``use_dora`` one magnitude vector spans the whole output, every part included.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        enable_lora: Sequence[bool] = (False,),
        fan_in_fan_out: bool = False,
        merge_weights: bool = True,
        split_sizes: Optional[Sequence[int]] = None,
        use_rslora: bool = False,
        use_dora: bool = False,
        **kwargs,
    ):
        if split_sizes is None:
            parts = LoRAParts.equal(out_features, enable_lora)
        else:
            parts = LoRAParts(tuple(split_sizes), tuple(enable_lora))
            if parts.out_features != out_features:
                raise ValueError(
                    f"split_sizes {list(split_sizes)} sum to {parts.out_features}, "
                    f"not out_features ({out_features})"
                )
        super().__init__(in_features, out_features, r, lora_alpha, lora_dropout, fan_in_fan_out,
                         merge_weights, use_rslora, lora_parts=parts, use_dora=use_dora, **kwargs)
        self.enable_lora = list(enable_lora)

    @property
    def lora_ind(self) -> torch.Tensor:
        """loralib's bool mask [out] of the output rows that have LoRA (enabled parts)."""
        mask = torch.zeros(self.out_features, dtype=torch.bool, device=self.lora_B.device
                           if self.has_lora else None)
        for start, end in self.lora_parts.enabled_out_cols:
            mask[start:end] = True
        return mask

    def zero_pad(self, x: torch.Tensor) -> torch.Tensor:
        """x [rows of lora_B, ...] placed in its parts' rows of a zero [out, ...] (loralib's)."""
        result = x.new_zeros((self.out_features, *x.shape[1:]))
        result[self.lora_ind.to(x.device)] = x
        return result

    def merge_AB(self) -> torch.Tensor:
        """Each part's B·A in the weight's layout, without the scaling (loralib's)."""
        product = self._low_rank_product()
        return product.t() if self.fan_in_fan_out else product


class Embedding(LoRALayer, nn.Embedding):
    """``nn.Embedding`` plus a low-rank table: A: [r, num_embeddings] (zero), B: [dim, r]
    (normal)."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        r: int = 0,
        lora_alpha: float = 1,
        merge_weights: bool = True,
        use_rslora: bool = False,
        **kwargs,
    ):
        nn.Embedding.__init__(self, num_embeddings, embedding_dim, **kwargs)
        LoRALayer.__init__(self, r, lora_alpha, 0.0, merge_weights, use_rslora)
        if r > 0:
            self.lora_A = nn.Parameter(self.weight.new_zeros((r, num_embeddings)))
            self.lora_B = nn.Parameter(self.weight.new_zeros((embedding_dim, r)))
            self.weight.requires_grad = False
        self.reset_parameters()

    def reset_parameters(self):
        nn.Embedding.reset_parameters(self)
        self.reset_lora_parameters()

    def reset_lora_parameters(self):
        if self.has_lora:
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A).t() * self.scaling

    def _lookup(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return F.embedding(
            ids, table, self.padding_idx, self.max_norm,
            self.norm_type, self.scale_grad_by_freq, self.sparse,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self._lookup(x, self.weight)
        if not self.has_lora or self.merged:
            return result
        delta = (self._lookup(x, self.lora_A.t()) @ self.lora_B.t()) * self.scaling
        return (result + delta).to(result.dtype)  # fp32 adapters keep a bf16 table's dtype


class ConvLoRA(LoRALayer, nn.Module):
    """A convolution (``self.conv``, as in loralib) with a low-rank weight update:
    ``ConvLoRA(nn.Conv2d, in_channels, out_channels, kernel_size, r=...)``, as loralib's.

    For a d-dimensional square kernel k: A: [r·k, in·k^(d-1)], B: [out/groups·k, r·k],
    and B·A is viewed as the conv weight. For d = 2 these are loralib's shapes;
    loralib's Conv1d/Conv3d shapes only work for k = 1, where ours equal theirs.
    """

    def __init__(
        self,
        conv_module: type,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        merge_weights: bool = True,
        use_rslora: bool = False,
        **kwargs,
    ):
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int):
            raise ValueError(f"kernel_size must be an int (a square kernel), got {kernel_size!r}")
        nn.Module.__init__(self)
        self.conv = conv_module(in_channels, out_channels, kernel_size, **kwargs)
        LoRALayer.__init__(self, r, lora_alpha, lora_dropout, merge_weights, use_rslora)
        if r > 0:
            dims = len(self.conv.kernel_size)
            weight = self.conv.weight
            self.lora_A = nn.Parameter(
                weight.new_zeros((r * kernel_size, in_channels * kernel_size ** (dims - 1)))
            )
            self.lora_B = nn.Parameter(
                weight.new_zeros((out_channels // self.conv.groups * kernel_size, r * kernel_size))
            )
            weight.requires_grad = False
        self.reset_parameters()

    def reset_parameters(self):
        self.conv.reset_parameters()
        if self.has_lora:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    @property
    def lora_base_weight(self) -> nn.Parameter:
        return self.conv.weight

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Accept loralib's current layout too: it registers the conv's ``weight``/``bias`` at
        the top level as well (``weight`` next to ``conv.weight``, or instead of it)."""
        for name in ("weight", "bias"):
            if prefix + name in state_dict:
                state_dict.setdefault(f"{prefix}conv.{name}", state_dict.pop(prefix + name))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A).view(self.conv.weight.shape) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.has_lora or self.merged:
            return self.conv(x)
        if self.training and self.lora_dropout.p > 0:
            # Dropout applies to the low-rank path's input only, so it needs its own conv.
            base = self.conv(x)
            return base + self.conv._conv_forward(self.lora_dropout(x), self.delta_weight(), None)
        return self.conv._conv_forward(x, self.conv.weight + self.delta_weight(), self.conv.bias)


class Conv1d(ConvLoRA):
    def __init__(self, *args, **kwargs):
        super().__init__(nn.Conv1d, *args, **kwargs)


class Conv2d(ConvLoRA):
    def __init__(self, *args, **kwargs):
        super().__init__(nn.Conv2d, *args, **kwargs)


class Conv3d(ConvLoRA):
    def __init__(self, *args, **kwargs):
        super().__init__(nn.Conv3d, *args, **kwargs)
