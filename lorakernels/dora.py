"""DoRA's column norm n_j = ‖W_j + s·(B·A)_j‖ by algebra, never materialising W + s·B·A.

n_j² = ‖W_j‖² + 2s·B_j·(W·Aᵀ)_j + s²·B_j·(A·Aᵀ)·B_jᵀ. W is frozen, so ‖W_j‖² is computed
once (``row_sq_norms``) and kept by the layer; each step then costs one skinny product
W·Aᵀ ([N, r], the caller's, so it runs on the backend's base GEMM), a Gram matrix A·Aᵀ and
row-wise dot products, all in fp32. For a fused projection each enabled part's pair acts on
its own rows; rows without LoRA keep ‖W_j‖.
"""
import functools
from typing import Optional

import torch

from .nf4 import NF4Weight, dequantize_nf4_reference
from .parts import LoRAParts


def row_sq_norms(weight) -> torch.Tensor:
    """‖W_j‖² in fp32 for a dense [N, K] weight or an NF4 one (dequantised once, here): [N]."""
    if isinstance(weight, NF4Weight):
        weight = dequantize_nf4_reference(weight, torch.float32)
    return torch.linalg.vector_norm(weight, dim=1, dtype=torch.float32).square()


@functools.lru_cache(maxsize=256)
def _expanded_b_index(parts: LoRAParts, rank: int, device: torch.device) -> torch.Tensor:
    """Flat positions in B̂ [N, r·G] of lora_B's entries [N_lora, r] (row-major), B̂ being B
    expanded to every output column: column j's row in its part's block of r columns."""
    groups = parts.num_enabled
    index = torch.empty(parts.lora_out_features, rank, dtype=torch.long)
    for pair in parts.slices(rank):
        cols = torch.arange(pair.out_cols.start, pair.out_cols.stop)
        index[pair.b_rows] = cols[:, None] * rank * groups + pair.a_rows.start + torch.arange(rank)
    return index.view(-1).to(device)


def expanded_b(lora_B: torch.Tensor, parts: Optional[LoRAParts], out_features: int) -> torch.Tensor:
    """B̂ [N, r·G] in fp32: B itself for one pair; for a fused projection each part's rows of B
    in its own block of r columns, zeros elsewhere (and for parts without LoRA)."""
    b = lora_B.float()
    if parts is None:
        return b
    rank = lora_B.shape[1]
    out = torch.zeros(out_features * rank * parts.num_enabled, dtype=b.dtype, device=b.device)
    out.index_copy_(0, _expanded_b_index(parts, rank, b.device), b.reshape(-1))
    return out.view(out_features, -1)


@torch.no_grad()
def column_norm(sq_norms: torch.Tensor, weight_a: torch.Tensor, lora_A: torch.Tensor,
                lora_B: torch.Tensor, scaling: float, parts: Optional[LoRAParts]) -> torch.Tensor:
    """n [N] in fp32, a constant for autograd (DoRA §4.3, as PEFT detaches it).

    sq_norms: ‖W_j‖² [N] (fp32); weight_a: A·Wᵀ [r·G, N]; A: [r·G, K]; B: [N_lora, r].
    With B̂ [N, r·G] (``expanded_b``), every part at once, in a fixed handful of ops
    (each a launch on a GPU, whatever the number of parts):
    n² = ‖W‖² + rowsum(B̂ ⊙ (2s·(A·Wᵀ)ᵀ + s²·B̂·A·Aᵀ)).
    """
    a = lora_A.float()
    b_hat = expanded_b(lora_B, parts, sq_norms.shape[0])
    terms = torch.addmm(weight_a.float().t(), b_hat, a @ a.t(), beta=2 * scaling,
                        alpha=scaling * scaling)
    sq = sq_norms + torch.linalg.vecdot(b_hat, terms)
    # Rounding can take a tiny n² just below zero; a norm is never negative.
    return sq.clamp_min(0).sqrt()


def column_scale(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """DoRA's per-column output scale c = m/n [N], fp32 and contiguous, for the kernels."""
    return (magnitude.detach().float() / norm).contiguous()


def magnitude_grad(dot: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """dm [N] from dot_j = Σ_i dy_ij·(y_ij − b_j), y the layer's output.

    With y = (m/n)⊙z + b: dm_j = Σ_i dy_ij·z_ij/n_j = dot_j/m_j, so backward needs only y,
    never an unscaled copy z. A column whose m_j is exactly 0 has lost z (its y is b): it
    gets a zero gradient, where PEFT's would be Σ dy·z/n.
    """
    return torch.where(magnitude != 0, dot / magnitude, 0.0).to(magnitude.dtype)
