"""An adapter runs on the base it was trained on: the README's QLoRA generate command, the
recorded base as the default --model, a mismatch named before any weights are built."""
from pathlib import Path

import pytest
import torch

import generate
from lorakernels.adapters import save_peft_adapter
from model.build import random_model
from model.config import Phi3Config
from model.lora import DEFAULT_TARGETS, apply_lora


def write_adapter(directory: Path, base: str = "phi3-tiny", quantize: str = "none") -> Path:
    """A phi3-tiny LoRA adapter (no training needed) recording ``base`` as its base."""
    model = random_model(Phi3Config.from_name("phi3-tiny"), torch.float32, "cpu", 42, quantize)
    apply_lora(model, r=4, lora_alpha=8)
    save_peft_adapter(model, directory, base_model_name_or_path=base,
                      target_modules=list(DEFAULT_TARGETS))
    return directory


@pytest.mark.parametrize("trained_on", ["none", "nf4"])
def test_the_readmes_qlora_generate_command_runs(tmp_path, capsys, trained_on):
    adapter = write_adapter(tmp_path / "final", quantize=trained_on)
    status = generate.main(["--adapter", str(adapter), "--quantize", "nf4", "--prompt", "hi",
                            "--max-new-tokens", "3", "--device", "cpu"])
    assert status == 0 and "Traceback" not in capsys.readouterr().err
