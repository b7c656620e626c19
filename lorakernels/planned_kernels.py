"""Shape-only twins of the Triton LoRA linear, the NF4 matmul and FlexAttention, for fake tensors.

A memory plan (``training/memory_plan.py``) runs the CUDA code path on fake tensors
(``FakeTensorMode``) on any machine. A Triton launch cannot run on a fake tensor, so
``functional`` sends fake inputs of the Triton path here: each twin allocates what its
real launcher allocates (outputs, what it saves for backward, the scratch it keeps) and
computes nothing. They mirror ``ops/lora_linear.py`` (F1, F2, B1, B2, B3 on the fused
GEMM), ``ops/nf4_matmul.py`` and ``ops/flex_attention.py``: a change to what one of those
allocates belongs here too (tests/test_memory_plan.py compares the shapes).
"""
from typing import TYPE_CHECKING, Dict, Optional, Tuple

import torch
import triton

from .dora import column_scale, magnitude_grad
from .nf4 import NF4Weight
from .ops.lora_linear import _b3_programs, b3_splits

if TYPE_CHECKING:
    from .lora_call import LoRACall

# ops/nf4_dequant.py's scratch buffer: one per (device, dtype), the size of the largest
# weight dequantised so far, alive for the whole run.
_SCRATCH: Dict[Tuple[torch.device, torch.dtype], torch.Tensor] = {}


def reset_scratch() -> None:
    """Forget the planned scratch buffers (a new plan starts with none, as a new process)."""
    _SCRATCH.clear()


def _dense_operand(weight: NF4Weight, rows: int) -> None:
    """An NF4 weight over more than ``fused_max_rows`` rows is dequantised into the scratch."""
    if rows <= weight.fused_max_rows:
        return
    key = (weight.packed.device, weight.dtype)
    buffer = _SCRATCH.get(key)
    if buffer is None or buffer.numel() < weight.numel:
        _SCRATCH.pop(key, None)
        _SCRATCH[key] = weight.packed.new_empty(weight.numel, dtype=weight.dtype)


def planned_nf4_matmul(a: torch.Tensor, weight: NF4Weight, transposed: bool) -> torch.Tensor:
    """``ops.nf4_matmul.nf4_matmul``'s allocations: a·Wᵀ [M, N] (transposed) or a·W [M, K]."""
    _dense_operand(weight, a.shape[0])
    n, k = weight.shape
    return a.new_empty((a.shape[0], n if transposed else k))


class PlannedLoRALinear(torch.autograd.Function):
    """``ops.lora_linear.LoRALinearFunction``'s tensors, forward and backward, without the math."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, dropout_p, magnitude, norm):
        N, K = weight.shape
        x2 = x.reshape(-1, K)
        M, R = x2.shape[0], lora_A.shape[0]
        col_scale = column_scale(magnitude, norm) if magnitude is not None else None
        s = x2.new_empty((M, R), dtype=torch.float32)  # F1
        mask = x2.new_empty((M, triton.cdiv(K, 32)), dtype=torch.int32) if dropout_p > 0 else None
        nf4 = isinstance(weight, NF4Weight)
        if nf4:
            _dense_operand(weight, M)
        y = x2.new_empty((M, N))  # F2, bias and scale in its epilogue
        dora = (y, magnitude, col_scale) if magnitude is not None else (None,) * 3
        ctx.save_for_backward(x2, None if nf4 else weight, lora_A, lora_B, s, mask, *dora)
        ctx.nf4_weight = weight if nf4 else None
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, lora_A, lora_B, s, mask, y, magnitude, col_scale = ctx.saved_tensors
        weight = ctx.nf4_weight if weight is None else weight
        need_dx, need_dw, need_db, need_da, need_dB = ctx.needs_input_grad[:5]
        N, K = weight.shape
        dy2 = dy.reshape(-1, N)
        M, R = dy2.shape[0], lora_A.shape[0]
        _ds = dy2.new_empty((M, R), dtype=torch.float32)  # B1: dS, alive through B2 and B3
        db = dy2.new_zeros((1, *lora_B.shape), dtype=torch.float32)
        dm = dy2.new_zeros((1, N), dtype=torch.float32) if magnitude is not None else None
        dx = da = dB = dw = dbias = dmag = None
        if need_dx:  # B2
            if isinstance(weight, NF4Weight):
                _dense_operand(weight, M)
            dx = dy2.new_empty((M, K)).view(ctx.x_shape)
        if need_da:  # B3: split partials, summed
            splits, _ = b3_splits(M, K, _b3_programs(x2.device))
            partials = x2.new_empty((splits, R, K), dtype=torch.float32)
            da = (partials[0] if splits == 1 else partials.sum(0)).to(lora_A.dtype)
        if need_dB:
            dB = db[0].to(lora_B.dtype)
        if need_dw:
            dw = (dy2.t() @ x2).to(weight.dtype)
        if need_db:
            dbias = dy2.sum(0)
        if dm is not None and ctx.needs_input_grad[6]:
            dmag = magnitude_grad(dm[0], magnitude)
        return dx, dw, dbias, da, dB, None, dmag, None


def planned_lora_linear(x: torch.Tensor, weight, bias: Optional[torch.Tensor],
                        lora: "LoRACall") -> torch.Tensor:
    """``ops.lora_linear.fused_lora_linear``'s allocations for fake inputs: y [..., N]."""
    return PlannedLoRALinear.apply(x, weight, bias, lora.lora_A, lora.lora_B,
                                   float(lora.dropout_p), lora.magnitude, lora.norm)


class PlannedFlexAttention(torch.autograd.Function):
    """FlexAttention's compiled kernels' tensors: out and the fp32 logsumexp forward; the
    fp32 delta (Σ out⊙dout) and dq, dk, dv backward (dk, dv per key head)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(q.shape)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        _delta = q.new_empty(q.shape[:-1], dtype=torch.float32)  # alive while the kernel runs
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def planned_flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``ops.flex_attention.flex_packed_attention``'s allocations: [B, Hq, T, D]."""
    return PlannedFlexAttention.apply(q, k, v)
