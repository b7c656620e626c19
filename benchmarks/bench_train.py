"""Benchmark train.py's training step against a transformers + PEFT script's, side by side.

What is timed for our model is what train.py runs, not a harness of its own: training.loop's
seed_step, step_micro_batches (collate the step's batch, move it to the device) and
training_step (accumulate_gradients, clip_grad_norm_, AdamW, the cosine schedule, zero_grad),
on the batches train.py builds from the data (prepare_rows and MicroBatches: the chats
tokenized with the checkpoint's tokenizer, packed into rows of up to --max-seq-len tokens with
segment ids so attention stays within each conversation, shuffled with train.py's seed), with
the TrainConfig of

    train.py --model BASE --data DATA --batch-size B --max-seq-len L --max-steps N --lr 2e-4
             --dtype D --device DEVICE

(train.py's defaults otherwise: packing on, LoRA r 16 / alpha 32 / dropout 0.05 on qkv_proj,
o_proj, gate_up_proj and down_proj, weight decay 0, --max-grad-norm 1, 10% warm-up, seed 42).
The headline is data tokens/s, the non-padding tokens of the steps' batches per second, as
bench_cli.py counts them for whole train.py processes, so that the two figures agree.

Providers, each in its own process, from the same base weights and LoRA init:
  hf_peft     a transformers + PEFT training script's step (common.py, shared with
              bench_cli.py): transformers' Phi3ForCausalLM (attn_implementation="sdpa") +
              peft.get_peft_model (hf_peft_model); the same chats shuffled once, B
              conversations a batch right-padded to the longest (hf_batches: no packing, as
              HF users train); per step the batch to the device and hf_training_step (HF's own
              loss over full logits upcast to fp32, backward, clip_grad_norm_(1), AdamW,
              zero_grad; no schedule)
  ours_eager  train.py's step (above) with LORAKERNELS_BACKEND=eager
  ours_fused  the same with LORAKERNELS_BACKEND=auto, what train.py runs by default: the Triton
              kernels on CUDA; on a CPU in fp32 the oneDNN path
              (lorakernels/ops/onednn_lora_linear.py, the LM head's GEMMs on oneDNN too)
Both sides' LoRA parameters are fp32 over the frozen base in the run's dtype (checked for dtype,
names and shapes). AdamW lr 2e-4, weight decay 0 on both.

Same start: one worker builds a random base (model.build.random_model, seed 1234: Linear and
Embedding weights N(0, 0.02²) as Hugging Face initialises, norms 1) and writes it with our
save_pretrained, the tiny tokenizer beside it (common.write_random_base); ours loads it with
train.py's model.build.load_model, transformers with its from_pretrained. The same worker
draws one LoRA init in our parameter names, A as loralib/PEFT (kaiming-uniform, bound
1/sqrt(in)) and B ~ N(0, 0.01²) rather than zeros, so the low-rank path changes the loss and A
gets a gradient from the first step; each provider copies it in (PEFT's names mapped by
lorakernels.adapters' key rule).

Steps: --check-steps with LoRA dropout 0, then dropout 0.05 for --warmup-steps and the timed
--steps. Our step i trains on train.py's batch i (MicroBatches[i]); hf_peft's timed and
warm-up step i on its padded batch i, its check steps on the conversations of our check
batches (below). The first step (autotuning included on a GPU) is never timed; its time is
reported as "1st step s".

Loss check: step 1 of ours trains on train.py's packed batch 0; hf_peft's step 1 on the same
conversations one per row, right-padded with an attention mask (common.unpacked). Their loss
(the mean over the same target tokens) and the global norm of the LoRA gradients
(clip_grad_norm_'s, before clipping) must match within a relative REL_TOL (1e-4 in fp32, 2e-2
in bf16): our packed step, with attention confined to each conversation and positions
restarting, must compute what transformers computes on the conversations apart. At random
init the loss is close to ln(vocab) whatever the model does, so the grad norm is the sharper
test. The later check steps' losses are reported, not compared (ours warms its learning rate
up, the HF script does not). A mismatch, or a provider that crashes, makes the script exit 1
after writing its results (marked FAILED).

Measured per provider and gradient-checkpointing setting, each provider in a fresh process (on
CPU one process per setting too): time.perf_counter around each timed step (on GPU with
torch.cuda.synchronize before the start and before the stop); data tokens/s = the timed steps' data
tokens / their summed time, ms/step = that time / the timed steps; with --repeats N, every
provider runs N times in turn and the repeat with the highest data tokens/s counts (the same
steps each time; load from elsewhere only adds time). Also per step: data tokens, tokens with
padding, conversations. Peak memory: on GPU torch.cuda.max_memory_allocated over the run's
steps after reset_peak_memory_stats (weights, optimizer state and activations); on CPU the
growth of the process's peak RSS (resource.getrusage ru_maxrss) over the steps, a lower bound
if loading peaked higher, and at small sizes mostly allocator and library scratch. A CUDA
out-of-memory error is reported as OOM, not a failure.

Configurations (--config; the default follows the device), on --data (examples/chat.jsonl:
600 chats of 21 to 89 tokens, so B conversations carry far fewer tokens than B packed rows):
  cpu-small  the phi3-tiny preset (4 layers, hidden 256, vocab 1088), fp32, batch 4 × up to
             256 tokens, no gradient checkpointing, 3 check + 3 warm-up + 20 timed steps
             (bench_cli.py's train.py run: the same model, data, batch and length)
  gpu-mini   the Phi-3-mini-4k architecture, random weights, bf16, batch 4 × up to 2048
             tokens (packed rows padded to 2048 on CUDA, as train.py's bucketed_length), with
             and without gradient checkpointing, 2 check + 1 warm-up + 4 timed steps: few, so
             that with the setup (a 7.6 GB base written once, loaded by each provider, Triton
             autotuning, FlexAttention's compile) the run has a chance in gpu_check.py's share.
             Its data joins 40 consecutive chats into each multi-turn conversation
             (--chats-per-conversation; ~1,600-1,800 tokens each), so that both sides train
             on about 4 × 2048 tokens a step: with the short chats as they are, the HF
             script's 4 conversations would be ~180 tokens, too few to load a GPU.
  --smoke    phi3-tiny with 2 layers, batch 2 × up to 128, 2 check + 1 warm-up + 2 timed steps
             (times mean nothing); its files get a _smoke suffix.

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
from typing import Callable, Dict, List, Optional, Tuple

from common import (  # first: it sets TRITON_INTERPRET and puts this checkout on sys.path
    DATA, DEVICE, ON_CUDA, ROOT, SEED, add_output_args, command_line, data_tokens, device_label,
    device_name, hf_batches, hf_peft_model, hf_training_step, unpacked, utc_now, versions,
    write_long_chats, write_random_base, write_results)

import torch
from safetensors.torch import load_file, save_file

import lorakernels
from lorakernels.adapters import lora_key_from_peft
from model import PRESETS, Phi3Config
from model.build import load_model, resolve_dtype
from model.tokenizer import load_tokenizer
from training import loop  # called as loop.<name>, so that a test can watch what runs
from training.config import TrainConfig
from training.data import MicroBatches

LR = 2e-4  # bench_cli.py's --lr (train.py's default for a checkpoint)
LORA_B_STD = 0.01
REL_TOL = {"float32": 1e-4, "bfloat16": 2e-2}
PROFILE_ROWS = 20

# Provider -> LORAKERNELS_BACKEND for its process (None: our kernels are not involved).
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
SMOKE = dict(preset="phi3-tiny", layers=2, batch_size=2, max_seq_len=128, steps=2, warmup_steps=1,
             check_steps=2, chats_per_conversation=1)
CHECKPOINTING = {"off": [False], "on": [True], "both": [False, True]}


# ----------------------------------------------------------------------------- worker: the base


def total_steps(spec: dict) -> int:
    return spec["check_steps"] + spec["warmup_steps"] + spec["steps"]


def train_config(spec: dict) -> TrainConfig:
    """What train.py runs with for this benchmark's flags (see the module docstring)."""
    return TrainConfig(model=spec["checkpoint"], data=spec["data"], batch_size=spec["batch_size"],
                       max_seq_len=spec["max_seq_len"], max_steps=total_steps(spec), lr=LR,
                       dtype=spec["dtype"], device=spec["device"],
                       packing=spec.get("packing", True))


def lora_init(model, config: TrainConfig) -> Dict[str, torch.Tensor]:
    """One LoRA init, named and shaped by train.py's LoRA on ``model`` (added in place): A
    kaiming-uniform as loralib/PEFT draw it, B ~ N(0, LORA_B_STD²) (not zeros, so the low-rank
    path counts from step 1)."""
    loop.add_lora(model, config)
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
    """Random base weights and the tiny tokenizer in one directory, and one LoRA init (safetensors)."""
    config = Phi3Config.from_name(spec["preset"])
    if spec["layers"]:
        config = dataclasses.replace(config, num_hidden_layers=spec["layers"])
    model = write_random_base(config, getattr(torch, spec["dtype"]), spec["device"], spec["checkpoint"])
    save_file(lora_init(model, train_config(spec)), spec["lora_init"])
    return {"cuda": torch.version.cuda, "num_threads": torch.get_num_threads(),
            "config": {k: v for k, v in dataclasses.asdict(config).items()
                       if k not in ("extra", "rope_scaling")}}


# ----------------------------------------------------------------------------- worker: a provider


@dataclasses.dataclass
class Trainer:
    """One provider, ready to train: its step over its own batches, and what the runs need."""

    module: torch.nn.Module  # for train()
    lora: Dict[str, torch.nn.Parameter]  # our parameter names -> the provider's parameters
    set_checkpointing: Callable[[bool], None]
    set_dropout: Callable[[float], None]
    start: Callable[[], None]  # a fresh optimizer (and schedule), as a run starts
    step: Callable[[int], Tuple[float, float]]  # step i, one optimizer step: (loss, grad norm)
    batches: Callable[[int], List[dict]]  # step i's micro-batches, on the CPU (for counting)


def packed_batches(config: TrainConfig, tokenizer, device: torch.device) -> MicroBatches:
    """train.py's training batches for ``config`` (one process)."""
    rows, _ = loop.prepare_rows(config.data, tokenizer, config)
    return MicroBatches(rows, config.batch_size, config.seed, tokenizer.pad_id,
                        pad_to=loop.batch_length_rule(config, device))


def ours_trainer(config: TrainConfig, check_steps: int) -> Trainer:
    """train.py's model, LoRA, batches, optimizer, schedule and step (training.loop)."""
    device = torch.device(config.device)
    model, tokenizer = load_model(config.model, resolve_dtype(config.dtype, device), device,
                                  config.seed, config.quantize, config.tokenizer)
    loop.add_lora(model, config)
    step_loss = loop.StepLoss(model)
    params = [p for p in model.parameters() if p.requires_grad]
    batches = packed_batches(config, tokenizer, device)
    layers = [m for m in model.modules() if isinstance(m, lorakernels.LoRALayer)]
    state = {}

    def start() -> None:
        state["optimizer"], state["scheduler"] = loop.optimizer_and_schedule(params, config,
                                                                             config.max_steps)

    def step(index: int) -> Tuple[float, float]:
        loop.seed_step(config.seed, index)
        micro = loop.step_micro_batches(batches, index, config.grad_accum, device)
        loss, grad_norm, _ = loop.training_step(step_loss, params, state["optimizer"],
                                                state["scheduler"], micro, config.max_grad_norm)
        return loss, grad_norm

    def set_dropout(p: float) -> None:
        for module in layers:
            module.lora_dropout.p = p

    return Trainer(model, {name: p for name, p in model.named_parameters() if p.requires_grad},
                   model.set_gradient_checkpointing, set_dropout, start, step,
                   lambda index: loop.step_micro_batches(batches, index, config.grad_accum, "cpu"))


def hf_peft_trainer(config: TrainConfig, check_steps: int) -> Trainer:
    """A transformers + PEFT script on the same data: check steps on the conversations of
    train.py's first batches, one per row; then the script's own padded batches."""
    device = config.device
    model = hf_peft_model(config.model, resolve_dtype(config.dtype, torch.device(device)), device,
                          config.lora_r, config.lora_alpha, config.lora_dropout,
                          config.target_modules)
    base = model.get_base_model()
    params = [p for p in model.parameters() if p.requires_grad]
    lora = {lora_key_from_peft(name): p for name, p in model.named_parameters() if p.requires_grad}
    dropouts = [m for n, m in model.named_modules() if n.endswith("lora_dropout.default")]
    tokenizer = load_tokenizer(config.model)
    packed = packed_batches(config, tokenizer, torch.device("cpu"))
    batches = ([unpacked(packed[i], tokenizer.pad_id) for i in range(check_steps)]
               + hf_batches(tokenizer, config.data, config.batch_size, config.max_seq_len,
                            config.max_steps + 1)[check_steps:])  # + 1: the --profile step
    state = {}

    def start() -> None:
        state["optimizer"] = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)

    def step(index: int) -> Tuple[float, float]:
        batch = {k: v.to(device) for k, v in batches[index].items()}
        return hf_training_step(model, params, state["optimizer"], batch, config.max_grad_norm)

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

    return Trainer(model, lora, set_checkpointing, set_dropout, start, step,
                   lambda index: [batches[index]])


def conversations(batch: dict) -> int:
    """Conversations in a batch: one a row with an attention mask (HF), else each row's segments."""
    if "attention_mask" in batch:
        return int((batch["attention_mask"].sum(dim=1) > 0).sum())
    return int((batch["segment_ids"].max(dim=1).values + 1).sum())


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def train_run(trainer: Trainer, init: Dict[str, torch.Tensor], grad_checkpointing: bool,
              spec: dict) -> dict:
    """Check steps (dropout 0), warm-up and timed steps (dropout 0.05) from the shared init."""
    device = spec["device"]
    with torch.no_grad():
        for name, param in trainer.lora.items():
            param.copy_(init[name])
    trainer.start()
    trainer.set_checkpointing(grad_checkpointing)
    trainer.module.train()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    rss_before = rss_mb()

    def counts(index: int) -> Tuple[int, int, int]:
        micro = trainer.batches(index)
        return (sum(data_tokens(b) for b in micro), sum(int(b["input_ids"].numel()) for b in micro),
                sum(conversations(b) for b in micro))

    run = {"grad_checkpointing": grad_checkpointing, "error": None}
    try:
        trainer.set_dropout(0.0)
        started = time.perf_counter()
        check = [trainer.step(0)]
        run["first_step_s"] = time.perf_counter() - started  # autotuning included
        check += [trainer.step(i) for i in range(1, spec["check_steps"])]
        run["check_losses"] = [loss for loss, _ in check]
        run["step1_grad_norm"] = check[0][1]
        run["check_data_tokens"], _, run["check_conversations"] = counts(0)
        trainer.set_dropout(train_config(spec).lora_dropout)
        offset = spec["check_steps"]
        for i in range(spec["warmup_steps"]):
            trainer.step(offset + i)
        offset += spec["warmup_steps"]
        times, losses = [], []
        for i in range(spec["steps"]):
            synchronize(device)
            start = time.perf_counter()
            losses.append(trainer.step(offset + i)[0])
            synchronize(device)
            times.append((time.perf_counter() - start) * 1e3)
        run["timed_losses"] = losses
        run["step_ms"] = times
        run["step_data_tokens"], run["step_tokens"], run["step_conversations"] = (
            list(c) for c in zip(*(counts(offset + i) for i in range(spec["steps"]))))
        if spec.get("profile") and not spec.get("profiled"):
            run["profile"] = profile_step(lambda: trainer.step(total_steps(spec)), device)
            spec["profiled"] = True
    except torch.cuda.OutOfMemoryError:
        run["error"] = "out of memory"
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
    config = train_config(spec)
    build = hf_peft_trainer if spec["provider"] == "hf_peft" else ours_trainer
    trainer = build(config, spec["check_steps"])
    init = load_file(spec["lora_init"])
    if set(trainer.lora) != set(init):
        missing, unexpected = sorted(set(init) - set(trainer.lora)), sorted(set(trainer.lora) - set(init))
        raise ValueError(f"{spec['provider']}: trainable parameters differ from the LoRA init: "
                         f"missing {missing[:8]}, unexpected {unexpected[:8]}")
    for name, param in trainer.lora.items():
        if param.dtype != torch.float32 or tuple(param.shape) != tuple(init[name].shape):
            raise ValueError(f"{spec['provider']}: {name} is {param.dtype} {tuple(param.shape)}, "
                             f"expected float32 {tuple(init[name].shape)}")
    init = {name: t.to(spec["device"]) for name, t in init.items()}
    runs = [train_run(trainer, init, ckpt, spec) for ckpt in spec["grad_checkpointing"]]
    frozen = sum(p.numel() for p in trainer.module.parameters() if not p.requires_grad)
    return {"provider": spec["provider"], "backend": os.environ.get("LORAKERNELS_BACKEND"),
            "trainable_parameters": sum(p.numel() for p in trainer.lora.values()),
            "frozen_parameters": frozen, "num_threads": torch.get_num_threads(), "runs": runs}


def worker_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    torch.manual_seed(SEED)  # HF's dropout stream (ours seeds each step as train.py does)
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


def run_throughput(run: dict) -> float:
    """A run's data tokens per second over its timed steps."""
    return sum(run["step_data_tokens"]) / (sum(run["step_ms"]) * 1e-3)


def collect_rows(results: Dict[str, dict], providers: List[str]) -> List[dict]:
    """One row per provider and checkpointing setting, timed by its best repeat."""
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
                   "check_data_tokens": first.get("check_data_tokens"),
                   "check_conversations": first.get("check_conversations"),
                   "first_step_s": first.get("first_step_s"),
                   "peak_memory_mb": max(memory) if memory else None,
                   "memory_kind": first.get("memory_kind"),
                   "peak_rss_mb": first.get("peak_rss_mb"),
                   "trainable_parameters": result["trainable_parameters"],
                   "backend": result["backend"], "num_threads": result["num_threads"],
                   "repeats": len(runs)}
            if timed:
                # The same steps every repeat, and load from other processes only ever adds
                # time: the repeat with the most data tokens/s counts.
                best = max(timed, key=run_throughput)
                steps = len(best["step_ms"])
                row.update(tokens_per_s=run_throughput(best),
                           ms_per_step=sum(best["step_ms"]) / steps,
                           median_ms=statistics.median(best["step_ms"]),
                           repeat_tokens_per_s=[run_throughput(run) for run in timed],
                           data_tokens_per_step=sum(best["step_data_tokens"]) / steps,
                           tokens_per_step=sum(best["step_tokens"]) / steps,
                           conversations_per_step=sum(best["step_conversations"]) / steps,
                           step_ms=best["step_ms"], step_data_tokens=best["step_data_tokens"],
                           step_tokens=best["step_tokens"],
                           step_conversations=best["step_conversations"],
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
                failures.append(f"{row['provider']} (grad ckpt {row['grad_checkpointing']}): step-1 "
                                f"{key} {value:.6g} vs {ref['provider']}'s {expected:.6g}, relative "
                                f"error {error:.3g} > {tol:g}")
    return {"passed": not failures, "tolerance": tol, "reference": ref["provider"],
            "conversations": ref.get("check_conversations"), "data_tokens": ref.get("check_data_tokens"),
            "max_rel_error_loss": worst["loss"], "max_rel_error_grad_norm": worst["grad_norm"],
            "failures": failures}


def fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def ratio(value) -> str:
    return "–" if value is None else f"{value:.2f}×"


def markdown_table(rows: List[dict], device: str) -> str:
    memory = "peak MB" if device == "cuda" else "RSS growth MB"
    lines = [f"| provider | grad ckpt | data tokens/s | ms/step | data tokens/step | tokens/step "
             f"with padding | conversations/step | {memory} | data tokens/s vs hf_peft "
             f"| memory vs hf_peft | 1st step s | losses, first steps (dropout 0) "
             f"| step-1 LoRA grad norm |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        provider = r["provider"]
        ckpt = {True: "on", False: "off", None: "–"}[r["grad_checkpointing"]]
        losses = ", ".join(f"{x:.5f}" for x in r["check_losses"]) if r.get("check_losses") else "–"
        if r.get("tokens_per_s"):
            timing = (f"{r['tokens_per_s']:,.0f} | {r['ms_per_step']:.1f} "
                      f"| {r['data_tokens_per_step']:.0f} | {r['tokens_per_step']:.0f} "
                      f"| {r['conversations_per_step']:.1f} "
                      f"| {fmt(r['peak_memory_mb'], '.0f')} "
                      f"| {ratio(r.get('speedup_vs_hf_peft'))} "
                      f"| {ratio(r.get('memory_vs_hf_peft'))}")
        else:
            error = "OOM" if r["error"] == "out of memory" else (r["error"] or "no timing")
            timing = f"{error} | – | – | – | – | {fmt(r.get('peak_memory_mb'), '.0f')} | – | –"
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
        f"# train.py's training step on {result['device_name']}{smoke}",
        "",
        f"torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, "
        f"triton {v['triton']}, python {v['python']}"
        + (f", CUDA {result['cuda']}" if result["device_type"] == "cuda" else "")
        + f"; {result['date']}",
        "",
        f"Config {s['config']}: {s['preset']} architecture ({c['num_hidden_layers']} layers, hidden "
        f"{c['hidden_size']}, vocab {c['vocab_size']}), random weights (seed {SEED}), {s['dtype']} "
        f"base, fp32 LoRA r {s['lora']['r']} / alpha {s['lora']['lora_alpha']:g} / dropout "
        f"{s['lora']['lora_dropout']} on {', '.join(s['targets'])}; AdamW lr {LR:g}, "
        f"clip_grad_norm_({s['max_grad_norm']:g}); {s['data']}"
        + ("" if s["chats_per_conversation"] == 1 else
           f" ({s['chats_per_conversation']} consecutive chats joined into each conversation)")
        + f", batch {s['batch_size']} × up to "
        f"{s['max_seq_len']} tokens; {s['check_steps']} check + {s['warmup_steps']} warm-up + "
        f"{s['steps']} timed steps"
        + ("" if s["repeats"] == 1 else
           f"; each provider run {s['repeats']} times in turn, the repeat with the most data "
           f"tokens/s counts") + ".",
        "",
        "ours_*: train.py's step (training.loop.training_step) on train.py's batches, "
        + ("packed " if s["packing"] else "one conversation a row (--no-packing) ")
        + "(MicroBatches over prepare_rows); hf_peft: a transformers + PEFT script's step on "
        f"{s['batch_size']} conversations a batch, right-padded. Data tokens/s = the timed steps' "
        "non-padding tokens / their time; ms/step their mean.",
        "",
        f"Command: `{command}`",
        "",
        f"Memory: {memory}. Loss check (dropout 0, same init, step 1 on the same "
        f"{fmt(check.get('conversations'), 'd')} conversations, {fmt(check.get('data_tokens'), 'd')} "
        f"tokens: packed for ours, one per row for hf_peft): {verdict}.",
        "",
        markdown_table(result["rows"], result["device_type"]),
        "",
        "ours_fused: LORAKERNELS_BACKEND=auto (" + ("the Triton kernels" if result["device_type"] == "cuda"
                                                     else "the oneDNN path for fp32 CPU tensors")
        + "). 1st step s: the first check step, never timed.",
        "",
    ])


def write_profiles(profiles: Dict[str, str], path: Path) -> None:
    """Each provider's torch.profiler table, one after the other."""
    text = "\n\n".join(f"== {p}: one step, top {PROFILE_ROWS} ops by self time\n{t}"
                       for p, t in profiles.items())
    path.write_text(text + "\n")
    print(f"wrote {path}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark train.py's training step against a transformers + PEFT script's: "
                    "hf_peft, ours_eager, ours_fused.")
    parser.add_argument("--config", choices=list(CONFIGS),
                        help="cpu-small or gpu-mini (default: gpu-mini on CUDA, else cpu-small)")
    parser.add_argument("--steps", type=int, help="timed steps per run (default: per config)")
    parser.add_argument("--warmup-steps", type=int,
                        help="untimed steps before them (default: per config)")
    parser.add_argument("--check-steps", type=int,
                        help="dropout-0 steps whose losses are reported, before the warm-up; "
                             "step 1 is compared (default: 3 on cpu-small, 2 on gpu-mini and smoke)")
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
                             "conversation (default: 40 for gpu-mini, so that a batch of "
                             "conversations is about a batch of 2048-token rows; 1 for cpu-small)")
    parser.add_argument("--no-packing", dest="packing", action="store_false",
                        help="train.py's --no-packing for ours: one conversation a row, causal "
                             "attention without segments (e.g. to compare peak memory with the "
                             "packed run's FlexAttention)")
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
                             "run with the most data tokens/s (default: 1): for machines "
                             "shared with other work")
    add_output_args(parser, "train", "phi3-tiny with 2 layers, batch 2 × up to 128, a few steps: a "
                                     "test of the script; files get a _smoke suffix")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one step per provider with torch.profiler "
                             "(top ops to <stem>_profile.txt)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "max_seq_len", "layers", "repeats",
                 "chats_per_conversation"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("warmup_steps", "check_steps"):
        if getattr(args, name) is not None and getattr(args, name) < (1 if name == "check_steps" else 0):
            parser.error(f"--{name.replace('_', '-')} is too small")
    return args


def shown_path(path: str) -> str:
    """``path`` relative to this checkout when it is inside it."""
    try:
        return str(Path(path).relative_to(ROOT))
    except ValueError:
        return path


def settings_from(args: argparse.Namespace) -> dict:
    config = args.config or ("gpu-mini" if ON_CUDA else "cpu-small")
    settings = dict(CONFIGS[config], config=config, smoke=args.smoke)
    if args.smoke:
        settings.update(SMOKE, config="smoke", dtype="bfloat16" if ON_CUDA else "float32",
                        grad_checkpointing="off")
    for name in ("steps", "warmup_steps", "check_steps", "batch_size", "max_seq_len", "layers",
                 "grad_checkpointing", "repeats", "chats_per_conversation"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    if args.model is not None:
        settings["preset"] = args.model
    settings["data"] = str(args.data.resolve())
    settings["packing"] = args.packing
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
        data = settings["data"]
        if settings["chats_per_conversation"] > 1:
            data = str(write_long_chats(data, workdir / "conversations.jsonl",
                                        settings["chats_per_conversation"]))
        spec = dict(settings, data=data, device=DEVICE, checkpoint=str(workdir / "base"),
                    lora_init=str(workdir / "lora_init.safetensors"), profile=args.profile)
        config = train_config(spec)  # for the report: train.py's settings
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
    add_ratios(rows)
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
        "settings": dict(settings, data=shown_path(settings["data"]), providers=providers,
                         lora=dict(r=config.lora_r, lora_alpha=config.lora_alpha,
                                   lora_dropout=config.lora_dropout),
                         targets=list(config.target_modules), lr=LR,
                         weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm,
                         warmup_ratio=config.warmup_ratio, packing=config.packing,
                         data_seed=config.seed, seed=SEED, lora_b_std=LORA_B_STD,
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
