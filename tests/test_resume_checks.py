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
    result = subprocess.run([sys.executable, "train.py", "--data", str(changed), "--output", str(stopped_run),
                             "--device", "cpu", "--max-seq-len", "64", "--batch-size", "2", "--lora-r", "4",
                             "--max-steps", "3", "--save-every", "1", "--seed", "3", "--lr", "0.01",
                             "--resume"], capture_output=True, text=True, cwd=ROOT,
                             timeout=subprocess_timeout(120))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"--resume {stopped_run / 'checkpoint-2'}: this run differs" in result.stderr
    assert "--lr: 0.003 → 0.01" in result.stderr and "the data (the --data file's contents differ)" in result.stderr
    assert "--allow-changed-resume" in result.stderr and not (stopped_run / "final").exists()

    notes = []
    summary = train(config(data, stopped_run, lr=0.01, resume="latest", allow_changed_resume=True),
                    log=notes.append)
    assert summary["step"] == 3
    assert any("continuing with --lr: 0.003 → 0.01" in n for n in notes)
    assert any("the checkpoint's peak learning rate 0.003 is used, not --lr 0.01" in n for n in notes)


def test_a_damaged_newest_checkpoint_falls_back_and_a_torn_metrics_line_is_dropped(data, stopped_run):
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
    steps = [json.loads(line)["step"] for line in (stopped_run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_a_damaged_checkpoint_named_on_resume_is_an_error(data, stopped_run):
    (stopped_run / "checkpoint-2" / STATE_FILE).write_text("")
    with pytest.raises(ValueError, match=f"{stopped_run / 'checkpoint-2' / STATE_FILE}: empty or not JSON"):
        verify_checkpoint(stopped_run / "checkpoint-2")
    with pytest.raises(ValueError, match="empty or not JSON"):
        train(config(data, stopped_run, resume=str(stopped_run / "checkpoint-2")), log=lambda _: None)
