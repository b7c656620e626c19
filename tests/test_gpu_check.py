"""The one-command GPU check: its steps, and its budget logic on a fake clock (no GPU)."""
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_timeout

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
gpu_check = pytest.importorskip("gpu_check")


def test_gpu_check_lists_its_steps_in_order():
    listing = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--list"],
                             capture_output=True, text=True, check=True,
                             timeout=subprocess_timeout(60)).stdout
    names = [line.split(": ", 1)[0] for line in listing.splitlines()]
    assert names == ["correctness", "memory_plan", "bench_lora_linear", "bench_lora_linear_p0",
                     "bench_train", "bench_attention", "bench_dora", "tests", "bench_qlora"]
    for step in gpu_check.steps():
        script = next((part for part in step.command if part.endswith(".py")), None)
        assert script is None or (ROOT / script).exists(), script
    assert "16384" in listing and "gpu-mini" in listing


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def run_fake(budget, durations):
    """run_steps with stub steps that each take durations[name] fake seconds (capped by timeout)."""
    clock, calls, written = FakeClock(), [], []

    def run(step, timeout):
        calls.append((step.name, timeout))
        took = durations[step.name]
        clock.now += min(took, timeout)
        return dict(returncode=0 if took <= timeout else "timeout", last_line="")

    results = gpu_check.run_steps(gpu_check.steps(), budget, run,
                                  lambda r: written.append([s["step"] for s in r]), clock)
    return calls, results, written


def test_every_step_is_bounded_by_its_limit_and_the_budget_left():
    durations = {s.name: 30 for s in gpu_check.steps()}
    durations["bench_train"] = 1000  # hangs: cut at its limit, the rest still run
    calls, results, written = run_fake(480, durations)
    limits = {s.name: s.limit_s for s in gpu_check.steps()}
    assert [name for name, _ in calls] == [s.name for s in gpu_check.steps()]
    assert dict(calls)["bench_train"] == limits["bench_train"]
    spent = 30 * 4 + limits["bench_train"] + 30 * 2  # bench_attention, bench_dora before the tests
    assert dict(calls)["tests"] == min(limits["tests"], 480 - spent)
    assert [r["returncode"] for r in results] == [0, 0, 0, 0, "timeout", 0, 0, 0, 0]
    assert written == [[s.name for s in gpu_check.steps()][:i + 1] for i in range(len(results))]


def test_steps_without_enough_time_left_are_skipped_and_recorded():
    durations = {s.name: 10_000 for s in gpu_check.steps()}
    calls, results, written = run_fake(200, durations)
    assert sum(timeout for _, timeout in calls) <= 200
    assert results[-1]["returncode"] == "skipped"
    assert "left of the budget" in results[-1]["last_line"]
    assert len(written) == len(gpu_check.steps())  # every step recorded, run or not
