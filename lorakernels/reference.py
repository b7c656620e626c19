"""Eager PyTorch for every op: the ground truth each kernel is tested against, and the CPU path.

Written for clarity, not speed; each formula is Hugging Face's Phi-3 (or PEFT's LoRA)
rounding point for rounding point, so the model computes exactly what transformers does
whenever ``lorakernels.functional`` picks the eager backend.

LoRA linear, y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ: dropout is not drawn here. The caller
passes the already dropped-out input as ``lora_input`` (``None`` means no dropout), so a
test can hand the reference exactly the mask a kernel drew. As in PEFT, the low-rank path
runs in the LoRA parameters' dtype (fp32 adapters over a bf16 base stay fp32), is added to
the base output in the wider of the two dtypes, and the sum is rounded once to the base
output's dtype. The frozen weight may be an NF4Weight: it is dequantised eagerly (and again
in backward, see ``nf4_linear``), then used as the dense weight would be.
"""
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .nf4 import NF4Weight, dequantize_nf4_reference
from .lora_call import LoRACall
from .nf4_linear import nf4_linear
from .parts import LoRAParts

BaseWeight = Union[torch.Tensor, NF4Weight]  # a LoRA layer's frozen weight: dense or 4-bit
LoRAAdapter = Tuple[torch.Tensor, torch.Tensor, float]  # (lora_A [r, K], lora_B [N, r], scaling)


# ----------------------------------------------------------------------------- linear layers


def nf4_matmul_reference(a: torch.Tensor, weight: NF4Weight, transposed: bool) -> torch.Tensor:
    """a·Ŵᵀ or a·Ŵ, Ŵ dequantised eagerly into the weight's dtype (rounded once, as the kernels)."""
    dense = dequantize_nf4_reference(weight, weight.dtype)
    return a @ (dense.t() if transposed else dense)


def base_linear_reference(x: torch.Tensor, weight: BaseWeight,
                          bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x·Wᵀ + b for a dense or an NF4 weight."""
    if isinstance(weight, NF4Weight):
        return nf4_linear(x, weight, bias, nf4_matmul_reference)
    return F.linear(x, weight, bias)


def lora_delta(
    lora_input: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float
) -> torch.Tensor:
    """s·(h·Aᵀ)·Bᵀ for h: [..., K], A: [r, K], B: [N, r] → [..., N]."""
    h = lora_input.to(lora_A.dtype)
    return (h @ lora_A.t()) @ lora_B.t() * scaling


def lora_linear_reference(
    x: torch.Tensor,
    weight: BaseWeight,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    lora_input: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One A/B pair over the whole output. x: [..., K], W: [N, K], A: [r, K], B: [N, r]."""
    base = base_linear_reference(x, weight, bias)
    delta = lora_delta(x if lora_input is None else lora_input, lora_A, lora_B, scaling)
    return (base + delta).to(base.dtype)


def low_rank_update(lora_input: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                    scaling: float, parts: Optional[LoRAParts], out_features: int) -> torch.Tensor:
    """s·(h·A_gᵀ)·B_gᵀ in each enabled part's output columns, zeros elsewhere: [..., out_features].

    ``parts`` None: one pair over the whole output. In the adapters' dtype (or wider).
    """
    if parts is None:
        return lora_delta(lora_input, lora_A, lora_B, scaling)
    rank = lora_A.shape[0] // parts.num_enabled
    delta = lora_input.new_zeros((*lora_input.shape[:-1], out_features),
                                 dtype=torch.promote_types(lora_input.dtype, lora_A.dtype))
    for pair in parts.slices(rank):
        delta[..., pair.out_cols] = lora_delta(lora_input, lora_A[pair.a_rows], lora_B[pair.b_rows],
                                               scaling)
    return delta


def merged_lora_linear_reference(
    x: torch.Tensor,
    weight: BaseWeight,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    parts: LoRAParts,
    lora_input: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """A fused projection with one A/B pair per enabled part.

    A: [r·G, K] (G enabled parts, stacked), B: [sum of enabled part sizes, r].
    Disabled parts get no low-rank term.
    """
    base = base_linear_reference(x, weight, bias)
    h = x if lora_input is None else lora_input
    delta = low_rank_update(h, lora_A, lora_B, scaling, parts, base.shape[-1])
    return (base + delta).to(base.dtype)


# ----------------------------------------------------------------------------- DoRA


def dora_weight_norm_reference(weight: BaseWeight, lora_A: torch.Tensor, lora_B: torch.Tensor,
                               scaling: float, parts: Optional[LoRAParts] = None) -> torch.Tensor:
    """n_j = ‖W_j + s·(B·A)_j‖ the direct way, as PEFT: W + s·B·A materialised in fp32. [N]."""
    dense = (dequantize_nf4_reference(weight, torch.float32) if isinstance(weight, NF4Weight)
             else weight)
    eye = torch.eye(dense.shape[1], dtype=torch.float32, device=dense.device)
    product = low_rank_update(eye, lora_A.float(), lora_B.float(), 1.0, parts, dense.shape[0]).t()
    return torch.linalg.vector_norm(dense.float() + scaling * product, dim=1)


def dora_linear_reference(x: torch.Tensor, weight: BaseWeight, bias: Optional[torch.Tensor],
                          lora: LoRACall, lora_input: Optional[torch.Tensor] = None
                          ) -> torch.Tensor:
    """PEFT's DoRA linear: y = x·Wᵀ + b + (m/n − 1)⊙(h·Wᵀ) + (m/n)⊙s·(h·Aᵀ)·Bᵀ.

    h is x (no dropout; then y = (m/n)⊙(x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b) or the dropped-out x
    (``lora_input``; ``lora.dropout_p`` is not read: no dropout is drawn here), which costs
    a second base GEMM. ``lora.magnitude`` m: [N]; n (``lora.norm``, [N]) is taken as a
    constant in backward, and computed the direct way when None. As in PEFT the DoRA terms
    are in the adapters' dtype (or wider), added to the base output and rounded once to its
    dtype; the dropped-out GEMM runs in the base's dtype.
    """
    norm = lora.norm
    if norm is None:
        norm = dora_weight_norm_reference(weight, lora.lora_A, lora.lora_B, lora.scaling,
                                          lora.parts)
    scale = lora.magnitude / norm.detach()
    base = base_linear_reference(x, weight, bias)
    if lora_input is None:
        h, unbiased = x, (base if bias is None else base - bias)
    else:
        h, unbiased = lora_input, base_linear_reference(lora_input.to(base.dtype), weight, None)
    delta = low_rank_update(h, lora.lora_A, lora.lora_B, lora.scaling, lora.parts,
                            base.shape[-1])
    return (base + ((scale - 1) * unbiased + scale * delta)).to(base.dtype)


# ----------------------------------------------------------------------------- Phi-3's other ops


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Phi3RMSNorm: normalised in fp32, rounded to x's dtype, then scaled by the weight."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] → [-x2, x1], halves of the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _check_rope_tables(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """cos and sin must be [B or 1, T, R] with an even R <= D, or they broadcast wrongly."""
    batch, _, length, head_dim = q.shape
    for name, table in (("cos", cos), ("sin", sin)):
        rotary = table.shape[-1]
        if (table.dim() != 3 or table.shape[0] not in (1, batch) or table.shape[1] != length
                or rotary % 2 or not 0 < rotary <= head_dim or table.shape != cos.shape):
            raise ValueError(f"rope: {name} must be [B, T, R] = [{batch}, {length}, R] (or "
                             f"[1, {length}, R]) with an even R <= {head_dim}, like cos; got "
                             f"{tuple(table.shape)}")


def rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Phi-3's rotary embedding of q [B, Hq, T, D] and k [B, Hk, T, D]; cos/sin [B, T, R].

    R <= D: the first R dims of each head are rotated, the other D - R pass through
    (partial rotary, Phi-4-mini's 96 of 128). cos/sin may have a batch of 1; other shapes
    (a 2-D [T, R] table would broadcast over the heads) are refused, as the kernel does.
    """
    _check_rope_tables(q, cos, sin)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rotary = cos.shape[-1]
    if rotary == q.shape[-1]:
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    q_rot, q_pass = q[..., :rotary], q[..., rotary:]
    k_rot, k_pass = k[..., :rotary], k[..., rotary:]
    return (torch.cat((q_rot * cos + rotate_half(q_rot) * sin, q_pass), dim=-1),
            torch.cat((k_rot * cos + rotate_half(k_rot) * sin, k_pass), dim=-1))


def swiglu_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """Phi3MLP's activation: gate, up = chunk(2, -1); up · silu(gate)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return up * F.silu(gate)


def attention_mask(query_len: int, key_len: int, segment_ids: Optional[torch.Tensor],
                   sliding_window: Optional[int], device: torch.device) -> Optional[torch.Tensor]:
    """Boolean [B or 1, 1, Tq, Tk] mask (True = attend), or None when SDPA needs no mask.

    Queries are the last ``query_len`` of ``key_len`` positions (a KV cache holds the
    rest). Key k is visible from query q when 0 <= q - k < window, as in
    transformers, and, for packed sequences, when both have the same segment id.
    """
    window_matters = sliding_window is not None and sliding_window < key_len
    plain = query_len == key_len or query_len == 1  # causal SDPA, or one query seeing all
    if segment_ids is None and not window_matters and plain:
        return None
    query_pos = torch.arange(key_len - query_len, key_len, device=device)
    distance = query_pos[:, None] - torch.arange(key_len, device=device)[None, :]
    mask = distance >= 0
    if window_matters:
        mask = mask & (distance < sliding_window)
    mask = mask[None, None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return mask


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: Optional[torch.Tensor]) -> torch.Tensor:
    """SDPA under ``attention_mask``'s mask: q [B, Hq, Tq, D], k and v [B, Hk, Tk, D] →
    [B, Hq, Tq, D].

    No mask means causal attention (or, for one query, attention to every key).
    Grouped-query heads (Hk divides Hq) are SDPA's ``enable_gqa``.
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                          is_causal=mask is None and q.shape[2] > 1,
                                          enable_gqa=k.shape[1] != q.shape[1])


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    lora: Optional[LoRAAdapter] = None,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Summed cross entropy of the LM head's logits (its bias [V] too), [N, V] logits and all.

    What ``ops.linear_cross_entropy`` must equal. With ``lora`` the logits are those
    of a LoRA ``Linear``: the low-rank term in the adapters' dtype, the sum rounded
    to the base output's dtype.
    """
    if lora is None:
        logits = F.linear(hidden, weight, bias)
    else:
        lora_A, lora_B, scaling = lora
        logits = lora_linear_reference(hidden, weight, bias, lora_A, lora_B, scaling)
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")
