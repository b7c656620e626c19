"""Benchmark whole training processes: ``train.py`` against a transformers + PEFT training script.

Both sides fine-tune the same checkpoint on the same data with the same batch, rank and
optimizer, each as its own ``python`` process, --repeats times alternating (ours, HF, ours,
HF, ...):

  ours     python train.py --model BASE --data examples/chat.jsonl --max-steps S --batch-size 4
           --max-seq-len 256 --lora-r 16 --lora-alpha 32 --lora-dropout 0.05 --lr 2e-4
           --dtype float32 --device cpu --output TMP/...   (packing on: train.py's default)
  hf_peft  python benchmarks/bench_cli.py --hf-worker ...: hf_worker() below, a plain
           Hugging Face training loop (its parts in common.py, shared with bench_train.py):
           hf_peft_model, transformers.Phi3ForCausalLM.from_pretrained(BASE, dtype=fp32,
           attn_implementation="sdpa") + peft.get_peft_model(LoraConfig(r 16, alpha 32,
           dropout 0.05, qkv_proj o_proj gate_up_proj down_proj)); hf_batches, the chats in
           order shuffled once (seed 42), 4 conversations a batch padded to the longest of
           the 4 (right padding, attention_mask, labels -100 on padding; no packing, as HF
           users train), each conversation cut to 256 tokens; per step hf_training_step,
           ``model(input_ids, attention_mask=..., labels=..., use_cache=False).loss.backward()``,
           clip_grad_norm_(1.0) (train.py's and HF Trainer's default, so both do that work),
           AdamW(lr 2e-4, weight decay 0).step(), zero_grad. No LR schedule (train.py's cosine
           schedule costs nothing measurable).

Same checkpoint: one random base (model.build.random_model, seed 1234; the phi3-tiny preset
unless --model) written with our save_pretrained, and the tiny tokenizer beside it with
tokenizer.save_pretrained, in a temp dir; both sides load it. Same tokens: both tokenize each
conversation with training.data.tokenize_chats and the checkpoint's tokenizer, so the token
ids and the loss mask (the assistant replies and their end-of-turn token) are identical; HF's
labels are the ids on the mask and -100 elsewhere.

What is counted, the same on both sides: **data tokens consumed per second**, i.e. the
non-padding tokens of the conversations in the step's batch (HF: attention_mask.sum(); ours:
the packed rows' tokens, segment_ids >= 0, padding excluded), summed over the timed steps
3..S and divided by the time from the end of step 2 to the end of step S (2 warm-up steps
untimed). Note that train.py's own ``tokens_per_s`` counts ``input_ids.numel()``, padding
included, from the start of the loop; this script does not use that figure as is. It
recovers train.py's clock from metrics.jsonl instead: with --log-every 1 every step logs
its cumulative ``tokens_per_s`` = padded tokens so far / seconds since the loop started, and
the padded token counts are known exactly (this script rebuilds train.py's batches with
training.data: the same rows, seed and MicroBatches order), so the end time of step k is
padded_k / tokens_per_s_k. The same rebuild gives each step's data tokens.

Also reported per run: ms/step over the timed steps, data tokens per step, and the process's
wall time (start to exit: imports, loading, data, all S steps, saving).

Run:
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

from common import (  # first: it sets TRITON_INTERPRET and puts this checkout on sys.path
    DATA, DATA_SEED, ROOT, add_output_args, command_line, data_tokens, device_name, hf_batches,
    hf_peft_model, hf_training_step, utc_now, versions, write_random_base, write_results)

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
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in ("extra", "rope_scaling")}


# ----------------------------------------------------------------------------- HF + PEFT worker


def hf_worker(args) -> None:
    """The transformers + PEFT training script; prints one JSON line with its step times."""
    from model.tokenizer import load_tokenizer

    torch.manual_seed(DATA_SEED)
    model = hf_peft_model(args.base, torch.float32, "cpu", LORA["r"], LORA["alpha"], LORA["dropout"],
                          TARGETS)
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
    from training.loop import prepare_rows

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
    """Data tokens/s and ms/step over steps WARMUP_STEPS+1..steps (``ends``: each step's end time)."""
    seconds = ends[steps - 1] - ends[WARMUP_STEPS - 1]
    timed = steps - WARMUP_STEPS
    tokens = sum(data_tokens[WARMUP_STEPS:steps])
    return {"tokens_per_s": tokens / seconds, "ms_per_step": seconds / timed * 1e3,
            "data_tokens_per_step": tokens / timed}


def run_ours(args, base: Path, out: Path, counts) -> dict:
    command = [sys.executable, str(ROOT / "train.py"), "--model", str(base), "--data", str(args.data),
               "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--max-seq-len", str(args.max_seq_len), "--lora-r", str(LORA["r"]),
               "--lora-alpha", str(LORA["alpha"]), "--lora-dropout", str(LORA["dropout"]),
               "--lr", str(LR), "--dtype", "float32", "--device", "cpu", "--log-every", "1",
               "--output", str(out)]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"train.py failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "tokens_per_s" in r]
    assert [r["step"] for r in rows] == list(range(1, args.steps + 1)), rows
    padded = [c[0] for c in counts]
    cumulative = [sum(padded[:k + 1]) for k in range(args.steps)]
    ends = [cumulative[k] / rows[k]["tokens_per_s"] for k in range(args.steps)]
    assert all(a < b for a, b in zip(ends, ends[1:])), ends  # the rebuilt batches fit its clock
    summary = [line for line in result.stdout.splitlines() if line.startswith("done:")]
    return {**summarise(ends, [c[1] for c in counts], args.steps), "process_s": wall,
            "losses": [r["loss"] for r in rows], "train_py_summary": summary[-1] if summary else None,
            "command": " ".join(command)}


def run_hf(args, base: Path) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--hf-worker", "--base", str(base),
               "--data", str(args.data), "--steps", str(args.steps), "--batch-size",
               str(args.batch_size), "--max-seq-len", str(args.max_seq_len)]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"HF worker failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
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
    parser.add_argument("--model", default="phi3-tiny", help="preset of the random base (default: phi3-tiny)")
    parser.add_argument("--steps", type=int, default=30, help="steps per run, 2 of them warm-up (default: 30)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, alternating (default: 3)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--data", default=str(DATA))
    add_output_args(parser, "cli", "phi3-tiny with 2 layers, 4 steps, 1 repeat: a test of the script "
                                   "(times mean nothing); files get a _smoke suffix")
    parser.add_argument("--hf-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.repeats = 4, 1
    if args.steps <= WARMUP_STEPS:
        parser.error(f"--steps must exceed the {WARMUP_STEPS} warm-up steps")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.hf_worker:
        hf_worker(args)
        return 0
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_cli_") as tmp:
        tmp = Path(tmp)
        base = tmp / "base"
        config = build_base(args.model, base, layers=2 if args.smoke else None)
        counts = our_batches(str(base), args.data, args.batch_size, args.max_seq_len, args.steps)
        for repeat in range(1, args.repeats + 1):
            for side in ("ours", "hf_peft"):
                run = (run_ours(args, base, tmp / f"run{repeat}", counts) if side == "ours"
                       else run_hf(args, base))
                runs.append({"repeat": repeat, "side": side, **run})
                print(f"repeat {repeat} {side}: {run['tokens_per_s']:,.0f} data tokens/s, "
                      f"{run['ms_per_step']:.1f} ms/step, process {run['process_s']:.1f} s", flush=True)
    ours = [r["tokens_per_s"] for r in runs if r["side"] == "ours"]
    hf = [r["tokens_per_s"] for r in runs if r["side"] == "hf_peft"]
    summary = {"ours_tokens_per_s": statistics.median(ours), "hf_tokens_per_s": statistics.median(hf),
               "ratio": statistics.median(ours) / statistics.median(hf),
               "ratios": [o / h for o, h in zip(ours, hf)]}
    result = {
        "benchmark": "bench_cli", "device": "cpu", "device_name": device_name(), "date": utc_now(),
        "versions": versions("transformers", "peft"), "command": command_line(),
        "num_threads": torch.get_num_threads(),
        "settings": {"model": args.model + (" (2 layers)" if args.smoke else ""), "steps": args.steps,
                     "warmup_steps": WARMUP_STEPS, "repeats": args.repeats,
                     "batch_size": args.batch_size, "max_seq_len": args.max_seq_len,
                     "data": os.path.relpath(args.data, ROOT), "smoke": args.smoke, "lora": LORA,
                     "lr": LR, "targets": TARGETS},
        "model_config": config,
        "tokens_counted": "non-padding data tokens of the step's batch, steps 3..S, per second of "
                          "the wall clock from the end of step 2 to the end of step S",
        "runs": runs, "summary": summary,
    }
    write_results(result, report(result), args.out_dir, "cli_cpu" + ("_smoke" if args.smoke else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
