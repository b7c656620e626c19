"""``--report-to tensorboard``: the metrics rows as TensorBoard scalars, to watch a run live.

TensorBoard is an optional extra, so it is imported only when asked for.
"""
import json
from pathlib import Path


def summary_writer_class():
    """torch's SummaryWriter, or a ValueError saying how to install the package it needs."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError('--report-to tensorboard needs the tensorboard package: '
                         'pip install -e ".[tensorboard]"') from None
    return SummaryWriter


def shown(value):
    """An option's value as TensorBoard's hparams take it: a number, a string or a bool (a
    list as its items, a mapping as JSON); None (unset) as it is, left out."""
    if isinstance(value, list):
        return " ".join(map(str, value))
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return value


def tag(key: str) -> str:
    """A metrics.jsonl key as a TensorBoard tag: loss -> train/loss, eval_loss -> eval/loss."""
    return "eval/" + key[len("eval_"):] if key.startswith("eval_") else "train/" + key


class TensorBoardLog:
    """Writes OUTPUT/tensorboard/: the run's settings, then every metrics row as scalars.

    Everything a run writes is at steps after ``start_step``, behind a purge marker at
    the first of them: TensorBoard drops what an earlier run logged from that step on,
    so a resumed run continues the same curves with each step once (and a fresh run in
    an old directory starts clean, as metrics.jsonl does). Every run writes the marker:
    the reader of ``tensorboard --load_fast=false`` ignores the first one in a run. (The
    default fast reader skips markers, but drops a tag's old points from any step that
    the resumed run logs again.)
    """

    def __init__(self, output: Path, start_step: int, settings: dict):
        self.writer = summary_writer_class()(str(Path(output) / "tensorboard"),
                                             purge_step=start_step + 1)
        self._write_settings(settings, start_step + 1)

    def _write_settings(self, settings: dict, step: int) -> None:
        """The settings as a table in the Text tab and as hyperparameters in the HParams tab."""
        from torch.utils.tensorboard.summary import hparams

        values = {name: shown(value) for name, value in settings.items()}
        table = "| option | value |\n|---|---|\n" + "".join(
            f"| {name} | {value} |\n" for name, value in values.items())
        self.writer.add_text("config", table, step)
        metrics = dict.fromkeys([tag("loss"), tag("eval_loss")])
        # Into this run's file: add_hparams would start a new run (subdirectory) per call.
        for summary in hparams(values, metrics):  # unset (None) options are left out
            self.writer.file_writer.add_summary(summary, step)

    def log(self, row: dict) -> None:
        """Each number of a metrics row as a scalar at the row's step, on disk at once."""
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(tag(key), value, row["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
