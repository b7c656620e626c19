"""Benchmark one LoRA fine-tuning step of Phi-3: transformers + PEFT against our model, side by side.

Providers, each the same step on the same base weights, LoRA init and token data:
  hf_peft     transformers' Phi3ForCausalLM (attn_implementation="sdpa") + peft.get_peft_model
  ours_eager  our model.Phi3ForCausalLM + model.lora.apply_lora, LORAKERNELS_BACKEND=eager
  ours_fused  the same with LORAKERNELS_BACKEND=auto: the Triton kernels on CUDA; on a CPU in
              fp32 the oneDNN path (lorakernels/ops/onednn_lora_linear.py, the LM head's
              GEMMs on oneDNN too), what train.py runs by default
The first check step (autotuning included on a GPU) is never timed; its time is reported as
"1st step s".

The step: LoRA r 16, alpha 32, dropout 0.05 on qkv_proj, o_proj, gate_up_proj and down_proj;
forward, the mean next-token cross entropy over every token, backward, then AdamW (lr 1e-4,
weight decay 0) on the LoRA parameters and zero_grad. Each side computes the loss as its users
do: ours with training.loop.accumulate_gradients, what train.py runs (the LM head and loss
chunk by chunk, never holding the [tokens, vocab] logits); Hugging Face with
``model(input_ids, labels=...).loss`` (full logits, upcast to fp32). The base is frozen in the
run's dtype; LoRA parameters are fp32 on every provider (apply_lora creates them so; PEFT's
are cast to fp32 explicitly, and every provider's are checked for dtype, names and shapes).

Same start: one worker builds a random base (model.build.random_model, seed 1234: Linear and
Embedding weights N(0, 0.02²) as Hugging Face initialises, norms 1) and writes it once with our
save_pretrained; every provider loads that directory with its own from_pretrained. The same
worker draws one LoRA init in our parameter names, A as loralib/PEFT (kaiming-uniform, bound
1/sqrt(in)) and B ~ N(0, 0.01²) rather than PEFT's zeros, so the low-rank path changes the loss
and A gets a gradient from the first step; each provider copies it in (PEFT's names mapped by
lorakernels.adapters' key rule). Step i uses the token batch drawn with seed 1234 + i.

Loss check: each run first takes --check-steps steps with LoRA dropout 0 from that init
and records their losses and the global norm of the LoRA gradients of step 1; then it
restores dropout 0.05 for the warm-up and timed steps. The step-1 loss and grad norm of every
provider must match hf_peft's within a relative REL_TOL (1e-4 in fp32, 2e-2 in bf16): at
random init the loss is close to ln(vocab) whatever the model does, so the grad norm is the
sharper test. A mismatch, or a provider that crashes, makes the script exit 1 after
writing its results (marked FAILED).

Measured per provider and gradient-checkpointing setting, each provider in a fresh process
(on CPU one process per setting too): ms/step, the median over --steps timed steps after
--warmup-steps (time.perf_counter around forward + backward + optimizer step + zero_grad,
after torch.cuda.synchronize on GPU; with --repeats N, every provider runs N times in turn and
the lowest of the N medians counts, as load from elsewhere only adds time); tokens/s =
batch·seq_len / that median; peak memory: on GPU torch.cuda.max_memory_allocated over the
run's steps after reset_peak_memory_stats (weights, optimizer state and activations); on CPU
the growth of the process's peak RSS (resource.getrusage ru_maxrss) over the steps, a lower
bound if loading peaked higher, and at small sizes mostly allocator and library scratch.
A CUDA out-of-memory error is reported as OOM, not a failure.

Configurations (--config; the default follows the device):
  cpu-small  the phi3-tiny preset (4 layers, hidden 256, vocab 1088), fp32, batch 4 × 256
             tokens, no gradient checkpointing, 3 check + 3 warm-up + 20 timed steps
  gpu-mini   the Phi-3-mini-4k architecture, random weights, bf16, batch 4 × 2048 tokens, with
             and without gradient checkpointing, 2 check + 1 warm-up + 4 timed steps: few, so
             that with the setup (a 7.6 GB base written once, loaded by each provider, Triton
             autotuning) the default run is meant to fit gpu_check.py's 240 s. Its sliding
             window 2047 < 2048 tokens, so both models attend through a dense SDPA mask.
  --smoke    phi3-tiny with 2 layers, batch 2 × 64, 2 check + 1 warm-up + 2 timed steps (times
             mean nothing); its files get a _smoke suffix.

Run:
    python benchmarks/bench_train.py                       # the device's default config
    python benchmarks/bench_train.py --repeats 3           # on a shared machine (train_cpu.md)
    python benchmarks/bench_train.py --config gpu-mini --grad-checkpointing on --steps 8
    python benchmarks/bench_train.py --smoke --out-dir /tmp/bench
    python benchmarks/bench_train.py --profile             # + torch.profiler top ops per provider

Results: a markdown table on stdout, and ``<out-dir>/train_<device>.json`` and ``.md``
(``_profile.txt`` with --profile).
"""
import argparse
import dataclasses
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from common import (  # first: it sets TRITON_INTERPRET and puts this checkout on sys.path
    DEVICE, ON_CUDA, ROOT, SEED, add_output_args, command_line, device_label, device_name,
    random_base, utc_now, versions, write_results)

import torch
from safetensors.torch import load_file, save_file

import lorakernels
from lorakernels.adapters import lora_key_from_peft
from model import PRESETS, Phi3Config, Phi3ForCausalLM
from model.lora import DEFAULT_TARGETS, apply_lora
from training.loop import StepLoss, accumulate_gradients

LORA_B_STD = 0.01
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05)
LR = 1e-4
WEIGHT_DECAY = 0.0
REL_TOL = {"float32": 1e-4, "bfloat16": 2e-2}
PROFILE_ROWS = 20

# Provider -> LORAKERNELS_BACKEND for its process (None: our kernels are not involved).
PROVIDERS = {"hf_peft": None, "ours_eager": "eager", "ours_fused": "auto"}
REFERENCE = "hf_peft"

CONFIGS = {
    "cpu-small": dict(preset="phi3-tiny", layers=None, dtype="float32", batch_size=4, seq_len=256,
                      steps=20, warmup_steps=3, check_steps=3, grad_checkpointing="off"),
    "gpu-mini": dict(preset="phi3-mini-4k", layers=None, dtype="bfloat16", batch_size=4,
                     seq_len=2048, steps=4, warmup_steps=1, check_steps=2,
                     grad_checkpointing="both"),
}
SMOKE = dict(preset="phi3-tiny", layers=2, batch_size=2, seq_len=64, steps=2, warmup_steps=1,
             check_steps=2)
CHECKPOINTING = {"off": [False], "on": [True], "both": [False, True]}


# ----------------------------------------------------------------------------- worker: the base


def lora_init(model: Phi3ForCausalLM) -> Dict[str, torch.Tensor]:
    """One LoRA init, named and shaped by apply_lora on ``model`` (in place): A kaiming-uniform as
    loralib/PEFT draw it, B ~ N(0, LORA_B_STD²) (not zeros, so the low-rank path counts from step 1)."""
    apply_lora(model, targets=DEFAULT_TARGETS, **LORA)
    gen = torch.Generator().manual_seed(SEED)
    init = {}
    for name, param in model.named_parameters():
        if name.endswith("lora_A"):
            bound = 1.0 / math.sqrt(param.shape[1])
            init[name] = torch.rand(param.shape, generator=gen) * (2 * bound) - bound
        elif name.endswith("lora_B"):
            init[name] = torch.randn(param.shape, generator=gen) * LORA_B_STD
    return init


def build_base(spec: dict) -> dict:
    """Random base weights saved with our save_pretrained, and one LoRA init (safetensors)."""
    config = Phi3Config.from_name(spec["preset"])
    if spec["layers"]:
        config = dataclasses.replace(config, num_hidden_layers=spec["layers"])
    model = random_base(config, getattr(torch, spec["dtype"]), spec["device"])
    model.save_pretrained(spec["checkpoint"])
    save_file(lora_init(model), spec["lora_init"])
    return {"cuda": torch.version.cuda, "num_threads": torch.get_num_threads(),
            "config": {k: v for k, v in dataclasses.asdict(config).items()
                       if k not in ("extra", "rope_scaling")}}


# ----------------------------------------------------------------------------- worker: a provider


@dataclasses.dataclass
class Subject:
    """One provider's model, ready to train: what the step loop needs and nothing else."""

    loss_backward: object  # batch -> the step's mean token loss (float), gradients accumulated
    module: torch.nn.Module  # for train()
    lora: Dict[str, torch.nn.Parameter]  # our parameter names -> the provider's parameters
    set_checkpointing: object
    set_dropout: object


def hf_peft_subject(checkpoint: str, dtype: torch.dtype, device: str) -> Subject:
    import peft
    import transformers

    base = transformers.Phi3ForCausalLM.from_pretrained(checkpoint, dtype=dtype,
                                                        attn_implementation="sdpa").to(device)
    model = peft.get_peft_model(base, peft.LoraConfig(
        r=LORA["r"], lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"],
        target_modules=list(DEFAULT_TARGETS), bias="none", task_type="CAUSAL_LM"))
    lora = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            param.data = param.data.float()  # fp32 adapters over the frozen base, as ours
            lora[lora_key_from_peft(name)] = param
    dropouts = [m for n, m in model.named_modules() if n.endswith("lora_dropout.default")]

    def set_checkpointing(enabled: bool) -> None:
        # transformers 5 renamed gradient_checkpointing_enable (now a deprecated alias). Either
        # also makes the embedding output require grad (PEFT + checkpointing): HF's own default.
        if hasattr(base, "activation_checkpointing_enable"):
            enable, disable = base.activation_checkpointing_enable, base.activation_checkpointing_disable
            kwargs = {"activation_checkpointing_kwargs": {"use_reentrant": False}}
        else:
            enable, disable = base.gradient_checkpointing_enable, base.gradient_checkpointing_disable
            kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
        enable(**kwargs) if enabled else disable()

    def set_dropout(p: float) -> None:
        for module in dropouts:
            module.p = p

    def loss_backward(batch: dict) -> float:
        # Hugging Face's own loss: full logits, upcast to fp32, mean over the shifted labels.
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss
        loss.backward()
        return loss.item()

    return Subject(loss_backward, model, lora, set_checkpointing, set_dropout)


def ours_subject(checkpoint: str, dtype: torch.dtype, device: str) -> Subject:
    model = apply_lora(Phi3ForCausalLM.from_pretrained(checkpoint, dtype=dtype, device=device),
                       targets=DEFAULT_TARGETS, **LORA)
    lora = {name: p for name, p in model.named_parameters() if p.requires_grad}
    layers = [m for m in model.modules() if isinstance(m, lorakernels.LoRALayer)]

    def set_dropout(p: float) -> None:
        for module in layers:
            module.lora_dropout.p = p

    def loss_backward(batch: dict) -> float:
        return accumulate_gradients(StepLoss(model), [batch])  # what train.py runs, LM head and loss included

    return Subject(loss_backward, model, lora, model.set_gradient_checkpointing, set_dropout)


def make_batch(index: int, batch_size: int, seq_len: int, vocab: int, device: str) -> dict:
    """Step ``index``'s tokens: the same on every provider; every token is a target."""
    gen = torch.Generator().manual_seed(SEED + index)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=gen).to(device)
    return {"input_ids": ids, "labels": ids, "position_ids": None, "segment_ids": None}


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def train_run(subject: Subject, init: Dict[str, torch.Tensor], batches: List[dict],
              grad_checkpointing: bool, spec: dict) -> dict:
    """Check steps (dropout 0), warm-up and timed steps (dropout 0.05) from the shared init."""
    device = spec["device"]
    params = list(subject.lora.values())
    with torch.no_grad():
        for name, param in subject.lora.items():
            param.copy_(init[name])
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    subject.set_checkpointing(grad_checkpointing)
    subject.module.train()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    rss_before = rss_mb()

    def step(batch: dict, grad_norm: bool = False):
        loss = subject.loss_backward(batch)
        norm = (torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()
                if grad_norm else None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss, norm

    run = {"grad_checkpointing": grad_checkpointing, "error": None}
    try:
        subject.set_dropout(0.0)
        started = time.perf_counter()
        check = [step(batches[0], grad_norm=True)]
        run["first_step_s"] = time.perf_counter() - started  # autotuning included
        check += [step(batches[i]) for i in range(1, spec["check_steps"])]
        run["check_losses"] = [loss for loss, _ in check]
        run["step1_grad_norm"] = check[0][1]
        subject.set_dropout(LORA["lora_dropout"])
        offset = spec["check_steps"]
        for i in range(spec["warmup_steps"]):
            step(batches[offset + i])
        offset += spec["warmup_steps"]
        times, losses = [], []
        for i in range(spec["steps"]):
            synchronize(device)
            start = time.perf_counter()
            losses.append(step(batches[offset + i])[0])
            synchronize(device)
            times.append((time.perf_counter() - start) * 1e3)
        run["timed_losses"] = losses
        run["step_ms"] = times
        if spec.get("profile") and not spec.get("profiled"):
            run["profile"] = profile_step(lambda: step(batches[0]), device)
            spec["profiled"] = True
    except torch.cuda.OutOfMemoryError:
        run["error"] = "out of memory"
    optimizer.zero_grad(set_to_none=True)
    del optimizer
    if device == "cuda":
        run["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
        run["memory_kind"] = "torch.cuda.max_memory_allocated"
        gc.collect()
        torch.cuda.empty_cache()
    else:
        run["peak_memory_mb"] = rss_mb() - rss_before
        run["peak_rss_mb"] = rss_mb()
        run["memory_kind"] = "ru_maxrss growth over the steps"
    return run


def profile_step(fn, device: str) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
    sort_by = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort_by, row_limit=PROFILE_ROWS)


def train_provider(spec: dict) -> dict:
    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    build = hf_peft_subject if spec["provider"] == "hf_peft" else ours_subject
    subject = build(spec["checkpoint"], dtype, device)
    init = load_file(spec["lora_init"])
    if set(subject.lora) != set(init):
        missing, unexpected = sorted(set(init) - set(subject.lora)), sorted(set(subject.lora) - set(init))
        raise ValueError(f"{spec['provider']}: trainable parameters differ from the LoRA init: "
                         f"missing {missing[:8]}, unexpected {unexpected[:8]}")
    for name, param in subject.lora.items():
        if param.dtype != torch.float32 or tuple(param.shape) != tuple(init[name].shape):
            raise ValueError(f"{spec['provider']}: {name} is {param.dtype} {tuple(param.shape)}, "
                             f"expected float32 {tuple(init[name].shape)}")
    init = {name: t.to(device) for name, t in init.items()}
    vocab = json.loads((Path(spec["checkpoint"]) / "config.json").read_text())["vocab_size"]
    total = spec["check_steps"] + spec["warmup_steps"] + spec["steps"]
    batches = [make_batch(i, spec["batch_size"], spec["seq_len"], vocab, device)
               for i in range(total)]
    runs = [train_run(subject, init, batches, ckpt, spec) for ckpt in spec["grad_checkpointing"]]
    frozen = sum(p.numel() for p in subject.module.parameters() if not p.requires_grad)
    return {"provider": spec["provider"], "backend": os.environ.get("LORAKERNELS_BACKEND"),
            "trainable_parameters": sum(p.numel() for p in subject.lora.values()),
            "frozen_parameters": frozen, "num_threads": torch.get_num_threads(), "runs": runs}


def worker_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    torch.manual_seed(SEED)  # dropout's stream
    result = build_base(spec) if spec["task"] == "base" else train_provider(spec)
    Path(spec["result"]).write_text(json.dumps(result, indent=2) + "\n")


# ----------------------------------------------------------------------------- the parent


def run_worker(spec: dict, workdir: Path, name: str, env: Optional[dict] = None) -> dict:
    """Run one worker in a fresh process; returns its result, or {"crash": the output's tail}."""
    spec = dict(spec, result=str(workdir / f"{name}.result.json"))
    spec_path = workdir / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)],
                          cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-25:]
        print(f"!! {name} failed (exit {proc.returncode}):\n" + "\n".join(tail), file=sys.stderr)
        return {"crash": "\n".join(tail), "returncode": proc.returncode}
    return json.loads(Path(spec["result"]).read_text())


def relative_error(value: float, reference: float) -> float:
    return abs(value - reference) / max(abs(reference), 1e-12)


def collect_rows(results: Dict[str, dict], providers: List[str]) -> List[dict]:
    """One row per provider and checkpointing setting; ms/step of the best of the repeats."""
    rows = []
    for provider in providers:
        result = results[provider]
        settings = list(dict.fromkeys(run["grad_checkpointing"] for run in result["runs"]))
        for ckpt in settings:
            runs = [run for run in result["runs"] if run["grad_checkpointing"] == ckpt]
            first = runs[0]
            timed = [run for run in runs if run.get("step_ms")]
            memory = [run["peak_memory_mb"] for run in runs if run.get("peak_memory_mb") is not None]
            row = {"provider": provider, "grad_checkpointing": ckpt,
                   "error": None if timed else first["error"],
                   "check_losses": first.get("check_losses"),
                   "step1_grad_norm": first.get("step1_grad_norm"),
                   "first_step_s": first.get("first_step_s"),
                   "peak_memory_mb": max(memory) if memory else None,
                   "memory_kind": first.get("memory_kind"),
                   "peak_rss_mb": first.get("peak_rss_mb"),
                   "trainable_parameters": result["trainable_parameters"],
                   "backend": result["backend"], "num_threads": result["num_threads"],
                   "repeats": len(runs)}
            if timed:
                # Load from other processes only ever adds time: take the best repeat's median.
                medians = [statistics.median(run["step_ms"]) for run in timed]
                row.update(step_ms=[t for run in timed for t in run["step_ms"]],
                           median_ms=min(medians), repeat_median_ms=medians,
                           timed_losses=first.get("timed_losses"))
                # Every repeat starts from the same init and data: its check losses must match.
                row["repeat_check_losses_equal"] = all(
                    run.get("check_losses") == first.get("check_losses") for run in runs)
            profile = next((run["profile"] for run in runs if run.get("profile")), None)
            if profile:
                row["profile"] = profile
            rows.append(row)
        if "crash" in result:
            rows.append({"provider": provider, "grad_checkpointing": None,
                         "error": "crashed: " + result["crash"].splitlines()[-1]})
    return rows


def add_ratios(rows: List[dict], tokens_per_step: int) -> None:
    """tokens/s, and speed and memory relative to hf_peft with the same checkpointing."""
    reference = {r["grad_checkpointing"]: r for r in rows
                 if r["provider"] == REFERENCE and r.get("median_ms")}
    for row in rows:
        if not row.get("median_ms"):
            continue
        row["tokens_per_s"] = tokens_per_step / (row["median_ms"] * 1e-3)
        ref = reference.get(row["grad_checkpointing"])
        if ref:
            row["speedup_vs_hf_peft"] = ref["median_ms"] / row["median_ms"]
            if ref["peak_memory_mb"] and row["peak_memory_mb"] is not None:
                row["memory_vs_hf_peft"] = row["peak_memory_mb"] / ref["peak_memory_mb"]


def loss_check(rows: List[dict], dtype: str) -> dict:
    """Step-1 loss and LoRA grad norm of every run against hf_peft's (any setting), within REL_TOL."""
    tol = REL_TOL[dtype]
    checked = [r for r in rows if r.get("check_losses")]
    refs = [r for r in checked if r["provider"] == REFERENCE] or checked[:1]
    if not refs:
        return {"passed": False, "tolerance": tol, "failures": ["no run finished its check steps"]}
    ref = refs[0]
    failures, worst = [], {"loss": 0.0, "grad_norm": 0.0}
    for row in checked:
        for key, value, expected in (("loss", row["check_losses"][0], ref["check_losses"][0]),
                                     ("grad_norm", row["step1_grad_norm"], ref["step1_grad_norm"])):
            error = relative_error(value, expected)
            worst[key] = max(worst[key], error)
            if not error <= tol:
                failures.append(f"{row['provider']} (grad ckpt {row['grad_checkpointing']}): step-1 "
                                f"{key} {value:.6g} vs {ref['provider']}'s {expected:.6g}, relative "
                                f"error {error:.3g} > {tol:g}")
    return {"passed": not failures, "tolerance": tol, "reference": ref["provider"],
            "max_rel_error_loss": worst["loss"], "max_rel_error_grad_norm": worst["grad_norm"],
            "failures": failures}


def fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def ratio(value) -> str:
    return "–" if value is None else f"{value:.2f}×"


def markdown_table(rows: List[dict], device: str) -> str:
    memory = "peak MB" if device == "cuda" else "RSS growth MB"
    lines = [f"| provider | grad ckpt | tokens/s | ms/step | {memory} | speed-up vs hf_peft "
             f"| memory vs hf_peft | 1st step s | losses, first steps (dropout 0) "
             f"| step-1 LoRA grad norm |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        provider = r["provider"]
        ckpt = {True: "on", False: "off", None: "–"}[r["grad_checkpointing"]]
        losses = ", ".join(f"{x:.5f}" for x in r["check_losses"]) if r.get("check_losses") else "–"
        if r.get("median_ms"):
            timing = (f"{r['tokens_per_s']:,.0f} | {r['median_ms']:.1f} "
                      f"| {fmt(r['peak_memory_mb'], '.0f')} "
                      f"| {ratio(r.get('speedup_vs_hf_peft'))} "
                      f"| {ratio(r.get('memory_vs_hf_peft'))}")
        else:
            error = "OOM" if r["error"] == "out of memory" else (r["error"] or "no timing")
            timing = f"{error} | – | {fmt(r.get('peak_memory_mb'), '.0f')} | – | –"
        lines.append(f"| {provider} | {ckpt} | {timing} | {fmt(r.get('first_step_s'), '.2f')} | {losses} "
                     f"| {fmt(r.get('step1_grad_norm'), '.6g')} |")
    return "\n".join(lines)


def markdown_report(result: dict, command: str) -> str:
    s, v, check = result["settings"], result["versions"], result["loss_check"]
    smoke = " (smoke test: times mean nothing)" if s["smoke"] else ""
    c = result["model_config"]
    memory = ("peak: torch.cuda.max_memory_allocated over each run's steps (weights + optimizer "
              "state + activations)" if result["device_type"] == "cuda" else
              f"RSS growth: ru_maxrss after the steps minus before them, each provider in its own "
              f"process ({result['num_threads']} torch threads)")
    verdict = (f"PASSED: step-1 loss and LoRA grad norm of every run within relative "
               f"{check['tolerance']:g} of {check.get('reference')}'s (worst: loss "
               f"{check.get('max_rel_error_loss', float('nan')):.2g}, grad norm "
               f"{check.get('max_rel_error_grad_norm', float('nan')):.2g})"
               if check["passed"] else "FAILED: " + "; ".join(check["failures"]))
    return "\n".join([
        f"# LoRA training step on {result['device_name']}{smoke}",
        "",
        f"torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, "
        f"triton {v['triton']}, python {v['python']}"
        + (f", CUDA {result['cuda']}" if result["device_type"] == "cuda" else "")
        + f"; {result['date']}",
        "",
        f"Config {s['config']}: {s['preset']} architecture ({c['num_hidden_layers']} layers, hidden "
        f"{c['hidden_size']}, vocab {c['vocab_size']}), random weights (seed {SEED}), {s['dtype']} "
        f"base, fp32 LoRA r {LORA['r']} / alpha {LORA['lora_alpha']} / dropout "
        f"{LORA['lora_dropout']} on {', '.join(DEFAULT_TARGETS)}; AdamW lr {LR:g}; batch "
        f"{s['batch_size']} × {s['seq_len']} tokens; {s['check_steps']} check + "
        f"{s['warmup_steps']} warm-up + {s['steps']} timed steps"
        + ("; ms/step: median of the timed steps" if s["repeats"] == 1 else
           f"; ms/step: each provider run {s['repeats']} times in turn, the lowest of the runs' "
           f"medians") + ".",
        "",
        f"Command: `{command}`",
        "",
        f"Memory: {memory}. Loss check (dropout 0, same init and data): {verdict}.",
        "",
        markdown_table(result["rows"], result["device_type"]),
        "",
        "ours_fused: LORAKERNELS_BACKEND=auto (" + ("the Triton kernels" if result["device_type"] == "cuda"
                                                     else "the oneDNN path for fp32 CPU tensors")
        + "). 1st step s: the first check step, never timed.",
        "",
    ])


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark one LoRA fine-tuning step of Phi-3: hf_peft, ours_eager, ours_fused.")
    parser.add_argument("--config", choices=list(CONFIGS),
                        help="cpu-small or gpu-mini (default: gpu-mini on CUDA, else cpu-small)")
    parser.add_argument("--steps", type=int, help="timed steps per run (default: per config)")
    parser.add_argument("--warmup-steps", type=int,
                        help="untimed steps before them (default: per config)")
    parser.add_argument("--check-steps", type=int,
                        help="dropout-0 steps whose losses are reported, before the warm-up; "
                             "step 1 is compared (default: 3 on cpu-small, 2 on gpu-mini and smoke)")
    parser.add_argument("--batch-size", type=int, help="sequences per step (default: per config)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: per config)")
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
                             "lowest of the runs' median ms/step (default: 1): for machines "
                             "shared with other work")
    add_output_args(parser, "train", "phi3-tiny with 2 layers, batch 2 × 64, a few steps: a test "
                                     "of the script; files get a _smoke suffix")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one step per provider with torch.profiler "
                             "(top ops to <stem>_profile.txt)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "seq_len", "layers", "repeats"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("warmup_steps", "check_steps"):
        if getattr(args, name) is not None and getattr(args, name) < (1 if name == "check_steps" else 0):
            parser.error(f"--{name.replace('_', '-')} is too small")
    return args


def write_profiles(profiles: Dict[str, str], path: Path) -> None:
    """Each provider's torch.profiler table, one after the other."""
    text = "\n\n".join(f"== {p}: one step, top {PROFILE_ROWS} ops by self time\n{t}"
                       for p, t in profiles.items())
    path.write_text(text + "\n")
    print(f"wrote {path}")


def settings_from(args: argparse.Namespace) -> dict:
    config = args.config or ("gpu-mini" if ON_CUDA else "cpu-small")
    settings = dict(CONFIGS[config], config=config, smoke=args.smoke)
    if args.smoke:
        settings.update(SMOKE, config="smoke", dtype="bfloat16" if ON_CUDA else "float32",
                        grad_checkpointing="off")
    for name in ("steps", "warmup_steps", "check_steps", "batch_size", "seq_len", "layers",
                 "grad_checkpointing", "repeats"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    if args.model is not None:
        settings["preset"] = args.model
    return settings


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0
    settings = settings_from(args)
    providers = args.providers or list(PROVIDERS)
    modes = CHECKPOINTING[settings["grad_checkpointing"]]
    command = command_line()

    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        workdir = Path(tmp)
        spec = dict(settings, device=DEVICE, checkpoint=str(workdir / "base"),
                    lora_init=str(workdir / "lora_init.safetensors"), profile=args.profile)
        print(f"== base: {settings['preset']}, {settings['dtype']}, on {DEVICE}", flush=True)
        base = run_worker(dict(spec, task="base"), workdir, "base")
        if "crash" in base:
            return 1
        # One process per provider on GPU (peak memory resets per run); on CPU one per
        # setting too, as a process's peak RSS never goes down. Repeats go round all the
        # providers in turn, so that load from elsewhere falls on each alike.
        groups = [modes] if ON_CUDA else [[m] for m in modes]
        results = {provider: {"runs": []} for provider in providers}
        for repeat in range(args.repeats):
            for provider in providers:
                backend = PROVIDERS[provider]
                env = {"LORAKERNELS_BACKEND": backend} if backend else {}
                if backend == "auto":  # tune each shape once, not once per process
                    env["TRITON_CACHE_AUTOTUNING"] = os.environ.get("TRITON_CACHE_AUTOTUNING", "1")
                for index, group in enumerate(groups):
                    if "crash" in results[provider]:
                        break
                    label = f"{provider}, grad ckpt {'/'.join('on' if m else 'off' for m in group)}"
                    print(f"== {label}" + (f", repeat {repeat + 1}" if args.repeats > 1 else ""),
                          flush=True)
                    started = time.perf_counter()
                    result = run_worker(dict(spec, task="train", provider=provider,
                                             grad_checkpointing=group), workdir,
                                        f"{provider}_{repeat}_{index}", env)
                    print(f"   {time.perf_counter() - started:.1f} s", flush=True)
                    runs = results[provider]["runs"]
                    results[provider].update(result)
                    results[provider]["runs"] = runs + [dict(run, repeat=repeat)
                                                        for run in result.get("runs", [])]

    rows = collect_rows(results, providers)
    add_ratios(rows, settings["batch_size"] * settings["seq_len"])
    check = loss_check(rows, settings["dtype"])
    crashed = [p for p in providers if "crash" in results[p]]
    if crashed:
        check["passed"] = False
        check["failures"].append(f"crashed: {', '.join(crashed)}")
    profiles = {r["provider"]: r.pop("profile") for r in rows if "profile" in r}
    result = {
        "device": device_label(cpu="cpu"), "device_name": device_name(), "device_type": DEVICE,
        "cuda": base["cuda"], "num_threads": base["num_threads"], "date": utc_now(),
        "versions": versions("transformers", "peft"), "command": command,
        "settings": dict(settings, providers=providers, lora=LORA, targets=list(DEFAULT_TARGETS), lr=LR,
                         weight_decay=WEIGHT_DECAY, seed=SEED, lora_b_std=LORA_B_STD,
                         lora_dtype="float32",
                         timer="time.perf_counter around each step" +
                               (", torch.cuda.synchronize before and after" if ON_CUDA else "")),
        "model_config": base["config"],
        "loss_check": check,
        "rows": rows,
    }
    stem = f"train_{result['device']}" + ("_smoke" if settings["smoke"] else "")
    write_results(result, markdown_report(result, command), args.out_dir, stem)
    if profiles:
        write_profiles(profiles, args.out_dir / f"{stem}_profile.txt")
    if not check["passed"]:
        print("LOSS CHECK FAILED:\n  " + "\n  ".join(check["failures"]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
