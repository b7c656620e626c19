"""How a fused projection's output rows are split into parts, and which parts carry LoRA.

A fused projection such as Phi-3's ``qkv_proj`` stores several linear maps in one
weight: its output rows are the concatenation of parts (q, k, v). loralib's
``MergedLinear`` gives each enabled part its own rank-r pair (A_g, B_g); this
object is the one description of that layout shared by the layers, the eager
reference and the kernels.
"""
from dataclasses import dataclass
from itertools import accumulate
from typing import NamedTuple, Optional, Sequence, Tuple


class PartSlices(NamedTuple):
    """Where one A/B pair acts: its output columns, its rows of ``lora_B`` and of ``lora_A``."""
    out_cols: slice
    b_rows: slice
    a_rows: slice


@dataclass(frozen=True)
class LoRAParts:
    """Output split of a fused projection.

    split_sizes: rows of each part, in output order (e.g. (5120, 1280, 1280)).
    enabled: whether each part has its own LoRA pair.

    For the g-th *enabled* part, A rows are ``[g·r, (g+1)·r)`` of ``lora_A`` and
    B rows are ``enabled_b_rows[g]`` of ``lora_B``; its output columns are
    ``enabled_out_cols[g]``.
    """

    split_sizes: Tuple[int, ...]
    enabled: Tuple[bool, ...]

    def __post_init__(self):
        object.__setattr__(self, "split_sizes", tuple(int(s) for s in self.split_sizes))
        object.__setattr__(self, "enabled", tuple(bool(e) for e in self.enabled))
        if len(self.split_sizes) != len(self.enabled):
            raise ValueError(
                f"split_sizes {list(self.split_sizes)} and enable_lora {list(self.enabled)} "
                "must have the same length"
            )
        if not self.split_sizes or any(s <= 0 for s in self.split_sizes):
            raise ValueError(f"split_sizes must be positive, got {list(self.split_sizes)}")

    @classmethod
    def equal(cls, out_features: int, enabled: Sequence[bool]) -> "LoRAParts":
        """loralib's layout: ``len(enabled)`` parts of equal size."""
        if len(enabled) == 0 or out_features % len(enabled) != 0:
            raise ValueError(
                f"the length of enable_lora ({len(enabled)}) must divide "
                f"out_features ({out_features})"
            )
        return cls((out_features // len(enabled),) * len(enabled), tuple(enabled))

    @property
    def out_features(self) -> int:
        return sum(self.split_sizes)

    @property
    def num_enabled(self) -> int:
        return sum(self.enabled)

    @property
    def lora_out_features(self) -> int:
        """Rows of ``lora_B``: the enabled parts' sizes added up."""
        return sum(s for s, e in zip(self.split_sizes, self.enabled) if e)

    @property
    def enabled_out_cols(self) -> Tuple[Tuple[int, int], ...]:
        """(start, end) output columns of each enabled part."""
        starts = (0, *accumulate(self.split_sizes))
        return tuple(
            (start, start + size)
            for start, size, on in zip(starts, self.split_sizes, self.enabled)
            if on
        )

    @property
    def enabled_b_rows(self) -> Tuple[Tuple[int, int], ...]:
        """(start, end) rows of ``lora_B`` of each enabled part."""
        sizes = [s for s, e in zip(self.split_sizes, self.enabled) if e]
        starts = (0, *accumulate(sizes))
        return tuple((start, start + size) for start, size in zip(starts, sizes))

    def slices(self, rank: int) -> Tuple[PartSlices, ...]:
        """Each enabled part's pair, in order: the g-th uses A rows [g·rank, (g+1)·rank)."""
        pairs = zip(self.enabled_out_cols, self.enabled_b_rows)
        return tuple(PartSlices(slice(*cols), slice(*b_rows), slice(g * rank, (g + 1) * rank))
                     for g, (cols, b_rows) in enumerate(pairs))


def pair_slices(parts: Optional[LoRAParts], out_features: int, rank: int) -> Tuple[PartSlices, ...]:
    """The A/B pairs of a layer: ``parts``' own, or one pair over all ``out_features`` when None."""
    whole = LoRAParts((out_features,), (True,)) if parts is None else parts
    return whole.slices(rank)
