"""NF4 (4-bit NormalFloat) weights as in QLoRA (Dettmers et al. 2023) and bitsandbytes: eager
reference.

Layout of a quantised weight of ``numel`` elements (a multiple of BLOCK_SIZE = 64):

- ``packed`` uint8 [numel/2]: one 4-bit index into NF4_CODE per element, two a byte,
  the earlier element in the high nibble (bitsandbytes' order).
- one absmax per 64-element block, stored double-quantised: ``absmax - offset`` (offset =
  the mean absmax, a float) as int8 ``absmax_q`` [n_blocks] times an fp32 ``absmax_scale``
  per 256 blocks [ceil(n_blocks/256)]:  absmax ≈ absmax_q·scale + offset.

Double quantisation differs from bitsandbytes in one documented way: bitsandbytes encodes
``absmax - offset`` with its dynamic (signed, tree-shaped) 8-bit map in blocks of 256; here it
is symmetric int8, round to nearest, with scale = max|absmax - offset| / 127 over each 256
block. So each stored absmax is off by at most scale/2 = max|absmax - offset| / 254 (plus fp32
rounding), absolute, and an element dequantises to within
    max_gap/2 · absmax  +  absmax_error          (max_gap: largest gap between code values)
of the original (|code| ≤ 1 multiplies the absmax error by at most 1).

Dequantisation, eager here and in ``lorakernels/ops/nf4_dequant.py`` alike, is
    value = NF4_CODE[index] · (float(absmax_q)·scale + offset)
in fp32, one rounding per operation (no fused multiply-add), then rounded once to the dtype.
"""
import dataclasses
from typing import Tuple

import torch

BLOCK_SIZE = 64          # elements sharing one absmax (QLoRA / bitsandbytes default)
ABSMAX_BLOCK_SIZE = 256  # absmax values sharing one fp32 scale in the double quantisation
QUANTIZE_CHUNK_BLOCKS = 1 << 16  # blocks quantised at a time (4 Mi elements)
# Rows of input up to which the Triton GEMM reads the 4-bit codes in its K-loop; more rows
# dequantise the weight once first (lorakernels/ops/nf4_matmul.py). Not yet measured on a GPU:
# benchmarks/bench_qlora.py reports the crossover.
NF4_FUSED_MAX_ROWS = 64

# bitsandbytes' NF4 code book, index 0b0000..0b1111: bitsandbytes/functional.py get_4bit_type("nf4")
# and the nf4_dequantization_lut in csrc/kernels.cu
# (github.com/bitsandbytes-foundation/bitsandbytes, commit
# 95f9af309d4d5793847169c39288dcd3fcbdf564), generated there by
# create_normal_map(offset=0.9677083, use_extra_value=True). Every value is exactly an fp32 number.
NF4_CODE_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
# The largest gap between adjacent code values (between 0.7229568 and 1.0): rounding to the
# nearest code value is off by at most half of it, times the block's absmax.
NF4_MAX_GAP = max(b - a for a, b in zip(NF4_CODE_VALUES, NF4_CODE_VALUES[1:]))


def nf4_code(device=None) -> torch.Tensor:
    """The 16 code values as an fp32 tensor [16]."""
    return torch.tensor(NF4_CODE_VALUES, dtype=torch.float32, device=device)


@dataclasses.dataclass
class NF4Weight:
    """A weight in NF4 with double-quantised absmax (see the module docstring for the layout)."""
    packed: torch.Tensor        # uint8 [numel/2]
    absmax_q: torch.Tensor      # int8 [n_blocks]
    absmax_scale: torch.Tensor  # fp32 [ceil(n_blocks/256)]
    absmax_offset: float        # mean absmax (an fp32 value)
    shape: Tuple[int, ...]
    dtype: torch.dtype          # the original weight's dtype
    fused_max_rows: int = NF4_FUSED_MAX_ROWS  # products of up to this many rows read 4-bit tiles

    @property
    def numel(self) -> int:
        return self.packed.numel() * 2

    @property
    def n_blocks(self) -> int:
        return self.absmax_q.numel()

    @property
    def nbytes(self) -> int:
        """Bytes held: packed codes, int8 absmax, fp32 scales and the fp32 offset."""
        return (self.packed.numel() * self.packed.element_size()
                + self.absmax_q.numel() * self.absmax_q.element_size()
                + self.absmax_scale.numel() * self.absmax_scale.element_size() + 4)


def nf4_nbytes(numel: int) -> int:
    """``NF4Weight.nbytes`` for a weight of numel elements, without quantising one."""
    n_blocks = numel // BLOCK_SIZE
    return numel // 2 + n_blocks + 4 * -(-n_blocks // ABSMAX_BLOCK_SIZE) + 4


def _nearest_code_index(normalized: torch.Tensor) -> torch.Tensor:
    """Index of the code value nearest to each fp32 value in [-1, 1] (ties to the lower index).

    Comparing against the midpoints in float64 is exact: fp32 values, and the midpoints of
    two fp32 values, are float64 numbers.
    """
    code = torch.tensor(NF4_CODE_VALUES, dtype=torch.float64, device=normalized.device)
    midpoints = (code[1:] + code[:-1]) / 2
    return torch.bucketize(normalized.double(), midpoints, right=False).to(torch.uint8)


def _quantize_absmax(absmax: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """absmax fp32 [n_blocks] → (int8 [n_blocks], fp32 scale [ceil(n/256)], offset)."""
    offset = absmax.mean()  # an fp32 value, so float(offset) converts back exactly
    centered = absmax - offset
    n_blocks = absmax.numel()
    n_groups = -(-n_blocks // ABSMAX_BLOCK_SIZE)
    padded = torch.zeros(n_groups * ABSMAX_BLOCK_SIZE, dtype=torch.float32, device=absmax.device)
    padded[:n_blocks] = centered
    groups = padded.view(n_groups, ABSMAX_BLOCK_SIZE)
    scale = groups.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-equal group: any scale
    q = torch.round(groups / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.view(-1)[:n_blocks].clone(), scale, float(offset)  # clone: drop the padding


def quantize_nf4(weight: torch.Tensor) -> NF4Weight:
    """Any-shaped weight with numel a multiple of 64 → NF4Weight (on the weight's device).

    Each element is divided by its block's absmax (fp32) and stored as the index of the
    nearest NF4 code value; an all-zero block stores zeros.
    """
    numel = weight.numel()
    if numel == 0 or numel % BLOCK_SIZE:
        raise ValueError(f"quantize_nf4 needs a weight whose number of elements is a positive "
                         f"multiple of {BLOCK_SIZE}; got shape {tuple(weight.shape)} "
                         f"({numel} elements)")
    if not weight.is_floating_point():
        raise TypeError(f"quantize_nf4 needs a floating-point weight, got {weight.dtype}")
    blocks = weight.detach().reshape(-1, BLOCK_SIZE)
    packed = torch.empty(numel // 2, dtype=torch.uint8, device=weight.device)
    absmax = torch.empty(blocks.shape[0], dtype=torch.float32, device=weight.device)
    # In chunks: the fp32 and float64 temporaries stay ~100 MB whatever the weight's size.
    for start in range(0, blocks.shape[0], QUANTIZE_CHUNK_BLOCKS):
        chunk = blocks[start:start + QUANTIZE_CHUNK_BLOCKS].float()
        chunk_absmax = absmax[start:start + chunk.shape[0]]
        torch.amax(chunk.abs(), dim=1, out=chunk_absmax)
        safe = torch.where(chunk_absmax > 0, chunk_absmax, torch.ones_like(chunk_absmax))
        index = _nearest_code_index(chunk / safe[:, None]).view(-1)
        half = start * BLOCK_SIZE // 2
        # The first of each pair in the high nibble.
        packed[half:half + index.numel() // 2] = (index[0::2] << 4) | index[1::2]
    absmax_q, absmax_scale, offset = _quantize_absmax(absmax)
    return NF4Weight(packed=packed, absmax_q=absmax_q, absmax_scale=absmax_scale,
                     absmax_offset=offset, shape=tuple(weight.shape), dtype=weight.dtype)


def dequantize_absmax_reference(q: NF4Weight) -> torch.Tensor:
    """The stored absmax, fp32 [n_blocks]: absmax_q·scale + offset (separately rounded ops)."""
    group = torch.arange(q.n_blocks, device=q.absmax_q.device) // ABSMAX_BLOCK_SIZE
    return q.absmax_q.float() * q.absmax_scale[group] + q.absmax_offset


def dequantize_nf4_reference(q: NF4Weight, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Eager dequantisation: NF4Weight → tensor of q.shape in ``dtype``."""
    index = torch.stack([q.packed >> 4, q.packed & 0xF], dim=1).view(-1).long()
    values = nf4_code(q.packed.device)[index].view(-1, BLOCK_SIZE)
    absmax = dequantize_absmax_reference(q)
    return (values * absmax[:, None]).to(dtype).view(q.shape)
