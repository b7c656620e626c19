"""One process of bench_train.py: build the shared base, or train one provider and time it.

    python benchmarks/train_worker.py SPEC.json     # bench_train.py runs it; SPEC: see main()

Writes its result as JSON to the spec's ``result`` path. Methodology: docs/benchmarks.md.
"""
import dataclasses
import gc
import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
from common import (SEED, conversations, data_tokens, hf_batches, hf_peft_model,
                    hf_training_step, set_hf_checkpointing, unpacked, write_random_base)
from safetensors.torch import load_file, save_file

import lorakernels
from lorakernels import settings
from lorakernels.adapters import lora_key_from_peft
from model import Phi3Config
from model.build import load_model, resolve_dtype
from model.tokenizer import load_tokenizer
from training import loop  # called as loop.<name>, so that a test can watch what runs
from training.config import TrainConfig
from training.data import MicroBatches, prepare_rows

LR = 2e-4  # bench_cli.py's --lr (train.py's default for a checkpoint)
LORA_B_STD = 0.01
PROFILE_ROWS = 20


# ----------------------------------------------------------------------------- the base


def total_steps(spec: dict) -> int:
    return spec["check_steps"] + spec["warmup_steps"] + spec["steps"]


def train_config(spec: dict) -> TrainConfig:
    """What train.py runs with for this benchmark's flags (docs/benchmarks.md)."""
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
    """Random base weights and the tiny tokenizer in one directory, and one LoRA init."""
    config = Phi3Config.from_name(spec["preset"])
    if spec["layers"]:
        config = dataclasses.replace(config, num_hidden_layers=spec["layers"])
    model = write_random_base(config, getattr(torch, spec["dtype"]), spec["device"],
                              spec["checkpoint"])
    save_file(lora_init(model, train_config(spec)), spec["lora_init"])
    return {"cuda": torch.version.cuda, "num_threads": torch.get_num_threads(),
            "config": {k: v for k, v in dataclasses.asdict(config).items()
                       if k not in ("extra", "rope_scaling")}}


# ----------------------------------------------------------------------------- the providers


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
    """train.py's training batches for ``config``."""
    rows, _ = prepare_rows(config.data, tokenizer, config)
    return MicroBatches(rows, config.batch_size, config.seed, tokenizer.pad_id,
                        pad_to=loop.batch_length_rule(config, device))


def dropout_setter(modules: List[torch.nn.Module]) -> Callable[[float], None]:
    """Sets the LoRA dropout p of every module in ``modules``."""
    def set_dropout(p: float) -> None:
        for module in modules:
            module.p = p
    return set_dropout


def ours_trainer(config: TrainConfig, check_steps: int) -> Trainer:
    """train.py's model, LoRA, batches, optimizer, schedule and step (training.loop)."""
    device = torch.device(config.device)
    model, tokenizer = load_model(config.model, resolve_dtype(config.dtype, device), device,
                                  config.seed, config.quantize, config.tokenizer)
    loop.add_lora(model, config)
    step_loss = loop.StepLoss(model)
    params = [p for p in model.parameters() if p.requires_grad]
    batches = packed_batches(config, tokenizer, device)
    state = {}

    def start() -> None:
        state["optimizer"], state["scheduler"] = loop.optimizer_and_schedule(
            params, config, config.max_steps)

    def step(index: int) -> Tuple[float, float]:
        loop.seed_step(config.seed, index)
        micro = loop.step_micro_batches(batches, index, config.grad_accum, device)
        loss, grad_norm, _ = loop.training_step(step_loss, params, state["optimizer"],
                                                state["scheduler"], micro, config.max_grad_norm)
        return loss, grad_norm

    dropouts = [m.lora_dropout for m in model.modules() if isinstance(m, lorakernels.LoRALayer)]
    return Trainer(model, {name: p for name, p in model.named_parameters() if p.requires_grad},
                   model.set_gradient_checkpointing, dropout_setter(dropouts), start, step,
                   lambda index: loop.step_micro_batches(batches, index, config.grad_accum, "cpu"))


def hf_peft_trainer(config: TrainConfig, check_steps: int) -> Trainer:
    """A transformers + PEFT script on the same data: check steps on the conversations of
    train.py's first batches, one per row; then the script's own padded batches."""
    device = config.device
    model = hf_peft_model(config.model, resolve_dtype(config.dtype, torch.device(device)), device,
                          config.lora_r, config.lora_alpha, config.lora_dropout,
                          config.target_modules)
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
        state["optimizer"] = torch.optim.AdamW(params, lr=config.lr,
                                               weight_decay=config.weight_decay)

    def step(index: int) -> Tuple[float, float]:
        batch = {k: v.to(device) for k, v in batches[index].items()}
        return hf_training_step(model, params, state["optimizer"], batch, config.max_grad_norm)

    return Trainer(model, lora, lambda enabled: set_hf_checkpointing(model, enabled),
                   dropout_setter(dropouts), start, step, lambda index: [batches[index]])


# ----------------------------------------------------------------------------- one run


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def step_counts(trainer: Trainer, index: int) -> Tuple[int, int, int]:
    """Step ``index``'s data tokens, tokens with padding and conversations."""
    micro = trainer.batches(index)
    return (sum(data_tokens(b) for b in micro), sum(int(b["input_ids"].numel()) for b in micro),
            sum(conversations(b) for b in micro))


def start_run(trainer: Trainer, init: Dict[str, torch.Tensor], grad_checkpointing: bool,
              device: str) -> None:
    """The shared LoRA init copied in, a fresh optimizer, memory counters reset."""
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


def check_steps(trainer: Trainer, spec: dict) -> dict:
    """The dropout-0 steps: their losses, step 1's grad norm and time (autotuning included)."""
    trainer.set_dropout(0.0)
    started = time.perf_counter()
    check = [trainer.step(0)]
    first_step_s = time.perf_counter() - started
    check += [trainer.step(i) for i in range(1, spec["check_steps"])]
    data, _, convs = step_counts(trainer, 0)
    return {"first_step_s": first_step_s, "check_losses": [loss for loss, _ in check],
            "step1_grad_norm": check[0][1], "check_data_tokens": data,
            "check_conversations": convs}


def timed_steps(trainer: Trainer, spec: dict) -> dict:
    """The warm-up steps, then the timed ones (train.py's dropout), each timed alone."""
    trainer.set_dropout(train_config(spec).lora_dropout)
    offset = spec["check_steps"]
    for i in range(spec["warmup_steps"]):
        trainer.step(offset + i)
    offset += spec["warmup_steps"]
    times, losses = [], []
    for i in range(spec["steps"]):
        synchronize(spec["device"])
        start = time.perf_counter()
        losses.append(trainer.step(offset + i)[0])
        synchronize(spec["device"])
        times.append((time.perf_counter() - start) * 1e3)
    counts = zip(*(step_counts(trainer, offset + i) for i in range(spec["steps"])))
    data, tokens, convs = (list(c) for c in counts)
    return {"timed_losses": losses, "step_ms": times, "step_data_tokens": data,
            "step_tokens": tokens, "step_conversations": convs}


def peak_memory(device: str, rss_before: float) -> dict:
    if device == "cuda":
        peak = {"peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20,
                "memory_kind": "torch.cuda.max_memory_allocated"}
        gc.collect()
        torch.cuda.empty_cache()
        return peak
    return {"peak_memory_mb": rss_mb() - rss_before, "peak_rss_mb": rss_mb(),
            "memory_kind": "ru_maxrss growth over the steps"}


def train_run(trainer: Trainer, init: Dict[str, torch.Tensor], grad_checkpointing: bool,
              spec: dict) -> dict:
    """Check steps (dropout 0), warm-up and timed steps (dropout 0.05) from the shared init."""
    device = spec["device"]
    start_run(trainer, init, grad_checkpointing, device)
    rss_before = rss_mb()
    run = {"grad_checkpointing": grad_checkpointing, "error": None}
    try:
        run.update(check_steps(trainer, spec))
        run.update(timed_steps(trainer, spec))
        if spec.get("profile") and not spec.get("profiled"):
            run["profile"] = profile_step(lambda: trainer.step(total_steps(spec)), device)
            spec["profiled"] = True
    except torch.cuda.OutOfMemoryError:
        run["error"] = "out of memory"
    return dict(run, **peak_memory(device, rss_before))


def profile_step(fn, device: str) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
    sort_by = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort_by, row_limit=PROFILE_ROWS)


# ----------------------------------------------------------------------------- a provider


def check_init_matches(provider: str, lora: Dict[str, torch.Tensor],
                       init: Dict[str, torch.Tensor]) -> None:
    """The provider's trainable parameters are the init's: names, fp32, shapes."""
    if set(lora) != set(init):
        missing, unexpected = sorted(set(init) - set(lora)), sorted(set(lora) - set(init))
        raise ValueError(f"{provider}: trainable parameters differ from the LoRA init: "
                         f"missing {missing[:8]}, unexpected {unexpected[:8]}")
    for name, param in lora.items():
        if param.dtype != torch.float32 or tuple(param.shape) != tuple(init[name].shape):
            raise ValueError(f"{provider}: {name} is {param.dtype} {tuple(param.shape)}, "
                             f"expected float32 {tuple(init[name].shape)}")


def train_provider(spec: dict) -> dict:
    """Every gradient-checkpointing run of one provider, on the backend its spec names."""
    build = hf_peft_trainer if spec["provider"] == "hf_peft" else ours_trainer
    with settings.override(backend=spec.get("backend")):  # None: as the environment says
        trainer = build(train_config(spec), spec["check_steps"])
        init = load_file(spec["lora_init"])
        check_init_matches(spec["provider"], trainer.lora, init)
        init = {name: t.to(spec["device"]) for name, t in init.items()}
        runs = [train_run(trainer, init, ckpt, spec) for ckpt in spec["grad_checkpointing"]]
    frozen = sum(p.numel() for p in trainer.module.parameters() if not p.requires_grad)
    return {"provider": spec["provider"], "backend": spec.get("backend"),
            "trainable_parameters": sum(p.numel() for p in trainer.lora.values()),
            "frozen_parameters": frozen, "num_threads": torch.get_num_threads(), "runs": runs}


def main(spec_path: str) -> None:
    """SPEC: bench_train.py's settings plus task ("base" or "train"), device, checkpoint,
    lora_init and result paths, and for "train" the provider, its backend and the
    gradient-checkpointing settings to run."""
    spec = json.loads(Path(spec_path).read_text())
    torch.manual_seed(SEED)  # HF's dropout stream (ours seeds each step as train.py does)
    result = build_base(spec) if spec["task"] == "base" else train_provider(spec)
    Path(spec["result"]).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/train_worker.py SPEC.json (bench_train.py writes it)")
    main(sys.argv[1])
