"""Training checkpoints: the adapter (PEFT and loralib formats) plus everything resume needs.

A checkpoint directory is written under a temporary name and renamed into place,
so a run killed mid-save leaves the previous checkpoints intact. All tensors are
safetensors; the rest is JSON.
"""
import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
from safetensors.torch import save_file

from lorakernels.adapters import (LORA_FILE, load_lora_state_dict, save_lora_state_dict,
                                  save_peft_adapter)
from lorakernels.weight_files import (follow_umask, open_safetensors, raise_naming,
                                      replace_directory)
from model.build import recorded_name

from .distributed import full_tensors, shard_like

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
# The options that change what a step computes; a resume under other values is not a continuation.
# The global batch (per-process batch × processes) stands for --batch-size, so a run may resume
# on another number of processes.
FINGERPRINT_OPTIONS = ("model", "lr", "grad_accum", "max_seq_len", "packing", "train_on_prompt",
                       "lora_r", "lora_alpha", "lora_dropout", "target_modules", "rank_pattern",
                       "alpha_pattern", "layers_to_transform", "use_rslora", "use_dora",
                       "warmup_ratio", "weight_decay", "max_grad_norm", "seed", "quantize")


def step_checkpoints(output: Path) -> List[Path]:
    """Complete ``checkpoint-STEP`` directories, oldest first."""
    found = [p for p in output.glob("checkpoint-*")
             if p.name.split("-", 1)[1].isdigit() and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))


def _optimizer_tensors(optimizer: torch.optim.Optimizer):
    """Per-parameter state as flat safetensors keys (whole tensors, also under FSDP), and the
    JSON-able rest. A collective under FSDP: every rank calls it."""
    state = optimizer.state_dict()
    tensors = full_tensors({f"{index}.{name}": value.detach()
                            for index, per_param in state["state"].items()
                            for name, value in per_param.items() if torch.is_tensor(value)})
    return {k: v.cpu().contiguous() for k, v in tensors.items()}, state["param_groups"]


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, param_groups: list) -> None:
    """Load whole tensors back, each as its parameter's shard when the model is FSDP-sharded."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        value = value if name == "step" else shard_like(value, params[int(index)])
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_fingerprint(config, global_batch: int, data_digest: Optional[str] = None) -> dict:
    """What makes two runs the same run: the data's contents (``data_digest``, by default the
    --data file's sha256) and the options that change the math."""
    fingerprint = {name: getattr(config, name) for name in FINGERPRINT_OPTIONS}
    fingerprint.update(global_batch=global_batch,
                       data_sha256=data_digest or file_sha256(config.data))
    return fingerprint


def fingerprint_changes(saved: dict, current: dict) -> List[str]:
    """Each difference as the user would name it: the data file, or a flag and its two values."""
    changes = []
    for key, value in current.items():
        if key not in saved or saved[key] == value:
            continue
        if key == "data_sha256":
            changes.append("the data (the --data file's contents differ)")
        elif key == "global_batch":
            changes.append(f"the global batch (--batch-size × processes): {saved[key]} → {value}")
        else:
            changes.append(f"--{key.replace('_', '-')}: {saved[key]} → {value}")
    return changes


def check_fingerprint(directory: Path, current: dict, allow_changes: bool,
                      log: Callable[[str], None] = print) -> None:
    """A resume continues the run that saved ``directory``, or stops naming what differs."""
    saved = read_state(directory).get("fingerprint")
    if saved is None:
        log(f"note: {directory} records no fingerprint (an older checkpoint): the data and "
            f"settings are not checked against it")
        return
    changes = fingerprint_changes(saved, current)
    if changes and not allow_changes:
        raise ValueError(f"--resume {directory}: this run differs from the one that saved it: "
                         f"{'; '.join(changes)}; pass --allow-changed-resume to continue anyway, "
                         f"or another --output to start a new run")
    if changes:
        log(f"note: --allow-changed-resume: continuing with {'; '.join(changes)}")


class TrainingState(NamedTuple):
    """What a checkpoint saves and resume restores: the model's LoRA weights, AdamW's state and
    the schedule."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object


def save_checkpoint(directory: Path, state: TrainingState, step: int, config: dict,
                    target_modules, is_main: bool = True,
                    fingerprint: Optional[dict] = None) -> Path:
    """Adapter + optimizer + scheduler + position, atomically at ``directory``.

    ``target_modules``: the adapter's layout (an ``AdapterLayout``, or module names). Every
    rank calls it (an FSDP-sharded model's tensors are gathered); the main rank writes.
    """
    directory = Path(directory)
    model, optimizer, scheduler = state
    lora = full_tensors({name: p.detach() for name, p in model.named_parameters()
                         if "lora_" in name})
    tensors, param_groups = _optimizer_tensors(optimizer)
    if not is_main:
        return directory
    lora = {k: v.cpu() for k, v in lora.items()}
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        save_peft_adapter(model, tmp, base_model_name_or_path=recorded_name(config["model"]),
                          target_modules=target_modules, state=lora)
        save_lora_state_dict(model, tmp / LORA_FILE, state=lora)
        save_file(tensors, str(tmp / OPTIMIZER_FILE))
        state = {"step": step, "scheduler": scheduler.state_dict(), "param_groups": param_groups,
                 "config": config, "fingerprint": fingerprint}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")  # last: marks it complete
        for path in tmp.iterdir():
            follow_umask(path)
        replace_directory(tmp, directory)
    except BaseException as error:  # disk full, Ctrl-C: nothing half-written stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise_naming(error, tmp)
        raise
    return directory


def read_state(directory: Path) -> dict:
    """A checkpoint's trainer_state.json, or a ValueError naming it."""
    path = directory / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{path}: empty or not JSON (damaged)") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError(f"{path}: no step recorded (damaged)")
    return state


def verify_checkpoint(directory: Path) -> dict:
    """Its state, once every file resume reads is whole; else a ValueError naming the damaged
    file."""
    state = read_state(directory)
    path = directory / STATE_FILE
    if not isinstance(state.get("scheduler"), dict) or "last_epoch" not in state["scheduler"]:
        raise ValueError(f"{path}: no scheduler state recorded (damaged)")
    groups = state.get("param_groups")
    if not (isinstance(groups, list) and groups and all(
            isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)):
        raise ValueError(f"{path}: no optimizer param_groups recorded (damaged)")
    for name in (LORA_FILE, OPTIMIZER_FILE):
        path = directory / name
        try:  # the header and its offsets against the file's size: truncation shows here
            with open_safetensors(path) as reader:
                reader.keys()
        except FileNotFoundError as error:
            raise ValueError(str(error)) from None
    return state


def resolve_resume(resume: str, output: Path, log: Callable[[str], None] = print) -> Optional[Path]:
    """``latest`` → the newest whole checkpoint in ``output`` (None if there is none): a damaged
    newest one is named and the one before it used. A PATH must be whole."""
    if resume == "latest":
        found = step_checkpoints(output)
        for directory in reversed(found):
            try:
                verify_checkpoint(directory)
                return directory
            except ValueError as error:
                log(f"warning: skipping a damaged checkpoint: {error}")
        if found:
            raise ValueError(f"--resume: every checkpoint in {output} is damaged")
        return None
    path = Path(resume)
    if not (path / STATE_FILE).exists():
        raise ValueError(f"--resume {path}: not a checkpoint directory (no {STATE_FILE})")
    verify_checkpoint(path)
    return path


def finished_step(output: Path, log: Callable[[str], None] = print) -> Optional[int]:
    """The step of ``output/final`` when the run finished (and final/ is whole), else None."""
    if not (output / "final" / STATE_FILE).exists():
        return None
    try:
        return verify_checkpoint(output / "final")["step"]
    except ValueError as error:
        log(f"warning: final/ is damaged, resuming from the step checkpoints: {error}")
        return None


def load_checkpoint(directory: Path, model, optimizer, scheduler) -> int:
    """Restore LoRA weights, optimizer and scheduler; returns the step to continue from.

    No RNG state: the loop seeds dropout from (seed, step, rank) at every step.
    """
    state = verify_checkpoint(directory)
    load_lora_state_dict(model, directory / LORA_FILE)
    with open_safetensors(directory / OPTIMIZER_FILE) as reader:
        tensors = {key: reader.get_tensor(key) for key in reader.keys()}
    try:  # torch's own checks (group sizes, keys) raise these on an edited or foreign state
        _restore_optimizer(optimizer, tensors, state["param_groups"])
        scheduler.load_state_dict(state["scheduler"])
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as error:
        raise ValueError(f"{directory / STATE_FILE} or {OPTIMIZER_FILE}: the optimizer or "
                         f"scheduler state does not fit this run ({type(error).__name__}: "
                         f"{error})") from None
    return state["step"]


def check_resume_step(directory: Path, step: int, total_steps: int) -> None:
    """A resume has steps left to train: a checkpoint at or past --max-steps has none."""
    if step >= total_steps:
        raise ValueError(f"--resume {directory}: the checkpoint is at step {step}, and --max-steps "
                         f"(or --epochs) gives {total_steps}: pass a --max-steps above {step}")


def prune_checkpoints(output: Path, keep: Optional[int]) -> None:
    """Delete the oldest step checkpoints beyond ``keep`` (``final/`` is never touched)."""
    if keep:
        for old in step_checkpoints(output)[:-keep]:
            shutil.rmtree(old)


def resume(config, output: Path, total_steps: int, fingerprint: dict, state: TrainingState,
           log: Callable[[str], None] = print) -> Tuple[int, bool]:
    """Where a ``--resume`` run starts: (step, False) after restoring ``state`` (model,
    optimizer, scheduler) from the checkpoint it names, (0, False) with none to resume from,
    or (step, True) when ``output`` holds a run that finished at or past ``total_steps``."""
    finished = finished_step(output, log) if config.resume == "latest" else None
    if finished is not None and finished >= total_steps:
        log(f"{output} holds a finished run (final/ at step {finished}); nothing to do: pass "
            f"--max-steps above {finished} to train it further")
        return finished, True
    if finished is not None:
        checkpoint = output / "final"
    else:
        checkpoint = resolve_resume(config.resume, output, log)
    if checkpoint is None:
        log(f"--resume: no checkpoint in {output}, starting fresh")
        return 0, False
    check_fingerprint(checkpoint, fingerprint, config.allow_changed_resume, log)
    model, optimizer, scheduler = state
    step = load_checkpoint(checkpoint, model, optimizer, scheduler)
    check_resume_step(checkpoint, step, total_steps)
    log(f"resumed from {checkpoint} at step {step}")
    report_overrides(config, scheduler, optimizer, log)
    return step, False


def report_overrides(config, scheduler, optimizer, log) -> None:
    """A checkpoint's schedule and optimizer settings win over the flags; say so when they
    differ."""
    peak_lr = scheduler.base_lrs[0]
    if not math.isclose(peak_lr, config.lr):
        log(f"note: the checkpoint's peak learning rate {peak_lr:g} is used, not --lr "
            f"{config.lr:g}")
    weight_decay = optimizer.param_groups[0]["weight_decay"]
    if not math.isclose(weight_decay, config.weight_decay):
        log(f"note: the checkpoint's weight decay {weight_decay:g} is used, "
            f"not --weight-decay {config.weight_decay:g}")
