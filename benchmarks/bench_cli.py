"""Benchmark whole training processes: ``train.py`` against a transformers + PEFT training script.

Both sides fine-tune one random phi3-tiny checkpoint on examples/chat.jsonl with the same
batch, rank and optimizer, each as its own process, --repeats times alternating; counted:
data (non-padding) tokens per second after the warm-up steps. Methodology:
docs/benchmarks.md.

    python benchmarks/bench_cli.py                 # phi3-tiny, 30 steps, 3 repeats (cli_cpu.md)
    python benchmarks/bench_cli.py --smoke --out-dir /tmp/bench

Results: a markdown table on stdout, and ``<out-dir>/cli_cpu.json`` and ``.md``
(``cli_cpu_smoke.*`` with --smoke).
"""
import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    DATA, DATA_SEED, ROOT, add_output_args, command_line, data_tokens, device_name, hf_batches,
    hf_peft_model, hf_training_step, prepare_script, utc_now, versions, write_random_base,
    write_results)

import torch

WARMUP_STEPS = 2
LORA = dict(r=16, alpha=32, dropout=0.05)
TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
LR = 2e-4
MAX_GRAD_NORM = 1.0  # train.py's default --max-grad-norm, and HF Trainer's


# ----------------------------------------------------------------------------- the base


def build_base(preset: str, directory: Path, layers=None) -> dict:
    from model import Phi3Config

    config = Phi3Config.from_name(preset)
    if layers:
        config = dataclasses.replace(config, num_hidden_layers=layers)
    write_random_base(config, torch.float32, "cpu", directory)
    return {k: v for k, v in dataclasses.asdict(config).items()
            if k not in ("extra", "rope_scaling")}


# ----------------------------------------------------------------------------- HF + PEFT worker


def hf_worker(args) -> None:
    """The transformers + PEFT training script; prints one JSON line with its step times."""
    from model.tokenizer import load_tokenizer

    torch.manual_seed(DATA_SEED)
    model = hf_peft_model(args.base, torch.float32, "cpu", LORA["r"], LORA["alpha"],
                          LORA["dropout"], TARGETS)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    batches = hf_batches(load_tokenizer(args.base), args.data, args.batch_size, args.max_seq_len,
                         args.steps)
    ends, losses = [], []
    for batch in batches:
        losses.append(hf_training_step(model, params, optimizer, batch, MAX_GRAD_NORM)[0])
        ends.append(time.perf_counter())
    print(json.dumps({
        "ends": ends, "losses": losses,
        "data_tokens": [data_tokens(b) for b in batches],
        "padded_tokens": [int(b["input_ids"].numel()) for b in batches],
    }))


# ----------------------------------------------------------------------------- runs


def our_batches(base: str, data: str, batch_size: int, max_seq_len: int, steps: int):
    """train.py's batches, rebuilt: (padded tokens, data tokens) of each step."""
    from model.tokenizer import load_tokenizer
    from training.config import TrainConfig
    from training.data import MicroBatches
    from training.data import prepare_rows

    tokenizer = load_tokenizer(base)
    config = TrainConfig(data=data, max_seq_len=max_seq_len)
    assert config.packing and config.seed == DATA_SEED and not config.train_on_prompt
    rows, _ = prepare_rows(data, tokenizer, config)
    batches = MicroBatches(rows, batch_size, config.seed, tokenizer.pad_id)
    counts = []
    for step in range(steps):
        batch = batches[step]
        counts.append((int(batch["input_ids"].numel()), data_tokens(batch)))
    return counts


def summarise(ends, data_tokens, steps: int) -> dict:
    """Data tokens/s and ms/step over steps WARMUP_STEPS+1..steps (``ends``: each step's end
    time)."""
    seconds = ends[steps - 1] - ends[WARMUP_STEPS - 1]
    timed = steps - WARMUP_STEPS
    tokens = sum(data_tokens[WARMUP_STEPS:steps])
    return {"tokens_per_s": tokens / seconds, "ms_per_step": seconds / timed * 1e3,
            "data_tokens_per_step": tokens / timed}


def run_ours(args, base: Path, out: Path, counts) -> dict:
    command = [sys.executable, str(ROOT / "train.py"), "--model", str(base),
               "--data", str(args.data), "--max-steps", str(args.steps),
               "--batch-size", str(args.batch_size),
               "--max-seq-len", str(args.max_seq_len), "--lora-r", str(LORA["r"]),
               "--lora-alpha", str(LORA["alpha"]), "--lora-dropout", str(LORA["dropout"]),
               "--lr", str(LR), "--dtype", "float32", "--device", "cpu", "--log-every", "1",
               "--output", str(out)]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"train.py failed ({result.returncode}):\n{result.stdout}\n"
                         f"{result.stderr}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "tokens_per_s" in r]
    assert [r["step"] for r in rows] == list(range(1, args.steps + 1)), rows
    padded = [c[0] for c in counts]
    cumulative = [sum(padded[:k + 1]) for k in range(args.steps)]
    ends = [cumulative[k] / rows[k]["tokens_per_s"] for k in range(args.steps)]
    assert all(a < b for a, b in zip(ends, ends[1:])), ends  # the rebuilt batches fit its clock
    summary = [line for line in result.stdout.splitlines() if line.startswith("done:")]
    return {**summarise(ends, [c[1] for c in counts], args.steps), "process_s": wall,
            "losses": [r["loss"] for r in rows],
            "train_py_summary": summary[-1] if summary else None, "command": " ".join(command)}


def run_hf(args, base: Path) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--hf-worker", "--base", str(base),
               "--data", str(args.data), "--steps", str(args.steps), "--batch-size",
               str(args.batch_size), "--max-seq-len", str(args.max_seq_len)]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"HF worker failed ({result.returncode}):\n{result.stdout}\n"
                         f"{result.stderr}")
    worker = json.loads(result.stdout.strip().splitlines()[-1])
    return {**summarise(worker["ends"], worker["data_tokens"], args.steps), "process_s": wall,
            "losses": worker["losses"], "command": " ".join(command)}


# ----------------------------------------------------------------------------- report


def report(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"# train.py vs a transformers + PEFT script, whole processes ({result['device_name']})",
        "",
        f"{s['model']}, fp32, CPU, batch {s['batch_size']} × up to {s['max_seq_len']} tokens, "
        f"LoRA r {LORA['r']} / alpha {LORA['alpha']} / dropout {LORA['dropout']}, AdamW lr {LR:g}, "
        f"{s['steps']} steps ({WARMUP_STEPS} warm-up + {s['steps'] - WARMUP_STEPS} timed), "
        f"{s['data']}; ours packed, HF padded per batch. tokens/s = data (non-padding) tokens "
        f"consumed per second over the timed steps.",
        "",
        "| run | side | data tokens/s | ms/step | data tokens/step | process s |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for run in result["runs"]:
        lines.append(f"| {run['repeat']} | {run['side']} | {run['tokens_per_s']:,.0f} | "
                     f"{run['ms_per_step']:.1f} | {run['data_tokens_per_step']:.0f} | "
                     f"{run['process_s']:.1f} |")
    summary = result["summary"]
    lines += [
        "",
        f"Median data tokens/s: ours {summary['ours_tokens_per_s']:,.0f}, transformers + PEFT "
        f"{summary['hf_tokens_per_s']:,.0f}: **{summary['ratio']:.2f}×** (per-repeat ratios "
        f"{', '.join(f'{r:.2f}' for r in summary['ratios'])}).",
        "",
        f"`{result['command']}`; torch {result['versions']['torch']}, transformers "
        f"{result['versions']['transformers']}, peft {result['versions']['peft']}, python "
        f"{result['versions']['python']}; {result['date']}",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="phi3-tiny",
                        help="preset of the random base (default: phi3-tiny)")
    parser.add_argument("--steps", type=int, default=30,
                        help=f"steps per run, {WARMUP_STEPS} of them warm-up (default: 30)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each side, alternating (default: 3)")
    parser.add_argument("--batch-size", type=int, default=4,
                        help="train.py's --batch-size, the HF script's conversations a step "
                             "(default: 4)")
    parser.add_argument("--max-seq-len", type=int, default=256,
                        help="tokens per row; longer chats are cut (default: 256)")
    parser.add_argument("--data", default=str(DATA),
                        help=f"chat data (default: {DATA.relative_to(ROOT)})")
    add_output_args(parser, "cli", "phi3-tiny with 2 layers, 4 steps, 1 repeat: a test of the "
                                   "script (times mean nothing); files get a _smoke suffix")
    parser.add_argument("--hf-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.repeats = 4, 1
    if args.steps <= WARMUP_STEPS:
        parser.error(f"--steps must exceed the {WARMUP_STEPS} warm-up steps")
    return args


def run_sides(args, base: Path, workdir: Path, counts) -> list:
    """Both sides --repeats times, alternating (ours, HF, ours, HF, ...)."""
    runs = []
    for repeat in range(1, args.repeats + 1):
        for side in ("ours", "hf_peft"):
            run = (run_ours(args, base, workdir / f"run{repeat}", counts) if side == "ours"
                   else run_hf(args, base))
            runs.append({"repeat": repeat, "side": side, **run})
            print(f"repeat {repeat} {side}: {run['tokens_per_s']:,.0f} data tokens/s, "
                  f"{run['ms_per_step']:.1f} ms/step, process {run['process_s']:.1f} s",
                  flush=True)
    return runs


def summary_of(runs: list) -> dict:
    """Each side's median data tokens/s, their ratio, and each repeat's ratio."""
    ours = [r["tokens_per_s"] for r in runs if r["side"] == "ours"]
    hf = [r["tokens_per_s"] for r in runs if r["side"] == "hf_peft"]
    return {"ours_tokens_per_s": statistics.median(ours),
            "hf_tokens_per_s": statistics.median(hf),
            "ratio": statistics.median(ours) / statistics.median(hf),
            "ratios": [o / h for o, h in zip(ours, hf)]}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.hf_worker:
        hf_worker(args)
        return 0
    with tempfile.TemporaryDirectory(prefix="bench_cli_") as tmp:
        base = Path(tmp) / "base"
        config = build_base(args.model, base, layers=2 if args.smoke else None)
        counts = our_batches(str(base), args.data, args.batch_size, args.max_seq_len, args.steps)
        runs = run_sides(args, base, Path(tmp), counts)
    settings = {"model": args.model + (" (2 layers)" if args.smoke else ""),
                "steps": args.steps, "warmup_steps": WARMUP_STEPS, "repeats": args.repeats,
                "batch_size": args.batch_size, "max_seq_len": args.max_seq_len,
                "data": os.path.relpath(args.data, ROOT), "smoke": args.smoke, "lora": LORA,
                "lr": LR, "targets": TARGETS}
    result = {
        "benchmark": "bench_cli", "device": "cpu", "device_name": device_name(),
        "date": utc_now(), "versions": versions("transformers", "peft"),
        "command": command_line(), "num_threads": torch.get_num_threads(),
        "settings": settings, "model_config": config,
        "tokens_counted": "non-padding data tokens of the step's batch, steps 3..S, per second "
                          "of the wall clock from the end of step 2 to the end of step S",
        "runs": runs, "summary": summary_of(runs),
    }
    stem = "cli_cpu" + ("_smoke" if args.smoke else "")
    write_results(result, report(result), args.out_dir, stem)
    return 0


if __name__ == "__main__":
    prepare_script()
    sys.exit(main())
