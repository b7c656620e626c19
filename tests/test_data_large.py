"""Data at its limits through train.py: a single 50 MB JSON Lines record trains (or fails in one
line naming file:line) in seconds; reading and tokenizing that take a while show a progress
bar on stderr."""
import json
import time

import pytest

import train as train_script
import training.data_sources as data_sources
from model.tokenizer import load_tokenizer
from training.config import TrainConfig
from training.data import prepare_rows, read_train_and_eval

REPLY = "ab " * 16_700_000  # 50.1 MB


def train_on(path, tmp_path, capsys):
    """train.py's exit status (a SystemExit's code for an error), its stderr and seconds."""
    started = time.perf_counter()
    try:
        status = train_script.main(["--data", str(path), "--output", str(tmp_path / "run"),
                                    "--data-cache", "none", "--device", "cpu", "--max-steps", "1",
                                    "--max-seq-len", "64", "--batch-size", "1", "--lora-r", "4"])
    except SystemExit as stop:
        status = stop.code
    return status, capsys.readouterr().err, time.perf_counter() - started


def test_a_50_mb_line_trains_in_seconds(tmp_path, capsys):
    path = tmp_path / "huge.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Repeat ab."},
                                             {"role": "assistant", "content": REPLY}]}) + "\n")
    assert path.stat().st_size > 50_000_000
    status, err, seconds = train_on(path, tmp_path, capsys)
    assert status == 0 and "Traceback" not in err
    assert seconds < 20  # about 2 s on an idle 2-core host; loose for a loaded one


def test_a_broken_50_mb_line_is_one_line_naming_it(tmp_path, capsys):
    path = tmp_path / "huge.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                    {"role": "assistant", "content": "Hello"}]})
    path.write_text(good + "\n" + '{"messages": [{"role": "user", "content": "' + REPLY + "\n")
    status, err, seconds = train_on(path, tmp_path, capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1, err[-500:]
    assert f"{path}:2: not JSON" in err and seconds < 20


@pytest.fixture
def no_progress_delay(monkeypatch):
    monkeypatch.setattr(data_sources, "PROGRESS_DELAY_S", 0)


def test_reading_and_tokenizing_show_progress(tmp_path, capsys, no_progress_delay):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Say {i}"}, {"role": "assistant", "content": str(i)}]}) + "\n"
        for i in range(50)))
    config = TrainConfig(data=str(path), data_cache="none", max_seq_len=64)
    train, _ = read_train_and_eval(config, log=lambda _: None)
    prepare_rows(train, load_tokenizer(), config)
    err = capsys.readouterr().err
    assert "read data" in err and "50rec" in err.replace(" ", "")
    assert "tokenize" in err and "50/50" in err


def test_no_bar_before_the_delay(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Hello"}]}) + "\n")
    config = TrainConfig(data=str(path), data_cache="none", max_seq_len=64)
    prepare_rows(read_train_and_eval(config, log=lambda _: None)[0], load_tokenizer(), config)
    assert capsys.readouterr().err == ""
