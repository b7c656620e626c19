"""The frozen NF4 base weight in the GEMM: read as 4-bit tiles, or dequantised once, by rows.

Up to ``NF4Weight.fused_max_rows`` rows (default ``NF4_FUSED_MAX_ROWS``) of input, the
product is memory-bound and reading a quarter of the bytes wins: the GEMM dequantises
4-bit tiles inside its K-loop. Above, it is compute-bound (dequantising per tile would
repeat the work M/BLOCK_M times): the weight is dequantised once into the scratch buffer
shared by all layers and the dense kernels run on it. Forward and backward choose
independently (the backward's rows are dy's). benchmarks/bench_qlora.py measures the
crossover.
"""
from typing import Union

import torch

from ..nf4 import NF4Weight
from .fused_gemm import NF4Operand, fused_gemm
from .nf4_dequant import dequantize_nf4_to_scratch


def gemm_operand(weight: Union[torch.Tensor, NF4Weight], rows: int,
                 transposed: bool) -> Union[torch.Tensor, NF4Operand]:
    """The base GEMM's w for ``rows`` rows of input: Wᵀ or W, as a view of 4-bit tiles or of
    a dequantised copy."""
    if isinstance(weight, NF4Weight):
        if rows <= weight.fused_max_rows:
            return NF4Operand(weight, transposed)
        weight = dequantize_nf4_to_scratch(weight)
    return weight.t() if transposed else weight


def nf4_matmul(a: torch.Tensor, weight: NF4Weight, transposed: bool) -> torch.Tensor:
    """a·Wᵀ (transposed) or a·W for a 2-D ``a`` and an NF4 weight, on the Triton path."""
    w = gemm_operand(weight, a.shape[0], transposed)
    if isinstance(w, NF4Operand):
        return fused_gemm(a, w)
    return a @ w
