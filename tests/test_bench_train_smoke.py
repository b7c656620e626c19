"""benchmarks/bench_train.py: it times train.py's own step (training.loop.training_step) on
train.py's packed batches, every provider trains, and their step-1 losses agree on the same
conversations."""
import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import checkout_env, subprocess_timeout

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"
PROVIDERS = {"hf_peft", "ours_eager", "ours_fused"}


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module, imported as its scripts import their neighbours."""
    if str(SCRIPT.parent) not in sys.path:  # as when run as a script: Python adds its folder
        sys.path.insert(0, str(SCRIPT.parent))
    return importlib.import_module(name)


def train_py_batches(spec: dict):
    """The batches train.py builds for the benchmark's settings, rebuilt here from training/
    (with the tiny tokenizer, which the benchmark's base carries)."""
    from model.tokenizer import load_tokenizer
    from training.data import MicroBatches
    from training.data import prepare_rows
    from training.loop import batch_length_rule

    config = load_benchmark("train_worker").train_config(spec)
    assert config.packing and config.grad_accum == 1  # train.py's defaults
    tokenizer = load_tokenizer()
    rows, _ = prepare_rows(spec["data"], tokenizer, config)
    return MicroBatches(rows, config.batch_size, config.seed, tokenizer.pad_id,
                        pad_to=batch_length_rule(config, torch.device(config.device)))


def data_tokens(batch: dict) -> int:
    return int((batch["segment_ids"] >= 0).sum())


def test_smoke_run_writes_rows_with_agreeing_losses(tmp_path):
    pytest.importorskip("peft")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out-dir", str(tmp_path),
         "--providers", *sorted(PROVIDERS)],
        capture_output=True, text=True, timeout=subprocess_timeout(300), env=checkout_env(),
    )
    assert result.returncode == 0, result.stdout + result.stderr

    [json_path] = tmp_path.glob("train_*_smoke.json")
    data = json.loads(json_path.read_text())
    settings = data["settings"]
    assert settings["smoke"] is True and data["loss_check"]["passed"] is True
    assert settings["packing"] is True and settings["data"] == "examples/chat.jsonl"
    rows = {row["provider"]: row for row in data["rows"]}
    assert set(rows) == PROVIDERS and len(data["rows"]) == len(PROVIDERS)
    assert len({row["trainable_parameters"] for row in rows.values()}) == 1
    tol = data["loss_check"]["tolerance"]
    reference = rows["hf_peft"]
    for row in rows.values():
        assert row["error"] is None and row["tokens_per_s"] > 0 and row["ms_per_step"] > 0
        assert len(row["step_ms"]) == len(row["step_data_tokens"]) == settings["steps"]
        assert row["tokens_per_s"] == pytest.approx(
            sum(row["step_data_tokens"]) / (sum(row["step_ms"]) * 1e-3))
        assert len(row["check_losses"]) == settings["check_steps"]
        assert all(math.isfinite(loss) for loss in row["check_losses"] + row["timed_losses"])
        # Step 1 is on the same conversations: packed in rows for ours, one per row for HF.
        assert row["check_data_tokens"] == reference["check_data_tokens"]
        assert row["check_conversations"] == reference["check_conversations"]
        assert math.isclose(row["check_losses"][0], reference["check_losses"][0], rel_tol=tol)
        assert math.isclose(row["step1_grad_norm"], reference["step1_grad_norm"], rel_tol=tol)
    assert reference["speedup_vs_hf_peft"] == 1.0
    # HF: batch_size conversations a step; ours: packed rows, several conversations each.
    assert reference["conversations_per_step"] == settings["batch_size"]
    assert reference["check_conversations"] > settings["batch_size"]
    for name in ("ours_eager", "ours_fused"):
        assert rows[name]["conversations_per_step"] > settings["batch_size"]
        assert rows[name]["data_tokens_per_step"] > reference["data_tokens_per_step"]

    # Ours trained on train.py's batches of the timed steps, in train.py's order.
    batches = train_py_batches(dict(
        settings, data=str(SCRIPT.parents[1] / settings["data"]), checkpoint="base", device="cpu"))
    first = settings["check_steps"] + settings["warmup_steps"]
    timed = range(first, first + settings["steps"])
    assert rows["ours_fused"]["step_data_tokens"] == [data_tokens(batches[i]) for i in timed]
    assert reference["check_data_tokens"] == data_tokens(batches[0])

    markdown = json_path.with_suffix(".md").read_text()
    assert "| provider | grad ckpt | data tokens/s | ms/step |" in markdown
    assert "--smoke" in markdown
    assert "PASSED" in markdown


def test_ours_times_train_py_step_on_train_py_batches(tmp_path, monkeypatch):
    """The ours providers call training.loop.training_step with train.py's optimizer, schedule,
    clipping and packed batches, once per step: not a harness of their own."""
    import training.loop

    bench, worker = load_benchmark("bench_train"), load_benchmark("train_worker")
    spec = dict(bench.CONFIGS["cpu-small"], **bench.SMOKE)
    spec.update(dtype="float32", device="cpu", grad_checkpointing=[False], check_steps=1,
                warmup_steps=1, steps=2, data=str(bench.DATA), checkpoint=str(tmp_path / "base"),
                lora_init=str(tmp_path / "lora_init.safetensors"), provider="ours_fused")
    worker.build_base(spec)
    calls = []
    real = training.loop.training_step

    def watched(step_loss, params, optimizer, scheduler, micro_batches, max_grad_norm, *args,
                **kwargs):
        calls.append((optimizer, scheduler, [dict(b) for b in micro_batches], max_grad_norm))
        return real(step_loss, params, optimizer, scheduler, micro_batches, max_grad_norm, *args,
                    **kwargs)

    monkeypatch.setattr(training.loop, "training_step", watched)
    result = worker.train_provider(spec)
    assert len(calls) == worker.total_steps(spec) == 4
    [run] = result["runs"]
    batches = train_py_batches(spec)
    for index, (optimizer, scheduler, micro, max_grad_norm) in enumerate(calls):
        assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["lr"] == worker.LR
        assert isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR)
        assert max_grad_norm == 1.0  # train.py's --max-grad-norm
        [batch] = micro
        expected = batches[index]
        assert set(batch) == set(expected)
        for key in expected:
            assert torch.equal(batch[key], expected[key]), (index, key)
        assert int(batch["segment_ids"].max()) >= 1  # packed: rows hold several conversations
    assert run["step_data_tokens"] == [data_tokens(batches[i]) for i in (2, 3)]


def test_unpacked_puts_each_packed_conversation_on_its_own_row():
    common = load_benchmark("common")
    from training.data import IGNORE, Example, collate, pack

    examples = [Example([5, 6, 7], [False, True, True]), Example([8, 9], [False, True]),
                Example([10, 11, 12, 13], [False, False, True, True])]
    batch = collate(pack(examples, max_seq_len=6, packing=True), pad_id=0)
    assert batch["input_ids"].shape == (2, 5)  # rows [5 6 7 8 9] and [10 11 12 13 pad]
    hf = common.unpacked(batch, pad_id=0)
    assert hf["input_ids"].tolist() == [[5, 6, 7, 0], [8, 9, 0, 0], [10, 11, 12, 13]]
    assert hf["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert hf["labels"].tolist() == [[IGNORE, 6, 7, IGNORE], [IGNORE, 9, IGNORE, IGNORE],
                                     [IGNORE, IGNORE, 12, 13]]
    assert common.conversations(batch) == common.conversations(hf) == 3


def test_loss_check_names_the_provider_that_disagrees():
    bench = load_benchmark("bench_train")
    rows = [
        {"provider": "hf_peft", "grad_checkpointing": False, "check_losses": [7.0, 6.9],
         "step1_grad_norm": 1.0, "check_data_tokens": 900},
        {"provider": "ours_eager", "grad_checkpointing": False, "check_losses": [7.0, 6.9],
         "step1_grad_norm": 1.00001, "check_data_tokens": 900},
        {"provider": "ours_fused", "grad_checkpointing": True, "check_losses": [7.0, 6.9],
         "step1_grad_norm": 1.1, "check_data_tokens": 900},
    ]
    check = bench.loss_check(rows, "float32")
    assert not check["passed"]
    [failure] = check["failures"]
    assert "ours_fused" in failure and "grad_norm" in failure
    assert bench.loss_check(rows[:2], "float32")["passed"]
    rows[1]["check_data_tokens"] = 899  # other conversations: not a comparison
    [failure] = bench.loss_check(rows[:2], "float32")["failures"]
    assert "ours_eager" in failure and "899" in failure


def test_long_chats_join_consecutive_chats_into_conversations_train_py_reads(tmp_path):
    common = load_benchmark("common")
    from model.tokenizer import load_tokenizer
    from training.data import read_chats, tokenize_chats

    chats = read_chats(common.DATA)
    path = common.write_long_chats(common.DATA, tmp_path / "long.jsonl", 40)
    joined = read_chats(path)  # train.py's reader accepts it
    assert len(joined) == len(chats) // 40
    assert joined[1] == [m for chat in chats[40:80] for m in chat if m["role"] != "system"]
    examples, truncated = tokenize_chats(joined, load_tokenizer(), 2048, train_on_prompt=False)
    lengths = [len(e.input_ids) for e in examples]
    assert truncated == 0 and 1200 < min(lengths) and max(lengths) <= 2048
