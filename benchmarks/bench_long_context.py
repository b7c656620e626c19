"""One 131,072-token step: the GPU memory plans, and real steps of phi3-tiny-128k on this CPU.

    python benchmarks/bench_long_context.py --plans        # the targets (fake tensors, minutes)
    python benchmarks/bench_long_context.py --cpu-steps    # real CPU steps at 8k, 32k, 128k
    python benchmarks/bench_long_context.py --hf-peft      # transformers + PEFT's longest fit

Plans are train.py --plan-memory --device cuda (bf16, LoRA r 16 on the four projections, one
conversation of --max-seq-len tokens, AdamW, --grad-checkpointing offload). CPU steps run the
same step on real random weights under the same counter (``plan_memory(fake=False)``), with
on-device checkpointing (on a CPU, offload is the same). Each part merges its records into
benchmarks/results/long_context.json and rewrites long_context.md.
"""
import argparse
import json
import time
from pathlib import Path

import common  # noqa: F401  (first: it puts this checkout on sys.path)
from bench_memory import hf_peft
from training.config import TrainConfig
from training.memory_plan import plan_memory

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
LONG = 131072
GB = 1e9
# (model, quantize, device target in GB)
PLANS = [("phi3-mini-128k", "none", 24), ("phi3-mini-128k", "nf4", 16),
         ("phi4-mini", "none", 24), ("phi4-mini", "nf4", 16), ("phi4", "nf4", 40)]
CPU_LENGTHS = [8192, 32768, 131072]
HF_LENGTHS = [32768, 65536, 131072]
HF_LIMIT = 80e9


def plan_record(model: str, quantize: str, target_gb: float, checkpointing="offload") -> dict:
    config = TrainConfig(model=model, device="cuda", batch_size=1, max_seq_len=LONG,
                         grad_checkpointing=checkpointing, quantize=quantize, lora_r=16,
                         target_modules=TARGETS, plan_memory=True)
    started = time.perf_counter()
    plan = plan_memory(config)
    return {"model": model, "quantize": quantize, "grad_checkpointing": checkpointing,
            "target_gb": target_gb, "device_bytes": plan.peak_bytes, "host_bytes": plan.host_bytes,
            "offloaded_checkpoints": plan.offloaded_bytes, "peak_op": plan.peak_op,
            **plan.categories, "met": plan.peak_bytes <= target_gb * GB,
            "plan_seconds": round(time.perf_counter() - started, 1)}


def cpu_step_record(seq_len: int) -> dict:
    config = TrainConfig(model="phi3-tiny-128k", device="cpu", batch_size=1, max_seq_len=seq_len,
                         grad_checkpointing=True, lora_r=16, target_modules=TARGETS,
                         lora_dropout=0.0, plan_memory=True)
    started = time.perf_counter()
    plan = plan_memory(config, fake=False)
    return {"model": "phi3-tiny-128k", "seq_len": seq_len, "seconds": round(
        time.perf_counter() - started, 1), "peak_bytes": plan.peak_bytes, **plan.categories}


def hf_record(seq_len: int) -> dict:
    counted = hf_peft("phi3-mini-128k", 1, seq_len, checkpointing=True)
    return {"model": "phi3-mini-128k", "seq_len": seq_len, **counted,
            "fits_80gb": counted["peak_bytes"] <= HF_LIMIT}


def gb(n: int) -> str:
    return f"{n / GB:.2f}"


def markdown(result: dict) -> str:
    lines = ["# One step at long context", "",
             "`python benchmarks/bench_long_context.py --plans --cpu-steps --hf-peft`; "
             "live tensors, GB = 1e9 bytes (docs/long_context.md).", "",
             "## GPU plans: one 131,072-token conversation, bf16, LoRA r 16, AdamW", "",
             "| model | base | checkpoints | device GB | target | host GB | weights | "
             "activations | temporaries | peak at |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result.get("plans", []):
        lines.append(f"| {r['model']} | {'nf4' if r['quantize'] == 'nf4' else 'bf16'} | "
                     f"{r['grad_checkpointing']} | {gb(r['device_bytes'])} | "
                     f"≤ {r['target_gb']} {'met' if r['met'] else 'MISSED'} | "
                     f"{gb(r['host_bytes'])} | {gb(r['frozen_weights'])} | "
                     f"{gb(r['activations'])} | {gb(r['temporaries'])} | {r['peak_op']} |")
    lines += ["", "## Real steps of phi3-tiny-128k on this CPU (fp32, checkpointing)", "",
              "Seconds on a 2-core machine shared with other jobs: they vary with its load.", "",
              "| tokens | seconds | peak MB | activations MB | temporaries MB |",
              "|---|---|---|---|---|"]
    for r in result.get("cpu_steps", []):
        lines.append(f"| {r['seq_len']} | {r['seconds']} | {r['peak_bytes'] / 1e6:.1f} | "
                     f"{r['activations'] / 1e6:.1f} | {r['temporaries'] / 1e6:.1f} |")
    steps = {r["seq_len"]: r["peak_bytes"] for r in result.get("cpu_steps", [])}
    if 32768 in steps and LONG in steps:
        lines.append(f"\npeak(131072) / peak(32768) = {steps[LONG] / steps[32768]:.2f} "
                     "(linear growth: at most 4.5)")
    lines += ["", "## transformers + PEFT, gradient checkpointing (phi3-mini-128k, bf16)", "",
              "| tokens | peak GB | fits 80 GB |", "|---|---|---|"]
    for r in result.get("hf_peft", []):
        lines.append(f"| {r['seq_len']} | {gb(r['peak_bytes'])} | {r['fits_80gb']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans", action="store_true", help="the GPU targets, planned")
    parser.add_argument("--cpu-steps", action="store_true", help="real phi3-tiny-128k steps")
    parser.add_argument("--hf-peft", action="store_true", help="transformers + PEFT, planned")
    parser.add_argument("--lengths", type=int, nargs="+", help="override the parts' lengths")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    path = args.out_dir / "long_context.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    if args.plans:
        result["plans"] = [plan_record(*row) for row in PLANS]
    if args.cpu_steps:
        result["cpu_steps"] = [cpu_step_record(n) for n in args.lengths or CPU_LENGTHS]
    if args.hf_peft:
        result["hf_peft"] = [hf_record(n) for n in args.lengths or HF_LENGTHS]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    (args.out_dir / "long_context.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
