"""Stop a run whose loss, gradient or weights stop being finite, before it applies or saves
them, and say which checkpoint is the last good one."""
import math
from pathlib import Path

import torch

from .checkpoint import step_checkpoints


class TrainingDiverged(RuntimeError):
    """The loss, gradient or weights stopped being finite: the run stops instead of saving
    them."""


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
    raise TrainingDiverged(f"step {step}: the LoRA weights are no longer finite: training "
                           f"diverged (try a lower --lr); {last_good(output)}")


def last_good(output: Path) -> str:
    found = step_checkpoints(output)
    if found:
        return f"the last good checkpoint is {found[-1]} (nothing after it was saved)"
    return f"no checkpoint was saved in {output}"
