"""The training job: data, model, LoRA, AdamW with cosine warmup, eval, metrics, checkpoints."""
import contextlib
import dataclasses
import json
import math
import os
import resource
import signal
import threading
import time
from functools import partial
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch
from tqdm import tqdm

from lorakernels.functional import ATTENTION_ENV, lm_head_loss
from lorakernels.weight_files import atomic_write
from model.build import load_model, resolve_dtype
from model.lora import apply_lora

from .checkpoint import (check_fingerprint, finished_step, load_checkpoint, prune_checkpoints,
                         resolve_resume, run_fingerprint, save_checkpoint, step_checkpoints)
from .config import TrainConfig
from .data import (IGNORE, MicroBatches, batches_in_order, bucketed_length, prepare_rows,
                   read_train_and_eval, target_tokens)
from .distributed import Distributed
from .run_directory import (RunLock, refuse_to_replace, remove_previous_run,
                            remove_stale_temporaries)
from .tensorboard_log import TensorBoardLog


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
               lora_dropout=config.lora_dropout, targets=config.target_modules,
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
    # max_norm inf measures without clipping (the factor is clamped to 1): the norm is logged either way.
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
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total_steps, warmup_steps))
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


def drop_metrics_after(path: Path, step: int, log=print) -> None:
    """Forget metrics of steps after ``step``: a resumed run logs them again. A torn last line
    (the run was killed mid-write) is dropped with a note; a bad line before it is an error."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number < len(lines):
                raise ValueError(f"{path}:{number}: not JSON; fix or remove that line to resume") from None
            log(f"note: {path}:{number}: dropped a torn last line (the run stopped mid-write)")
            continue
        if row.get("step", 0) <= step:
            rows.append(line)
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(r + "\n" for r in rows)))


def report_overrides(config: TrainConfig, scheduler, optimizer, log) -> None:
    """A checkpoint's schedule and optimizer settings win over the flags; say so when they differ."""
    peak_lr = scheduler.base_lrs[0]
    if not math.isclose(peak_lr, config.lr):
        log(f"note: the checkpoint's peak learning rate {peak_lr:g} is used, not --lr {config.lr:g}")
    weight_decay = optimizer.param_groups[0]["weight_decay"]
    if not math.isclose(weight_decay, config.weight_decay):
        log(f"note: the checkpoint's weight decay {weight_decay:g} is used, "
            f"not --weight-decay {config.weight_decay:g}")


class TrainingDiverged(RuntimeError):
    """The loss, gradient or weights stopped being finite: the run stops instead of saving them."""


def metrics_line(row: dict) -> str:
    """One strict-JSON line: a value that is not finite is written as null (JSON has no NaN)."""
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
    return json.dumps(clean, allow_nan=False) + "\n"


def check_finite(step: int, loss: float, grad_norm: float, output: Path) -> None:
    """Stop before the optimizer applies a step whose loss or gradient is not finite."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    raise TrainingDiverged(f"step {step}: loss {loss}, gradient norm {grad_norm}: training "
                           f"diverged (try a lower --lr); {last_good(output)}")


def check_finite_weights(params, step: int, output: Path) -> None:
    """Never save LoRA weights that are not finite (e.g. one update with an infinite --lr)."""
    if all(bool(torch.isfinite(p).all()) for p in params):
        return
    raise TrainingDiverged(f"step {step}: the LoRA weights are no longer finite: training diverged "
                           f"(try a lower --lr); {last_good(output)}")


def last_good(output: Path) -> str:
    found = step_checkpoints(output)
    if found:
        return f"the last good checkpoint is {found[-1]} (nothing after it was saved)"
    return f"no checkpoint was saved in {output}"


class StopOnInterrupt:
    """Turns Ctrl-C (SIGINT) into a request checked between steps, so a checkpoint is
    never taken halfway through an optimizer step; a second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class StepLoss(torch.nn.Module):
    """The model and its loss as one module, so DistributedDataParallel sees the forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> torch.Tensor:
        return token_loss_sum(self.model, batch)


def train(config: TrainConfig, log=print) -> dict:
    """Run the job described by ``config`` (one process, or one rank under torchrun)."""
    dist = Distributed.from_env(config.device)
    lock = None
    try:
        if dist.is_main:  # before anything expensive: a busy or occupied --output stops here
            lock = RunLock(Path(config.output), log)
            refuse_to_replace(Path(config.output), config.resume, config.overwrite)
        with attention_choice(config.attention):
            return _train(config, dist, log if dist.is_main else (lambda _: None))
    finally:
        if lock:
            lock.release()
        dist.close()


@contextlib.contextmanager
def attention_choice(choice: Optional[str]):
    """--attention as LORAKERNELS_ATTENTION (read by functional.attention at every forward) for
    the run; the variable is restored afterwards. None leaves it as it is."""
    previous = os.environ.get(ATTENTION_ENV)
    if choice is not None:
        os.environ[ATTENTION_ENV] = choice
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(ATTENTION_ENV, None)
        else:
            os.environ[ATTENTION_ENV] = previous


def per_process_batch(config: TrainConfig, dist: Distributed) -> TrainConfig:
    """``--global-batch-size`` split over processes and accumulation steps, evenly or not at all."""
    if config.global_batch_size is None:
        return config
    shares = dist.world_size * config.grad_accum
    if config.global_batch_size % shares:
        raise ValueError(f"--global-batch-size {config.global_batch_size} does not divide over "
                         f"{dist.world_size} processes × --grad-accum {config.grad_accum}")
    return dataclasses.replace(config, batch_size=config.global_batch_size // shares)


def _train(config: TrainConfig, dist: Distributed, log) -> dict:
    config = per_process_batch(config, dist)
    if config.strategy == "fsdp" and not dist.enabled:
        log("--strategy fsdp shards over processes started by torchrun; this is one process")
    output = Path(config.output)
    device = dist.device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    # Read and validate all data before anything expensive: a bad record stops here.
    train_data, eval_data = read_train_and_eval(config, log)
    model, tokenizer = load_model(config.model, dtype, device, config.seed, config.quantize,
                                  config.tokenizer)
    rows, truncated = prepare_rows(train_data, tokenizer, config, log)
    pad_to = batch_length_rule(config, device)
    train_batches = MicroBatches(rows, config.batch_size, config.seed, tokenizer.pad_id,
                                 dist.rank, dist.world_size, pad_to)
    eval_rows = prepare_rows(eval_data, tokenizer, config, log)[0] if eval_data else None
    log(f"data: {len(rows)} sequences of up to {config.max_seq_len} tokens, "
        f"{truncated} conversations truncated; {dist.world_size} process(es), global batch "
        f"{train_batches.global_batch} × {config.grad_accum} accumulation")

    add_lora(model, config)
    model.set_gradient_checkpointing(config.grad_checkpointing)
    model.train()
    step_loss = dist.wrap(StepLoss(model), device, config.strategy)
    params = [p for p in model.parameters() if p.requires_grad]
    total_steps = config.max_steps or math.ceil(config.epochs * train_batches.per_epoch / config.grad_accum)
    optimizer, scheduler = optimizer_and_schedule(params, config, total_steps)

    fingerprint = run_fingerprint(config, train_batches.global_batch, train_data.digest)
    start_step = 0
    if config.resume:
        finished = finished_step(output, log) if config.resume == "latest" else None
        if finished is not None and finished >= total_steps:
            log(f"{output} holds a finished run (final/ at step {finished}); nothing to do: pass "
                f"--max-steps above {finished} to train it further")
            return {"step": finished, "finished": True, "adapter": str(output / "final")}
        checkpoint = output / "final" if finished is not None else resolve_resume(config.resume, output, log)
        if checkpoint is not None:
            check_fingerprint(checkpoint, fingerprint, config.allow_changed_resume, log)
            start_step = load_checkpoint(checkpoint, model, optimizer, scheduler)
            log(f"resumed from {checkpoint} at step {start_step}")
            report_overrides(config, scheduler, optimizer, log)
        else:
            log(f"--resume: no checkpoint in {output}, starting fresh")

    settings = dataclasses.asdict(config)

    def save(name: str, step: int) -> Path:
        """Rank 0 writes (FSDP shards gathered); every rank waits, none runs ahead of it."""
        check_finite_weights(params, step, output)
        save_checkpoint(output / name, model, optimizer, scheduler, step, settings,
                        config.target_modules, dist.is_main, fingerprint)
        dist.barrier()
        return output / name

    if dist.is_main:
        output.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(output, log)
        if config.overwrite:  # only now that data and model are ready: a failed start loses nothing
            remove_previous_run(output, log)
        drop_metrics_after(output / "metrics.jsonl", start_step, log)
    metrics = (output / "metrics.jsonl").open("a") if dist.is_main else None
    board = (TensorBoardLog(output, start_step, settings)
             if config.report_to == "tensorboard" and dist.is_main else None)
    step, started, tokens_seen, loss = start_step, time.perf_counter(), 0, float("nan")
    evaluation: Optional[dict] = None
    bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
               disable=not dist.is_main)
    interrupt, interrupted = StopOnInterrupt(), None
    try:
        while step < total_steps:
            seed_step(config.seed, step, dist.rank)
            micro = step_micro_batches(train_batches, step, config.grad_accum, device)
            loss, grad_norm, lr = training_step(
                step_loss, params, optimizer, scheduler, micro, config.max_grad_norm, dist,
                before_update=partial(check_finite, step + 1, output=output))
            step += 1
            tokens_seen += dist.world_size * sum(int(b["input_ids"].numel()) for b in micro)
            tokens_per_s = tokens_seen / (time.perf_counter() - started)
            memory = peak_memory_mb(device)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}",
                            mem=f"{memory:.0f}MB")
            row = {}
            if step % config.log_every == 0 or step == total_steps:
                row.update(step=step, loss=loss, lr=lr, grad_norm=grad_norm,
                           tokens_per_s=tokens_per_s, peak_memory_mb=memory,
                           epoch=step * config.grad_accum / train_batches.per_epoch)
            if eval_rows and ((config.eval_every and step % config.eval_every == 0)
                              or step == total_steps):
                # Every rank evaluates (an FSDP forward needs them all); rank 0 records it.
                evaluation = evaluate(step_loss, eval_rows, config.batch_size, tokenizer.pad_id, device,
                                      pad_to)
                row.update(step=step, **evaluation)
            if row and metrics:
                metrics.write(metrics_line(row))
                metrics.flush()
                if board:
                    board.log(row)
            saved = config.save_every and step % config.save_every == 0 and step < total_steps
            if saved:
                save(f"checkpoint-{step}", step)
                if dist.is_main:
                    prune_checkpoints(output, config.save_total_limit)
            # Ctrl-C only raises a flag; the step in progress finishes, all ranks agree to stop.
            if dist.sum(interrupt.requested) > 0 and step < total_steps:
                interrupted = output / f"checkpoint-{step}" if saved else save(f"checkpoint-{step}", step)
                break
    finally:
        interrupt.restore()
        bar.close()
        if metrics:
            metrics.close()
        if board:
            board.close()
    if interrupted:  # after the bar is closed: the message gets a line of its own
        log(f"interrupted: saved {interrupted} at step {step}; continue with --resume")
        return {"step": step, "interrupted": True, "checkpoint": str(interrupted)}
    final = save("final", step)
    summary = {"step": step, "loss": loss, "seconds": round(time.perf_counter() - started, 1),
               "tokens_per_s": round(tokens_seen / max(time.perf_counter() - started, 1e-9)),
               "peak_memory_mb": round(peak_memory_mb(device)), "adapter": str(final)}
    if evaluation:
        summary.update(eval_loss=evaluation["eval_loss"], eval_ppl=evaluation["eval_ppl"])
    log("done: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                             for k, v in summary.items()))
    return summary
