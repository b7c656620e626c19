"""Fused rotary position embedding for q and k in one launch, forward and backward.

With x = [x1, x2] split at D/2 and cos = [c1, c2], sin = [s1, s2] likewise,
Phi-3's ``x·cos + rotate_half(x)·sin`` (``reference.rope_reference``) is

    y1 = x1·c1 - x2·s1        y2 = x2·c2 + x1·s2.

Its transpose, the backward, is dx1 = dy1·c1 + dy2·s2, dx2 = dy2·c2 - dy1·s1:
the inverse rotation (by -sin) for Phi-3's cos/sin, whose halves are equal, and
still the exact gradient if they are not. Computed in fp32, rounded once (eager
rounds x·cos, rotate_half(x)·sin and their sum: ≤ about 1.5 ulps apart in bf16).

``_rope_kernel``: one program per (batch, position) loads that position's cos and
sin once, then rotates every head of q and then of k, BLOCK_H heads at a time
(GQA: q and k may have different head counts). Inputs are read by strides (q, k
are usually transposed views of the qkv projection); outputs are new contiguous
[B, H, T, D] tensors, so autograd never sees an in-place change.
Saved for backward: cos and sin only.

Partial rotary (Phi-4-mini: cos/sin [B, T, R] with R = 96 < D = 128): the kernel runs on
the views ``q[..., :R]``, ``k[..., :R]`` (strides unchanged, so no copy) and writes the
rotated dims of the outputs; the other D - R dims are copied through, and their gradient
passes through unchanged.
"""
from typing import Tuple

import torch
import triton
import triton.language as tl

from .triton_utils import INTERPRETING, cast_to, num_warps_for, on_device

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
TILE = 4096  # elements of one half-head tile: BLOCK_H · BLOCK_HALF


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _rotate_heads(
    # Pointers
    x_ptr, out_ptr,
    # Where: batch row b, position t; the rotation's cos and sin halves
    b, t, c1, s1, c2, s2,
    # Shapes
    n_heads, half,
    # Strides
    stride_xb, stride_xh, stride_xt, stride_xd,
    stride_ob, stride_oh, stride_ot, stride_od,
    # Meta-parameters
    BACKWARD: tl.constexpr, EMULATE_BF16_RTNE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    """Rotate x[b, :, t, :] into out[b, :, t, :], BLOCK_H heads per step; c*, s* are
    [BLOCK_HALF]."""
    dims = tl.arange(0, BLOCK_HALF)
    dim_ok = dims < half
    for h0 in range(0, n_heads, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)
        mask = (heads < n_heads)[:, None] & dim_ok[None, :]
        x1_ptrs = x_ptr + b * stride_xb + t * stride_xt + heads[:, None] * stride_xh \
            + dims[None, :] * stride_xd
        x1 = tl.load(x1_ptrs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x1_ptrs + half * stride_xd, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:
            y1 = x1 * c1[None, :] + x2 * s2[None, :]
            y2 = x2 * c2[None, :] - x1 * s1[None, :]
        else:
            y1 = x1 * c1[None, :] - x2 * s1[None, :]
            y2 = x2 * c2[None, :] + x1 * s2[None, :]
        y1_ptrs = out_ptr + b * stride_ob + t * stride_ot + heads[:, None] * stride_oh \
            + dims[None, :] * stride_od
        dtype = out_ptr.dtype.element_ty
        tl.store(y1_ptrs, cast_to(y1, dtype, EMULATE_BF16_RTNE), mask=mask)
        tl.store(y1_ptrs + half * stride_od, cast_to(y2, dtype, EMULATE_BF16_RTNE), mask=mask)


@triton.jit
def _rope_kernel(
    # Pointers
    q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr,
    # Shapes
    T, n_q_heads, n_k_heads, half,
    # Strides: q, k, cos, sin, then the two outputs
    stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kt, stride_kd,
    stride_cb, stride_ct, stride_cd, stride_sb, stride_st, stride_sd,
    stride_qob, stride_qoh, stride_qot, stride_qod, stride_kob, stride_koh, stride_kot, stride_kod,
    # Meta-parameters
    BACKWARD: tl.constexpr, EMULATE_BF16_RTNE: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """Forward (BACKWARD=False) or its transpose on q [B, Hq, T, D] and k [B, Hk, T, D] at one
    (b, t)."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // T
    t = pid % T
    dims = tl.arange(0, BLOCK_HALF)
    dim_ok = dims < half
    cos_row = cos_ptr + b * stride_cb + t * stride_ct + dims * stride_cd
    sin_row = sin_ptr + b * stride_sb + t * stride_st + dims * stride_sd
    c1 = tl.load(cos_row, mask=dim_ok, other=0.0).to(tl.float32)
    c2 = tl.load(cos_row + half * stride_cd, mask=dim_ok, other=0.0).to(tl.float32)
    s1 = tl.load(sin_row, mask=dim_ok, other=0.0).to(tl.float32)
    s2 = tl.load(sin_row + half * stride_sd, mask=dim_ok, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr, q_out_ptr, b, t, c1, s1, c2, s2, n_q_heads, half,
                  stride_qb, stride_qh, stride_qt, stride_qd,
                  stride_qob, stride_qoh, stride_qot, stride_qod, BACKWARD, EMULATE_BF16_RTNE,
                  BLOCK_H, BLOCK_HALF)
    _rotate_heads(k_ptr, k_out_ptr, b, t, c1, s1, c2, s2, n_k_heads, half,
                  stride_kb, stride_kh, stride_kt, stride_kd,
                  stride_kob, stride_koh, stride_kot, stride_kod, BACKWARD, EMULATE_BF16_RTNE,
                  BLOCK_H, BLOCK_HALF)


# ----------------------------------------------------------------------------- launchers


def rope_settings(n_heads: int, head_dim: int) -> Tuple[dict, int]:
    """(constexprs, num_warps): half a head dim to a power of two, as many heads as fit a TILE."""
    block_half = triton.next_power_of_2(head_dim // 2)
    block_h = min(triton.next_power_of_2(n_heads), max(1, TILE // block_half))
    return dict(BLOCK_H=block_h, BLOCK_HALF=block_half), num_warps_for(block_h * block_half)


def _rotated_outputs(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     backward: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty(q.shape, device=q.device, dtype=q.dtype),
            torch.empty(k.shape, device=k.device, dtype=k.dtype))


@torch.library.custom_op("lorakernels::rope_rotate", mutates_args=())
def rope_rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                backward: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """q [B, Hq, T, D], k [B, Hk, T, D], cos/sin [B, T, R], R <= D (any strides) → q, k with
    their first R dims rotated (contiguous); ``backward``: the inverse rotation, the gradient."""
    q_out, k_out = _rotated_outputs(q, k, cos, sin, backward)
    B, Hq, T, D = q.shape
    Hk = k.shape[1]
    R = cos.shape[-1]  # rotated dims; the last D - R pass through
    if B * T == 0:
        return q_out, k_out
    _check_devices(q, k, cos, sin)
    if R < D:
        q_out[..., R:].copy_(q[..., R:])
        k_out[..., R:].copy_(k[..., R:])
        q, k, q_rot, k_rot = q[..., :R], k[..., :R], q_out[..., :R], k_out[..., :R]
    else:
        q_rot, k_rot = q_out, k_out
    meta, warps = rope_settings(max(Hq, Hk), R)
    with on_device(q):
        _rope_kernel[(B * T,)](
            q, k, cos, sin, q_rot, k_rot, T, Hq, Hk, R // 2,
            *q.stride(), *k.stride(), *cos.stride(), *sin.stride(),
            *q_rot.stride(), *k_rot.stride(),
            BACKWARD=backward, EMULATE_BF16_RTNE=INTERPRETING, num_warps=warps, **meta,
        )
    return q_out, k_out


# Fake tensors (a memory plan, torch.compile's tracing): the outputs, allocated as above.
rope_rotate.register_fake(_rotated_outputs)


def rope_forward(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """q [B, Hq, T, D], k [B, Hk, T, D], cos/sin [B, T, R], R <= D (any strides) → q, k with their
    first R dims rotated (contiguous)."""
    return rope_rotate(q, k, cos, sin, False)


# ----------------------------------------------------------------------------- autograd


def _check_devices(q, k, cos, sin):
    """Where the kernel runs: checked by the real op only (fake tensors run nothing)."""
    named = (("q", q), ("k", k), ("cos", cos), ("sin", sin))
    if not (q.is_cuda or INTERPRETING) or any(t.device != q.device for _, t in named):
        raise RuntimeError(
            "apply_rope needs q, k, cos and sin on one CUDA device (or CPU under "
            "TRITON_INTERPRET=1); "
            f"got {', '.join(f'{n} on {t.device}' for n, t in named)}")


def _check_inputs(q, k, cos, sin):
    named = (("q", q), ("k", k), ("cos", cos), ("sin", sin))
    for name, t in named:
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"apply_rope supports float16, bfloat16 and float32; {name} is "
                            f"{t.dtype}")
    if len({t.dtype for _, t in named}) != 1:
        dtypes = ", ".join(f"{n} {t.dtype}" for n, t in named)
        raise TypeError("apply_rope needs q, k, cos and sin in one dtype (model/phi3.py builds "
                        f"cos/sin in the activation dtype); got {dtypes}")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"apply_rope needs q [B, Hq, T, D] and k [B, Hk, T, D], got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    B, _, T, D = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (B, T, D):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, length or "
                         "head dim")
    if D % 2 or not 0 < D <= MAX_HEAD_DIM:
        raise ValueError(f"apply_rope needs an even head dim from 2 to {MAX_HEAD_DIM}, got {D}")
    R = cos.shape[-1] if cos.dim() == 3 else D
    if R % 2 or not 0 < R <= D:
        raise ValueError(f"apply_rope rotates an even number of dims from 2 to the head dim {D}; "
                         f"cos/sin have {R}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[0] not in (1, B) or tuple(t.shape[1:]) != (T, R):
            raise ValueError(f"{name} must be [B, T, R] = [{B}, {T}, {R}] (or [1, {T}, {R}]), "
                             f"got {tuple(t.shape)}")


def _save_cos_sin(ctx, inputs, output):
    _, _, cos, sin, backward = inputs
    ctx.save_for_backward(cos, sin)
    ctx.backward = backward


def _rope_grad(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    dq, dk = rope_rotate(dq, dk, cos, sin, not ctx.backward)
    return dq, dk, None, None, None


# Saved for backward: cos and sin only.
rope_rotate.register_autograd(_rope_grad, setup_context=_save_cos_sin)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``reference.rope_reference`` in one launch: q [B, Hq, T, D], k [B, Hk, T, D],
    cos/sin [B, T, R] (R <= D dims rotated, the rest copied) → (rotated q, rotated k), new
    contiguous tensors."""
    _check_inputs(q, k, cos, sin)
    if any(t.requires_grad for t in (cos, sin)) and torch.is_grad_enabled():
        raise ValueError("apply_rope gives no gradient for cos or sin; pass them detached")
    B, _, T, _ = q.shape
    R = cos.shape[-1]
    # A batch of 1 broadcasts by stride 0.
    return rope_forward(q, k, cos.expand(B, T, R), sin.expand(B, T, R))
