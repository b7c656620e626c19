"""Our Phi-3 against transformers' Phi3ForCausalLM: same names, same logits, HF checkpoints load."""
import json

import pytest
import torch
import transformers

from model import Phi3Config, Phi3ForCausalLM

SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
             original_max_position_embeddings=64, sliding_window=None, rms_norm_eps=1e-5,
             bos_token_id=1, eos_token_id=2, pad_token_id=2)
HALF_HEAD = 64 // 4 // 2
LONGROPE = dict(rope_scaling={"type": "longrope",
                              "short_factor": [1.0 + 0.1 * i for i in range(HALF_HEAD)],
                              "long_factor": [2.0 + 0.5 * i for i in range(HALF_HEAD)]},
                original_max_position_embeddings=16, max_position_embeddings=64)
CASES = {
    "mha": dict(),
    "gqa": dict(num_key_value_heads=2),
    "sliding_window": dict(sliding_window=5),
    "longrope": LONGROPE,
}


def hf_model(overrides, tmp_path):
    """A random transformers Phi-3 saved with Hugging Face's own save_pretrained, and reloaded."""
    torch.manual_seed(0)
    config = transformers.Phi3Config(**{**SMALL, **overrides}, attn_implementation="eager")
    model = transformers.Phi3ForCausalLM(config).eval()
    with torch.no_grad():  # HF initialises norms to one; perturb them so they are tested
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(tmp_path, safe_serialization=True)
    return model


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("seq_len", [12, 24])
def test_logits_match_transformers(case, seq_len, tmp_path):
    reference = hf_model(CASES[case], tmp_path)
    ours = Phi3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in reference.named_parameters()]
    ids = torch.randint(0, SMALL["vocab_size"], (2, seq_len),
                        generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_longrope_uses_long_factors_only_past_the_original_context(tmp_path):
    reference = hf_model(LONGROPE, tmp_path)
    ours = Phi3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    short, long = torch.arange(16)[None], torch.arange(17)[None]
    rotary = ours.model.rotary_emb
    cos_short, _ = rotary(short, torch.float32)
    cos_long, _ = rotary(long, torch.float32)
    assert not torch.allclose(cos_short[0, 1], cos_long[0, 1])
    scale = (1 + torch.log(torch.tensor(64 / 16)) / torch.log(torch.tensor(16.0))).sqrt()
    torch.testing.assert_close(cos_short[0, 0], torch.full_like(cos_short[0, 0], scale.item()))
    del reference


def test_packed_segments_equal_separate_sequences(tmp_path):
    hf_model(dict(num_key_value_heads=2), tmp_path)
    ours = Phi3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    first, second = torch.randint(0, 96, (1, 7)), torch.randint(0, 96, (1, 5))
    packed = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(7), torch.arange(5)])[None]
    segments = torch.tensor([[0] * 7 + [1] * 5])
    with torch.no_grad():
        together = ours(packed, position_ids=positions, segment_ids=segments)
        torch.testing.assert_close(together[:, :7], ours(first), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(together[:, 7:], ours(second), rtol=1e-5, atol=1e-5)


def test_bf16_loading_and_sharded_round_trip(tmp_path):
    reference = hf_model(dict(num_key_value_heads=2), tmp_path / "hf")
    ours = Phi3ForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    ours.save_pretrained(tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    again = Phi3ForCausalLM.from_pretrained(tmp_path / "sharded", dtype=torch.bfloat16)
    for (name, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    # transformers reads what we wrote.
    hf_again = transformers.Phi3ForCausalLM.from_pretrained(tmp_path / "sharded",
                                                            dtype=torch.float32)
    ids = torch.randint(0, 96, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(hf_again(ids).logits, ours.float()(ids), rtol=1e-4, atol=1e-4)
    del reference


def test_mismatched_checkpoint_lists_the_names(tmp_path):
    hf_model(dict(num_key_value_heads=2), tmp_path / "gqa")
    config = json.loads((tmp_path / "gqa" / "config.json").read_text())
    config["num_key_value_heads"] = 4
    (tmp_path / "gqa" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError,
                       match=r"mis-shaped \(2\): model.layers.0.self_attn.qkv_proj.weight"):
        Phi3ForCausalLM.from_pretrained(tmp_path / "gqa", dtype=torch.float32)


def test_unknown_config_key_is_named():
    with pytest.raises(ValueError, match=r"unknown Phi-3 config keys \['hidden_sise'\]"):
        Phi3Config.from_dict({"hidden_sise": 3}, source="x/config.json")


def test_presets():
    mini = Phi3Config.from_name("phi3-mini-4k")
    assert (mini.hidden_size, mini.num_hidden_layers, mini.vocab_size,
            mini.sliding_window) == (3072, 32, 32064, 2047)
    medium = Phi3Config.from_name("phi3-medium-4k")
    assert medium.qkv_split_sizes == (5120, 1280, 1280)
    for name in ("phi3-mini-128k", "phi3.5-mini"):
        long = Phi3Config.from_name(name)
        assert long.max_position_embeddings == 131072
        assert len(long.rope_scaling["long_factor"]) == 48
        # sqrt(1 + ln 32 / ln 4096)
        assert abs(long.rope_attention_scaling - 1.1902380714238083) < 1e-12
    with pytest.raises(ValueError, match="unknown preset 'phi5'"):
        Phi3Config.from_name("phi5")


def test_bf16_logits_close_to_transformers_bf16(tmp_path):
    reference = hf_model(dict(num_key_value_heads=2, sliding_window=6), tmp_path).to(torch.bfloat16)
    ours = Phi3ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, SMALL["vocab_size"], (2, 16))
    with torch.no_grad():
        expected, got = reference(ids).logits.float(), ours(ids).float()
    # Both round every op to bf16 (2^-8 relative); allow a few roundings of the logit scale.
    assert (got - expected).abs().max() <= 3e-2 * expected.abs().max()


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    hf_model(dict(), tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, tmp_path / "model.safetensors", {"format": "pt"})
    with pytest.raises(ValueError, match=r"missing \(1\): model.layers.1.mlp.down_proj.weight"):
        Phi3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)


def test_tiny_preset_matches_the_shipped_tokenizer():
    from model.tokenizer import load_tokenizer

    tokenizer, config = load_tokenizer(), Phi3Config.from_name("phi3-tiny")
    assert tokenizer.vocab_size <= config.vocab_size and config.vocab_size % 64 == 0
    assert (config.bos_token_id, config.eos_token_id) == (tokenizer.bos_id, tokenizer.eos_id)
    assert config.hidden_size == 256
    assert 2e6 < sum(p.numel() for p in Phi3ForCausalLM(config).parameters()) < 6e6
