"""NF4 dequantisation on Triton: a whole NF4Weight (lorakernels/nf4.py) into a dense buffer.

Numerics are ``dequantize_nf4_reference``'s bit for bit: absmax = float(absmax_q)·scale +
offset and value = code·absmax, each an fp32 operation rounded on its own (the launch turns
off fused multiply-add), then one round-to-nearest-even to the output dtype.

``_nf4_dequant_kernel``: BLOCKS_PER_PROGRAM 64-element blocks a program, as a
[BLOCKS_PER_PROGRAM, 32] tile of packed bytes; the code book is a tree of ``tl.where`` on
the index bits (registers, no table load); high and low nibbles are joined back into
element order and stored as one contiguous [BLOCKS_PER_PROGRAM, 64] tile.
"""
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..nf4 import ABSMAX_BLOCK_SIZE, BLOCK_SIZE, NF4Weight
from .triton_utils import INTERPRETING, cast_to, num_warps_for, on_device

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCKS_PER_PROGRAM = 16  # 1024 elements (512 bytes in) a program
_BLOCK_SIZE = tl.constexpr(BLOCK_SIZE)
_ABSMAX_BLOCK_SIZE = tl.constexpr(ABSMAX_BLOCK_SIZE)


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _nf4_code(index):
    """NF4_CODE_VALUES[index] (lorakernels/nf4.py, bitsandbytes' table) for int index in [0, 16)."""
    bit0 = (index & 1) != 0
    bit1 = (index & 2) != 0
    bit2 = (index & 4) != 0
    bit3 = (index & 8) != 0
    negative = tl.where(
        bit2,
        tl.where(bit1, tl.where(bit0, 0.0, -0.09105003625154495),
                 tl.where(bit0, -0.18477343022823334, -0.28444138169288635)),
        tl.where(bit1, tl.where(bit0, -0.39491748809814453, -0.5250730514526367),
                 tl.where(bit0, -0.6961928009986877, -1.0)))
    positive = tl.where(
        bit2,
        tl.where(bit1, tl.where(bit0, 1.0, 0.7229568362236023),
                 tl.where(bit0, 0.5626170039176941, 0.44070982933044434)),
        tl.where(bit1, tl.where(bit0, 0.33791524171829224, 0.24611230194568634),
                 tl.where(bit0, 0.16093020141124725, 0.07958029955625534)))
    return tl.where(bit3, positive, negative).to(tl.float32)


@triton.jit
def _nf4_absmax(absmax_q_ptr, absmax_scale_ptr, absmax_offset, blocks, mask):
    """The stored absmax of 64-element blocks ``blocks``: float(absmax_q)·scale + offset."""
    absmax_q = tl.load(absmax_q_ptr + blocks, mask=mask, other=0).to(tl.float32)
    scale = tl.load(absmax_scale_ptr + blocks // _ABSMAX_BLOCK_SIZE, mask=mask, other=0.0)
    return absmax_q * scale + absmax_offset  # two roundings where the launch disables fp fusion


@triton.jit
def nf4_gather(packed_ptr, absmax_q_ptr, absmax_scale_ptr, absmax_offset, flat, mask):
    """fp32 values of the NF4 weight's elements at flat (row-major) indices ``flat``; 0 where
    masked.

    For GEMMs that read 4-bit tiles of any orientation: two elements share a byte, so
    neighbouring loads hit the same cache line.
    """
    byte = tl.load(packed_ptr + flat // 2, mask=mask, other=0).to(tl.int32)
    index = tl.where(flat % 2 == 0, byte >> 4, byte & 15)  # high nibble: the even element
    absmax = _nf4_absmax(absmax_q_ptr, absmax_scale_ptr, absmax_offset, flat // _BLOCK_SIZE, mask)
    return tl.where(mask, _nf4_code(index) * absmax, 0.0)


@triton.jit
def _nf4_dequant_kernel(
    # Pointers
    packed_ptr, absmax_q_ptr, absmax_scale_ptr, out_ptr,
    # Shapes
    n_blocks,
    # Scalars
    absmax_offset,
    # Meta-parameters
    EMULATE_BF16_RTNE: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """out[b·64 + 2j + {0, 1}] = code(packed[b·32 + j] >> 4, & 15) · absmax[b] for this
    program's blocks b."""
    HALF: tl.constexpr = BLOCK_SIZE // 2
    blocks = tl.program_id(0).to(tl.int64) * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
    block_ok = blocks < n_blocks
    absmax = _nf4_absmax(absmax_q_ptr, absmax_scale_ptr, absmax_offset, blocks, block_ok)

    byte_cols = tl.arange(0, HALF)
    mask = block_ok[:, None] & (byte_cols < HALF)[None, :]
    packed = tl.load(packed_ptr + blocks[:, None] * HALF + byte_cols[None, :], mask=mask,
                     other=0).to(tl.int32)
    first = _nf4_code(packed >> 4) * absmax[:, None]  # high nibble: the earlier element
    second = _nf4_code(packed & 15) * absmax[:, None]
    values = tl.reshape(tl.join(first, second), (BLOCKS_PER_PROGRAM, BLOCK_SIZE))

    cols = tl.arange(0, BLOCK_SIZE)
    out_mask = block_ok[:, None] & (cols < BLOCK_SIZE)[None, :]
    tl.store(out_ptr + blocks[:, None] * BLOCK_SIZE + cols[None, :],
             cast_to(values, out_ptr.dtype.element_ty, EMULATE_BF16_RTNE), mask=out_mask)


# ----------------------------------------------------------------------------- launchers


def nf4_dequant_settings() -> tuple:
    """(constexprs, num_warps) for the dequantisation kernel."""
    meta = dict(BLOCKS_PER_PROGRAM=BLOCKS_PER_PROGRAM, BLOCK_SIZE=BLOCK_SIZE)
    return meta, num_warps_for(BLOCKS_PER_PROGRAM * BLOCK_SIZE)


def _check_inputs(q: NF4Weight, out: torch.Tensor):
    device = q.packed.device
    for name, t in (("absmax_q", q.absmax_q), ("absmax_scale", q.absmax_scale), ("out", out)):
        if t.device != device:
            raise RuntimeError(f"dequantize_nf4: {name} is on {t.device}, packed on {device}")
    expected = dict(packed=torch.uint8, absmax_q=torch.int8, absmax_scale=torch.float32)
    for name, dtype in expected.items():
        if getattr(q, name).dtype != dtype:
            raise TypeError(f"dequantize_nf4: {name} must be {dtype}, got {getattr(q, name).dtype}")
    if out.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"dequantize_nf4 writes float16, bfloat16 or float32; out is {out.dtype}")
    if tuple(out.shape) != tuple(q.shape) or not out.is_contiguous():
        raise ValueError(f"dequantize_nf4: out must be contiguous with shape {tuple(q.shape)}, "
                         f"got {tuple(out.shape)} (contiguous={out.is_contiguous()})")
    n_blocks = q.absmax_q.numel()
    if q.packed.numel() != n_blocks * BLOCK_SIZE // 2 or \
            q.absmax_scale.numel() != triton.cdiv(n_blocks, ABSMAX_BLOCK_SIZE):
        raise ValueError(f"dequantize_nf4: inconsistent NF4Weight: {q.packed.numel()} packed "
                         f"bytes, {n_blocks} absmax, {q.absmax_scale.numel()} scales")


@torch.library.custom_op("lorakernels::nf4_dequantize", mutates_args=("out",))
def nf4_dequantize(packed: torch.Tensor, absmax_q: torch.Tensor, absmax_scale: torch.Tensor,
                   absmax_offset: float, out: torch.Tensor) -> None:
    """An NF4 weight's codes and absmax (``NF4Weight``'s fields) dequantised into ``out``."""
    if not (packed.is_cuda or INTERPRETING):
        raise RuntimeError("dequantize_nf4 needs the NF4Weight on a CUDA device (or CPU under "
                           f"TRITON_INTERPRET=1); it is on {packed.device}")
    n_blocks = absmax_q.numel()
    meta, warps = nf4_dequant_settings()
    grid = (triton.cdiv(n_blocks, meta["BLOCKS_PER_PROGRAM"]),)
    with on_device(out):
        _nf4_dequant_kernel[grid](
            packed, absmax_q, absmax_scale, out, n_blocks, absmax_offset,
            EMULATE_BF16_RTNE=INTERPRETING, num_warps=warps, enable_fp_fusion=False, **meta,
        )


@nf4_dequantize.register_fake
def _nf4_dequantize_fake(packed, absmax_q, absmax_scale, absmax_offset, out) -> None:
    """It writes into ``out`` and allocates nothing."""


def dequantize_nf4(q: NF4Weight, out: Optional[torch.Tensor] = None,
                   dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """NF4Weight → dense tensor of q.shape, written into ``out`` (contiguous) or a new
    ``dtype`` one."""
    if out is None:
        out = torch.empty(q.shape, dtype=dtype, device=q.packed.device)
    _check_inputs(q, out)
    nf4_dequantize(q.packed, q.absmax_q, q.absmax_scale, float(q.absmax_offset), out)
    return out


# One dense buffer per (device, dtype), shared by every NF4 layer and grown to the largest
# weight seen: a layer's dequantised weight lives only until the next layer's replaces it.
_SCRATCH: Dict[Tuple[torch.device, torch.dtype], torch.Tensor] = {}


def dequantize_nf4_to_scratch(q: NF4Weight) -> torch.Tensor:
    """q dequantised (into q.dtype) into the shared buffer: valid until the next call on this
    device.

    Kernels launched on the same stream right after read it before any later
    dequantisation overwrites it, so no layer ever holds a persistent dense copy.
    """
    device = q.packed.device
    key = (device, q.dtype)
    buffer = _SCRATCH.get(key)
    if buffer is None or buffer.numel() < q.numel:
        _SCRATCH.pop(key, None)  # free the smaller buffer before allocating the larger
        buffer = _SCRATCH[key] = torch.empty(q.numel, dtype=q.dtype, device=device)
    return dequantize_nf4(q, out=buffer[:q.numel].view(q.shape))


def reset_scratch() -> None:
    """Forget the scratch buffers (a memory plan starts with none, as a new process, and
    leaves no fake buffer behind)."""
    _SCRATCH.clear()
