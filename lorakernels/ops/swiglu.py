"""Fused SwiGLU on a fused gate_up projection: out = up · silu(gate).

gate_up [..., 2I] holds gate in its first half and up in its second (Phi3MLP's
``gate_up_proj(x).chunk(2, -1)``). The kernels read both halves by strides, so a
strided view is never copied, and compute in fp32 with one rounding per output
(eager PyTorch also rounds silu(gate) to the activation dtype first: the two
differ by at most about one ulp in bf16/fp16 and agree to fp32 rounding in fp32).

Forward  ``_swiglu_forward_kernel``: out[m, c] = up·g·σ(g), g = gate[m, c].
Backward ``_swiglu_backward_kernel``: recomputes σ(g) from the saved input and
         writes d(gate_up) = [dout·up·σ(g)·(1 + g·(1 - σ(g))), dout·g·σ(g)].
Grid: (rows, column blocks of BLOCK). Saved for backward: gate_up only.
"""
from typing import Tuple

import torch
import triton
import triton.language as tl

from .triton_utils import INTERPRETING, cast_to, num_warps_for, on_device

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_BLOCK = 8192  # elementwise: wider rows take several column blocks


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _load_row_block(gate_ptr, up_ptr, n_cols, stride_in_m, stride_in_n, BLOCK: tl.constexpr):
    """This program's row and column block: (row, cols, mask, gate, up), gate and up in fp32."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    offsets = row * stride_in_m + cols * stride_in_n
    gate = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    return row, cols, mask, gate, up


@triton.jit
def _swiglu_forward_kernel(
    # Pointers
    gate_ptr, up_ptr, out_ptr,
    # Shapes
    n_cols,
    # Strides
    stride_in_m, stride_in_n, stride_out_m, stride_out_n,
    # Meta-parameters
    EMULATE_BF16_RTNE: tl.constexpr, BLOCK: tl.constexpr,
):
    """out[m, c] = up[m, c]·silu(gate[m, c]), fp32, rounded once. gate and up share strides."""
    row, cols, mask, gate, up = _load_row_block(gate_ptr, up_ptr, n_cols, stride_in_m, stride_in_n,
                                                BLOCK)
    out = up * (gate * tl.sigmoid(gate))
    tl.store(out_ptr + row * stride_out_m + cols * stride_out_n,
             cast_to(out, out_ptr.dtype.element_ty, EMULATE_BF16_RTNE), mask=mask)


@triton.jit
def _swiglu_backward_kernel(
    # Pointers
    dout_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr,
    # Shapes
    n_cols,
    # Strides
    stride_dout_m, stride_dout_n, stride_in_m, stride_in_n, stride_din_m, stride_din_n,
    # Meta-parameters
    EMULATE_BF16_RTNE: tl.constexpr, BLOCK: tl.constexpr,
):
    """dgate = dout·up·silu'(gate), dup = dout·silu(gate); silu' = σ·(1 + g·(1 - σ))."""
    row, cols, mask, gate, up = _load_row_block(gate_ptr, up_ptr, n_cols, stride_in_m, stride_in_n,
                                                BLOCK)
    dout = tl.load(dout_ptr + row * stride_dout_m + cols * stride_dout_n, mask=mask,
                   other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    dgate = dout * up * (sig * (1.0 + gate * (1.0 - sig)))
    din = row * stride_din_m + cols * stride_din_n
    tl.store(dgate_ptr + din, cast_to(dgate, dgate_ptr.dtype.element_ty, EMULATE_BF16_RTNE),
             mask=mask)
    tl.store(dup_ptr + din, cast_to(dout * silu, dup_ptr.dtype.element_ty, EMULATE_BF16_RTNE),
             mask=mask)


# ----------------------------------------------------------------------------- launchers


def swiglu_settings(n_cols: int) -> Tuple[dict, int]:
    """(constexprs, num_warps): a power-of-two column block covering the row, capped at
    MAX_BLOCK."""
    block = min(MAX_BLOCK, triton.next_power_of_2(n_cols))
    return dict(BLOCK=block), num_warps_for(block)


def _grid(M: int, n_cols: int, block: int):
    return (M, triton.cdiv(n_cols, block))


def _forward_output(gate_up: torch.Tensor) -> torch.Tensor:
    M, inter = gate_up.shape[0], gate_up.shape[1] // 2
    return torch.empty((M, inter), device=gate_up.device, dtype=gate_up.dtype)


@torch.library.custom_op("lorakernels::swiglu_forward", mutates_args=())
def swiglu_forward(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [M, 2I] (any strides) → out [M, I] in its dtype (I: the intermediate size)."""
    out = _forward_output(gate_up)
    M, inter = out.shape
    if M == 0 or inter == 0:
        return out
    _check_device(gate_up)
    gate, up = gate_up[:, :inter], gate_up[:, inter:]  # views: only the pointer moves
    meta, warps = swiglu_settings(inter)
    with on_device(gate_up):
        _swiglu_forward_kernel[_grid(M, inter, meta["BLOCK"])](
            gate, up, out, inter, gate_up.stride(0), gate_up.stride(1), out.stride(0),
            out.stride(1), EMULATE_BF16_RTNE=INTERPRETING, num_warps=warps, **meta,
        )
    return out


def _backward_output(dout: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    return torch.empty((dout.shape[0], 2 * dout.shape[1]), device=gate_up.device,
                       dtype=gate_up.dtype)


@torch.library.custom_op("lorakernels::swiglu_backward", mutates_args=())
def swiglu_backward(dout: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """dout [M, I], gate_up [M, 2I] (any strides) → d(gate_up) [M, 2I] in gate_up's dtype."""
    dgate_up = _backward_output(dout, gate_up)
    M, inter = dout.shape
    if M == 0 or inter == 0:
        return dgate_up
    _check_device(gate_up)
    meta, warps = swiglu_settings(inter)
    with on_device(gate_up):
        _swiglu_backward_kernel[_grid(M, inter, meta["BLOCK"])](
            dout, gate_up[:, :inter], gate_up[:, inter:], dgate_up[:, :inter],
            dgate_up[:, inter:], inter,
            dout.stride(0), dout.stride(1), gate_up.stride(0), gate_up.stride(1),
            dgate_up.stride(0), dgate_up.stride(1),
            EMULATE_BF16_RTNE=INTERPRETING, num_warps=warps, **meta,
        )
    return dgate_up


# Fake tensors (a memory plan, torch.compile's tracing): the outputs, allocated as above.
swiglu_forward.register_fake(_forward_output)
swiglu_backward.register_fake(_backward_output)


# ----------------------------------------------------------------------------- autograd


def _check_device(gate_up: torch.Tensor):
    """Where the kernels run: checked by the real op only (fake tensors run nothing)."""
    if not (gate_up.is_cuda or INTERPRETING):
        raise RuntimeError("swiglu needs a CUDA tensor (or CPU under TRITON_INTERPRET=1); "
                           f"got one on {gate_up.device}")


def _check_inputs(gate_up: torch.Tensor):
    if gate_up.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"swiglu supports float16, bfloat16 and float32, got {gate_up.dtype}")
    if gate_up.dim() == 0 or gate_up.shape[-1] % 2:
        raise ValueError("swiglu needs gate_up [..., 2·I] (gate then up), got "
                         f"{tuple(gate_up.shape)}")


def _save_input(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _swiglu_grad(ctx, dout):
    (gate_up,) = ctx.saved_tensors
    return swiglu_backward(dout, gate_up)


# Saved for backward: gate_up only.
swiglu_forward.register_autograd(_swiglu_grad, setup_context=_save_input)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """up·silu(gate) on the Triton kernels: gate_up [..., 2I] (gate first) → [..., I]."""
    _check_inputs(gate_up)
    two_i = gate_up.shape[-1]
    out = swiglu_forward(gate_up.reshape(-1, two_i))
    return out.view(*gate_up.shape[:-1], two_i // 2)
