"""Long sequences: the tiled MLP equals the whole one, offloaded checkpoints equal on-device
ones, the memory plan counts offloaded checkpoints as host memory, LongRoPE's long factors in
training, and the long-context tiny preset trains a step whose peak grows linearly in T."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import training.loop as loop
from lorakernels import settings
from model.build import random_model
from model.config import Phi3Config
from model.lora import apply_lora
from training.config import TrainConfig, parse_config
from training.memory_plan import planned_batch, plan_memory

ROOT = Path(__file__).resolve().parents[1]
TINY = Phi3Config.from_name("phi3-tiny")


def lora_model(dtype=torch.float32, lora_dropout=0.0, config=TINY):
    """phi3-tiny with LoRA on the four projections, B random so the low-rank path matters."""
    model = random_model(config, dtype, "cpu", seed=0)
    apply_lora(model, r=4, lora_alpha=8, lora_dropout=lora_dropout,
               targets=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    model.train()
    return model


def packed_batch(T: int, vocab: int) -> dict:
    """Two rows: three conversations, and one conversation with padding after it."""
    batch = planned_batch(2, T, vocab)
    batch["input_ids"] = torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(1))
    batch["labels"] = batch["input_ids"].clone()
    cuts = [(0, T // 3), (T // 3, T - 40), (T - 40, T)]
    for segment, (start, stop) in enumerate(cuts):
        batch["segment_ids"][0, start:stop] = segment
        batch["position_ids"][0, start:stop] = torch.arange(stop - start)
    batch["segment_ids"][1, T - 30:] = -1
    batch["labels"][1, T - 30:] = -100
    return batch


def loss_and_grads(model, batch, seed=0):
    model.zero_grad()
    torch.manual_seed(seed)
    loss = loop.accumulate_gradients(loop.StepLoss(model), [batch])
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss, grads


# Rows are independent, so tiles change no sum's order in fp32 beyond the LoRA weight
# gradients, summed over tiles instead of in one GEMM (float rounding of a 700-term sum). In
# bf16 each tile's GEMMs round their own partial sums once to bf16 (step 2^-8) before the sum.
TILE_TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6),
                  torch.bfloat16: dict(rtol=2e-2, atol=1e-3)}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tiled_mlp_gives_the_whole_mlps_loss_and_gradients(dtype, checkpointing):
    model = lora_model(dtype)
    model.set_gradient_checkpointing(checkpointing)
    batch = packed_batch(350, TINY.vocab_size)
    whole_loss, whole = loss_and_grads(model, batch)
    model.set_mlp_tile_tokens(128)  # 700 tokens: six tiles, the last one short
    tiled_loss, tiled = loss_and_grads(model, batch)
    assert tiled_loss == pytest.approx(whole_loss, rel=1e-5 if dtype == torch.float32 else 1e-2)
    for name in whole:
        torch.testing.assert_close(tiled[name], whole[name], **TILE_TOLERANCE[dtype])


def test_tiled_mlp_never_holds_a_whole_gate_up():
    """Tiled, the MLP's peak is below one whole [T, 2·intermediate] gate_up (what is left is
    [T, hidden]: the input, the output and their gradients)."""
    from lorakernels.memory_count import LiveBytes

    model = lora_model()
    mlp = model.model.layers[0].mlp
    x = torch.randn(1, 2048, TINY.hidden_size, requires_grad=True)
    peaks = {}
    for tile in (4096, 256):
        mlp.tile_tokens = tile
        with LiveBytes() as count:
            mlp(x).sum().backward()
        peaks[tile] = count.peak_bytes
    gate_up = 2048 * 2 * TINY.intermediate_size * 4
    assert peaks[4096] > 2 * gate_up  # whole: gate_up and its gradient
    assert peaks[256] < gate_up < peaks[4096] - peaks[256]


def test_offload_on_a_cpu_is_on_device_checkpointing():
    model = lora_model(lora_dropout=0.1)
    batch = packed_batch(200, TINY.vocab_size)
    results = []
    for mode in (True, "offload"):
        model.set_gradient_checkpointing(mode)
        assert not model.model.offloads_checkpoints(torch.device("cpu"))
        results.append(loss_and_grads(model, batch))
    assert results[0][0] == results[1][0]
    for name in results[0][1]:
        assert torch.equal(results[0][1][name], results[1][1][name])


def test_offloaded_checkpoint_equals_on_device_checkpointing():
    """The CUDA path's offloaded checkpoint (host copies, recompute in backward, the RNG
    restored so LoRA dropout draws the same masks), run on CPU tensors."""
    model = lora_model(lora_dropout=0.1)
    batch = packed_batch(200, TINY.vocab_size)
    with settings.override(device_path="cuda", backend="eager", attention="sdpa"):
        model.set_gradient_checkpointing(True)
        expected_loss, expected = loss_and_grads(model, batch)
        model.set_gradient_checkpointing("offload")
        assert model.model.offloads_checkpoints(torch.device("cpu"))
        loss, grads = loss_and_grads(model, batch)
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-5, atol=1e-7)


def tiny_plan(**options):
    chosen = dict(model="phi3-tiny", device="cuda", batch_size=2, max_seq_len=256,
                  plan_memory=True)
    return plan_memory(TrainConfig(**{**chosen, **options}))


def test_plan_counts_offloaded_checkpoints_as_host_memory():
    on_device = tiny_plan(grad_checkpointing=True, batch_size=1, max_seq_len=2048)
    offloaded = tiny_plan(grad_checkpointing="offload", batch_size=1, max_seq_len=2048)
    hidden = 2048 * TINY.hidden_size * 2  # one bf16 layer input
    checkpoints = TINY.num_hidden_layers * hidden
    assert offloaded.offloaded_bytes == checkpoints
    assert offloaded.host_bytes == on_device.host_bytes + checkpoints
    assert offloaded.as_json()["offloaded_checkpoints"] == checkpoints
    # On the device: every layer's input but the one being recomputed and the one prefetched.
    saved = on_device.categories["activations"] - offloaded.categories["activations"]
    assert saved >= (TINY.num_hidden_layers - 2) * hidden
    assert on_device.offloaded_bytes == 0


@pytest.mark.parametrize("argv, mode", [
    ([], False), (["--grad-checkpointing"], True), (["--grad-checkpointing", "on-device"], True),
    (["--grad-checkpointing", "offload"], "offload"), (["--no-grad-checkpointing"], False),
    (["--grad-checkpointing", "false"], False)])
def test_grad_checkpointing_flag(argv, mode):
    assert parse_config(argv).grad_checkpointing == mode


def test_grad_checkpointing_yaml_and_bad_values(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("grad-checkpointing: offload\n")
    assert parse_config(["--config", str(path)]).grad_checkpointing == "offload"
    path.write_text("grad-checkpointing: 3\n")
    with pytest.raises(ValueError, match=r"run.yaml: grad-checkpointing must be true, false, "
                                         r"on-device or offload, got 3"):
        parse_config(["--config", str(path)])
    with pytest.raises(ValueError, match="--grad-checkpointing must be"):
        parse_config(["--grad-checkpointing", "sometimes"])


LONG_TINY = Phi3Config.from_name("phi3-tiny-128k")


@pytest.mark.parametrize("T, factors", [(4096, "short"), (4200, "long")])
def test_training_uses_longrope_long_factors_past_the_original_context(T, factors):
    """As transformers' Phi3 does: positions past original_max_position_embeddings (4096)
    switch the whole batch to the long factors, in a training step too."""
    model = lora_model(config=LONG_TINY)
    rotary = model.model.rotary_emb
    seen = []
    rotary.register_forward_hook(lambda module, args, out: seen.append(out[0]))
    batch = planned_batch(1, T, LONG_TINY.vocab_size)
    loop.accumulate_gradients(loop.StepLoss(model), [batch])
    inv_freq = getattr(rotary, f"{factors}_inv_freq")
    angles = torch.arange(T)[:, None].float() * inv_freq
    expected = torch.cat((angles, angles), dim=-1).cos() * LONG_TINY.rope_attention_scaling
    torch.testing.assert_close(seen[0][0], expected)
    assert not torch.equal(rotary.short_inv_freq, rotary.long_inv_freq)


def test_long_conversations_pack_into_131072_token_rows(tmp_path):
    """scripts/make_long_chats.py's conversations at --max-seq-len 131072: packed, two share
    a row; unpacked, each has its own; none is cut."""
    from model.tokenizer import load_tokenizer

    path = tmp_path / "long.jsonl"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_long_chats.py"), "--tokens",
                    "50000", "--count", "2", "--out", str(path)], check=True)
    tokenizer = load_tokenizer()
    lengths = {}
    for packing in (True, False):
        config = TrainConfig(model="phi3-tiny-128k", data=str(path), max_seq_len=131072,
                             packing=packing)
        rows, truncated = loop.prepare_rows(str(path), tokenizer, config)
        assert truncated == 0
        lengths[packing] = [len(row.input_ids) for row in rows]
    assert len(lengths[True]) == 1 and len(lengths[False]) == 2
    assert sum(lengths[False]) == lengths[True][0] and 40000 < min(lengths[False]) < 131072


def test_phi3_tiny_128k_trains_a_step_at_8k_and_32k_with_linear_peak():
    """One real step (random weights, checkpointing, the tiled MLP and windowed attention)
    at 8,192 and 32,768 tokens, counted as the plan counts: 4 × the tokens, at most 4.5 ×
    the peak (the 131,072-token step is in benchmarks/results/long_context.md)."""
    peaks = {}
    for T in (8192, 32768):
        config = TrainConfig(model="phi3-tiny-128k", device="cpu", batch_size=1, max_seq_len=T,
                             grad_checkpointing=True, lora_dropout=0.0, plan_memory=True)
        peaks[T] = plan_memory(config, fake=False).peak_bytes
    assert peaks[32768] <= 4.5 * peaks[8192]
