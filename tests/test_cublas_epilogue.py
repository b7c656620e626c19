"""The cuBLAS safety net (ops/cublas_epilogue.py): torch's GEMM plus the low-rank epilogue
kernel for F2 and B2, against the reference, and the chooser (ops/gemm_path.py) that times
it against the fused kernel once per key.

gemm "cublas" forces the path; on CPU its epilogue runs under the interpreter.
Tolerances are test_lora_kernels.py's: the path rounds out twice (after torch's GEMM and
after the epilogue), well inside bf16's 2e-2.
"""
import logging
from types import SimpleNamespace

import pytest
import torch

from lorakernels.nf4 import quantize_nf4
from lorakernels.ops import cublas_epilogue as epilogue
from lorakernels.ops import gemm_path
from lorakernels.ops.fused_gemm import NF4Operand, fused_gemm
from lorakernels.ops.lowrank_term import LowRank
from test_lora_kernels import DEVICE, REL_TOL, assert_rel_close, run_case
from conftest import use_settings


@pytest.fixture
def cublas_path(monkeypatch):
    """Force the cuBLAS path, and check that F2 and B2 both took it."""
    use_settings(monkeypatch, gemm="cublas")
    calls = []
    real = epilogue.cublas_plus_epilogue
    monkeypatch.setitem(gemm_path.PATHS, "cublas",
                        lambda *args: calls.append(args[0].shape) or real(*args))
    monkeypatch.setitem(gemm_path.PATHS, "fused", None)  # never taken
    yield calls
    assert len(calls) == 2  # F2 and B2


@pytest.mark.parametrize("variant", ["plain", "gqa_unequal_k_off"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_cublas_path_forward_and_gradients(cublas_path, variant, dtype, dropout_p):
    run_case(7, 96, variant, 8, dtype, dropout_p)


def test_cublas_path_many_rows_fp16_without_bias(cublas_path):
    run_case(37, 40, "qkv_q_and_v", 4, torch.float16, 0.2, lead=(2,), bias=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_epilogue_equals_the_fused_kernel(dtype):
    """add_lowrank's low-rank term is the fused kernel's: out = 0 + s·S·B̂ᵀ⊙D compared directly."""
    torch.manual_seed(0)
    M, N, K, R = 33, 64, 40, 8
    x = torch.randn(M, K, device=DEVICE).to(dtype)
    w = torch.zeros(K, N, device=DEVICE, dtype=dtype)
    p, q = torch.randn(M, R, device=DEVICE), torch.randn(N, R, device=DEVICE)
    mask = torch.randint(-2**31, 2**31 - 1, (M, 2), device=DEVICE, dtype=torch.int32)
    lowrank = LowRank(p, q, 0.5, dropout_p=0.25, mask=mask)
    assert lowrank.block_r == 16
    fused = fused_gemm(x, w, lowrank)
    ours = epilogue.cublas_plus_epilogue(x, w, lowrank)
    assert_rel_close(ours, fused, REL_TOL[dtype] / 4, "out")
    kept = (mask[:, torch.arange(N) // 32] >> (torch.arange(N) % 32)) & 1
    want = torch.where(kept.bool(), 0.5 / 0.75 * (p @ q.t()), 0.0)
    assert_rel_close(ours, want, REL_TOL[dtype], "out vs torch")


class FakeTimer:
    """time_ms's stand-in: fixed times per path, recognised by which function a candidate calls."""

    def __init__(self, monkeypatch, times):
        self.times, self.asked = times, []
        for name in times:
            monkeypatch.setitem(gemm_path.PATHS, name, lambda *args, name=name: name)

    def __call__(self, fn):
        name = fn()
        self.asked.append(name)
        return self.times[name]


def _pick(role="F2", M=100, dropout_p=0.0, w=None):
    x = torch.empty(M, 32)
    mask = torch.empty(M, 2, dtype=torch.int32) if dropout_p > 0 else None
    lowrank = LowRank(torch.empty(M, 16), torch.empty(48, 16), dropout_p=dropout_p, mask=mask)
    return gemm_path.gemm_on_chosen_path(role, x, torch.empty(32, 48) if w is None else w,
                                         lowrank)


def test_auto_on_cpu_never_times(monkeypatch):
    use_settings(monkeypatch, gemm="auto")
    timer = FakeTimer(monkeypatch, {"fused": 1.0, "cublas": 0.5})
    monkeypatch.setattr(gemm_path, "time_ms", timer)
    monkeypatch.setattr(gemm_path, "_CHOICES", {})
    assert _pick() == "fused" and timer.asked == [] and gemm_path._CHOICES == {}


def test_auto_keeps_the_faster_path_timed_once_per_key(monkeypatch, caplog):
    use_settings(monkeypatch, gemm="auto")
    timer = FakeTimer(monkeypatch, {"fused": 2.0, "cublas": 1.0})
    monkeypatch.setattr(gemm_path, "time_ms", timer)
    monkeypatch.setattr(gemm_path, "_CHOICES", {})
    monkeypatch.setattr(gemm_path, "_times", lambda x: True)  # as on a GPU
    with caplog.at_level(logging.DEBUG, logger=gemm_path.__name__):
        assert _pick(M=100) == "cublas"
        assert _pick(M=120) == "cublas"  # the same M bucket (128): not timed again
        assert timer.asked == ["fused", "cublas"]
        timer.times["fused"] = 0.5
        assert _pick(M=100, dropout_p=0.1) == "fused"  # a new key: timed
        assert _pick(role="B2", M=100) == "fused"
        assert _pick(M=100) == "cublas"  # the first key keeps its choice
    assert len(timer.asked) == 6 and len(gemm_path._CHOICES) == 3
    assert len([r for r in caplog.records if r.name == gemm_path.__name__]) == 3


def test_backend_triton_and_cpu_do_not_time(monkeypatch):
    """auto times only CUDA tensors, not when backend triton forces the kernels nor
    in torch's deterministic mode."""
    gpu, cpu = SimpleNamespace(is_cuda=True), SimpleNamespace(is_cuda=False)
    use_settings(monkeypatch, backend="auto")
    assert gemm_path._times(gpu) and not gemm_path._times(cpu)
    use_settings(monkeypatch, backend="triton")
    assert not gemm_path._times(gpu)
    use_settings(monkeypatch, backend="auto")
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert not gemm_path._times(gpu)  # a timing must not decide the rounding
    finally:
        torch.use_deterministic_algorithms(deterministic)


def test_nf4_tiles_stay_fused(monkeypatch):
    nf4 = NF4Operand(quantize_nf4(torch.randn(48, 64)), True)
    timer = FakeTimer(monkeypatch, {"fused": 2.0, "cublas": 1.0})
    monkeypatch.setattr(gemm_path, "time_ms", timer)
    monkeypatch.setattr(gemm_path, "_times", lambda x: True)
    for mode in ("cublas", "auto"):
        use_settings(monkeypatch, gemm=mode)
        assert _pick(w=nf4) == "fused"
    assert timer.asked == []
