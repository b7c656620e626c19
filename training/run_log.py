"""What a run records as it goes: metrics.jsonl, TensorBoard (``--report-to``) and the progress
bar, in one object; and the repair of metrics.jsonl that a resumed run starts with."""
import contextlib
import json
import math
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from lorakernels.weight_files import atomic_write, raise_naming

from .tensorboard_log import TensorBoardLog

METRICS_FILE = "metrics.jsonl"


def metrics_line(row: dict) -> str:
    """One strict-JSON line: a value that is not finite is written as null (JSON has no NaN)."""
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v
             for k, v in row.items()}
    return json.dumps(clean, allow_nan=False) + "\n"


def drop_metrics_after(path: Path, step: int, log=print) -> None:
    """Forget metrics of steps after ``step``: a resumed run logs them again. A torn last line
    (the run was killed mid-write) is dropped with a note; a bad line before it is an error."""
    if not path.exists():
        return
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text (byte {error.start}); fix or remove it to "
                         "resume") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number < len(lines):
                raise ValueError(f"{path}:{number}: not JSON; fix or remove that line to "
                                 "resume") from None
            log(f"note: {path}:{number}: dropped a torn last line (the run stopped mid-write)")
            continue
        if not isinstance(row, dict) or not isinstance(row.get("step", 0), int):
            raise ValueError(f"{path}:{number}: not a metrics row (a JSON object with an integer "
                             "step); fix or remove that line to resume")
        if row.get("step", 0) <= step:
            rows.append(line)
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(r + "\n" for r in rows)))


class RunLog:
    """Rank 0's record of a run from ``start_step``: each step on the progress bar, each
    metrics row in metrics.jsonl (flushed, so a killed run keeps it) and, with
    ``tensorboard``, in OUTPUT/tensorboard/. Other ranks get one that records nothing.
    A context manager: leaving it closes the files and the bar."""

    def __init__(self, output: Path, start_step: int, total_steps: int, options: dict,
                 enabled: bool = True, tensorboard: bool = False):
        self.metrics = (output / METRICS_FILE).open("a") if enabled else None
        self.board: Optional[TensorBoardLog] = (TensorBoardLog(output, start_step, options)
                                                if tensorboard and enabled else None)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                        disable=not enabled)

    def progress(self, loss: float, lr: float, tokens_per_s: float, memory_mb: float) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}",
                             mem=f"{memory_mb:.0f}MB")

    def record(self, row: dict) -> None:
        if not (row and self.metrics):
            return
        try:
            self.metrics.write(metrics_line(row))
            self.metrics.flush()
        except OSError as error:  # a full disk: say which file, as the checkpoints do
            metrics, self.metrics = self.metrics, None
            with contextlib.suppress(OSError):  # its buffer cannot be written either
                metrics.close()
            raise_naming(error, metrics.name)
            raise
        if self.board:
            self.board.log(row)

    def close(self) -> None:
        self.bar.close()
        if self.metrics:
            self.metrics.close()
        if self.board:
            self.board.close()

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
