"""Phi3ForCausalLM.compile_layers: the compiled layers train exactly like the eager ones.

One decoder layer of the tiny preset, LoRA dropout on (both models draw the same masks:
the LoRA layers run eagerly in either), with and without gradient checkpointing. Skipped
where Inductor has no C++ compiler.
"""
import copy
import dataclasses

import pytest
import torch

from model import Phi3Config, Phi3ForCausalLM
from model.lora import apply_lora
from model.phi3 import compile_unavailable_reason
from training.loop import token_loss_sum


def one_layer_lora_model():
    torch.manual_seed(0)
    config = dataclasses.replace(Phi3Config.from_name("phi3-tiny"), num_hidden_layers=1)
    model = apply_lora(Phi3ForCausalLM(config), r=4, lora_alpha=8, lora_dropout=0.1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return model.train()


def losses_and_grads(model, batches):
    results = []
    for seed, batch in enumerate(batches):
        torch.manual_seed(seed)  # the dropout masks
        loss = token_loss_sum(model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        results.append((loss.detach(), grads))
    return results


@pytest.mark.skipif(compile_unavailable_reason(torch.nn.Linear(1, 1)) is not None,
                    reason="torch.compile's Inductor has no C++ compiler here")
@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_layers_match_eager(checkpointing):
    eager = one_layer_lora_model()
    compiled = copy.deepcopy(eager)
    assert compiled.compile_layers()
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(2):
        ids = torch.randint(0, 1088, (2, 32), generator=gen)
        batches.append({"input_ids": ids, "labels": ids, "position_ids": None, "segment_ids": None})
    for model in (eager, compiled):
        model.set_gradient_checkpointing(checkpointing)
    expected, actual = losses_and_grads(eager, batches), losses_and_grads(compiled, batches)
    for (loss, grads), (loss_ref, grads_ref) in zip(actual, expected):
        torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
        for name in grads_ref:
            torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_compile_layers_stays_eager_on_cuda_or_without_a_compiler(monkeypatch):
    model = one_layer_lora_model()
    monkeypatch.setattr("model.phi3.compile_unavailable_reason", lambda _: "no compiler")
    with pytest.warns(UserWarning, match="no compiler; the decoder layers stay eager"):
        assert not model.compile_layers()
