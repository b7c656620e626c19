"""The one-command GPU check finds the tests and every benchmark script."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_lists_tests_and_every_benchmark():
    listing = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--list"],
                             capture_output=True, text=True, check=True).stdout
    steps = dict(line.split(": ", 1) for line in listing.splitlines())
    assert "-m pytest -q tests" in steps["tests"]
    scripts = {p.stem for p in (ROOT / "benchmarks").glob("bench_*.py")}
    assert scripts and scripts <= set(steps)
