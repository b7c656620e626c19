"""Three results that were silently wrong, each against the plain PyTorch formula:
the LM-head loss with a biased head, with a ``fan_in_fan_out`` LoRA head, and RoPE with a
cos/sin table of the wrong rank (it broadcast over the heads when T equalled their number)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

import lorakernels as lora
from lorakernels import functional
from lorakernels.functional import lm_head_loss
from lorakernels.ops.linear_cross_entropy import linear_cross_entropy
from lorakernels.reference import linear_cross_entropy_reference
from conftest import use_settings

BACKENDS = ("eager", "triton")


def case(hidden_size, vocab, rows=37, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, hidden_size, generator=gen).requires_grad_()
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    labels[::5] = -100
    return hidden, labels


def randomise(module, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)


def loss_and_grads(loss_fn, head, hidden):
    """The loss and the gradients of hidden and of every trainable parameter of ``head``."""
    params = [hidden] + [p for p in head.parameters() if p.requires_grad]
    loss = loss_fn()
    return [loss.detach()] + list(torch.autograd.grad(loss, params))


def plain_loss(head, hidden, labels):
    return F.cross_entropy(head(hidden).float(), labels, ignore_index=-100, reduction="sum")


def assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head", [
    lambda: nn.Linear(31, 123),
    lambda: lora.Linear(31, 123, r=4, lora_alpha=8, bias=True, merge_weights=False),
], ids=["nn.Linear", "lora.Linear"])
def test_lm_head_loss_includes_the_bias(head):
    head = head()
    randomise(head)
    hidden, labels = case(31, 123)
    got = loss_and_grads(lambda: lm_head_loss(head, hidden, labels), head, hidden)
    want = loss_and_grads(lambda: plain_loss(head, hidden, labels), head, hidden)
    assert len(got) == (5 if isinstance(head, lora.Linear) else 4)  # loss, hidden, bias and more
    assert_same(got, want)


@pytest.mark.parametrize("chunk_size", [1, 8, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_with_bias_equals_the_reference(chunk_size, dtype):
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(29, 16, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(50, 16, generator=gen) / 4).to(dtype).requires_grad_()
    bias = torch.randn(50, generator=gen).to(dtype).requires_grad_()
    labels = torch.randint(0, 50, (29,), generator=gen)
    got = linear_cross_entropy(hidden, weight, labels, chunk_size=chunk_size, bias=bias)
    want = linear_cross_entropy_reference(hidden, weight, labels, bias=bias)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want.float(), rtol=tol, atol=tol)
    for g, w in zip(torch.autograd.grad(got, (hidden, weight, bias)),
                    torch.autograd.grad(want, (hidden, weight, bias))):
        torch.testing.assert_close(g.float(), w.float(), rtol=tol, atol=tol)
    with torch.no_grad():  # the evaluation path, without gradients
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, labels, bias=bias), got)


def test_chunked_loss_refuses_a_misshaped_bias():
    hidden, labels = case(16, 50)
    with pytest.raises(ValueError, match=r"bias must be \[V\] = \[50\]"):
        linear_cross_entropy(hidden, torch.randn(50, 16), labels, bias=torch.zeros(49))


@pytest.mark.parametrize("vocab", [31, 123], ids=["H==V", "H!=V"])
def test_lm_head_loss_transposes_a_fan_in_fan_out_head(vocab):
    head = lora.Linear(31, vocab, r=4, lora_alpha=8, fan_in_fan_out=True, bias=False,
                       merge_weights=False)
    randomise(head)
    assert head.weight.shape == (31, vocab)
    hidden, labels = case(31, vocab)
    got = loss_and_grads(lambda: lm_head_loss(head, hidden, labels), head, hidden)
    want = loss_and_grads(lambda: plain_loss(head, hidden, labels), head, hidden)
    assert_same(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fan_in_fan_out_linear_equals_the_formula_on_every_backend(backend, monkeypatch):
    use_settings(monkeypatch, backend=backend)
    layer = lora.Linear(24, 40, r=4, lora_alpha=8, fan_in_fan_out=True, merge_weights=False)
    randomise(layer)
    x = torch.randn(6, 24)
    expected = x @ layer.weight + layer.bias + (x @ layer.lora_A.t() @ layer.lora_B.t()) * 2.0
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def heads(batch=2, n_heads=16, length=16, head_dim=64, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, n_heads, length, head_dim, generator=gen),
            torch.randn(batch, n_heads // 4, length, head_dim, generator=gen))


def tables(*shape, seed=4):
    angles = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", [1, 2], ids=["table-batch-1", "table-batch-B"])
def test_rope_matches_transformers_for_every_accepted_table(backend, batch, monkeypatch):
    use_settings(monkeypatch, backend=backend)
    q, k = heads()  # T == number of query heads: a wrong broadcast would go unnoticed by shape
    cos, sin = tables(batch, 16, 64)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos.expand(2, -1, -1), sin.expand(2, -1, -1))
    got_q, got_k = functional.rope(q, k, cos, sin)
    torch.testing.assert_close(got_q, want_q)
    torch.testing.assert_close(got_k, want_k)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(16, 64), (1, 1, 16, 64), (3, 16, 64), (2, 15, 64), (2, 16, 66),
                                   (2, 16, 7)],
                         ids=["2-D", "4-D", "other-batch", "other-length", "too-wide", "odd"])
def test_rope_refuses_tables_it_would_broadcast_wrongly(backend, shape, monkeypatch):
    use_settings(monkeypatch, backend=backend)
    q, k = heads()
    cos, sin = tables(*shape)
    with pytest.raises(ValueError, match=r"cos must be \[B, T, R\]|rotates an even number"):
        functional.rope(q, k, cos, sin)
