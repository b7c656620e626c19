"""The one-command GPU check: the test suite on the GPU, then every benchmark in benchmarks/.

    python benchmarks/gpu_check.py

Each step runs in its own process with a time limit; on a machine lent for a few minutes,
run the steps one command each (``--list`` names them, ``--only STEP`` runs one). Output goes to
benchmarks/results/gpu_check_<device>/<step>.log, and a summary with device,
versions and date to benchmarks/results/gpu_check_<device>.json and .md.
Benchmarks write their own results next to it. Any issue lent a GPU runs this first.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, device_label, utc_now, versions

import torch


def steps() -> list:
    """(name, command) pairs: the tests first, then each benchmark script."""
    found = [("tests", [sys.executable, "-m", "pytest", "-q", "tests"])]
    for script in sorted((ROOT / "benchmarks").glob("bench_*.py")):
        found.append((script.stem, [sys.executable, str(script.relative_to(ROOT))]))
    return found


def run_step(name: str, command: list, timeout_s: int, log_dir: Path) -> dict:
    start = time.perf_counter()
    log = log_dir / f"{name}.log"
    with log.open("w") as out:
        try:
            rc = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
    return dict(step=name, command=" ".join(command), returncode=rc,
                seconds=round(time.perf_counter() - start, 1), last_line=tail[0],
                log=str(log.relative_to(ROOT)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", type=int, default=540,
                        help="seconds allowed per step (default 540: one step with --only fits a "
                             "10-minute command)")
    parser.add_argument("--list", action="store_true", help="print the steps and exit")
    parser.add_argument("--only", nargs="+", metavar="STEP",
                        help="run only these steps (e.g. to fit a per-command time limit)")
    args = parser.parse_args()
    if args.list:
        for name, command in steps():
            print(f"{name}: {' '.join(command)}")
        return 0
    if not torch.cuda.is_available():
        sys.exit("gpu_check.py needs a CUDA GPU; on CPU run `python -m pytest -q` instead")

    slug = device_label()
    log_dir = ROOT / "benchmarks" / "results" / f"gpu_check_{slug}"
    log_dir.mkdir(parents=True, exist_ok=True)
    summary = dict(device=torch.cuda.get_device_name(), date=utc_now(), **versions(),
                   cuda=torch.version.cuda, steps=[])
    chosen = [(name, command) for name, command in steps() if not args.only or name in args.only]
    if args.only and len(chosen) != len(args.only):
        sys.exit(f"unknown step in --only {args.only}; steps: {[name for name, _ in steps()]}")
    for name, command in chosen:
        print(f"== {name}", flush=True)
        summary["steps"].append(run_step(name, command, args.timeout, log_dir))
        print(summary["steps"][-1], flush=True)

    results = ROOT / "benchmarks" / "results"
    (results / f"gpu_check_{slug}.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"# GPU check on {summary['device']}",
             f"{summary['date']} · torch {summary['torch']} · triton {summary['triton']} · "
             f"CUDA {summary['cuda']} · Python {summary['python']}", "",
             "| step | result | seconds | last line |", "|---|---|---|---|"]
    lines += [f"| {s['step']} | {'ok' if s['returncode'] == 0 else s['returncode']} | {s['seconds']} "
              f"| {s['last_line']} |" for s in summary["steps"]]
    (results / f"gpu_check_{slug}.md").write_text("\n".join(lines) + "\n")
    return 0 if all(s["returncode"] == 0 for s in summary["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
