"""An adapter runs on the base it was trained on: the README's QLoRA generate command, the
recorded base as the default --model, a mismatch named before any weights are built."""
import time
from pathlib import Path

import pytest
import torch

import generate
import merge
import model.build as build
from lorakernels.adapters import save_peft_adapter
from adapter_base import resolve_base_model
from model.build import random_model, recorded_name
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


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A phi3-tiny checkpoint directory (its own weights, not the preset's)."""
    from model.tokenizer import load_tokenizer

    directory = tmp_path_factory.mktemp("base")
    base = random_model(Phi3Config.from_name("phi3-tiny"), torch.float32, "cpu", 7)
    base.save_pretrained(directory)
    load_tokenizer().save_pretrained(directory)
    return directory


def test_the_recorded_base_is_the_default_model(tmp_path, checkpoint, capsys):
    on_checkpoint = write_adapter(tmp_path / "a", str(checkpoint))
    assert resolve_base_model(None, on_checkpoint) == str(checkpoint)
    hub = write_adapter(tmp_path / "b", "microsoft/Phi-3-mini-4k-instruct")
    assert resolve_base_model(None, hub) == "microsoft/Phi-3-mini-4k-instruct"
    assert resolve_base_model(None, None) == "phi3-tiny"
    output = tmp_path / "merged"
    assert merge.main(["--adapter", str(tmp_path / "a"), "--output", str(output)]) == 0
    assert f"into {checkpoint} " in capsys.readouterr().out
    gone = write_adapter(tmp_path / "c", str(tmp_path / "deleted-base"))
    with pytest.raises(ValueError, match=f"records base {tmp_path / 'deleted-base'}, which is "
                                         "not a preset, a directory here or a hub id"):
        resolve_base_model(None, gone)


def test_a_directory_base_is_recorded_by_its_absolute_path(checkpoint, monkeypatch):
    monkeypatch.chdir(checkpoint.parent)
    assert recorded_name(checkpoint.name) == str(checkpoint)
    assert recorded_name("phi3-tiny") == "phi3-tiny"
    assert recorded_name("microsoft/phi-4") == "microsoft/phi-4"


def test_a_model_that_is_not_the_recorded_base_stops_before_any_weights(
        tmp_path, checkpoint, capsys, monkeypatch):
    adapter = write_adapter(tmp_path / "a")
    monkeypatch.setattr(build, "random_model", None)  # building any weights would fail
    started = time.perf_counter()
    code = run_main(generate.main, "--adapter", adapter, "--model", "phi3-mini-4k",
                    "--prompt", "hi")
    err = capsys.readouterr().err
    assert code == 2 and time.perf_counter() - started < 5 and err.count("\n") == 1
    assert err.endswith(f"generate.py: error: --model phi3-mini-4k is not the base the adapter was "
                        f"trained on: {adapter / 'adapter_config.json'} records phi3-tiny "
                        f"(vocab_size 32064 vs 1088; hidden_size 3072 vs 256; intermediate_size "
                        f"8192 vs 688); pass --model phi3-tiny, or --allow-base-mismatch to use "
                        f"phi3-mini-4k anyway\n")
    for model, recorded in ((str(checkpoint), "phi3-tiny"), ("phi3-tiny", str(checkpoint))):
        with pytest.raises(ValueError, match="a preset's random weights are not"):
            resolve_base_model(model, write_adapter(tmp_path / "b", recorded))
    notes = []
    assert resolve_base_model("phi3-mini-4k", adapter, True, notes.append) == "phi3-mini-4k"
    assert notes == ["note: --allow-base-mismatch: using --model phi3-mini-4k, not the recorded "
                     "phi3-tiny"]
    copy = tmp_path / "copy"  # the same architecture in another directory: the same base
    copy.mkdir()
    (copy / "config.json").write_bytes((checkpoint / "config.json").read_bytes())
    same = write_adapter(tmp_path / "c", str(checkpoint))
    assert resolve_base_model(str(copy), same) == str(copy)


def run_main(main, *argv):
    try:
        return main([*map(str, argv)])
    except SystemExit as stopped:
        return stopped.code
