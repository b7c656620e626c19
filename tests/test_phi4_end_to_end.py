"""train.py, PEFT and merge.py on a Phi-4-mini-layout checkpoint saved by transformers.

Partial rotary (12 of 16 head dims), LongRoPE, grouped-query attention (3 query heads per
KV head) and tied embeddings, with Phi-4-mini's own chat template beside the weights
(no newlines after the role tags, unlike Phi-3's). The vocabulary is the tiny tokenizer's,
so the shipped example chats train on it.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from model.build import load_model
from model.chat import render_chat, tokenize_chat
from training.config import TrainConfig
from training.loop import train
from conftest import subprocess_timeout

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
TINY_TOKENIZER = ROOT / "model" / "assets" / "phi3-tiny"
PHI4_MINI_TEMPLATE = (  # microsoft/Phi-4-mini-instruct's, as in tests/test_chat_templates.py
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and "
    "message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + "
    "'<|tool|>' + message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + "
    "message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)
LAYOUT = dict(vocab_size=1088, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
              num_attention_heads=6, num_key_value_heads=2, partial_rotary_factor=0.75,
              rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.05 * i for i in range(6)],
                            "long_factor": [1.5 + 2.0 * i for i in range(6)]},
              max_position_embeddings=256, original_max_position_embeddings=64,
              sliding_window=262144, tie_word_embeddings=True, bos_token_id=1,
              eos_token_id=1024, pad_token_id=1024)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The base as transformers saves it, with the tiny tokenizer and Phi-4-mini's template."""
    directory = tmp_path_factory.mktemp("phi4-mini")
    torch.manual_seed(0)
    config = transformers.Phi3Config(**LAYOUT)
    transformers.Phi3ForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    shutil.copy(TINY_TOKENIZER / "tokenizer.json", directory)
    tokenizer_config = json.loads((TINY_TOKENIZER / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = PHI4_MINI_TEMPLATE
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return directory


@pytest.fixture(scope="module")
def adapter(checkpoint, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(TrainConfig(data=data, output=str(out), model=str(checkpoint), max_steps=3, device="cpu",
                      max_seq_len=96, lora_r=4, lr=3e-3, seed=3), log=lambda _: None)
    return out / "final"


def test_trains_on_the_checkpoints_own_template(checkpoint):
    _, tokenizer = load_model(str(checkpoint), torch.float32, torch.device("cpu"))
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    # No newline after the role tags: Phi-4-mini's template, not the tiny tokenizer's Phi-3 one.
    assert render_chat(messages, tokenizer=tokenizer) == \
        "<|user|>Hi<|end|><|assistant|>Hello<|end|><|endoftext|>"
    ids, mask = tokenize_chat(tokenizer, messages)
    trained = tokenizer.decode([i for i, keep in zip(ids, mask) if keep])
    assert trained.strip().startswith("Hello") and trained.endswith("<|end|>")


def test_adapter_loads_in_peft_with_our_logits(checkpoint, adapter):
    ours, _ = load_model(str(checkpoint), torch.float32, torch.device("cpu"), adapter=adapter)
    hf = transformers.Phi3ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    hf = peft.PeftModel.from_pretrained(hf, adapter).eval()
    ids = torch.randint(0, 1000, (1, 80), generator=torch.Generator().manual_seed(1))  # past 64
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_merged_checkpoint_loads_in_transformers_tied(checkpoint, adapter, tmp_path):
    merged_dir = tmp_path / "merged"
    result = subprocess.run([sys.executable, "merge.py", "--model", str(checkpoint), "--adapter",
                             str(adapter), "--output", str(merged_dir), "--dtype", "float32"],
                            capture_output=True, text=True, cwd=ROOT,
                            timeout=subprocess_timeout(300))
    assert result.returncode == 0, result.stderr
    with safe_open(str(merged_dir / "model.safetensors"), "pt") as reader:
        assert "lm_head.weight" not in reader.keys()  # tied, as transformers writes it
    merged = transformers.Phi3ForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    ours, _ = load_model(str(checkpoint), torch.float32, torch.device("cpu"), adapter=adapter)
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, ours.eval()(ids), rtol=1e-4, atol=1e-4)
    assert json.loads((merged_dir / "tokenizer_config.json").read_text())["chat_template"] \
        == PHI4_MINI_TEMPLATE
