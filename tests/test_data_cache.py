"""The tokenized-data cache through train.py: a second run and a resume on the same data read it
and tokenize nothing; any part of its key changed misses it; the suite's cache is a temporary
folder."""
import json
import shutil
import tempfile
from pathlib import Path

import pytest

import train as train_script
from model.chat import ChatEncoder
from model.tokenizer import load_tokenizer
from training.config import TrainConfig
from training.data import prepare_rows
from training.data_cache import cache_directory

TOKENIZER = load_tokenizer()


@pytest.fixture
def encodes(monkeypatch):
    """How many times conversations were tokenized (each ChatEncoder batch is one)."""
    calls = []
    real = ChatEncoder.encode_ranges
    monkeypatch.setattr(ChatEncoder, "encode_ranges",
                        lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    return calls


def run(data, output, cache, *extra):
    assert train_script.main(["--data", data, "--output", str(output), "--data-cache", str(cache),
                              "--device", "cpu", "--max-steps", "2", "--max-seq-len", "128",
                              "--batch-size", "2", "--lora-r", "4", *extra]) == 0


def test_second_run_and_resume_read_the_cache(data, tmp_path, encodes):
    cache = tmp_path / "cache"
    run(data, tmp_path / "first", cache, "--save-every", "1")
    assert len(encodes) == 1 and len(list(cache.glob("tokenized-*.safetensors"))) == 1
    second = tmp_path / "second"
    run(data, second, cache, "--save-every", "1", "--max-steps", "3")
    shutil.rmtree(second / "final")  # as if killed during step 3
    run(data, second, cache, "--save-every", "1", "--max-steps", "3", "--resume")
    assert (second / "final").is_dir()
    assert len(encodes) == 1  # neither the second run nor the resume tokenized
    run(data, tmp_path / "longer", cache, "--max-seq-len", "256")
    assert len(encodes) == 2 and len(list(cache.glob("tokenized-*.safetensors"))) == 2


def test_any_key_change_misses(tmp_path, encodes):
    path = tmp_path / "d.jsonl"
    record = {"messages": [{"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello there"}]}
    path.write_text(json.dumps(record) + "\n")
    config = TrainConfig(data=str(path), data_cache=str(tmp_path / "cache"), max_seq_len=128)
    prepare_rows(str(path), TOKENIZER, config)
    prepare_rows(str(path), TOKENIZER, config)
    assert len(encodes) == 1
    record["messages"][1]["content"] = "Hello here"  # the data's contents
    path.write_text(json.dumps(record) + "\n")
    prepare_rows(str(path), TOKENIZER, config)
    assert len(encodes) == 2
    other = load_tokenizer()  # the chat template (part of the tokenizer's digest)
    other.chat_template = other.chat_template.replace("<|end|>", "<|end|>\n", 1)
    prepare_rows(str(path), other, config)
    assert len(encodes) == 3
    for change in ({"max_seq_len": 64}, {"packing": False}, {"train_on_prompt": True}):
        prepare_rows(str(path), TOKENIZER, TrainConfig(**{**vars(config), **change}))
    assert len(encodes) == 6


def test_the_suite_caches_in_a_temporary_folder(monkeypatch, tmp_path):
    """conftest points HF_DATASETS_CACHE (which --data-cache auto honours) at a temporary
    folder, for train.py processes too."""
    assert cache_directory("auto").is_relative_to(Path(tempfile.gettempdir()))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path))
    assert cache_directory("auto") == tmp_path / "lorakernels-tokenized"
    monkeypatch.delenv("HF_DATASETS_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf"))
    assert cache_directory("auto") == tmp_path / "hf" / "datasets" / "lorakernels-tokenized"
