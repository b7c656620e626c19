"""KV-cached generation against full forwards and transformers' generate."""
import pytest
import torch
import transformers

from model import Phi3ForCausalLM
from model.generation import sample_next
from model.kv_cache import KVCache

SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             bos_token_id=1, eos_token_id=2, pad_token_id=2)


def build(tmp_path, **overrides):
    torch.manual_seed(0)
    hf = transformers.Phi3ForCausalLM(transformers.Phi3Config(**{**SMALL, **overrides},
                                                              attn_implementation="eager")).eval()
    hf.save_pretrained(tmp_path)
    return hf, Phi3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()


@pytest.mark.parametrize("sliding_window", [None, 6])
def test_cached_steps_equal_full_forward(tmp_path, sliding_window):
    _, model = build(tmp_path, sliding_window=sliding_window)
    ids = torch.randint(3, 96, (2, 16))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config, 2, 16, torch.float32, torch.device("cpu"))
        steps = [model(ids[:, :9], cache=cache)]
        steps += [model(ids[:, t:t + 1], cache=cache) for t in range(9, 16)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_greedy_equals_transformers_generate(tmp_path):
    hf, model = build(tmp_path, sliding_window=8)
    prompt = torch.randint(3, 96, (1, 5))
    ours = model.generate(prompt, max_new_tokens=12, stop_ids=())
    theirs = hf.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                         eos_token_id=None, pad_token_id=2)
    assert torch.equal(ours, theirs)


def test_stops_at_stop_id_and_pads_finished_rows(tmp_path):
    _, model = build(tmp_path)
    prompt = torch.randint(3, 96, (2, 4))
    free = model.generate(prompt, max_new_tokens=6, stop_ids=())
    stop = int(free[0, 5])  # the second generated token of row 0
    out = model.generate(prompt, max_new_tokens=6, stop_ids=(stop,), pad_id=0)
    assert out[0, 5] == stop and (out[0, 6:] == 0).all()


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, 0.7, gen)) for _ in range(200)}
    assert draws == {0, 1}
    assert int(sample_next(logits, 0.0, 1.0, None)) == 0
