"""Runs that must not look like success: divergence, nothing to learn, metrics that are not JSON."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from training.config import TrainConfig
from training.divergence import TrainingDiverged
from training.loop import train
from conftest import subprocess_timeout

ROOT = Path(__file__).resolve().parents[1]


def config(data, output, **overrides):
    options = dict(data=data, output=str(output), device="cpu", max_seq_len=64, batch_size=2,
                   lora_r=4, max_steps=3, seed=3)
    return TrainConfig(**{**options, **overrides})


def metrics(output):
    return [json.loads(line) for line in (Path(output) / "metrics.jsonl").read_text().splitlines()]


def test_divergence_stops_keeps_the_last_checkpoint_and_writes_no_final(data, tmp_path):
    result = subprocess.run([sys.executable, "train.py", "--data", data, "--output", str(tmp_path),
                             "--device", "cpu", "--max-seq-len", "64", "--lora-r", "4",
                             "--max-steps", "3",
                             "--lr", "1e30", "--save-every", "1", "--warmup-ratio", "0"],
                            capture_output=True, text=True, cwd=ROOT,
                            timeout=subprocess_timeout(120))
    assert result.returncode == 1, result.stderr
    assert "training diverged" in result.stderr and "Traceback" not in result.stderr
    # Step 1 is finite and saved; its update overflows, so step 2's loss is not.
    assert "step 2:" in result.stderr and f"{tmp_path / 'checkpoint-1'}" in result.stderr
    assert not (tmp_path / "final").exists() and not (tmp_path / "checkpoint-2").exists()
    assert [row["step"] for row in metrics(tmp_path)] == [1]


def test_weights_that_are_not_finite_are_never_saved(data, tmp_path, monkeypatch):
    """An update that overflows the weights on the last step: no loss ever saw it."""
    import torch

    class OverflowingAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            super().step(closure)
            self.param_groups[0]["params"][0].data.fill_(float("inf"))

    monkeypatch.setattr(torch.optim, "AdamW", OverflowingAdamW)
    with pytest.raises(TrainingDiverged, match="step 1: the LoRA weights are no longer finite"):
        train(config(data, tmp_path, max_steps=1), log=lambda _: None)
    assert not (tmp_path / "final").exists()


def test_non_finite_flags_are_refused():
    with pytest.raises(ValueError, match="--lr must be a finite number"):
        TrainConfig(lr=float("inf"))


def test_metrics_are_strict_json_without_clipping(data, tmp_path):
    train(config(data, tmp_path, max_steps=2, max_grad_norm=0.0), log=lambda _: None)
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and all(row["grad_norm"] > 0 for row in metrics(tmp_path))


def test_data_without_target_tokens_is_refused_naming_max_seq_len(data, tmp_path):
    with pytest.raises(ValueError,
                       match="no target tokens left after truncating .* --max-seq-len 8"):
        train(config(data, tmp_path, max_seq_len=8), log=lambda _: None)
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "final").exists()
