"""Adapter interchange: our PEFT-format adapters against PEFT on transformers' Phi-3, both ways;
loralib-style state dicts; merged checkpoints loaded by transformers."""
import json
import math
import warnings

import peft
import pytest
import torch
import torch.nn as nn
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lorakernels as lora
from lorakernels.adapters import (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, load_lora_state_dict,
                                  load_peft_adapter, merge_lora, save_lora_state_dict,
                                  save_peft_adapter)
from model import Phi3Config, Phi3ForCausalLM
from model.lora import DEFAULT_TARGETS, apply_lora

SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             sliding_window=None, bos_token_id=1, eos_token_id=2, pad_token_id=2)
ALL_TARGETS = DEFAULT_TARGETS + ("lm_head", "embed_tokens")
R, ALPHA = 4, 8


@pytest.fixture()
def checkpoint(tmp_path):
    torch.manual_seed(0)
    hf = transformers.Phi3ForCausalLM(transformers.Phi3Config(**SMALL, attn_implementation="eager"))
    hf.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


@pytest.fixture()
def ids():
    return torch.randint(0, SMALL["vocab_size"], (2, 10),
                         generator=torch.Generator().manual_seed(1))


def randomise_lora(model: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def ours(checkpoint, targets=DEFAULT_TARGETS, r=R, seed=None, **options) -> Phi3ForCausalLM:
    model = Phi3ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    apply_lora(model, r=r, lora_alpha=ALPHA, targets=targets, **options)
    if seed is not None:
        randomise_lora(model, seed)
    return model


def merged_for_eval(model: nn.Module) -> nn.Module:
    """eval() with the update folded into the base weight (loralib's merge_weights=True)."""
    for module in model.modules():
        if isinstance(module, lora.LoRALayer):
            module.merge_weights = True
    model.eval()
    assert all(m.merged for m in model.modules() if isinstance(m, lora.LoRALayer))
    return model


def hf_base(checkpoint) -> transformers.Phi3ForCausalLM:
    return transformers.Phi3ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out)


def key_warnings(caught):
    return [str(w.message) for w in caught if "missing" in str(w.message).lower()
            or "unexpected" in str(w.message).lower()]


@pytest.mark.parametrize("targets, use_rslora, dropout", [
    (DEFAULT_TARGETS, False, 0.05),
    (ALL_TARGETS, True, 0.0),
], ids=["default-targets", "all-targets-rslora"])
def test_our_adapter_loads_in_peft_unchanged(checkpoint, tmp_path, ids, targets, use_rslora,
                                             dropout):
    model = ours(checkpoint, targets, seed=0, use_rslora=use_rslora, lora_dropout=dropout)
    save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=checkpoint)

    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG_FILE).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"], config["use_rslora"]) == (
        R, ALPHA, dropout, use_rslora)
    assert sorted(config["target_modules"]) == sorted(targets)
    with safe_open(str(tmp_path / "adapter" / ADAPTER_WEIGHTS_FILE), "pt") as reader:
        shapes = {k: tuple(reader.get_slice(k).get_shape()) for k in reader.keys()}
        assert {reader.get_slice(k).get_dtype() for k in reader.keys()} == {"F32"}
    assert shapes["base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight"] == (R, 64)
    assert shapes["base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight"] == (128, R)
    if "embed_tokens" in targets:
        assert shapes["base_model.model.model.embed_tokens.lora_embedding_A"] == (R, 96)
        assert shapes["base_model.model.model.embed_tokens.lora_embedding_B"] == (64, R)
    assert len(shapes) == 2 * sum(isinstance(m, lora.LoRALayer) for m in model.modules())

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = peft.PeftModel.from_pretrained(hf_base(checkpoint), tmp_path / "adapter")
    assert key_warnings(caught) == []
    result = peft_model.load_adapter(tmp_path / "adapter", adapter_name="again")
    assert result.missing_keys == [] and result.unexpected_keys == []
    peft_qkv = peft_model.base_model.model.model.layers[0].self_attn.qkv_proj
    assert peft_qkv.scaling["default"] == pytest.approx(
        model.model.layers[0].self_attn.qkv_proj.scaling)
    model.eval()  # no dropout, as in PEFT's inference mode
    torch.testing.assert_close(logits(model, ids), logits(peft_model, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("targets", [DEFAULT_TARGETS, ALL_TARGETS], ids=["default", "all"])
def test_peft_adapter_loads_in_ours(checkpoint, tmp_path, ids, targets):
    peft_model = peft.get_peft_model(hf_base(checkpoint), peft.LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=list(targets), use_rslora=True,
        task_type="CAUSAL_LM"))
    randomise_lora(peft_model, seed=3)
    with warnings.catch_warnings():
        # "Setting save_embedding_layers to True" when embeddings are targets
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(tmp_path / "peft")
    model = ours(checkpoint, targets, use_rslora=True)
    load_peft_adapter(model, tmp_path / "peft")
    torch.testing.assert_close(logits(model, ids), logits(peft_model, ids), rtol=1e-4, atol=1e-4)


def test_keys_with_peft_adapter_name_load(checkpoint, tmp_path, ids):
    source = ours(checkpoint, ALL_TARGETS, seed=0)
    save_peft_adapter(source, tmp_path / "adapter")
    weights = tmp_path / "adapter" / ADAPTER_WEIGHTS_FILE
    state = load_file(weights)
    renamed = {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
               .replace("lora_embedding_A", "lora_embedding_A.default")
               .replace("lora_embedding_B", "lora_embedding_B.default"): v
               for k, v in state.items()}
    assert "base_model.model.model.embed_tokens.lora_embedding_A.default" in renamed
    save_file(renamed, weights)
    model = ours(checkpoint, ALL_TARGETS)
    load_peft_adapter(model, tmp_path / "adapter")
    torch.testing.assert_close(logits(model, ids), logits(source, ids))


def test_rslora_round_trip_keeps_scaling(checkpoint, tmp_path, ids):
    source = ours(checkpoint, seed=0, use_rslora=True)
    save_peft_adapter(source, tmp_path / "adapter")
    model = ours(checkpoint, use_rslora=True)
    load_peft_adapter(model, tmp_path / "adapter")
    assert model.model.layers[1].mlp.down_proj.scaling == pytest.approx(ALPHA / math.sqrt(R))
    torch.testing.assert_close(logits(model, ids), logits(source, ids))
    with pytest.raises(ValueError, match=r"use_rslora: file True, model False"):
        load_peft_adapter(ours(checkpoint), tmp_path / "adapter")


def test_rank_mismatch_raises(checkpoint, tmp_path):
    save_peft_adapter(ours(checkpoint, seed=0), tmp_path / "adapter")
    with pytest.raises(ValueError,
                       match=r"adapter_config\.json does not match .* file r 4, .*model r 8"):
        load_peft_adapter(ours(checkpoint, r=8), tmp_path / "adapter")


def test_missing_key_is_named_and_strict_false_warns(checkpoint, tmp_path, ids):
    source = ours(checkpoint, seed=0)
    save_peft_adapter(source, tmp_path / "adapter")
    weights = tmp_path / "adapter" / ADAPTER_WEIGHTS_FILE
    state = load_file(weights)
    dropped = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    del state[dropped]
    save_file(state, weights)
    model = ours(checkpoint)
    before = {k: v.clone() for k, v in lora.lora_state_dict(model).items()}
    named = rf"adapter_model\.safetensors does not match[\s\S]*missing \(1\): {dropped}"
    with pytest.raises(ValueError, match=named):
        load_peft_adapter(model, tmp_path / "adapter")
    torch.testing.assert_close(lora.lora_state_dict(model), before)  # nothing loaded
    with pytest.warns(UserWarning, match=dropped):
        load_peft_adapter(model, tmp_path / "adapter", strict=False)
    qkv = "model.layers.0.self_attn.qkv_proj.lora_A"
    torch.testing.assert_close(lora.lora_state_dict(model)[qkv], lora.lora_state_dict(source)[qkv])


def test_misshaped_and_unexpected_keys_are_named(checkpoint, tmp_path):
    save_peft_adapter(ours(checkpoint, seed=0), tmp_path / "adapter")
    weights = tmp_path / "adapter" / ADAPTER_WEIGHTS_FILE
    state = load_file(weights)
    bad = "base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"
    state[bad] = torch.zeros(R, 63)
    state["base_model.model.model.layers.0.self_attn.extra.lora_A.weight"] = torch.zeros(R, 64)
    save_file(state, weights)
    with pytest.raises(ValueError, match=rf"unexpected \(1\): .*extra\.lora_A\.weight[\s\S]*"
                                         rf"mis-shaped \(1\): {bad}: "
                                         r"file \(4, 63\), model \(4, 64\)"):
        load_peft_adapter(ours(checkpoint), tmp_path / "adapter", strict=False)


def test_target_modules_must_match_the_model(checkpoint, tmp_path):
    peft_model = peft.get_peft_model(hf_base(checkpoint), peft.LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=["qkv_proj"], task_type="CAUSAL_LM"))
    peft_model.save_pretrained(tmp_path / "peft")
    with pytest.raises(ValueError, match=r"LoRA layers not in target_modules \(6\): .*down_proj"):
        load_peft_adapter(ours(checkpoint), tmp_path / "peft")


def test_lora_state_dict_round_trip_into_merged_model(checkpoint, tmp_path, ids):
    source = ours(checkpoint, ALL_TARGETS, seed=0)
    path = save_lora_state_dict(source, tmp_path)
    assert path == tmp_path / "lora.safetensors"
    assert set(load_file(path)) == set(lora.lora_state_dict(source))
    # base weight holds seed 1's update
    model = merged_for_eval(ours(checkpoint, ALL_TARGETS, seed=1))
    load_lora_state_dict(model, path)
    torch.testing.assert_close(logits(model, ids), logits(source, ids), rtol=1e-5, atol=1e-5)
    model.train()  # unmerging takes out the loaded update, not seed 1's
    torch.testing.assert_close(logits(model, ids), logits(source, ids), rtol=1e-5, atol=1e-5)


def test_lora_state_dict_checks_keys(checkpoint, tmp_path):
    path = save_lora_state_dict(ours(checkpoint, seed=0), tmp_path / "lora.safetensors")
    with pytest.raises(ValueError, match=r"missing \(4\): .*lm_head\.lora_A"):
        load_lora_state_dict(ours(checkpoint, ALL_TARGETS), path)
    with pytest.raises(ValueError,
                       match=r"unexpected \(16\): model\.layers\.0\.mlp\.down_proj\.lora_A"):
        load_lora_state_dict(ours(checkpoint, ["lm_head"]), path)
    with pytest.raises(ValueError, match=r"\.safetensors only"):
        save_lora_state_dict(ours(checkpoint), tmp_path / "lora.pt")


def test_merge_lora_equals_adapter_and_saves_a_plain_checkpoint(checkpoint, tmp_path, ids):
    model = ours(checkpoint, ALL_TARGETS, seed=0)
    expected = logits(model, ids)
    assert merge_lora(model) is model
    assert not any(isinstance(m, lora.LoRALayer) for m in model.modules())
    assert type(model.model.layers[0].self_attn.qkv_proj) is nn.Linear
    assert type(model.model.embed_tokens) is nn.Embedding
    assert not any("lora_" in name for name in model.state_dict())
    merged = logits(model, ids)
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    model.save_pretrained(tmp_path / "merged")
    hf = transformers.Phi3ForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    torch.testing.assert_close(logits(hf, ids), merged, rtol=1e-4, atol=1e-4)


def test_merge_lora_after_eval_merges_once(checkpoint, ids):
    model = ours(checkpoint, seed=0)
    expected = logits(model, ids)
    merge_lora(merged_for_eval(model))
    tolerance = 1e-5 * expected.abs().max().item()
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-5, atol=tolerance)


def test_merge_lora_refuses_tied_weights():
    model = Phi3ForCausalLM(Phi3Config(**SMALL, tie_word_embeddings=True))
    apply_lora(model, r=R, targets=["lm_head"])
    with pytest.raises(ValueError,
                       match=r"tied weights \(model\.embed_tokens\.weight = lm_head\.weight\)"):
        merge_lora(model)


def test_per_part_lora_is_refused_for_peft(checkpoint, tmp_path):
    model = ours(checkpoint, per_part=True)
    with pytest.raises(ValueError, match=r"per-part LoRA .*qkv_proj.* per_part=False"):
        save_peft_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_layers_must_share_hyperparameters(checkpoint, tmp_path):
    model = ours(checkpoint, ["o_proj"])
    apply_lora(model, r=8, lora_alpha=ALPHA, lora_dropout=0.1, targets=["down_proj"])
    with pytest.raises(ValueError,
                       match=r"differ in lora_dropout \(0.0: .*o_proj; 0.1: .*down_proj"):
        save_peft_adapter(model, tmp_path / "adapter")
