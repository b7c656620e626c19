"""LoRA injection into our Phi-3 against PEFT on transformers' Phi-3: same logits and gradients."""
import peft
import pytest
import torch
import transformers

import lorakernels as lora
from lorakernels.adapters import lora_key_from_peft
from model import Phi3ForCausalLM
from model.lora import apply_lora
from conftest import use_settings

SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             sliding_window=None, bos_token_id=1, eos_token_id=2, pad_token_id=2)
TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


@pytest.fixture()
def checkpoint(tmp_path):
    torch.manual_seed(0)
    hf = transformers.Phi3ForCausalLM(transformers.Phi3Config(**SMALL, attn_implementation="eager"))
    hf.save_pretrained(tmp_path)
    return tmp_path


def peft_and_ours(checkpoint, targets):
    """PEFT's LoRA (r 4, alpha 8) over transformers and ours over our model, on one checkpoint,
    with the same random factors (B off zero, so the low-rank path shows); ours' parameters."""
    hf = transformers.Phi3ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    hf = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                 target_modules=list(targets)))
    ours = apply_lora(Phi3ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32),
                      r=4, lora_alpha=8, targets=targets)
    ours_params = dict(ours.named_parameters())
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.2)
                ours_params[lora_key_from_peft(name)].copy_(param)
    return hf, ours, ours_params


def test_apply_lora_matches_peft(checkpoint):
    hf, ours, ours_params = peft_and_ours(checkpoint, TARGETS)
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 4 * 2 and all("lora_" in n for n in trainable)

    ids = torch.randint(0, 96, (2, 10))
    hf_logits, our_logits = hf(ids).logits, ours(ids)
    torch.testing.assert_close(our_logits, hf_logits, rtol=1e-4, atol=1e-4)
    hf_logits.square().mean().backward()
    our_logits.square().mean().backward()
    for name, param in hf.named_parameters():
        if "lora_" in name:
            key = lora_key_from_peft(name)
            torch.testing.assert_close(ours_params[key].grad, param.grad, rtol=1e-4, atol=1e-6)


def test_injection_shares_weights_and_starts_from_the_base(checkpoint):
    base = Phi3ForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
    ids = torch.randint(0, 96, (1, 8))
    with torch.no_grad():
        before = base(ids)
    qkv_weight = base.model.layers[0].self_attn.qkv_proj.weight
    apply_lora(base, r=4, lora_alpha=8, per_part=True)
    qkv = base.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, lora.MergedLinear) and qkv.weight is qkv_weight
    assert qkv.lora_parts.split_sizes == (64, 32, 32)  # GQA: 4 query heads, 2 KV heads of 16
    assert qkv.lora_A.dtype == torch.float32 and qkv.weight.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(base(ids), before)


def test_unknown_target_is_named(checkpoint):
    model = Phi3ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"unknown LoRA targets \['q_proj'\]"):
        apply_lora(model, targets=["q_proj"])


def test_lm_head_and_embedding_targets(checkpoint):
    model = Phi3ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    ids = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        before = model(ids)
    apply_lora(model, r=2, targets=["lm_head", "embed_tokens"])
    assert isinstance(model.lm_head, lora.Linear)
    assert isinstance(model.model.embed_tokens, lora.Embedding)
    model(ids).sum().backward()
    assert model.model.embed_tokens.lora_A.grad is not None
    assert model.lm_head.lora_A.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before)


def test_whole_model_on_the_triton_kernels_equals_eager(checkpoint, monkeypatch):
    """LORAKERNELS_BACKEND=triton routes LoRA linears, RMSNorm, RoPE and SwiGLU through the
    kernels (interpreted on CPU): logits and LoRA gradients equal the eager model's."""
    # the kernels need CUDA or the interpreter
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = apply_lora(Phi3ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32,
                                                       device=device),
                       r=4, lora_alpha=8)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    ids = torch.randint(0, 96, (2, 7), device=device)
    results = {}
    for backend in ("eager", "triton"):
        use_settings(monkeypatch, backend=backend)
        model.zero_grad()
        logits = model(ids)
        logits.square().mean().backward()
        results[backend] = (logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                              if p.requires_grad})
    torch.testing.assert_close(results["triton"][0], results["eager"][0], rtol=1e-4, atol=1e-5)
    for name, grad in results["eager"][1].items():
        torch.testing.assert_close(results["triton"][1][name], grad, rtol=1e-3, atol=1e-6, msg=name)


def test_embedding_lora_keeps_a_bf16_model_in_bf16(checkpoint):
    model = Phi3ForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
    apply_lora(model, r=2, targets=["embed_tokens", "qkv_proj"])
    hidden = model.model.embed_tokens(torch.randint(0, 96, (1, 5)))
    assert hidden.dtype == torch.bfloat16
    assert model(torch.randint(0, 96, (1, 5))).dtype == torch.bfloat16
