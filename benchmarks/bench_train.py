"""Benchmark train.py's training step against a transformers + PEFT script's, side by side.

Providers hf_peft, ours_eager and ours_fused train one random base from one LoRA init, each
in its own process (benchmarks/train_worker.py); their step-1 loss and LoRA gradient norm
must agree, then data (non-padding) tokens per second are timed. Methodology and the
configurations: docs/benchmarks.md.

    python benchmarks/bench_train.py                  # the device's config (cpu-small, gpu-mini)
    python benchmarks/bench_train.py --repeats 3      # on a shared machine (results/train_cpu.md)
    python benchmarks/bench_train.py --config gpu-mini --grad-checkpointing on --steps 8
    python benchmarks/bench_train.py --smoke --out-dir /tmp/bench

Results: a markdown table on stdout, and ``<out-dir>/train_<device>.json`` and ``.md``
(``_smoke`` with --smoke; ``_profile.txt`` with --profile).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from common import (DATA, DEVICE, ON_CUDA, ROOT, SEED, add_output_args, command_line,
                    device_label, device_name, prepare_script, utc_now, versions,
                    write_long_chats, write_results)
from train_report import markdown_report, write_profiles
from train_worker import LORA_B_STD, LR, train_config

from model import PRESETS

WORKER = Path(__file__).resolve().with_name("train_worker.py")
REL_TOL = {"float32": 1e-4, "bfloat16": 2e-2}

# Provider -> the lorakernels backend its process runs under (None: our kernels not involved).
PROVIDERS = {"hf_peft": None, "ours_eager": "eager", "ours_fused": "auto"}
REFERENCE = "hf_peft"

CONFIGS = {
    "cpu-small": dict(preset="phi3-tiny", layers=None, dtype="float32", batch_size=4,
                      max_seq_len=256, steps=20, warmup_steps=3, check_steps=3,
                      grad_checkpointing="off", chats_per_conversation=1),
    "gpu-mini": dict(preset="phi3-mini-4k", layers=None, dtype="bfloat16", batch_size=4,
                     max_seq_len=2048, steps=4, warmup_steps=1, check_steps=2,
                     grad_checkpointing="both", chats_per_conversation=40),
}
SMOKE = dict(preset="phi3-tiny", layers=2, batch_size=2, max_seq_len=128, steps=2,
             warmup_steps=1, check_steps=2, chats_per_conversation=1)
CHECKPOINTING = {"off": [False], "on": [True], "both": [False, True]}
# Flags that override a config's value, and the least each may be.
OVERRIDES = {"steps": 1, "warmup_steps": 0, "check_steps": 1, "batch_size": 1, "max_seq_len": 1,
             "layers": 1, "repeats": 1, "chats_per_conversation": 1, "grad_checkpointing": None}


# ----------------------------------------------------------------------------- the workers


def run_worker(spec: dict, workdir: Path, name: str, env: Optional[dict] = None) -> dict:
    """Run one worker in a fresh process; returns its result, or {"crash": the output's tail}."""
    spec = dict(spec, result=str(workdir / f"{name}.result.json"))
    spec_path = workdir / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, str(WORKER), str(spec_path)], cwd=ROOT,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-25:]
        print(f"!! {name} failed (exit {proc.returncode}):\n" + "\n".join(tail), file=sys.stderr)
        return {"crash": "\n".join(tail), "returncode": proc.returncode}
    return json.loads(Path(spec["result"]).read_text())


def provider_env(provider: str) -> dict:
    """Environment for the provider's process: the kernels tune each shape once, not once
    per process."""
    if PROVIDERS[provider] != "auto":
        return {}
    return {"TRITON_CACHE_AUTOTUNING": os.environ.get("TRITON_CACHE_AUTOTUNING", "1")}


def run_providers(spec: dict, providers: List[str], repeats: int, workdir: Path) -> dict:
    """Every provider's runs, provider -> its last result with "runs" from all repeats.

    One process per provider on a GPU (peak memory resets per run); on a CPU one per
    checkpointing setting too, as a process's peak RSS never goes down. Repeats go round
    all providers in turn, so that load from elsewhere falls on each alike."""
    modes = CHECKPOINTING[spec["grad_checkpointing"]]
    groups = [modes] if ON_CUDA else [[m] for m in modes]
    results = {provider: {"runs": []} for provider in providers}
    for repeat in range(repeats):
        for provider in providers:
            for index, group in enumerate(groups):
                if "crash" in results[provider]:
                    break
                label = f"{provider}, grad ckpt {'/'.join('on' if m else 'off' for m in group)}"
                print(f"== {label}" + (f", repeat {repeat + 1}" if repeats > 1 else ""),
                      flush=True)
                started = time.perf_counter()
                task = dict(spec, task="train", provider=provider,
                            backend=PROVIDERS[provider], grad_checkpointing=group)
                result = run_worker(task, workdir, f"{provider}_{repeat}_{index}",
                                    provider_env(provider))
                print(f"   {time.perf_counter() - started:.1f} s", flush=True)
                runs = results[provider]["runs"] + [dict(run, repeat=repeat)
                                                    for run in result.get("runs", [])]
                results[provider].update(result, runs=runs)
    return results


# ----------------------------------------------------------------------------- rows, check


def run_throughput(run: dict) -> float:
    """A run's data tokens per second over its timed steps."""
    return sum(run["step_data_tokens"]) / (sum(run["step_ms"]) * 1e-3)


def best_repeat(runs: List[dict]) -> dict:
    """The timing of the repeat with the most data tokens/s: the same steps every repeat,
    and load from other processes only ever adds time."""
    timed = [run for run in runs if run.get("step_ms")]
    best = max(timed, key=run_throughput)
    steps = len(best["step_ms"])
    return dict(tokens_per_s=run_throughput(best), ms_per_step=sum(best["step_ms"]) / steps,
                median_ms=statistics.median(best["step_ms"]),
                repeat_tokens_per_s=[run_throughput(run) for run in timed],
                data_tokens_per_step=sum(best["step_data_tokens"]) / steps,
                tokens_per_step=sum(best["step_tokens"]) / steps,
                conversations_per_step=sum(best["step_conversations"]) / steps,
                step_ms=best["step_ms"], step_data_tokens=best["step_data_tokens"],
                step_tokens=best["step_tokens"], step_conversations=best["step_conversations"],
                timed_losses=runs[0].get("timed_losses"),
                # Every repeat starts from the same init and data: its check losses must match.
                repeat_check_losses_equal=all(run.get("check_losses") == runs[0].get(
                    "check_losses") for run in runs))


def provider_row(provider: str, result: dict, runs: List[dict]) -> dict:
    """The row of one provider and checkpointing setting (``runs``: its repeats)."""
    first = runs[0]
    timed = any(run.get("step_ms") for run in runs)
    memory = [run["peak_memory_mb"] for run in runs if run.get("peak_memory_mb") is not None]
    row = {"provider": provider, "grad_checkpointing": first["grad_checkpointing"],
           "error": None if timed else first["error"]}
    for key in ("check_losses", "step1_grad_norm", "check_data_tokens", "check_conversations",
                "first_step_s"):
        row[key] = first.get(key)
    row.update(peak_memory_mb=max(memory) if memory else None,
               memory_kind=first.get("memory_kind"), peak_rss_mb=first.get("peak_rss_mb"),
               trainable_parameters=result["trainable_parameters"], backend=result["backend"],
               num_threads=result["num_threads"], repeats=len(runs))
    if timed:
        row.update(best_repeat(runs))
    profile = next((run["profile"] for run in runs if run.get("profile")), None)
    if profile:
        row["profile"] = profile
    return row


def collect_rows(results: Dict[str, dict], providers: List[str]) -> List[dict]:
    """One row per provider and checkpointing setting, timed by its best repeat."""
    rows = []
    for provider in providers:
        result = results[provider]
        for ckpt in dict.fromkeys(run["grad_checkpointing"] for run in result["runs"]):
            runs = [run for run in result["runs"] if run["grad_checkpointing"] == ckpt]
            rows.append(provider_row(provider, result, runs))
        if "crash" in result:
            rows.append({"provider": provider, "grad_checkpointing": None,
                         "error": "crashed: " + result["crash"].splitlines()[-1]})
    return rows


def add_ratios(rows: List[dict]) -> None:
    """Data tokens/s and memory relative to hf_peft with the same checkpointing (the providers'
    batches differ, so speed is compared in data tokens per second, not per step)."""
    reference = {r["grad_checkpointing"]: r for r in rows
                 if r["provider"] == REFERENCE and r.get("tokens_per_s")}
    for row in rows:
        ref = reference.get(row["grad_checkpointing"])
        if not row.get("tokens_per_s") or not ref:
            continue
        row["speedup_vs_hf_peft"] = row["tokens_per_s"] / ref["tokens_per_s"]
        if ref["peak_memory_mb"] and row["peak_memory_mb"] is not None:
            row["memory_vs_hf_peft"] = row["peak_memory_mb"] / ref["peak_memory_mb"]


def relative_error(value: float, reference: float) -> float:
    return abs(value - reference) / max(abs(reference), 1e-12)


def loss_check(rows: List[dict], dtype: str) -> dict:
    """Step-1 loss and LoRA grad norm of every run against hf_peft's (any setting), within REL_TOL,
    on the same conversations (packed for ours, one per row for hf_peft)."""
    tol = REL_TOL[dtype]
    checked = [r for r in rows if r.get("check_losses")]
    refs = [r for r in checked if r["provider"] == REFERENCE] or checked[:1]
    if not refs:
        return {"passed": False, "tolerance": tol, "failures": ["no run finished its check steps"]}
    ref = refs[0]
    failures, worst = [], {"loss": 0.0, "grad_norm": 0.0}
    for row in checked:
        if row.get("check_data_tokens") != ref.get("check_data_tokens"):
            failures.append(f"{row['provider']}: step 1 trained on {row.get('check_data_tokens')} "
                            f"data tokens, {ref['provider']} on {ref.get('check_data_tokens')}")
        for key, value, expected in (("loss", row["check_losses"][0], ref["check_losses"][0]),
                                     ("grad_norm", row["step1_grad_norm"], ref["step1_grad_norm"])):
            error = relative_error(value, expected)
            worst[key] = max(worst[key], error)
            if not error <= tol:
                failures.append(f"{row['provider']} (grad ckpt {row['grad_checkpointing']}): "
                                f"step-1 {key} {value:.6g} vs {ref['provider']}'s {expected:.6g}, "
                                f"relative error {error:.3g} > {tol:g}")
    return {"passed": not failures, "tolerance": tol, "reference": ref["provider"],
            "conversations": ref.get("check_conversations"),
            "data_tokens": ref.get("check_data_tokens"), "max_rel_error_loss": worst["loss"],
            "max_rel_error_grad_norm": worst["grad_norm"], "failures": failures}


# ----------------------------------------------------------------------------- arguments


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark train.py's training step against a transformers + PEFT "
                    "script's: hf_peft, ours_eager, ours_fused (docs/benchmarks.md).")
    parser.add_argument("--config", choices=list(CONFIGS),
                        help="cpu-small or gpu-mini (default: gpu-mini on CUDA, else cpu-small)")
    parser.add_argument("--steps", type=int, help="timed steps per run (default: per config)")
    parser.add_argument("--warmup-steps", type=int,
                        help="untimed steps before them (default: per config)")
    parser.add_argument("--check-steps", type=int,
                        help="dropout-0 steps whose losses are reported, before the warm-up; "
                             "step 1 is compared (default: 3 on cpu-small, 2 on gpu-mini, smoke)")
    parser.add_argument("--batch-size", type=int,
                        help="packed rows per step (ours), conversations per step (hf_peft) "
                             "(default: per config)")
    parser.add_argument("--max-seq-len", type=int,
                        help="train.py's --max-seq-len: tokens per packed row, longer chats cut "
                             "(default: per config)")
    parser.add_argument("--data", type=Path, default=DATA,
                        help=f"chat data in train.py's format (default: {DATA.relative_to(ROOT)})")
    parser.add_argument("--chats-per-conversation", type=int,
                        help="join this many consecutive chats of --data into one multi-turn "
                             "conversation (default: 40 for gpu-mini, 1 for cpu-small)")
    parser.add_argument("--no-packing", dest="packing", action="store_false",
                        help="train.py's --no-packing for ours: one conversation a row, causal "
                             "attention without segments")
    parser.add_argument("--model", choices=sorted(PRESETS),
                        help="preset whose architecture is trained (default: per config)")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the preset's)")
    parser.add_argument("--grad-checkpointing", choices=list(CHECKPOINTING),
                        help="gradient checkpointing off, on or both (default: both for "
                             "gpu-mini, off for cpu-small)")
    parser.add_argument("--providers", nargs="+", choices=list(PROVIDERS),
                        help="providers to run (default: all)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run every provider this many times, in turn, and report the "
                             "run with the most data tokens/s (default: 1)")
    add_output_args(parser, "train", "phi3-tiny with 2 layers, batch 2 × up to 128, a few steps: "
                                     "a test of the script; files get a _smoke suffix")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one step per provider with torch.profiler "
                             "(top ops to <stem>_profile.txt)")
    args = parser.parse_args(argv)
    for name, minimum in OVERRIDES.items():
        value = getattr(args, name)
        if minimum is not None and value is not None and value < minimum:
            parser.error(f"--{name.replace('_', '-')} must be at least {minimum}")
    return args


def settings_from(args: argparse.Namespace) -> dict:
    """The run's settings: the config's, the smoke case's, then the flags given."""
    config = args.config or ("gpu-mini" if ON_CUDA else "cpu-small")
    settings = dict(CONFIGS[config], config=config, smoke=args.smoke)
    if args.smoke:
        settings.update(SMOKE, config="smoke", dtype="bfloat16" if ON_CUDA else "float32",
                        grad_checkpointing="off")
    settings.update({name: getattr(args, name) for name in OVERRIDES
                     if getattr(args, name) is not None})
    if args.model is not None:
        settings["preset"] = args.model
    return dict(settings, data=str(args.data.resolve()), packing=args.packing)


# ----------------------------------------------------------------------------- main


def shown_path(path: str) -> str:
    """``path`` relative to this checkout when it is inside it."""
    try:
        return str(Path(path).relative_to(ROOT))
    except ValueError:
        return path


def worker_spec(settings: dict, workdir: Path, profile: bool) -> dict:
    """What every worker reads: the settings, this run's files and the data it trains on."""
    data = settings["data"]
    if settings["chats_per_conversation"] > 1:
        data = str(write_long_chats(data, workdir / "conversations.jsonl",
                                    settings["chats_per_conversation"]))
    return dict(settings, data=data, device=DEVICE, checkpoint=str(workdir / "base"),
                lora_init=str(workdir / "lora_init.safetensors"), profile=profile)


def result_document(settings: dict, config, providers: List[str], base: dict, rows: List[dict],
                    check: dict) -> dict:
    """The JSON result: device, versions, the settings (``config``: train.py's), the check and
    the rows."""
    timer = "time.perf_counter around each step" + (
        ", torch.cuda.synchronize before and after" if ON_CUDA else "")
    return {
        "device": device_label(cpu="cpu"), "device_name": device_name(), "device_type": DEVICE,
        "cuda": base["cuda"], "num_threads": base["num_threads"], "date": utc_now(),
        "versions": versions("transformers", "peft"), "command": command_line(),
        "settings": dict(settings, data=shown_path(settings["data"]), providers=providers,
                         lora=dict(r=config.lora_r, lora_alpha=config.lora_alpha,
                                   lora_dropout=config.lora_dropout),
                         targets=list(config.target_modules), lr=LR,
                         weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm,
                         warmup_ratio=config.warmup_ratio, packing=config.packing,
                         data_seed=config.seed, seed=SEED, lora_b_std=LORA_B_STD,
                         lora_dtype="float32", timer=timer),
        "model_config": base["config"], "loss_check": check, "rows": rows,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = settings_from(args)
    providers = args.providers or list(PROVIDERS)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        workdir = Path(tmp)
        spec = worker_spec(settings, workdir, args.profile)
        print(f"== base: {settings['preset']}, {settings['dtype']}, on {DEVICE}", flush=True)
        base = run_worker(dict(spec, task="base"), workdir, "base")
        if "crash" in base:
            return 1
        results = run_providers(spec, providers, settings["repeats"], workdir)

    rows = collect_rows(results, providers)
    add_ratios(rows)
    check = loss_check(rows, settings["dtype"])
    crashed = [p for p in providers if "crash" in results[p]]
    if crashed:
        check["passed"] = False
        check["failures"].append(f"crashed: {', '.join(crashed)}")
    profiles = {r["provider"]: r.pop("profile") for r in rows if "profile" in r}
    result = result_document(settings, train_config(spec), providers, base, rows, check)
    stem = f"train_{result['device']}" + ("_smoke" if settings["smoke"] else "")
    write_results(result, markdown_report(result, result["command"]), args.out_dir, stem)
    if profiles:
        write_profiles(profiles, args.out_dir / f"{stem}_profile.txt")
    if not check["passed"]:
        print("LOSS CHECK FAILED:\n  " + "\n  ".join(check["failures"]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    prepare_script()
    sys.exit(main())
