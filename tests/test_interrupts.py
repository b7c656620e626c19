"""Signals during saves: the first during the final save lets it finish, a second during any
save leaves only whole directories; a directory swap holds signals until both renames are done."""
import signal
from pathlib import Path

import pytest

import training.checkpoint as checkpoint
from lorakernels.weight_files import replace_directory, signals_held
from training.config import TrainConfig
from training.interrupts import Interrupted, stopping_signals
from training.loop import train


def config(data, output, **overrides):
    options = dict(data=data, output=str(output), device="cpu", max_seq_len=64, batch_size=2,
                   lora_r=4, max_steps=3, seed=3)
    return TrainConfig(**{**options, **overrides})


def signal_while_saving(monkeypatch, name: str, times: int, signum=signal.SIGTERM):
    """Send ``signum`` ``times`` times while writing the checkpoint directory ``name``."""
    real = checkpoint.save_lora_state_dict

    def save(model, path, *args, **kwargs):
        if Path(path).parent.name.startswith(f".{name}.tmp-"):
            for _ in range(times):
                signal.raise_signal(signum)
        return real(model, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_lora_state_dict", save)


def entries(output: Path):
    return sorted(p.name for p in output.iterdir() if p.name != ".train.lock")


def test_a_signal_during_the_final_save_lets_it_finish(data, tmp_path, monkeypatch):
    signal_while_saving(monkeypatch, "final", 1)
    notes = []
    summary = train(config(data, tmp_path), log=notes.append)
    assert summary["step"] == 3 and not summary.get("interrupted")
    assert (tmp_path / "final" / "trainer_state.json").is_file()
    assert "note: SIGTERM arrived at the last step or the final save, which finished" in notes


@pytest.mark.parametrize("name, kept", [("checkpoint-2", ["checkpoint-1"]),
                                        ("final", ["checkpoint-1", "checkpoint-2"])])
def test_a_second_signal_during_a_save_leaves_only_whole_directories(data, tmp_path, monkeypatch,
                                                                     name, kept):
    signal_while_saving(monkeypatch, name, 2, signal.SIGINT)
    with pytest.raises(Interrupted):
        train(config(data, tmp_path, save_every=1), log=lambda _: None)
    assert entries(tmp_path) == kept + ["metrics.jsonl"]
    for kept in tmp_path.glob("checkpoint-*"):
        checkpoint.verify_checkpoint(kept)


def test_a_swap_into_place_holds_signals_until_it_is_done(tmp_path):
    seen = []
    with stopping_signals():
        previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(len(seen)))
        try:
            with signals_held():
                signal.raise_signal(signal.SIGINT)
                assert seen == []
            assert seen == [0]
        finally:
            signal.signal(signal.SIGINT, previous)
    (tmp_path / "new").mkdir()
    (tmp_path / "final").mkdir()
    (tmp_path / "new" / "f").write_text("new")
    replace_directory(tmp_path / "new", tmp_path / "final")
    assert entries(tmp_path) == ["final"] and (tmp_path / "final" / "f").read_text() == "new"


def test_a_signal_before_training_stops_at_once():
    with stopping_signals(), pytest.raises(Interrupted) as stopped:
        signal.raise_signal(signal.SIGTERM)
    assert stopped.value.signum == signal.SIGTERM
