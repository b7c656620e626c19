"""train.py end to end on the tiny preset: falling loss, exact resume, accumulation, PEFT, safe
saves."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import training.loop as loop
from model.build import load_model
from model.lora import apply_lora
from training.config import TrainConfig
from training.data import collate, prepare_rows
from training.loop import train
from conftest import use_settings

ROOT = Path(__file__).resolve().parents[1]



def config(data, output, **overrides):
    # CPU and fp32 even on a GPU machine: these tests compare runs bit for bit, and the
    # GPU kernels reduce dB with atomics (not bitwise reproducible).
    options = dict(data=data, output=str(output), device="cpu", max_seq_len=128, batch_size=2,
                   lr=3e-3, lora_r=4, lora_alpha=8, lora_dropout=0.1, max_steps=6, seed=3,
                   log_every=1)
    return TrainConfig(**{**options, **overrides})


def tiny_lora_model(cfg, dtype=torch.float32, device="cpu", **lora):
    """The run's preset base with LoRA (r 4) whose B is random, so the low-rank path matters."""
    model, tokenizer = load_model(cfg.model, dtype, torch.device(device), cfg.seed)
    apply_lora(model, **{"r": 4, "lora_alpha": 8, **lora})
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return model, tokenizer


def lora_weights(directory):
    return load_file(str(Path(directory) / "lora.safetensors"))


def test_loss_falls_and_outputs_are_written(data, tmp_path):
    summary = train(config(data, tmp_path, max_steps=30, eval_data=data, eval_every=10),
                    log=lambda _: None)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert [r["step"] for r in rows if "eval_loss" in r] == [10, 20, 30]
    assert {"lr", "grad_norm", "tokens_per_s", "peak_memory_mb"} <= set(rows[0])
    final = tmp_path / "final"
    assert ({"adapter_model.safetensors", "adapter_config.json", "lora.safetensors"}
            <= {p.name for p in final.iterdir()})
    assert summary["step"] == 30 and summary["eval_ppl"] > 1


def test_resume_is_exact(data, tmp_path):
    train(config(data, tmp_path / "straight"), log=lambda _: None)
    train(config(data, tmp_path / "split", max_steps=6, save_every=3), log=lambda _: None)
    # Pretend the run stopped after step 3: resume from that checkpoint.
    train(config(data, tmp_path / "resumed", resume=str(tmp_path / "split" / "checkpoint-3")),
          log=lambda _: None)
    expected = lora_weights(tmp_path / "straight" / "final")
    resumed = lora_weights(tmp_path / "resumed" / "final")
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key


def test_accumulation_equals_a_larger_batch(data):
    """Gradients of 4 micro-batches of 1 equal those of one batch of 4 (dropout off)."""
    cfg = config(data, "unused", lora_dropout=0.0, packing=False)
    model, tokenizer = load_model(cfg.model, torch.float32, torch.device("cpu"), cfg.seed)
    apply_lora(model, r=4, lora_alpha=8)
    rows = prepare_rows(data, tokenizer, cfg)[0][:4]
    small_batches = [collate([row], tokenizer.pad_id) for row in rows]
    big_batch = collate(rows, tokenizer.pad_id)

    def gradients(micro):
        model.zero_grad()
        loss = loop.accumulate_gradients(loop.StepLoss(model), micro)
        return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss_big, grads_big = gradients([big_batch])
    loss_acc, grads_acc = gradients(small_batches)
    assert abs(loss_big - loss_acc) < 1e-5
    for name in grads_big:
        torch.testing.assert_close(grads_acc[name], grads_big[name], rtol=1e-4, atol=1e-7)


def test_interrupt_saves_and_resume_continues(data, tmp_path, monkeypatch):
    """Ctrl-C during step 4 lets the step finish, saves checkpoint-4 and returns."""
    import signal

    real = loop.token_loss_sum
    calls = {"n": 0}

    def interrupt_during_fourth_step(model, batch):
        calls["n"] += 1
        if calls["n"] == 4:
            signal.raise_signal(signal.SIGINT)
        return real(model, batch)

    monkeypatch.setattr(loop, "token_loss_sum", interrupt_during_fourth_step)
    summary = train(config(data, tmp_path), log=lambda _: None)
    assert summary["interrupted"] and summary["step"] == 4
    assert (tmp_path / "checkpoint-4" / "trainer_state.json").exists()
    monkeypatch.setattr(loop, "token_loss_sum", real)
    assert train(config(data, tmp_path, resume="latest"), log=lambda _: None)["step"] == 6
    steps = [json.loads(line)["step"]
             for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # each step logged once across the interruption
    resumed = lora_weights(tmp_path / "final")
    train(config(data, tmp_path / "straight"), log=lambda _: None)
    for key, value in lora_weights(tmp_path / "straight" / "final").items():
        assert torch.equal(resumed[key], value), key


def test_failed_save_keeps_the_previous_checkpoint(data, tmp_path, monkeypatch):
    import training.checkpoint as checkpoint

    real = checkpoint.save_lora_state_dict
    saves = {"n": 0}

    def fail_second_save(*args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 2:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_lora_state_dict", fail_second_save)
    with pytest.raises(OSError, match="disk full"):
        train(config(data, tmp_path, save_every=2), log=lambda _: None)
    assert [p.name for p in checkpoint.step_checkpoints(tmp_path)] == ["checkpoint-2"]
    assert not (tmp_path / "checkpoint-4").exists()
    monkeypatch.setattr(checkpoint, "save_lora_state_dict", real)
    assert train(config(data, tmp_path, resume="latest"), log=lambda _: None)["step"] == 6


def test_save_total_limit_keeps_the_newest(data, tmp_path):
    train(config(data, tmp_path, save_every=1, save_total_limit=2), log=lambda _: None)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]


def test_adapter_loads_in_peft_with_our_logits(data, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    cfg = config(data, tmp_path / "run", max_steps=3)
    train(cfg, log=lambda _: None)
    base, _ = load_model(cfg.model, torch.float32, torch.device("cpu"), cfg.seed)
    base.save_pretrained(tmp_path / "base")
    hf = transformers.Phi3ForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    hf = peft.PeftModel.from_pretrained(hf, tmp_path / "run" / "final").eval()
    from generate import build_parser, load
    args = build_parser().parse_args(["--model", "phi3-tiny", "--seed", "3", "--dtype", "float32",
                                      "--device", "cpu", "--adapter",
                                      str(tmp_path / "run" / "final"), "--prompt", "unused"])
    ours, _, _ = load(args)
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_cli_reports_bad_data_with_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data", str(bad),
                             "--output", str(tmp_path / "out")],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert f"{bad}:1: no assistant turn" in result.stderr and "Traceback" not in result.stderr


def test_gradient_checkpointing_gives_the_same_gradients(data):
    cfg = config(data, "unused", lora_dropout=0.0)
    model, tokenizer = tiny_lora_model(cfg)
    batch = collate(prepare_rows(data, tokenizer, cfg)[0][:2], tokenizer.pad_id)
    grads = []
    for enabled in (False, True):
        model.zero_grad()
        model.set_gradient_checkpointing(enabled)
        loop.accumulate_gradients(loop.StepLoss(model), [batch])
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


def test_trains_from_a_checkpoint_directory(data, tmp_path):
    cfg = config(data, tmp_path / "unused")
    base, tokenizer = load_model(cfg.model, torch.float32, torch.device("cpu"), cfg.seed)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")  # tokenizer.json and its chat template
    summary = train(config(data, tmp_path / "run", model=str(tmp_path / "base"), max_steps=2),
                    log=lambda _: None)
    assert summary["step"] == 2
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").exists()
    settings = json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())
    assert settings["base_model_name_or_path"] == str(tmp_path / "base")


@pytest.mark.parametrize("targets", [["qkv_proj"], ["qkv_proj", "lm_head"]])
def test_chunked_loss_equals_full_logits_loss(data, targets):
    cfg = config(data, "unused", lora_dropout=0.0)
    model, tokenizer = tiny_lora_model(cfg, targets=targets)
    batch = collate(prepare_rows(data, tokenizer, cfg)[0][:2], tokenizer.pad_id)
    chunked = loop.token_loss_sum(model, batch)
    logits = model(batch["input_ids"], batch["position_ids"], batch["segment_ids"])
    full = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             batch["labels"][:, 1:].reshape(-1), reduction="sum")
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_bf16_training_on_the_gpu_kernels(data, tmp_path, quantize):
    """The GPU path end to end: bf16 (or NF4) base, fp32 LoRA, fused LoRA/RMSNorm/RoPE/SwiGLU
    kernels."""
    summary = train(config(data, tmp_path, device="cuda", dtype="bfloat16", max_steps=20,
                           lora_dropout=0.05, quantize=quantize), log=lambda _: None)
    losses = [json.loads(line)["loss"]
              for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(loss == loss for loss in losses)  # no NaN
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert summary["step"] == 20 and (tmp_path / "final" / "adapter_model.safetensors").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_kernels_match_eager_in_bf16(data, monkeypatch):
    cfg = config(data, "unused", device="cuda", lora_dropout=0.0)
    model, tokenizer = tiny_lora_model(cfg, torch.bfloat16, "cuda")
    batch = {k: v.cuda() for k, v in collate(prepare_rows(data, tokenizer, cfg)[0][:2],
                                             tokenizer.pad_id).items()}
    losses = {}
    for backend in ("eager", "triton"):
        use_settings(monkeypatch, backend=backend)
        losses[backend] = loop.token_loss_sum(model, batch).item()
    assert losses["triton"] == pytest.approx(losses["eager"], rel=2e-2)


def test_batch_lengths_come_in_few_shapes_on_cuda_only():
    """On CUDA (FlexAttention compiles per length) packed batches are padded to --max-seq-len
    and unpacked ones to a power of two; on the CPU each batch keeps its longest row (a
    single padded shape there cut oneDNN's per-shape memory but cost 4-19% of the step)."""
    from training.config import TrainConfig
    from training.loop import batch_length_rule

    packed, unpacked = TrainConfig(max_seq_len=256), TrainConfig(max_seq_len=256, packing=False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert batch_length_rule(packed, cuda)(100) == 256
    assert batch_length_rule(unpacked, cuda)(100) == 128
    assert batch_length_rule(packed, cpu) is None and batch_length_rule(unpacked, cpu) is None
