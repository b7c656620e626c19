"""train.py --plan-memory: the peak of live tensor bytes of one optimizer step, before any GPU.

The configured run's model is built with fake weights (``FakeTensorMode``: shapes,
dtypes and lifetimes, no storage; a preset or a checkpoint's config.json, no weights
read) on the code path of ``--device`` (``cuda`` on a machine without a GPU runs the
CUDA path, ``settings.device_path``), and one whole optimizer step of train.py
(``training_step``: every micro-batch of --grad-accum, clipping, AdamW's first step)
runs on a batch of --batch-size rows of --max-seq-len tokens, packed, under
``lorakernels.memory_count.LiveBytes``. The result is live tensors: a GPU's caching
allocator holds somewhat more (rounded blocks, fragmentation). No run directory is
written.

``--plan-world-size N`` plans rank 0 of N processes in this one: a fake process group
(torch's ``fake`` backend: every collective a no-op) and train.py's own wrap
(``Distributed.wrap``: DDP with its gradient buckets, or FSDP2's shards), at the per-rank
batch of ``per_process_batch``.
"""
import contextlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.distributed._tools.fake_collectives  # noqa: F401  (fake impls of collectives)
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.testing._internal.distributed.fake_pg import FakeStore

from lorakernels import settings
from lorakernels.memory_count import CATEGORIES, LiveBytes
from lorakernels.ops.lora_linear import reset_b_index
from lorakernels.ops.nf4_dequant import reset_scratch
from lorakernels.weight_files import atomic_write
from model.build import INIT_STD, resolve_dtype
from model.config import PRESETS, Phi3Config
from model.loading import CONFIG_FILE
from model.phi3 import Phi3ForCausalLM
from model.quantization import quantize_decoder_linears, uses_nf4

from .config import TrainConfig, device_path
from .distributed import Distributed
from .loop import StepLoss, add_lora, optimizer_and_schedule, per_process_batch, training_step


class PlanFailed(RuntimeError):
    """The step did something a fake-tensor run cannot follow (a data-dependent value)."""


PLANNED_STEPS = 1000  # the schedule's length does not change a step's memory


@dataclass
class MemoryPlan:
    """Bytes at the peak of one step: ``peak_bytes`` and its split into CATEGORIES."""

    peak_bytes: int
    peak_op: str
    categories: Dict[str, int]
    host_bytes: int  # the batches waiting on the host, and the offloaded checkpoints
    offloaded_bytes: int  # of which the checkpoints (--grad-checkpointing offload)
    device_path: str
    settings: dict

    def as_json(self) -> dict:
        return {"peak_bytes": self.peak_bytes, "device_bytes": self.peak_bytes,
                "host_bytes": self.host_bytes, "offloaded_checkpoints": self.offloaded_bytes,
                **self.categories, "peak_op": self.peak_op,
                "device_path": self.device_path, "live_tensors_only": True,
                "settings": self.settings}


def model_config(name: str) -> Phi3Config:
    """A preset's numbers, or a checkpoint's config.json (a directory, or a hub id of which
    only config.json is fetched)."""
    if name in PRESETS:
        return Phi3Config.from_name(name)
    local = Path(name).expanduser()
    if local.is_dir():
        path = local / CONFIG_FILE
        if not path.is_file():
            raise ValueError(f"--model {name}: no {CONFIG_FILE} in that directory")
        return Phi3Config.from_json(path)
    if local.exists():
        raise ValueError(f"--model {name}: a file; pass the checkpoint directory")
    try:
        from huggingface_hub import hf_hub_download

        return Phi3Config.from_json(Path(hf_hub_download(name, CONFIG_FILE)))
    except Exception as error:  # offline, no such repo: one line
        reason = (str(error).strip().splitlines() or [""])[0]
        raise ValueError(f"--model {name}: not a preset or a directory, and the hub gave no "
                         f"{CONFIG_FILE} ({type(error).__name__}: {reason})") from None


def fake_model(config: Phi3Config, dtype: torch.dtype, quantize: str) -> Phi3ForCausalLM:
    """The model with fake weights (call under FakeTensorMode): built as load_model builds
    it, on the meta device first, so no real weight is ever allocated."""
    with unset_fake_temporarily(), torch.device("meta"):
        model = Phi3ForCausalLM(config)
        model.to(dtype)
        if uses_nf4(quantize):
            quantize_decoder_linears(model, dtype)
    model.to_empty(device="cpu")
    model.tie_weights()
    with torch.no_grad():  # values only matter to a real step (the plan's check)
        for param in model.parameters():
            param.normal_(0.0, INIT_STD)
    model.init_rotary("cpu")
    return model


def planned_batch(batch_size: int, seq_len: int, vocab_size: int) -> dict:
    """A packed micro-batch of full rows, one conversation each, every token a target (real
    tensors: their values decide the attention layout)."""
    ids = torch.arange(batch_size * seq_len).remainder(vocab_size).view(batch_size, seq_len)
    positions = torch.arange(seq_len).expand(batch_size, seq_len).contiguous()
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": positions,
            "segment_ids": torch.zeros_like(ids)}


def planned_settings(config: TrainConfig, device_path: str, dtype: torch.dtype) -> dict:
    keys = ("model", "batch_size", "grad_accum", "max_seq_len", "lora_r", "target_modules",
            "lora_dropout", "use_dora", "quantize", "grad_checkpointing", "max_grad_norm",
            "attention", "strategy")
    chosen = {key: getattr(config, key) for key in keys}
    chosen["world_size"] = config.plan_world_size
    return dict(chosen, device=config.device, device_path=device_path,
                dtype=str(dtype).replace("torch.", ""))


def planned_allreduce(_, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP's built-in hook as far as memory goes (the bucket averaged in place), without the
    result a fake process group's future cannot give."""
    buffer = bucket.buffer().div_(dist.get_world_size())
    done = torch.futures.Future()
    done.set_result(buffer)
    return done


def wrapped_step(model: Phi3ForCausalLM, config: TrainConfig, ranks: Distributed,
                 count: LiveBytes) -> torch.nn.Module:
    """train.py's step module on rank 0 of ``ranks`` (call inside ``count``): what the wrap
    makes and keeps (DDP's buckets, FSDP's shards) counts from the start."""
    if not ranks.enabled:
        return StepLoss(model)
    count.storages_resize = config.strategy == "fsdp"
    with count.making("grads" if config.strategy == "ddp" else "frozen_weights"):
        step_loss = ranks.wrap(StepLoss(model), torch.device("cpu"), config.strategy,
                               planning=True)
    if config.strategy == "ddp":
        step_loss.register_comm_hook(None, planned_allreduce)
    return step_loss


def count_step(config: TrainConfig, model_cfg: Phi3Config, dtype: torch.dtype, micro: List[dict],
               count: LiveBytes) -> None:
    """Build the run (fake weights) and run one step on ``micro`` under ``count``."""
    model = fake_model(model_cfg, dtype, config.quantize)
    add_lora(model, config)
    model.set_gradient_checkpointing(config.grad_checkpointing)
    model.train()
    ranks = Distributed(0, config.plan_world_size)
    with count:
        step_loss = wrapped_step(model, config, ranks, count)
        count.track_module(model)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer, scheduler = optimizer_and_schedule(params, config, PLANNED_STEPS)
        for p in params:
            p.register_post_accumulate_grad_hook(lambda p: count.label([p.grad], "grads"))
        optimizer.register_step_pre_hook(lambda *_: setattr(count, "context", "optimizer step"))
        optimizer.register_step_post_hook(lambda *_: setattr(count, "context", None))
        training_step(step_loss, params, optimizer, scheduler, micro, config.max_grad_norm,
                      ranks)
        count.label([t for state in optimizer.state.values() for t in state.values()
                     if isinstance(t, torch.Tensor)], "optimizer_state")


def forget_process_caches() -> None:
    """The kernels' per-process buffers (NF4 scratch, B̂ gathers): a plan starts without them,
    as a new process would, and leaves no fake tensor in them."""
    reset_scratch()
    reset_b_index()


@contextlib.contextmanager
def fake_process_group(world_size: int):
    """A process group of ``world_size`` ranks in this process, this one rank 0, whose
    collectives do nothing (none for one process)."""
    if world_size == 1:
        yield
        return
    if dist.is_initialized():
        raise ValueError("--plan-world-size plans in one process: run it without torchrun")
    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def plan_memory(config: TrainConfig, count: Optional[LiveBytes] = None,
                fake: bool = True) -> MemoryPlan:
    """The memory plan of ``config``'s run (rank 0 of --plan-world-size; see the module
    docstring).

    ``fake=False`` runs the same step on real (random) weights instead: the count the plan
    is checked against (tests/test_memory_plan.py), on the CPU path only.
    """
    config = per_process_batch(config, Distributed(0, config.plan_world_size))
    path = device_path(config.device)
    dtype = resolve_dtype(config.dtype, torch.device(path))
    model_cfg = model_config(config.model)
    count = count or LiveBytes(host_device="meta" if fake else None)
    torch.manual_seed(config.seed)
    forget_process_caches()
    micro = [planned_batch(config.batch_size, config.max_seq_len, model_cfg.vocab_size)
             for _ in range(config.grad_accum)]
    with settings.override(device_path=path, attention=config.attention), \
            fake_process_group(config.plan_world_size), \
            FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext():
        try:
            count_step(config, model_cfg, dtype, micro, count)
        finally:
            forget_process_caches()
    # On CUDA the collated batches wait on the host before their copy to the GPU.
    batches = sum(t.nbytes for batch in micro for t in batch.values()) if path == "cuda" else 0
    return MemoryPlan(count.peak_bytes, count.peak_op or "", count.breakdown(),
                      batches + count.host_peak_bytes, count.host_peak_bytes, path,
                      planned_settings(config, path, dtype))


def gib(n: int) -> str:
    return f"{n / 2**30:8.3f} GiB"


CATEGORY_NAMES = {"frozen_weights": "frozen weights", "lora_params": "LoRA parameters",
                  "grads": "LoRA gradients", "optimizer_state": "AdamW state",
                  "activations": "saved activations", "temporaries": "temporaries"}


def plan_report(plan: MemoryPlan) -> str:
    """The lines train.py --plan-memory prints."""
    s = plan.settings
    head = (f"memory plan of one optimizer step: {s['model']}, {plan.device_path} path, "
            f"{s['dtype']}, batch {s['batch_size']} x {s['max_seq_len']} tokens x "
            f"{s['grad_accum']} micro-batch(es), LoRA r {s['lora_r']}"
            + (", DoRA" if s["use_dora"] else "") + (", NF4 base" if s["quantize"] == "nf4" else "")
            + {False: "", True: ", gradient checkpointing",
               "offload": ", gradient checkpoints offloaded"}[s["grad_checkpointing"]]
            + (f"; rank 0 of {s['world_size']} under {s['strategy']}"
               if s["world_size"] > 1 else ""))
    lines = [head, f"  peak of live tensors {gib(plan.peak_bytes)}   (at {plan.peak_op})"]
    lines += [f"    {CATEGORY_NAMES[c]:<22}{gib(plan.categories[c])}" for c in CATEGORIES]
    if plan.host_bytes:
        lines.append(f"  host memory {gib(plan.host_bytes)}   (batches "
                     f"{gib(plan.host_bytes - plan.offloaded_bytes).strip()}, offloaded "
                     f"checkpoints {gib(plan.offloaded_bytes).strip()})")
    lines.append("  live tensors only: the GPU's caching allocator adds its own slack "
                 "(rounding, fragmentation), and CUDA's context takes ~0.5 GiB more")
    return "\n".join(lines)


def run_plan(config: TrainConfig, json_path: Optional[str], log=print) -> dict:
    """Plan, print the report, write ``json_path`` if given; returns the JSON record."""
    if json_path and not Path(json_path).expanduser().parent.is_dir():
        raise ValueError(f"--plan-json {json_path}: no directory {Path(json_path).parent}")
    try:
        with warnings.catch_warnings():  # DoRA's cache key reads a fake data pointer (0)
            warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
            plan = plan_memory(config)
    except (RuntimeError, NotImplementedError) as error:
        reason = (str(error).strip().splitlines() or [""])[0]
        raise PlanFailed(f"--plan-memory: this run could not be planned ({type(error).__name__}: "
                         f"{reason})") from None
    log(plan_report(plan))
    record = plan.as_json()
    if json_path:
        path = Path(json_path).expanduser()
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2) + "\n"))
    return record
