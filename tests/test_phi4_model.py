"""The Phi-4 family's layouts against transformers' Phi3ForCausalLM (its architecture class).

Tiny random checkpoints saved by transformers itself, in each layout scaled down:
- Phi-4-mini: partial rotary 0.75 (RoPE on 12 of 16 head dims, LongRoPE with 6 = 12/2
  factors), tied embeddings (no lm_head.weight in the file), 3 query heads per KV head,
  sliding window larger than any sequence; checked below and above the original context.
- Phi-4: 4 query heads per KV head (40/10), rope_theta 250000, untied, no sliding window.
"""
import json

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorakernels.adapters import lora_key_from_peft, merge_lora
from model import Phi3Config, Phi3ForCausalLM
from model.build import random_model
from model.lora import apply_lora
from model.tokenizer import TINY_TOKENIZER_DIR
from test_phi3_lora import peft_and_ours
from model.chat import stop_ids

HEAD_DIM = 16
PHI4_MINI = dict(vocab_size=128, hidden_size=6 * HEAD_DIM, intermediate_size=160,
                 num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                 partial_rotary_factor=0.75,
                 rope_scaling={"type": "longrope",
                               "short_factor": [1.0 + 0.05 * i for i in range(6)],
                               "long_factor": [1.5 + 2.0 * i for i in range(6)]},
                 max_position_embeddings=64, original_max_position_embeddings=16,
                 sliding_window=262144, tie_word_embeddings=True, rms_norm_eps=1e-5,
                 bos_token_id=1, eos_token_id=2, pad_token_id=1)
PHI4 = dict(vocab_size=128, hidden_size=8 * HEAD_DIM, intermediate_size=224, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=2, rope_theta=250000.0,
            max_position_embeddings=64, original_max_position_embeddings=64, sliding_window=None,
            tie_word_embeddings=False, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
            pad_token_id=2)
LAYOUTS = {"phi4-mini": PHI4_MINI, "phi4": PHI4}


def hf_model(layout, directory):
    """A random transformers Phi-3 in ``layout``, saved with transformers' save_pretrained."""
    torch.manual_seed(0)
    config = transformers.Phi3Config(**layout, attn_implementation="eager")
    model = transformers.Phi3ForCausalLM(config).eval()
    with torch.no_grad():  # norms start at one in HF; perturb them so they are tested
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(directory, safe_serialization=True)
    return model


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("seq_len", [12, 24])  # below and above Phi-4-mini's original context (16)
def test_logits_match_transformers(layout, seq_len, tmp_path):
    reference = hf_model(LAYOUTS[layout], tmp_path)
    ours = Phi3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in reference.named_parameters()]
    ids = torch.randint(0, 128, (2, seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), reference(ids).logits, rtol=1e-4, atol=1e-4)


def test_phi4_mini_layout_rotates_only_the_first_dims(tmp_path):
    hf_model(PHI4_MINI, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    ours = Phi3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert ours.config.partial_rotary_factor == 0.75 and ours.config.rotary_dim == 12
    cos, _ = ours.model.rotary_emb(torch.arange(20)[None], torch.float32)
    assert cos.shape == (1, 20, 12)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as reader:
        assert "lm_head.weight" not in reader.keys()  # what transformers writes for a tied model
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert config["tie_word_embeddings"] is True


def test_tied_checkpoint_that_still_carries_lm_head_loads(tmp_path):
    reference = hf_model(PHI4_MINI, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["lm_head.weight"] = torch.zeros_like(state["model.embed_tokens.weight"])
    save_file(state, tmp_path / "model.safetensors", {"format": "pt"})
    ours = Phi3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = torch.arange(10)[None]
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), reference(ids).logits, rtol=1e-4, atol=1e-4)


def test_save_pretrained_of_a_tied_model_loads_in_transformers(tmp_path):
    reference = hf_model(PHI4_MINI, tmp_path / "hf")
    ours = Phi3ForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ours.save_pretrained(tmp_path / "ours")
    with safe_open(str(tmp_path / "ours" / "model.safetensors"), "pt") as reader:
        assert "lm_head.weight" not in reader.keys()
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["partial_rotary_factor"] == 0.75 and saved["tie_word_embeddings"] is True
    again = transformers.Phi3ForCausalLM.from_pretrained(tmp_path / "ours",
                                                         dtype=torch.float32).eval()
    ids = torch.arange(20)[None]
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


def test_random_tied_model_shares_one_table():
    config = Phi3Config(**{**PHI4_MINI, "rope_scaling": dict(PHI4_MINI["rope_scaling"])})
    model = random_model(config, torch.float32, "cpu", seed=3)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) < sum(
        p.numel() for p in random_model(Phi3Config(**PHI4), torch.float32, "cpu", 3).parameters())


def test_lora_on_the_tied_head_trains_apart_but_refuses_to_merge(tmp_path):
    """As in PEFT: the frozen table stays shared, lm_head's adapter is its own; merging it would
    change the embedding too, so merge_lora stops and says so."""
    hf_model(PHI4_MINI, tmp_path)
    ours = Phi3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    apply_lora(ours, r=2, lora_alpha=4, targets=("qkv_proj", "lm_head"))
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    with torch.no_grad():
        ours.lm_head.lora_B.normal_()
    with pytest.raises(ValueError,
                       match=r"tied weights \(model.embed_tokens.weight = lm_head.weight\)"):
        merge_lora(ours)


def test_lm_head_loss_reads_the_tied_table():
    from lorakernels.functional import lm_head_loss

    config = Phi3Config(**{**PHI4_MINI, "rope_scaling": dict(PHI4_MINI["rope_scaling"])})
    model = random_model(config, torch.float32, "cpu", seed=0)
    hidden = torch.randn(9, config.hidden_size)
    labels = torch.randint(0, config.vocab_size, (9,))
    loss = lm_head_loss(model.lm_head, hidden, labels)
    expected = torch.nn.functional.cross_entropy(hidden @ model.model.embed_tokens.weight.t(),
                                                 labels, reduction="sum")
    torch.testing.assert_close(loss, expected)


def test_longrope_factor_count_follows_the_rotary_dims():
    layout = {**PHI4_MINI, "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8,
                                            "long_factor": [1.0] * 8}}
    with pytest.raises(ValueError, match=r"rope_scaling.short_factor must have rotary_dim/2 = 6 "
                                         r"values \(head_dim 16 × partial_rotary_factor 0.75 = "
                                         r"12 rotated dims\), got 8"):
        Phi3Config(**layout)
    with pytest.raises(ValueError, match=r"partial_rotary_factor 0.1 must give an even number "
                                         r".* int\(16 \* 0.1\) = 1"):
        Phi3Config(**{**PHI4, "partial_rotary_factor": 0.1})


def test_transformers_5_rope_parameters_layout():
    """transformers 5 writes partial_rotary_factor and the original context inside
    rope_parameters."""
    config = transformers.Phi3Config(**PHI4_MINI)
    ours = Phi3Config.from_dict(json.loads(config.to_json_string()))
    assert (ours.partial_rotary_factor, ours.rotary_dim,
            ours.original_max_position_embeddings) == (0.75, 12, 16)
    assert ours.rope_scaling["long_factor"] == PHI4_MINI["rope_scaling"]["long_factor"]


def test_presets_hold_the_public_numbers():
    phi4 = Phi3Config.from_name("phi4")
    assert (phi4.hidden_size, phi4.num_hidden_layers, phi4.num_attention_heads,
            phi4.num_key_value_heads, phi4.head_dim, phi4.intermediate_size, phi4.vocab_size,
            phi4.rope_theta,
            phi4.max_position_embeddings, phi4.rope_scaling, phi4.sliding_window,
            phi4.tie_word_embeddings) == (5120, 40, 40, 10, 128, 17920, 100352, 250000.0, 16384,
                                          None, None, False)
    assert phi4.qkv_split_sizes == (5120, 1280, 1280)
    mini = Phi3Config.from_name("phi4-mini")
    assert (mini.hidden_size, mini.num_hidden_layers, mini.num_attention_heads,
            mini.num_key_value_heads, mini.head_dim, mini.rotary_dim, mini.intermediate_size,
            mini.vocab_size, mini.original_max_position_embeddings, mini.max_position_embeddings,
            mini.sliding_window,
            mini.tie_word_embeddings) == (3072, 32, 24, 8, 128, 96, 8192, 200064, 4096, 131072,
                                          262144, True)
    assert mini.qkv_split_sizes == (3072, 1024, 1024)
    assert len(mini.rope_scaling["short_factor"]) == len(mini.rope_scaling["long_factor"]) == 48
    assert mini.rope_scaling["long_factor"][-1] == 47.77
    # sqrt(1 + ln 32 / ln 4096)
    assert abs(mini.rope_attention_scaling - 1.1902380714238083) < 1e-12
    # transformers accepts the same numbers (it validates the factor count against the rotary dims).
    transformers.Phi3Config(**{k: v for k, v in mini.to_hf_dict().items()
                               if k not in ("architectures", "model_type", "torch_dtype")})


def test_greedy_generation_equals_transformers_and_stops_on_end_of_turn(tmp_path):
    reference = hf_model(PHI4_MINI, tmp_path)
    ours = Phi3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    prompt = torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(2))  # past 16
    free = ours.generate(prompt, max_new_tokens=8, stop_ids=())
    theirs = reference.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                eos_token_id=None, pad_token_id=1)
    assert torch.equal(free, theirs)
    new = free[0, 20:].tolist()
    # A stand-in for the family's end of turn: the first generated token not seen before it.
    first = next((j for j in range(1, len(new)) if new[j] not in new[:j]), 0)
    stopped = ours.generate(prompt, max_new_tokens=8, stop_ids=(new[first],))
    theirs = reference.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=new[first],
                                pad_token_id=1)
    assert torch.equal(stopped, theirs) and stopped.shape[1] == 21 + first


def test_checkpoint_stop_ids_reach_generation(tmp_path):
    """load_model's tokenizer stops on the checkpoint's generation_config.json eos ids and the
    template's end of turn; generate() without stop_ids uses config.json's eos."""
    import shutil

    from model.build import load_model

    hf_model({**PHI4_MINI, "vocab_size": 1088, "eos_token_id": 1024}, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_TOKENIZER_DIR / name, tmp_path / name)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1024, 1031, 5]}))
    model, tokenizer = load_model(str(tmp_path), torch.float32, torch.device("cpu"))
    assert stop_ids(tokenizer) == (5, 1024, 1031)  # 1031: <|end|>, the template's end of turn
    assert model.config.eos_token_id == 1024



@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_lora_logits_gradients_and_adapter_equal_peft(layout, tmp_path):
    """LoRA on every projection and the LM head (tied in Phi-4-mini): same logits and LoRA
    gradients as PEFT on transformers; our adapter file loads in PEFT with the same logits."""
    import peft

    from lorakernels.adapters import save_peft_adapter

    hf_model(LAYOUTS[layout], tmp_path / "base")
    targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"]
    hf, ours, ours_params = peft_and_ours(tmp_path / "base", targets)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(4))
    hf_logits, our_logits = hf(ids).logits, ours(ids)
    torch.testing.assert_close(our_logits, hf_logits, rtol=1e-4, atol=1e-4)
    hf_logits.square().mean().backward()
    our_logits.square().mean().backward()
    for name, param in hf.named_parameters():
        if "lora_" in name:
            got, want = ours_params[lora_key_from_peft(name)].grad, param.grad
            assert (got - want).abs().max() <= 1e-4 * want.abs().max(), name

    save_peft_adapter(ours, tmp_path / "adapter")
    base = transformers.Phi3ForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, our_logits.detach(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("vocab", [100352, 200064])
def test_chunked_loss_over_phi4_vocabularies(vocab):
    from lorakernels.functional import lm_head_loss

    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, vocab, bias=False)
    with torch.no_grad():
        head.weight.normal_(0, 0.5, generator=gen)
    hidden = torch.randn(40, 16, generator=gen, requires_grad=True)
    labels = torch.randint(0, vocab, (40,), generator=gen)
    labels[::7] = -100
    loss = lm_head_loss(head, hidden, labels)
    (grad,) = torch.autograd.grad(loss, hidden)
    # Against float64: fp32 sums over 200k logits round in any order (the plain fp32 loss's
    # gradient is off by 2.5e-5 here, the chunked one by 1.6e-6).
    hidden_ref = hidden.detach().double().requires_grad_()
    expected = torch.nn.functional.cross_entropy(hidden_ref @ head.weight.double().t(), labels,
                                                 reduction="sum")
    expected.backward()
    assert abs(loss.item() - expected.item()) <= 1e-5 * expected.item()
    assert (grad.double() - hidden_ref.grad).abs().max() <= 1e-5 * hidden_ref.grad.abs().max()
