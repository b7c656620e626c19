"""One line naming the file or flag for every user error; exit 2 for usage and data, 1 for runtime
failures, 130 for Ctrl-C; merge.py's outputs whole, with the umask's permissions and the run's
seed."""
import json
import os
import signal
from pathlib import Path

import pytest
import torch

import generate
import merge
import train as train_cli
import training.loop as loop
from lorakernels.weight_files import atomic_write
from adapter_base import preset_seed
from training.config import TrainConfig
from training.data import read_chats
from training.loop import train

ROOT = Path(__file__).resolve().parents[1]
CHAT = ('{"messages": [{"role": "user", "content": "Hi"}, '
        '{"role": "assistant", "content": "Hello"}]}\n')


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(TrainConfig(data=str(ROOT / "examples" / "chat.jsonl"), output=str(out), max_steps=2,
                      device="cpu", max_seq_len=64, lora_r=4, seed=5), log=lambda _: None)
    return out / "final"


def train_main(capsys, *argv):
    try:
        status = train_cli.main([*map(str, argv)])
    except SystemExit as stopped:
        status = stopped.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return status, err


def exits(capsys, main, *argv):
    with pytest.raises(SystemExit) as stopped:
        main([*map(str, argv)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return stopped.value.code, err


@pytest.mark.parametrize("flags, message", [
    (["--device", "tpu"], "--device tpu: unknown device; use auto, cpu, cuda or cuda:N"),
    (["--lora-alpha", "-1"], "--lora-alpha must be positive, got -1.0"),
    (["--model", "phi3-tiyn"], "--model phi3-tiyn: not a preset, a directory or a model in the hub "
                               "cache (did you mean phi3-tiny?)"),
])
def test_train_usage_errors_are_one_line(capsys, tmp_path, data, flags, message):
    status, err = train_main(capsys, "--data", data, "--output", tmp_path / "out", *flags)
    assert status == 2 and err == f"train.py: error: {message}\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_cuda_without_a_gpu_is_refused_at_parse_time(capsys, tmp_path):
    status, err = train_main(capsys, "--device", "cuda", "--output", tmp_path)
    assert status == 2 and "--device cuda: no CUDA GPU is visible" in err
    code, err = exits(capsys, generate.main, "--device", "cuda", "--prompt", "hi")
    assert code == 2 and "--device cuda: no CUDA GPU is visible" in err


@pytest.mark.parametrize("flags, message", [
    (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["--temperature", "-1"], "--temperature must be 0 (greedy) or from 0.001, got -1.0"),
    (["--temperature", "1e-40"], "--temperature must be 0 (greedy) or from 0.001, got 1e-40"),
    (["--prompt", "hi \udcff"], "--prompt is not valid UTF-8 text"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be positive, got 0"),
])
def test_generate_ranges(capsys, flags, message):
    code, err = exits(capsys, generate.main, "--prompt", "hi", *flags)
    assert code == 2 and err.endswith(f"generate.py: error: {message}\n")


def test_data_encoding_and_layout(tmp_path):
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + CHAT.encode())
    assert read_chats(bom)[0][1]["content"] == "Hello"
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(CHAT.encode() + CHAT.replace("Hello", "Caf\xe9").encode("latin-1"))
    with pytest.raises(ValueError, match=f"{latin}:2: not UTF-8 \\(byte 0xe9 at column"):
        read_chats(latin)
    pretty = tmp_path / "pretty.jsonl"  # a .json file is read as JSON
    pretty.write_text(json.dumps(json.loads(CHAT), indent=2))
    with pytest.raises(ValueError,
                       match=f"{pretty}:1: not JSON .*one whole .* per line .*pretty-printed"):
        read_chats(pretty)


def test_damaged_files_are_named(capsys, tmp_path, data, adapter):
    damaged = tmp_path / "adapter"
    damaged.mkdir()
    for f in adapter.iterdir():
        (damaged / f.name).write_bytes(f.read_bytes())
    weights = damaged / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    code, err = exits(capsys, generate.main, "--adapter", damaged, "--prompt", "hi",
                      "--device", "cpu")
    assert code == 2 and f"{weights}: damaged, not a whole safetensors file" in err
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text("{not json")
    status, err = train_main(capsys, "--data", data, "--output", tmp_path / "out",
                             "--device", "cpu", "--tokenizer", tokenizer)
    assert status == 2 and f"{tokenizer}: not a readable tokenizer.json" in err


@pytest.mark.parametrize("signum, status", [
    (signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_a_signal_saves_a_checkpoint_and_exits_128_plus_it(capsys, tmp_path, data, monkeypatch,
                                                           signum, status):
    real, calls = loop.token_loss_sum, {"n": 0}
    name, before = signal.Signals(signum).name, signal.getsignal(signum)
    if before is signal.SIG_IGN:
        pytest.skip(f"{name} is ignored here (nohup)")

    def interrupt(times):
        def loss(model, batch):
            calls["n"] += 1
            if calls["n"] == 2:
                for _ in range(times):
                    signal.raise_signal(signum)
            return real(model, batch)
        return loss

    flags = ["--data", data, "--device", "cpu", "--max-seq-len", "64", "--lora-r", "4",
             "--max-steps", "4"]
    monkeypatch.setattr(loop, "token_loss_sum", interrupt(1))
    assert train_cli.main([*flags, "--output", str(tmp_path / "once")]) == status
    saved = tmp_path / "once" / "checkpoint-2"
    assert f"\ninterrupted by {name}: saved {saved} at step 2" in "\n" + capsys.readouterr().out
    assert (saved / "trainer_state.json").is_file() and not (tmp_path / "once" / "final").exists()
    calls["n"] = 0
    monkeypatch.setattr(loop, "token_loss_sum", interrupt(2))  # the second stops at once
    code, err = train_main(capsys, *flags, "--output", tmp_path / "twice")
    assert code == status and err.endswith(f"\ntrain.py: interrupted by {name}: stopped at once; "
                                           f"checkpoints saved before are intact\n")
    assert signal.getsignal(signum) is before


def test_ctrl_c_in_chat_exits_130(capsys, adapter, monkeypatch):
    class Keyboard:
        def __iter__(self):
            raise KeyboardInterrupt
    monkeypatch.setattr("sys.stdin", Keyboard())
    code, err = exits(capsys, generate.main, "--adapter", adapter, "--chat", "--device", "cpu")
    assert code == 130 and err.endswith("\ngenerate.py: interrupted\n")


def test_merge_writes_a_whole_checkpoint_with_the_runs_seed(capsys, tmp_path, adapter):
    assert preset_seed("phi3-tiny", adapter, None) == 5
    assert preset_seed("phi3-tiny", adapter, 7) == 7
    output = tmp_path / "merged"
    output.mkdir()
    stale = ["model-00001-of-00002.safetensors", "model.safetensors.index.json"]
    for name in stale:
        (output / name).write_text("old")
    code, err = exits(capsys, merge.main, "--adapter", adapter, "--output", output)
    assert code == 2 and f"--output {output} is not empty; pass --overwrite" in err
    assert sorted(p.name for p in output.iterdir()) == sorted(stale)
    old_umask = os.umask(0o027)
    try:
        assert merge.main(["--adapter", str(adapter), "--output", str(output), "--overwrite"]) == 0
    finally:
        os.umask(old_umask)
    assert "(seed 5)" in capsys.readouterr().out
    assert sorted(p.name for p in output.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]
    assert (output / "model.safetensors").stat().st_mode & 0o777 == 0o640
    assert not list(tmp_path.glob(".merged.*"))


def test_atomic_write_follows_the_umask(tmp_path):
    old_umask = os.umask(0o022)
    try:
        atomic_write(tmp_path / "f", lambda tmp: Path(tmp).write_text("x"))
    finally:
        os.umask(old_umask)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o644


def test_merge_never_writes_over_the_adapters_run_or_the_working_directory(
        capsys, tmp_path, adapter, monkeypatch):
    run = adapter.parent
    before = sorted(p.name for p in run.iterdir())
    for output in (adapter, run, run / "checkpoint-9" / "merged", run.parent):
        code, err = exits(capsys, merge.main, "--adapter", adapter, "--output", output,
                          "--overwrite")
        assert code == 2 and f"--output {output} overlaps the adapter's run {run}" in err
    monkeypatch.chdir(tmp_path)
    for output in (".", ""):
        code, err = exits(capsys, merge.main, "--adapter", adapter, "--output", output,
                          "--overwrite")
        assert code == 2 and "is or contains the current directory" in err
    assert sorted(p.name for p in run.iterdir()) == before and list(tmp_path.iterdir()) == []


def test_max_new_tokens_is_checked_against_the_context(capsys, adapter):
    code, err = exits(capsys, generate.main, "--adapter", adapter, "--prompt", "hi",
                      "--max-new-tokens", "1000000000", "--device", "cpu")
    assert code == 2 and err.endswith("generate.py: error: --max-new-tokens 1000000000 is beyond "
                                      "the model's context of 4096 tokens\n")


def test_a_prompt_longer_than_the_context_warns(capsys, adapter):
    assert generate.main(["--adapter", str(adapter), "--prompt", "hi " * 4000, "--device", "cpu",
                          "--max-new-tokens", "1"]) == 0
    assert "warning: the prompt (" in capsys.readouterr().err


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                 "allocate memory: you tried to allocate 819200000 bytes."),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    MemoryError(),
])
def test_out_of_memory_is_one_line_naming_the_batch_flags(capsys, monkeypatch, tmp_path, error):
    def run_out(config, log=print):
        raise error

    monkeypatch.setattr(loop, "train", run_out)
    status, err = train_main(capsys, "--batch-size", 200000, "--output", tmp_path / "run")
    assert status == 1
    assert "error: out of memory with --batch-size 200000 x --max-seq-len 512" in err
    assert len(err.strip().splitlines()) == 1


def test_other_runtime_errors_are_not_called_out_of_memory(capsys, monkeypatch, tmp_path):
    def fail(config, log=print):
        raise RuntimeError("a bug")

    monkeypatch.setattr(loop, "train", fail)
    with pytest.raises(RuntimeError, match="a bug"):
        train_cli.main(["--output", str(tmp_path / "run")])


def test_a_template_whose_turns_end_in_a_plain_token_is_refused(capsys, tmp_path, data):
    """Replies would learn to end on "\\n", and generation would never stop on it."""
    from model.tokenizer import load_tokenizer

    load_tokenizer().save_pretrained(tmp_path / "tok")
    config = tmp_path / "tok" / "tokenizer_config.json"
    values = json.loads(config.read_text())
    values["chat_template"] = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                               "{% endfor %}")
    config.write_text(json.dumps(values))
    status, err = train_main(capsys, "--data", data, "--tokenizer", tmp_path / "tok",
                             "--output", tmp_path / "run", "--max-steps", 1, "--device", "cpu")
    assert status == 2
    assert "an assistant turn ends with '\\n', not a special token" in err
    assert not (tmp_path / "run" / "final").exists()
