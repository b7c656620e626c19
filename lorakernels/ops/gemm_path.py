"""Which path F2 and B2 take: the fused GEMM (``fused_gemm.py``) or cuBLAS plus the low-rank
epilogue (``cublas_epilogue.py``), and the call that runs the one chosen.

The choice is ``settings.current().gemm`` (``LORAKERNELS_GEMM`` by default). ``auto``: on
CUDA, for a dense weight, the first call per (role, M bucket, N, K, dtype, dropout, DoRA)
times both paths and keeps the faster for the process (logged once at debug level); on CPU
(the interpreter), for an NF4 weight's 4-bit tiles, with the backend forced to ``triton`` or
under torch.use_deterministic_algorithms(True), the fused kernel. ``fused`` / ``cublas``
force one path (an NF4 weight's 4-bit tiles always run fused: torch has no GEMM for them).
"""
import logging
from typing import Callable, Dict, Optional

import torch
import triton

from .. import settings
from .cublas_epilogue import cublas_plus_epilogue
from .fused_gemm import NF4Operand, fused_gemm
from .lowrank_term import LowRank
from .triton_utils import m_bucket

log = logging.getLogger(__name__)

# (role, M bucket, N, K, dtype, dropout, DoRA) -> "fused" or "cublas", for the process.
_CHOICES: Dict[tuple, str] = {}
PATHS = {"fused": fused_gemm, "cublas": cublas_plus_epilogue}


def _times(x: torch.Tensor) -> bool:
    """Whether ``auto`` may time the two paths: on a GPU, unless the fused path is forced or
    torch's deterministic mode asks that results not depend on a timing (the paths round
    differently)."""
    return (x.is_cuda and settings.current().backend != "triton"
            and not torch.are_deterministic_algorithms_enabled())


def time_ms(fn: Callable[[], torch.Tensor]) -> float:
    """A path's time in ms: a few reps (the first call also autotunes the fused kernel)."""
    return triton.testing.do_bench(fn, warmup=5, rep=20)


def choose_path(role: str, x: torch.Tensor, w, dropout_p: float, scaled: bool,
                candidates: Dict[str, Callable[[], torch.Tensor]]) -> str:
    """"fused" or "cublas" for this call; under ``auto`` on a GPU, timed once per key."""
    if isinstance(w, NF4Operand):
        return "fused"
    mode = settings.current().gemm
    if mode != "auto":
        return mode
    if not _times(x):
        return "fused"
    M, K = x.shape
    key = (role, m_bucket(M), w.shape[1], K, x.dtype, dropout_p > 0, scaled)
    choice = _CHOICES.get(key)
    if choice is None:
        times = {name: time_ms(fn) for name, fn in candidates.items()}
        choice = _CHOICES[key] = min(times, key=times.get)
        log.debug("%s %s: %s (%s)", role, key[1:], choice,
                  ", ".join(f"{name} {ms:.3f} ms" for name, ms in times.items()))
    return choice


def gemm_on_chosen_path(role: str, x: torch.Tensor, w, lowrank: LowRank,
                        bias: Optional[torch.Tensor] = None,
                        col_scale: Optional[torch.Tensor] = None,
                        k_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F2 (role "F2") or B2 ("B2"): ``fused_gemm``'s result by the path ``choose_path`` picks."""
    args = (x, w, lowrank, bias, col_scale, k_scale)
    candidates = {name: (lambda fn=fn: fn(*args)) for name, fn in PATHS.items()}
    scaled = col_scale is not None or k_scale is not None
    return PATHS[choose_path(role, x, w, lowrank.dropout_p, scaled, candidates)](*args)
