"""NF4Linear / NF4MergedLinear: the dense LoRA layers' outputs and gradients over the dequantised
weight, fp32 scales that survive ``.to(dtype)``, and merging refused."""
import pytest
import torch
import torch.nn as nn

import lorakernels as lora
from lorakernels.nf4 import dequantize_nf4_reference, quantize_nf4
from lorakernels.nf4_layers import NF4MergedLinear
from conftest import use_settings


@pytest.fixture(autouse=True)
def eager_backend(monkeypatch):
    """One backend for both layers (auto would put the dense one on oneDNN): tight tolerances."""
    use_settings(monkeypatch, backend="eager")


def _dense_twin(nf4_layer, dense_layer):
    """``dense_layer`` given the NF4 layer's dequantised weight and its LoRA factors."""
    with torch.no_grad():
        dense_layer.weight.copy_(dequantize_nf4_reference(nf4_layer.nf4_weight, torch.float32))
        dense_layer.lora_A.copy_(nf4_layer.lora_A)
        dense_layer.lora_B.normal_()
        nf4_layer.lora_B.copy_(dense_layer.lora_B)
    return dense_layer


def _assert_same_outputs_and_grads(nf4_layer, dense_layer, in_features):
    x = torch.randn(2, 5, in_features)
    results = []
    for layer in (nf4_layer, dense_layer):
        xi = x.clone().requires_grad_()
        layer(xi).square().sum().backward()
        results.append((layer(x).detach(), xi.grad, layer.lora_A.grad, layer.lora_B.grad))
    for name, got, want in zip(("y", "dx", "dA", "dB"), *results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


def test_nf4_linear_equals_the_dense_layer_on_the_dequantised_weight():
    torch.manual_seed(0)
    nf4_layer = lora.NF4Linear.from_linear(nn.Linear(64, 48), r=4, lora_alpha=8)
    assert nf4_layer.lora_A.dtype == torch.float32 and not nf4_layer.weight_packed.requires_grad
    assert [n for n, p in nf4_layer.named_parameters()
            if p.requires_grad] == ["bias", "lora_A", "lora_B"]
    dense = _dense_twin(nf4_layer, lora.Linear(64, 48, r=4, lora_alpha=8))
    with torch.no_grad():
        dense.bias.copy_(nf4_layer.bias)
    _assert_same_outputs_and_grads(nf4_layer, dense, 64)


def test_nf4_merged_linear_per_part_equals_merged_linear():
    torch.manual_seed(1)
    options = dict(r=4, lora_alpha=8, enable_lora=[True, False, True], split_sizes=[32, 16, 16],
                   bias=False)
    nf4_layer = NF4MergedLinear(64, 64, dtype=torch.float32, **options)
    nf4_layer.quantize_weight(torch.randn(64, 64) * 0.1, torch.float32)
    _assert_same_outputs_and_grads(nf4_layer,
                                   _dense_twin(nf4_layer, lora.MergedLinear(64, 64, **options)),
                                   64)


def test_to_dtype_keeps_the_scales_exact_and_changes_the_products():
    layer = lora.NF4Linear.from_linear(nn.Linear(256, 128, bias=False).bfloat16(), r=4)
    scales = layer.nf4_weight.absmax_scale.clone()
    layer.to(torch.float32)
    assert layer.weight_dtype == torch.float32 and layer(torch.randn(3, 256)).dtype == torch.float32
    layer.to(torch.bfloat16)
    assert torch.equal(layer.nf4_weight.absmax_scale, scales)  # fp32 bits, untouched
    assert layer(torch.randn(3, 256, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_stored_absmax_holds_no_padding():
    q = quantize_nf4(torch.randn(1376, 256))  # 5504 blocks: not a multiple of 256
    assert q.absmax_q.untyped_storage().nbytes() == q.absmax_q.numel()


def test_merging_into_nf4_is_refused():
    layer = lora.NF4Linear.from_linear(nn.Linear(64, 32), r=4)
    with pytest.raises(ValueError, match="cannot merge LoRA into a 4-bit"):
        layer.set_merged(True)
