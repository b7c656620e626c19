"""The training job: data, model, LoRA, AdamW with cosine warmup, eval, metrics, checkpoints."""
import contextlib
import dataclasses
import math
import resource
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch

from lorakernels import settings
from lorakernels.functional import lm_head_loss
from model.build import load_model, resolve_dtype
from model.chat import end_of_turn_id
from model.lora import apply_lora

from .checkpoint import (TrainingState, prune_checkpoints, resume, run_fingerprint,
                         save_checkpoint)
from .config import TrainConfig, check_environment
from .data import (IGNORE, MicroBatches, batches_in_order, bucketed_length, prepare_rows,
                   read_train_and_eval, target_tokens)
from .distributed import Distributed
from .divergence import check_finite, check_finite_weights
from .interrupts import StopOnInterrupt, stopping_signals
from .run_directory import (RunLock, refuse_to_replace, remove_previous_run,
                            remove_stale_temporaries)
from .run_log import METRICS_FILE, RunLog, drop_metrics_after


def token_loss_sum(model, batch: dict) -> torch.Tensor:
    """Summed next-token cross entropy over the target tokens of one micro-batch."""
    hidden = model.model(batch["input_ids"], batch["position_ids"], batch["segment_ids"])
    return lm_head_loss(model.lm_head, hidden[:, :-1].reshape(-1, hidden.shape[-1]),
                        batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE)


def accumulate_gradients(step_loss, micro_batches, dist: Optional[Distributed] = None) -> float:
    """Backward over one optimizer step's micro-batches; returns the step's mean token loss.

    Each micro-batch's summed loss is divided by the target tokens of the whole step
    on all ranks, so 4 micro-batches of 1 give the gradient of one batch of 4, and
    2 ranks of batch 2 that of one process of batch 4 (DDP averages over ranks,
    hence the factor world_size). Ranks synchronise once, on the last micro-batch.
    """
    dist = dist or Distributed()
    n_targets = max(1.0, dist.sum(sum(target_tokens(b) for b in micro_batches)))
    total = 0.0
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        ddp = isinstance(step_loss, torch.nn.parallel.DistributedDataParallel)
        sync = step_loss.no_sync() if ddp and not last else contextlib.nullcontext()
        with sync:
            loss_sum = step_loss(batch)
            (loss_sum * dist.world_size / n_targets).backward()
        total += loss_sum.item()
    return dist.sum(total) / n_targets


def add_lora(model, config: TrainConfig) -> None:
    """The run's LoRA layers on the target projections, initialised from --seed (whatever
    loading drew before)."""
    torch.manual_seed(config.seed)
    apply_lora(model, r=config.lora_r, lora_alpha=config.lora_alpha,
               lora_dropout=config.lora_dropout, targets=config.lora_layout(),
               use_rslora=config.use_rslora, use_dora=config.use_dora)


def seed_step(seed: int, step: int, rank: int = 0) -> None:
    """Seed torch for optimizer step ``step``: dropout masks are a function of (seed, step, rank),
    so a resumed run is exact with no RNG state saved."""
    torch.manual_seed(seed * 1_000_003 + step * 1_009 + rank)


def step_micro_batches(batches: MicroBatches, step: int, grad_accum: int, device) -> List[dict]:
    """Optimizer step ``step``'s ``grad_accum`` micro-batches, collated and on ``device``."""
    return [{k: v.to(device) for k, v in batches[step * grad_accum + j].items()}
            for j in range(grad_accum)]


def training_step(step_loss, params, optimizer, scheduler, micro_batches, max_grad_norm: float,
                  dist: Optional[Distributed] = None,
                  before_update: Optional[Callable[[float, float], None]] = None
                  ) -> Tuple[float, float, float]:
    """One optimizer step of train.py: backward over ``micro_batches``, clip the gradient to
    ``max_grad_norm`` (<= 0: measure only), AdamW, the schedule, zero_grad.

    ``before_update(loss, grad_norm)`` runs before the weights change and may raise to stop a
    step that must not be applied (train.py's check_finite). Returns (the step's mean token
    loss, the gradient norm before clipping, the learning rate the step used).
    """
    loss = accumulate_gradients(step_loss, micro_batches, dist)
    # max_norm inf measures without clipping (the factor is clamped to 1): the norm is logged
    # either way.
    grad_norm = torch.nn.utils.clip_grad_norm_(
        params, max_grad_norm if max_grad_norm > 0 else float("inf")).item()
    if before_update is not None:
        before_update(loss, grad_norm)
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm, lr


def cosine_with_warmup(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def optimizer_and_schedule(params, config: TrainConfig, total_steps: int):
    """AdamW over ``params`` and its schedule: linear warmup over --warmup-ratio of the steps to
    --lr, then cosine decay to 0 at ``total_steps``."""
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warmup_steps = math.ceil(config.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                  cosine_with_warmup(total_steps, warmup_steps))
    return optimizer, scheduler


def batch_length_rule(config: TrainConfig, device: torch.device) -> Optional[Callable[[int], int]]:
    """MicroBatches' ``pad_to`` for this run: on CUDA attention is compiled per length
    (FlexAttention), so batches come in few lengths; elsewhere each is its longest row."""
    if device.type != "cuda":
        return None
    return partial(bucketed_length, max_seq_len=config.max_seq_len, packing=config.packing)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@torch.no_grad()
def evaluate(step_loss, rows, batch_size: int, pad_id: int, device, pad_to=None) -> dict:
    """Token-weighted loss and perplexity over every eval row, in order."""
    step_loss.eval()
    total, tokens = 0.0, 0
    for batch in batches_in_order(rows, batch_size, pad_id, pad_to):
        batch = {k: v.to(device) for k, v in batch.items()}
        total += step_loss(batch).item()
        tokens += target_tokens(batch)
    step_loss.train()
    loss = total / max(tokens, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": tokens}




class StepLoss(torch.nn.Module):
    """The model and its loss as one module, so DistributedDataParallel sees the forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> torch.Tensor:
        return token_loss_sum(self.model, batch)


# What torch says when an allocation fails: CUDA's OutOfMemoryError, the CPU allocator's.
OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "not enough memory")


def out_of_memory_message(error: BaseException, config: TrainConfig) -> Optional[str]:
    """One line for a run that ran out of device or host memory, naming the flags that shrink
    it; None for any other error."""
    text = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    if not (isinstance(error, MemoryError) or any(s in text.lower() for s in OUT_OF_MEMORY)):
        return None
    return (f"out of memory with --batch-size {config.batch_size} x --max-seq-len "
            f"{config.max_seq_len} ({text[:200]}); lower them, add --grad-accum or "
            "--grad-checkpointing; --plan-memory shows where the memory goes")


def per_process_batch(config: TrainConfig, dist: Distributed) -> TrainConfig:
    """``--global-batch-size`` split over processes and accumulation steps, evenly or not at all."""
    if config.global_batch_size is None:
        return config
    shares = dist.world_size * config.grad_accum
    if config.global_batch_size % shares:
        raise ValueError(f"--global-batch-size {config.global_batch_size} does not divide over "
                         f"{dist.world_size} processes × --grad-accum {config.grad_accum}")
    return dataclasses.replace(config, batch_size=config.global_batch_size // shares)


def train(config: TrainConfig, log=print) -> dict:
    """Run the job described by ``config`` (one process, or one rank under torchrun)."""
    check_environment(config)
    dist = Distributed.from_env(config.device)
    lock = None
    try:
        if dist.is_main:  # before anything expensive: a busy or occupied --output stops here
            lock = RunLock(Path(config.output), log)
            refuse_to_replace(Path(config.output), config.resume, config.overwrite)
        with settings.override(attention=config.attention), stopping_signals():
            return _train(config, dist, log if dist.is_main else (lambda _: None))
    finally:
        if lock:
            lock.release()
        dist.close()


@dataclass
class Run:
    """What one training run works on: built once by ``start_run`` before the first step."""

    config: TrainConfig
    dist: Distributed
    output: Path
    device: torch.device
    model: torch.nn.Module
    tokenizer: object
    step_loss: torch.nn.Module
    params: List[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: object
    batches: MicroBatches
    eval_rows: Optional[list]
    pad_to: Optional[Callable[[int], int]]
    total_steps: int
    data_digest: str  # the training data's content hash: part of resume's fingerprint

    @property
    def state(self) -> TrainingState:
        return TrainingState(self.model, self.optimizer, self.scheduler)


def start_run(config: TrainConfig, dist: Distributed, log) -> Run:
    """Data, model, LoRA, optimizer and schedule for ``config``; all data is read and checked
    before the model is built, so a bad record stops the run before anything slow."""
    device = dist.device(config.device)
    train_data, eval_data = read_train_and_eval(config, log)
    model, tokenizer = load_model(config.model, resolve_dtype(config.dtype, device), device,
                                  config.seed, config.quantize, config.tokenizer)
    if train_data.format != "text":  # replies must learn to end on a special token, not "\n"
        end_of_turn_id(tokenizer)
    rows, truncated = prepare_rows(train_data, tokenizer, config, log)
    pad_to = batch_length_rule(config, device)
    batches = MicroBatches(rows, config.batch_size, config.seed, tokenizer.pad_id,
                           dist.rank, dist.world_size, pad_to)
    eval_rows = prepare_rows(eval_data, tokenizer, config, log)[0] if eval_data else None
    log(f"data: {len(rows)} sequences of up to {config.max_seq_len} tokens, "
        f"{truncated} conversations truncated; {dist.world_size} process(es), global batch "
        f"{batches.global_batch} × {config.grad_accum} accumulation")
    add_lora(model, config)
    model.set_gradient_checkpointing(config.grad_checkpointing)
    model.train()
    step_loss = dist.wrap(StepLoss(model), device, config.strategy)
    params = [p for p in model.parameters() if p.requires_grad]
    total_steps = config.max_steps or math.ceil(
        config.epochs * batches.per_epoch / config.grad_accum)
    optimizer, scheduler = optimizer_and_schedule(params, config, total_steps)
    return Run(config, dist, Path(config.output), device, model, tokenizer, step_loss, params,
               optimizer, scheduler, batches, eval_rows, pad_to, total_steps, train_data.digest)


def _train(config: TrainConfig, dist: Distributed, log) -> dict:
    config = per_process_batch(config, dist)
    if config.strategy == "fsdp" and not dist.enabled:
        log("--strategy fsdp shards over processes started by torchrun; this is one process")
    run = start_run(config, dist, log)
    fingerprint = run_fingerprint(config, run.batches.global_batch, run.data_digest)
    start_step = 0
    if config.resume:
        start_step, finished = resume(config, run.output, run.total_steps, fingerprint,
                                      run.state, log)
        if finished:
            return {"step": start_step, "finished": True, "adapter": str(run.output / "final")}
    options = dataclasses.asdict(config)

    def save(name: str, step: int) -> Path:
        """Rank 0 writes (FSDP shards gathered); every rank waits, none runs ahead of it."""
        check_finite_weights(run.params, step, run.output)
        save_checkpoint(run.output / name, run.state, step, options, config.lora_layout(),
                        dist.is_main, fingerprint)
        dist.barrier()
        return run.output / name

    if dist.is_main:
        prepare_output(run.output, start_step, config.overwrite, log)
    with RunLog(run.output, start_step, run.total_steps, options, dist.is_main,
                config.report_to == "tensorboard") as run_log:
        result = run_steps(run, start_step, save, run_log)
    if result.interrupted:  # after the bar is closed: the message gets a line of its own
        log(f"interrupted by {result.interrupt.name}: saved {result.interrupted} at step "
            f"{result.step}; continue with --resume")
        return {"step": result.step, "interrupted": True, "signal": result.interrupt.signum,
                "checkpoint": str(result.interrupted)}
    final = save("final", result.step)
    if result.interrupt.requested:
        log(f"note: {result.interrupt.name} arrived at the last step or the final save, which "
            "finished")
    seconds = time.perf_counter() - result.started
    summary = {"step": result.step, "loss": result.loss, "seconds": round(seconds, 1),
               "tokens_per_s": round(result.tokens / max(seconds, 1e-9)),
               "peak_memory_mb": round(peak_memory_mb(run.device)), "adapter": str(final)}
    if result.evaluation:
        summary.update(eval_loss=result.evaluation["eval_loss"],
                       eval_ppl=result.evaluation["eval_ppl"])
    log("done: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                             for k, v in summary.items()))
    return summary


def prepare_output(output: Path, start_step: int, overwrite: bool, log) -> None:
    """The run directory as the first step needs it: left-over temporaries gone, the replaced
    run removed (--overwrite, only now that data and model are ready: a failed start loses
    nothing), metrics after the resumed step forgotten."""
    output.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(output, log)
    if overwrite:
        remove_previous_run(output, log)
    drop_metrics_after(output / METRICS_FILE, start_step, log)


@dataclass
class StepsDone:
    """Where ``run_steps`` stopped: the step, its loss, the last evaluation, the tokens
    trained on since ``started`` (perf_counter), the signals' state (it keeps handling them
    through the final save; ``train`` restores the handlers) and the checkpoint an interrupt
    saved."""

    step: int
    loss: float
    evaluation: Optional[dict]
    tokens: int
    started: float
    interrupt: StopOnInterrupt
    interrupted: Optional[Path] = None


def run_steps(run: Run, start_step: int, save: Callable[[str, int], Path],
              run_log: RunLog) -> StepsDone:
    """Optimizer steps from ``start_step`` to the end, each logged, evaluated and saved as the
    flags ask; a Ctrl-C finishes the step in progress, saves it and stops."""
    config, dist = run.config, run.dist
    done = StepsDone(start_step, float("nan"), None, 0, time.perf_counter(), StopOnInterrupt())
    while done.step < run.total_steps:
        seed_step(config.seed, done.step, dist.rank)
        micro = step_micro_batches(run.batches, done.step, config.grad_accum, run.device)
        done.loss, grad_norm, lr = training_step(
            run.step_loss, run.params, run.optimizer, run.scheduler, micro,
            config.max_grad_norm, dist,
            before_update=partial(check_finite, done.step + 1, output=run.output))
        done.step += 1
        step = done.step
        done.tokens += dist.world_size * sum(int(b["input_ids"].numel()) for b in micro)
        tokens_per_s = done.tokens / (time.perf_counter() - done.started)
        memory = peak_memory_mb(run.device)
        run_log.progress(done.loss, lr, tokens_per_s, memory)
        row = {}
        if step % config.log_every == 0 or step == run.total_steps:
            row.update(step=step, loss=done.loss, lr=lr, grad_norm=grad_norm,
                       tokens_per_s=tokens_per_s, peak_memory_mb=memory,
                       epoch=step * config.grad_accum / run.batches.per_epoch)
        if run.eval_rows and ((config.eval_every and step % config.eval_every == 0)
                              or step == run.total_steps):
            # Every rank evaluates (an FSDP forward needs them all); rank 0 records it.
            done.evaluation = evaluate(run.step_loss, run.eval_rows, config.batch_size,
                                       run.tokenizer.pad_id, run.device, run.pad_to)
            row.update(step=step, **done.evaluation)
        run_log.record(row)
        saved = config.save_every and step % config.save_every == 0 and step < run.total_steps
        if saved:
            save(f"checkpoint-{step}", step)
            if dist.is_main:
                prune_checkpoints(run.output, config.save_total_limit)
        # Ctrl-C only raises a flag; the step in progress finishes, all ranks agree to stop.
        if dist.sum(done.interrupt.requested) > 0 and step < run.total_steps:
            done.interrupted = (run.output / f"checkpoint-{step}" if saved
                                else save(f"checkpoint-{step}", step))
            break
    return done
