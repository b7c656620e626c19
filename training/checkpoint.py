"""Training checkpoints: the adapter (PEFT and loralib formats) plus everything resume needs.

A checkpoint directory is written under a temporary name and renamed into place,
so a run killed mid-save leaves the previous checkpoints intact. All tensors are
safetensors; the rest is JSON.
"""
import json
import os
import shutil
from pathlib import Path
from typing import List, Optional

import torch
from safetensors.torch import load_file, save_file

from lorakernels.adapters import (LORA_FILE, load_lora_state_dict, save_lora_state_dict,
                                  save_peft_adapter)

from .distributed import full_tensors, shard_like

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"


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


def _replace_directory(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final``; an existing ``final`` is swapped out first, then removed."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)


def save_checkpoint(directory: Path, model, optimizer, scheduler, step: int, config: dict,
                    target_modules: List[str], is_main: bool = True) -> Path:
    """Adapter + optimizer + scheduler + position, atomically at ``directory``.

    Every rank calls it (an FSDP-sharded model's tensors are gathered); the main rank writes.
    """
    directory = Path(directory)
    lora = full_tensors({name: p.detach() for name, p in model.named_parameters() if "lora_" in name})
    tensors, param_groups = _optimizer_tensors(optimizer)
    if not is_main:
        return directory
    lora = {k: v.cpu() for k, v in lora.items()}
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        save_peft_adapter(model, tmp, base_model_name_or_path=config["model"],
                          target_modules=target_modules, state=lora)
        save_lora_state_dict(model, tmp / LORA_FILE, state=lora)
        save_file(tensors, str(tmp / OPTIMIZER_FILE))
        state = {"step": step, "scheduler": scheduler.state_dict(), "param_groups": param_groups,
                 "config": config}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")  # last: marks it complete
        _replace_directory(tmp, directory)
    except BaseException:  # disk full, Ctrl-C: nothing half-written stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def resolve_resume(resume: str, output: Path) -> Optional[Path]:
    """``latest`` → the newest complete checkpoint in ``output`` (None if there is none)."""
    if resume == "latest":
        found = step_checkpoints(output)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).exists():
        raise ValueError(f"--resume {path}: not a checkpoint directory (no {STATE_FILE})")
    return path


def finished_step(output: Path) -> Optional[int]:
    """The step of ``output/final`` when the run finished, else None."""
    state = output / "final" / STATE_FILE
    return json.loads(state.read_text())["step"] if state.exists() else None


def load_checkpoint(directory: Path, model, optimizer, scheduler) -> int:
    """Restore LoRA weights, optimizer and scheduler; returns the step to continue from.

    No RNG state: the loop seeds dropout from (seed, step, rank) at every step.
    """
    state = json.loads((directory / STATE_FILE).read_text())
    load_lora_state_dict(model, directory / LORA_FILE)
    _restore_optimizer(optimizer, load_file(str(directory / OPTIMIZER_FILE)), state["param_groups"])
    scheduler.load_state_dict(state["scheduler"])
    return state["step"]


def prune_checkpoints(output: Path, keep: Optional[int]) -> None:
    """Delete the oldest step checkpoints beyond ``keep`` (``final/`` is never touched)."""
    if keep:
        for old in step_checkpoints(output)[:-keep]:
            shutil.rmtree(old)
