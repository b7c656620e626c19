"""--report-to tensorboard and scripts/plot_metrics.py: the same numbers as metrics.jsonl, each
step once."""
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import train as train_cli
from training.config import TrainConfig
from training.loop import train
from training.tensorboard_log import tag
from conftest import subprocess_timeout

ROOT = Path(__file__).resolve().parents[1]
PLOT = ROOT / "scripts" / "plot_metrics.py"


def config(data, output, **overrides):
    options = dict(data=data, eval_data=data, output=str(output), device="cpu", max_seq_len=64,
                   batch_size=2, lora_r=4, lora_alpha=8, max_steps=4, eval_every=2, seed=3,
                   report_to="tensorboard")
    return TrainConfig(**{**options, **overrides})


def metrics_rows(output):
    return [json.loads(line) for line in (Path(output) / "metrics.jsonl").read_text().splitlines()]


def expected_scalars(rows) -> dict:
    """{tag: [(step, value), ...]}: what the event files should hold for these metrics rows."""
    expected = {}
    for row in rows:
        for key, value in row.items():
            if key != "step":
                expected.setdefault(tag(key), []).append((row["step"],
                                                          pytest.approx(value, rel=1e-6)))
    return expected


def event_scalars(output) -> dict:
    """The scalars as TensorBoard's EventAccumulator reads them (it honours purge markers)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(Path(output) / "tensorboard"))
    events.Reload()
    return {name: [(e.step, e.value) for e in events.Scalars(name)]
            for name in events.Tags()["scalars"]}


def served_steps(output) -> dict:
    """Steps per tag as `tensorboard --load_fast=false` serves them (PluginEventAccumulator)."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    events = EventAccumulator(str(Path(output) / "tensorboard"))
    events.Reload()
    return {name: [e.step for e in events.Tensors(name)] for name in events.Tags()["tensors"]}


def test_event_files_hold_the_metrics_and_the_settings(data, tmp_path):
    pytest.importorskip("tensorboard")
    train(config(data, tmp_path), log=lambda _: None)
    rows = metrics_rows(tmp_path)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert event_scalars(tmp_path) == expected_scalars(rows)
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s",
            "train/peak_memory_mb", "eval/loss", "eval/ppl"} <= set(event_scalars(tmp_path))
    served = served_steps(tmp_path)
    assert served["config/text_summary"] == [1]
    assert served["_hparams_/session_start_info"] == [1]


def test_resume_continues_the_curves_without_duplicate_steps(data, tmp_path):
    pytest.importorskip("tensorboard")
    train(config(data, tmp_path, save_every=2), log=lambda _: None)
    first = metrics_rows(tmp_path)
    train(config(data, tmp_path, resume=str(tmp_path / "checkpoint-2")), log=lambda _: None)
    rows = metrics_rows(tmp_path)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert rows[2]["tokens_per_s"] != first[2]["tokens_per_s"]  # steps 3-4 are the second run's
    assert event_scalars(tmp_path) == expected_scalars(rows)
    for name, steps in served_steps(tmp_path).items():
        if name.startswith("train/"):
            assert steps == [1, 2, 3, 4], name
        elif name.startswith("eval/"):
            assert steps == [2, 4], name
        else:  # the settings: the first run's, then the resumed run's
            assert steps == [1, 3], name


def test_report_to_is_checked(monkeypatch, capsys):
    with pytest.raises(ValueError, match="--report-to must be none or tensorboard, got 'wandb'"):
        TrainConfig(report_to="wandb")
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(["--report-to", "tensorboard"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ('train.py: error: --report-to tensorboard needs the '
                                       'tensorboard package: pip install -e ".[tensorboard]"\n')


def write_run(directory: Path, steps: int, eval_every: int) -> Path:
    directory.mkdir()
    with (directory / "metrics.jsonl").open("w") as metrics:
        for step in range(1, steps + 1):
            row = {"step": step, "loss": 2 + 5 * math.exp(-step / 10),
                   "lr": 3e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))}
            if step % eval_every == 0:
                row.update(eval_loss=row["loss"] + 0.2, eval_ppl=math.exp(row["loss"] + 0.2))
            metrics.write(json.dumps(row) + "\n")
    return directory


def plot_script(*args, missing=None):
    """Run scripts/plot_metrics.py, with the module ``missing`` hidden as if not installed."""
    hide = f"sys.modules[{missing!r}] = None; " if missing else ""
    code = (f"import runpy, sys; {hide}sys.argv = ['plot_metrics.py', *sys.argv[1:]]; "
            f"runpy.run_path({str(PLOT)!r}, run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True, timeout=subprocess_timeout(120))


def test_plot_writes_a_png_for_two_runs(tmp_path):
    pytest.importorskip("matplotlib")
    a, b = write_run(tmp_path / "a", 40, 10), write_run(tmp_path / "b", 25, 5)
    result = plot_script(a, b, "--output", tmp_path / "curves.png")
    assert result.returncode == 0, result.stderr
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", png[16:24]) == (1000, 400)  # 10 × 4 inches at 100 dpi
    assert 25_000 < len(png) < 1_000_000  # an empty pair of axes is about 18 KB


def test_plot_errors_name_the_file_or_the_package(tmp_path):
    pytest.importorskip("matplotlib")  # checked first, before the files
    result = plot_script(tmp_path, "--output", tmp_path / "curves.png")
    assert result.returncode == 2
    assert result.stderr == (f"plot_metrics.py: error: {tmp_path}/metrics.jsonl: no such file "
                             f"(is {tmp_path} a train.py --output directory?)\n")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 7.0}\n{"step": 2,\n')
    result = plot_script(tmp_path, "--output", tmp_path / "curves.png")
    assert result.returncode == 2
    assert result.stderr == f"plot_metrics.py: error: {tmp_path}/metrics.jsonl:2: not JSON\n"
    result = plot_script(tmp_path, "--output", tmp_path / "curves.png", missing="matplotlib")
    assert result.returncode == 2
    assert result.stderr == ('plot_metrics.py: error: plotting needs the matplotlib package: '
                             'pip install -e ".[plot]"\n')
    assert not (tmp_path / "curves.png").exists()
