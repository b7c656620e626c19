"""One run per --output: the lock (two real processes), no fresh run over an old one, --overwrite,
--resume on a finished run, stale temporaries, a failed save that leaves nothing behind."""
import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from training.config import TrainConfig
from training.loop import train
from training.run_directory import LOCK_FILE, RunLock
from conftest import subprocess_timeout

ROOT = Path(__file__).resolve().parents[1]
HOLD_LOCK = ("import sys, time; from training.run_directory import RunLock; "
             "lock = RunLock(sys.argv[1]); print('locked', flush=True); time.sleep(60)")


def config(data, output, **overrides):
    options = dict(data=data, output=str(output), device="cpu", max_seq_len=64, batch_size=2,
                   lora_r=4, max_steps=2, seed=3)
    return TrainConfig(**{**options, **overrides})


def train_cli(data, output, *flags):
    return subprocess.run([sys.executable, "train.py", "--data", data, "--output", str(output),
                           "--device", "cpu", "--max-seq-len", "64", "--lora-r", "4",
                           "--max-steps", "2", *flags], capture_output=True, text=True, cwd=ROOT,
                          timeout=subprocess_timeout(120))


def steps(output):
    return [json.loads(line)["step"]
            for line in (Path(output) / "metrics.jsonl").read_text().splitlines()]


def test_a_busy_output_stops_a_second_run_and_a_dead_holder_is_taken_over(data, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = train_cli(data, tmp_path)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert (f"--output {tmp_path} is in use by another run (process {holder.pid}"
                in result.stderr)
        assert not (tmp_path / "metrics.jsonl").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    notes = []
    lock = RunLock(tmp_path, notes.append)  # the kernel released the dead holder's lock
    assert notes and f"from process {holder.pid}, which ended" in notes[0]
    assert (tmp_path / LOCK_FILE).read_text().strip() == str(os.getpid())
    lock.release()
    assert (tmp_path / LOCK_FILE).read_text() == ""


def test_a_fresh_run_never_replaces_an_old_one(data, tmp_path):
    train(config(data, tmp_path, save_every=1), log=lambda _: None)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    result = train_cli(data, tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "already holds a run (checkpoint-1/, final/, metrics.jsonl)" in result.stderr
    assert "pass --resume to continue it or --overwrite to replace it" in result.stderr
    after = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert {k: v for k, v in after.items() if k != LOCK_FILE} == \
        {k: v for k, v in before.items() if k != LOCK_FILE}


def test_overwrite_replaces_only_the_runs_files_and_only_once_training_starts(data, tmp_path):
    train(config(data, tmp_path, max_steps=3, save_every=1), log=lambda _: None)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="--max-seq-len 8"):  # fails before training: nothing moved
        train(config(data, tmp_path, overwrite=True, max_seq_len=8), log=lambda _: None)
    assert steps(tmp_path) == [1, 2, 3] and (tmp_path / "checkpoint-2").exists()
    train(config(data, tmp_path, overwrite=True), log=lambda _: None)
    assert steps(tmp_path) == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE, "final", "metrics.jsonl",
                                                          "notes.txt"]
    with pytest.raises(ValueError, match="give one of them"):
        config(data, tmp_path, overwrite=True, resume="latest")


def test_resume_on_a_finished_run_says_so_and_continues_when_asked(data, tmp_path):
    train(config(data, tmp_path), log=lambda _: None)
    adapter = (tmp_path / "final" / "lora.safetensors").read_bytes()
    notes = []
    summary = train(config(data, tmp_path, resume="latest"), log=notes.append)
    assert summary["finished"] and "finished run (final/ at step 2)" in notes[-1]
    assert (tmp_path / "final" / "lora.safetensors").read_bytes() == adapter
    summary = train(config(data, tmp_path, resume="latest", max_steps=3), log=notes.append)
    assert summary["step"] == 3 and steps(tmp_path) == [1, 2, 3]


def test_stale_temporaries_go_and_a_failed_save_leaves_none(data, tmp_path, monkeypatch):
    import training.checkpoint as checkpoint

    stale = tmp_path / ".checkpoint-5.tmp-999999999"
    stale.mkdir(parents=True)
    (stale / "optimizer.safetensors").write_bytes(b"half")

    def disk_full(tensors, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        train(config(data, tmp_path), log=lambda _: None)
    assert not stale.exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert not (tmp_path / "final").exists()


def test_an_output_that_is_a_file_is_named(data, tmp_path):
    (tmp_path / "out").write_text("")
    result = train_cli(data, tmp_path / "out")
    assert result.returncode == 2 and f"--output {tmp_path / 'out'} is a file" in result.stderr


def test_only_the_temporaries_a_run_writes_are_removed(tmp_path):
    from training.run_directory import remove_stale_temporaries

    ours = [".checkpoint-5.tmp-999999999", ".final.old-999999999", ".final.tmp-12"]
    users = [".notes.old-2024", ".data.tmp-3", ".checkpoint-x.tmp-4", "final.old-5"]
    for name in ours + users:
        (tmp_path / name).mkdir()
    notes = []
    remove_stale_temporaries(tmp_path, notes.append)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(users) and len(notes) == 3
