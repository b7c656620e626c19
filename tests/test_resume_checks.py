"""Resume that knows what it resumes: fingerprints, damaged checkpoints, torn metrics."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from training.checkpoint import STATE_FILE, verify_checkpoint
from training.config import TrainConfig
from training.loop import train
from conftest import subprocess_timeout

ROOT = Path(__file__).resolve().parents[1]


def config(data, output, **overrides):
    options = dict(data=data, output=str(output), device="cpu", max_seq_len=64, batch_size=2,
                   lora_r=4, max_steps=3, save_every=1, seed=3, lr=3e-3)
    return TrainConfig(**{**options, **overrides})


@pytest.fixture
def stopped_run(data, tmp_path):
    """A run that saved checkpoint-1 and -2 and was killed before its end (no final/)."""
    output = tmp_path / "run"
    train(config(data, output), log=lambda _: None)
    shutil.rmtree(output / "final")
    return output


def test_a_changed_flag_or_data_stops_the_resume_naming_it(data, stopped_run, tmp_path):
    changed = tmp_path / "changed.jsonl"
    changed.write_text(Path(data).read_text().replace("5", "6"))
    result = subprocess.run([sys.executable, "train.py", "--data", str(changed),
                             "--output", str(stopped_run), "--device", "cpu", "--max-seq-len", "64",
                             "--batch-size", "2", "--lora-r", "4",
                             "--max-steps", "3", "--save-every", "1", "--seed", "3", "--lr", "0.01",
                             "--resume"], capture_output=True, text=True, cwd=ROOT,
                             timeout=subprocess_timeout(120))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"--resume {stopped_run / 'checkpoint-2'}: this run differs" in result.stderr
    assert "--lr: 0.003 → 0.01" in result.stderr
    assert "the data (the --data file's contents differ)" in result.stderr
    assert "--allow-changed-resume" in result.stderr and not (stopped_run / "final").exists()

    notes = []
    summary = train(config(data, stopped_run, lr=0.01, resume="latest", allow_changed_resume=True),
                    log=notes.append)
    assert summary["step"] == 3
    assert any("continuing with --lr: 0.003 → 0.01" in n for n in notes)
    assert any("the checkpoint's peak learning rate 0.003 is used, not --lr 0.01" in n
               for n in notes)


def test_a_damaged_newest_checkpoint_falls_back_and_a_torn_metrics_line_is_dropped(data,
                                                                                   stopped_run):
    optimizer = stopped_run / "checkpoint-2" / "optimizer.safetensors"
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # truncated
    with (stopped_run / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"step": 3, "lo')  # killed mid-write
    notes = []
    summary = train(config(data, stopped_run, resume="latest"), log=notes.append)
    assert summary["step"] == 3
    assert any(f"skipping a damaged checkpoint: {optimizer}: damaged" in n for n in notes)
    assert any(f"resumed from {stopped_run / 'checkpoint-1'} at step 1" in n for n in notes)
    assert any("dropped a torn last line" in n for n in notes)
    steps = [json.loads(line)["step"]
             for line in (stopped_run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_a_damaged_checkpoint_named_on_resume_is_an_error(data, stopped_run):
    (stopped_run / "checkpoint-2" / STATE_FILE).write_text("")
    with pytest.raises(ValueError,
                       match=f"{stopped_run / 'checkpoint-2' / STATE_FILE}: empty or not JSON"):
        verify_checkpoint(stopped_run / "checkpoint-2")
    with pytest.raises(ValueError, match="empty or not JSON"):
        train(config(data, stopped_run, resume=str(stopped_run / "checkpoint-2")),
              log=lambda _: None)


def edit_state(directory: Path, edit) -> None:
    state = json.loads((directory / STATE_FILE).read_text())
    edit(state)
    (directory / STATE_FILE).write_text(json.dumps(state))


@pytest.mark.parametrize("damage, message", [
    (lambda s: s.pop("scheduler"), "no scheduler state recorded"),
    (lambda s: s.update(scheduler="garbage"), "no scheduler state recorded"),
    (lambda s: s.update(param_groups=[{"lr": 1}]), "no optimizer param_groups recorded"),
])
def test_damaged_resume_state_is_named_and_the_checkpoint_before_used(data, stopped_run, damage,
                                                                      message):
    edit_state(stopped_run / "checkpoint-2", damage)
    notes = []
    assert train(config(data, stopped_run, resume="latest"), log=notes.append)["step"] == 3
    assert any(f"skipping a damaged checkpoint: {stopped_run / 'checkpoint-2' / STATE_FILE}: "
               f"{message}" in n for n in notes)


def test_edited_param_groups_are_named(data, stopped_run):
    def add_a_parameter(state):
        state["param_groups"][0]["params"].append(999)

    edit_state(stopped_run / "checkpoint-2", add_a_parameter)
    with pytest.raises(ValueError, match=r"checkpoint-2/trainer_state.json or optimizer"
                                         r".safetensors: the optimizer or scheduler state does "
                                         r"not fit this run"):
        train(config(data, stopped_run, resume=str(stopped_run / "checkpoint-2")),
              log=lambda _: None)


@pytest.mark.parametrize("line, message", [
    (b"[1, 2]\n", ":2: not a metrics row"),
    (b'{"step": "two"}\n', ":2: not a metrics row"),
    (b'{"step": 1, "loss": "\xff"}\n', ": not UTF-8 text"),
])
def test_damaged_metrics_are_named(data, stopped_run, line, message):
    metrics = stopped_run / "metrics.jsonl"
    rows = metrics.read_bytes().splitlines(keepends=True)
    metrics.write_bytes(rows[0] + line + b"".join(rows[1:]))
    with pytest.raises(ValueError, match=f"{metrics}{message}"):
        train(config(data, stopped_run, resume="latest"), log=lambda _: None)
    assert metrics.read_bytes().startswith(rows[0] + line)  # left as it was


def test_resume_past_max_steps_is_refused(data, stopped_run):
    with pytest.raises(ValueError, match=r"checkpoint-2: the checkpoint is at step 2, and "
                                         r"--max-steps \(or --epochs\) gives 2: pass a --max-steps "
                                         r"above 2"):
        train(config(data, stopped_run, resume="latest", max_steps=2), log=lambda _: None)
    assert not (stopped_run / "final").exists()
