"""The GPU check that fits one command: every step bounded by the time left.

    python benchmarks/gpu_check.py --budget 480      # --list names the steps, --only runs some

Correctness of the fused layer, the memory plan against the GPU (plan vs
torch.cuda.max_memory_allocated of gpu-mini's step), then bench_lora_linear, bench_train,
bench_attention, bench_dora, the tests and bench_qlora, each step given at most its own limit
and what is left of the budget. Logs: benchmarks/results/gpu_check_<device>/<step>.log; summary:
benchmarks/results/gpu_check_<device>.json and .md, rewritten after every step.
"""
import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional

from common import ROOT, device_label, prepare_script, utc_now, versions

import torch

MIN_STEP_S = 20  # a step given less than this could not even start its process usefully


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    command: List[str]
    limit_s: int  # its share: later steps keep the rest
    env: Optional[dict] = None


def steps() -> List[Step]:
    """The steps, most informative first (the GPU may be gone before the last)."""
    py = sys.executable
    bench = lambda script, *args: [py, f"benchmarks/{script}.py", *args]  # noqa: E731
    shapes = ["--shapes", "qkv", "o", "gate_up", "down", "--tokens", "4096", "16384"]
    return [
        Step("correctness", [py, "benchmarks/gpu_check.py", "--correctness"], 60),
        Step("memory_plan", [py, "benchmarks/gpu_check.py", "--memory-plan"], 90),
        Step("bench_lora_linear", bench("bench_lora_linear", *shapes, "--dropout", "0.05"), 120),
        Step("bench_lora_linear_p0", bench("bench_lora_linear", *shapes, "--dropout", "0",
                                           "--out-dir", "benchmarks/results/dropout0"), 90),
        Step("bench_train", bench("bench_train", "--config", "gpu-mini"), 120),
        Step("bench_attention", bench("bench_attention"), 60),
        # DoRA's own kernel variants (F2, B1, B2) compile and autotune on the first call.
        Step("bench_dora", bench("bench_dora", "--tokens", "4096", "--in-features", "3072",
                                 "--out-features", "9216", "--repeats", "2"), 75),
        Step("tests", [py, "-m", "pytest", "-q", "-x", "tests"], 240,
             env={"LORAKERNELS_AUTOTUNE": "0"}),
        Step("bench_qlora", bench("bench_qlora"), 120),
    ]


def run_step(step: Step, timeout_s: float, log_dir: Path) -> dict:
    """Run one step's process with a timeout; its output goes to its log."""
    log = log_dir / f"{step.name}.log"
    env = {**os.environ, **(step.env or {})}
    with log.open("w") as out:
        try:
            rc = subprocess.run(step.command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                timeout=timeout_s, env=env).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
    return dict(returncode=rc, last_line=tail[0], log=str(log.relative_to(ROOT)))


def run_steps(chosen: List[Step], budget_s: float, run: Callable[[Step, float], dict],
              write: Callable[[list], None], clock: Callable[[], float] = time.monotonic) -> list:
    """Each step in order with min(its limit, budget left) seconds; ``write`` after each."""
    start, results = clock(), []
    for step in chosen:
        left = budget_s - (clock() - start)
        timeout = min(step.limit_s, left)
        began = clock()
        if timeout < MIN_STEP_S:
            result = dict(returncode="skipped", last_line=f"{left:.0f} s left of the budget")
        else:
            result = run(step, timeout)
        results.append(dict(step=step.name, command=" ".join(step.command),
                            timeout_s=round(timeout), seconds=round(clock() - began, 1), **result))
        write(results)
    return results


def correctness() -> int:
    """The fused layer at Phi-3-mini's qkv (M = 4096, bf16, p = 0.05) against fp32."""
    from lorakernels import LoRACall, LoRAParts
    from lorakernels.ops.lora_linear import dropout_mask, fused_lora_linear
    from lorakernels.reference import merged_lora_linear_reference

    torch.manual_seed(0)
    M, K, N, r, p, seed = 4096, 3072, 9216, 16, 0.05, 7
    parts = LoRAParts((3072, 3072, 3072), (True, True, True))
    make = lambda *shape, s=1.0: torch.randn(*shape, device="cuda") * s  # noqa: E731
    x, w = make(M, K).bfloat16(), make(N, K, s=K ** -0.5).bfloat16()
    a, b, dy = make(3 * r, K, s=K ** -0.5), make(N, r), make(M, N).bfloat16()
    leaves = [t.clone().requires_grad_() for t in (x, a, b)]
    y = fused_lora_linear(leaves[0], w, None, LoRACall(leaves[1], leaves[2], 2.0, p, parts), seed)
    y.backward(dy)
    refs = [t.detach().float().requires_grad_() for t in (x, a, b)]
    y_ref = merged_lora_linear_reference(refs[0], w.float(), None, refs[1], refs[2], 2.0, parts,
                                         lora_input=refs[0] * dropout_mask(M, K, p, seed, "cuda"))
    y_ref.backward(dy.float())
    errors = {name: ((got.float() - want).abs().max() / want.abs().max()).item()
              for name, got, want in [("y", y.detach(), y_ref.detach()), *(
                  (n, g.grad, r_.grad) for n, g, r_ in zip(("dx", "dA", "dB"), leaves, refs))]}
    print(json.dumps(dict(shape=[M, K, N], rank=r, dropout=p, relative_errors=errors)))
    return 0 if all(e < 2e-2 for e in errors.values()) else 1


def measured_step_peak(config) -> int:
    """torch.cuda.max_memory_allocated over one optimizer step of ``config`` on the GPU, from
    an empty device: random weights, the plan's batch. A first step runs before, untimed, so
    that autotuning's and the GEMM path choice's trial launches are not counted; the
    measured step then holds AdamW's state from its start (the plan's has it from the
    optimizer step on)."""
    from model.phi3 import Phi3ForCausalLM
    from training.loop import StepLoss, add_lora, optimizer_and_schedule, training_step
    from training.memory_plan import PLANNED_STEPS, model_config, planned_batch

    cfg = model_config(config.model)
    with torch.device("cuda"):
        model = Phi3ForCausalLM(cfg).to(torch.bfloat16)
    model.init_rotary("cuda")
    add_lora(model, config)
    model.set_gradient_checkpointing(config.grad_checkpointing)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = optimizer_and_schedule(params, config, PLANNED_STEPS)
    micro = [planned_batch(config.batch_size, config.max_seq_len, cfg.vocab_size)]
    step = lambda: training_step(StepLoss(model), params, optimizer, scheduler, micro,  # noqa: E731
                                 config.max_grad_norm)
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def memory_plan_check() -> int:
    """gpu-mini (Phi-3-mini-4k, bf16, 4 x 2048, LoRA r 16), with and without checkpointing:
    the plan (train.py --plan-memory --device cuda) next to the GPU's peak of the same step."""
    from training.config import TrainConfig
    from training.memory_plan import plan_memory

    rows = []
    for checkpointing in (False, True):
        config = TrainConfig(model="phi3-mini-4k", device="cuda", dtype="bfloat16", batch_size=4,
                             max_seq_len=2048, grad_checkpointing=checkpointing,
                             plan_memory=True)
        plan = plan_memory(config)
        measured = measured_step_peak(config)
        rows.append(dict(grad_checkpointing=checkpointing, plan_bytes=plan.peak_bytes,
                         plan_optimizer_state_bytes=plan.categories["optimizer_state"],
                         max_memory_allocated=measured, ratio=measured / plan.peak_bytes))
        print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    return 0


def write_summary(summary: dict, slug: str) -> None:
    results = ROOT / "benchmarks" / "results"
    (results / f"gpu_check_{slug}.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"# GPU check on {summary['device']}",
             f"{summary['date']} · torch {summary['torch']} · triton {summary['triton']} · "
             f"CUDA {summary['cuda']} · Python {summary['python']} · "
             f"budget {summary['budget_s']} s",
             "", "| step | result | seconds | timeout | last line |", "|---|---|---|---|---|"]
    lines += [f"| {s['step']} | {'ok' if s['returncode'] == 0 else s['returncode']} "
              f"| {s['seconds']} | {s['timeout_s']} | {s['last_line']} |" for s in summary["steps"]]
    (results / f"gpu_check_{slug}.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=int, default=480,
                        help="seconds for all steps together (default 480: one 10-minute command "
                             "with room for the machine's start)")
    parser.add_argument("--list", action="store_true", help="print the steps and exit")
    parser.add_argument("--only", nargs="+", metavar="STEP", help="run only these steps")
    parser.add_argument("--correctness", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory-plan", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.list:
        for step in steps():
            print(f"{step.name}: {' '.join(step.command)}")
        return 0
    if not torch.cuda.is_available():
        sys.exit("gpu_check.py needs a CUDA GPU; on CPU run `python -m pytest -q` instead")
    if args.correctness:
        return correctness()
    if args.memory_plan:
        return memory_plan_check()
    chosen = [s for s in steps() if not args.only or s.name in args.only]
    if args.only and len(chosen) != len(args.only):
        sys.exit(f"unknown step in --only {args.only}; steps: {[s.name for s in steps()]}")

    slug = device_label()
    log_dir = ROOT / "benchmarks" / "results" / f"gpu_check_{slug}"
    log_dir.mkdir(parents=True, exist_ok=True)
    summary = dict(device=torch.cuda.get_device_name(), date=utc_now(), **versions(),
                   cuda=torch.version.cuda, budget_s=args.budget, steps=[])
    write_summary(summary, slug)  # versions and device, before any step can hang

    def write(results):
        summary["steps"] = results
        write_summary(summary, slug)
        print(results[-1], flush=True)

    results = run_steps(chosen, args.budget, lambda step, t: run_step(step, t, log_dir), write)
    return 0 if all(s["returncode"] == 0 for s in results) else 1


if __name__ == "__main__":
    prepare_script()
    sys.exit(main())
