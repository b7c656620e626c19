"""train.py under torchrun: 2 CPU processes (gloo) equal one process with the same global batch."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training.config import TrainConfig
from training.loop import train
from conftest import subprocess_timeout

ROOT = Path(__file__).resolve().parents[1]
COMMON = dict(device="cpu", max_seq_len=128, lora_r=4, lora_alpha=8, lora_dropout=0.0, lr=3e-3,
              seed=3, max_steps=4, log_every=1)



def torchrun(data, output, batch_size, **extra):
    flags = {**COMMON, "batch_size": batch_size, **extra}
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            str(ROOT / "train.py"), "--data", data, "--output", str(output)]
    for name, value in flags.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    result = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT,
                            timeout=subprocess_timeout(600))
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def metrics(output):
    return [json.loads(line) for line in (Path(output) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process_with_the_same_global_batch(data, tmp_path, strategy):
    torchrun(data, tmp_path / "ddp", batch_size=2, strategy=strategy, eval_data=data, eval_every=2)
    train(TrainConfig(data=data, output=str(tmp_path / "single"), batch_size=4, **COMMON),
          log=lambda _: None)
    ddp = [r for r in metrics(tmp_path / "ddp") if "loss" in r]
    single = metrics(tmp_path / "single")
    assert [r["step"] for r in ddp] == [1, 2, 3, 4]  # one writer: rank 0
    assert [r["step"] for r in metrics(tmp_path / "ddp") if "eval_loss" in r] == [2, 4]
    for a, b in zip(ddp, single):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)  # token normalisation
    got, want = load_file(str(tmp_path / "ddp" / "final" / "lora.safetensors")), \
        load_file(str(tmp_path / "single" / "final" / "lora.safetensors"))
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_checkpoint_from_two_ranks_resumes_on_one(data, tmp_path, strategy):
    torchrun(data, tmp_path / "ddp", batch_size=2, save_every=2, strategy=strategy)
    assert (tmp_path / "ddp" / "checkpoint-2" / "adapter_model.safetensors").exists()
    summary = train(TrainConfig(data=data, output=str(tmp_path / "one"), batch_size=4,
                                resume=str(tmp_path / "ddp" / "checkpoint-2"), **COMMON),
                    log=lambda _: None)
    assert summary["step"] == 4
    got, want = load_file(str(tmp_path / "one" / "final" / "lora.safetensors")), \
        load_file(str(tmp_path / "ddp" / "final" / "lora.safetensors"))
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-3, atol=1e-4)


def test_one_process_resumes_into_two_fsdp_ranks(data, tmp_path):
    train(TrainConfig(data=data, output=str(tmp_path / "one"), batch_size=4, save_every=2,
                      **COMMON),
          log=lambda _: None)
    torchrun(data, tmp_path / "fsdp", batch_size=2, strategy="fsdp",
             resume=str(tmp_path / "one" / "checkpoint-2"))
    got, want = load_file(str(tmp_path / "fsdp" / "final" / "lora.safetensors")), \
        load_file(str(tmp_path / "one" / "final" / "lora.safetensors"))
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-3, atol=1e-4)


def test_global_batch_must_divide_over_processes(data, tmp_path):
    flags = {**COMMON, "global_batch_size": 3}
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            str(ROOT / "train.py"), "--data", data, "--output", str(tmp_path)]
    for name, value in flags.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    result = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT,
                            timeout=subprocess_timeout(300))
    assert result.returncode != 0
    assert ("--global-batch-size 3 does not divide over 2 processes × --grad-accum 1"
            in result.stderr)


def test_global_batch_sets_the_per_process_batch(data, tmp_path):
    torchrun(data, tmp_path / "global", batch_size=1, global_batch_size=4)
    train(TrainConfig(data=data, output=str(tmp_path / "single"), batch_size=4, **COMMON),
          log=lambda _: None)
    for a, b in zip(metrics(tmp_path / "global"), metrics(tmp_path / "single")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
