"""The oneDNN CPU path (lorakernels/ops/onednn_lora_linear.py) against lorakernels.reference.

Outputs and every gradient in fp32, with the path's own dropout mask replayed from the
same seed into the reference; tolerances as the Triton kernels' fp32 ones (only the
order of fp32 accumulation differs).
"""
import pytest
import torch

import lorakernels as lora
from lorakernels.lora_call import LoRACall
from lorakernels.ops.onednn_lora_linear import dropped_mask, linear, onednn_lora_linear
from lorakernels.reference import lora_linear_reference, merged_lora_linear_reference
from conftest import use_settings

PARTS = {
    "plain": (40, None),
    "gqa_k_off": (64, lora.LoRAParts((40, 12, 12), (True, False, True))),
    "gate_up": (80, lora.LoRAParts((40, 40), (True, True))),
}


def make_inputs(out_features, parts, bias, train_weight, K=24, r=4, lead=(3, 7)):
    gen = torch.Generator().manual_seed(7)
    groups = 1 if parts is None else parts.num_enabled
    n_lora = out_features if parts is None else parts.lora_out_features
    tensors = {"x": torch.randn(*lead, K, generator=gen),
               "weight": torch.randn(out_features, K, generator=gen) * K ** -0.5,
               "bias": torch.randn(out_features, generator=gen) if bias else None,
               "lora_A": torch.randn(r * groups, K, generator=gen) * K ** -0.5,
               "lora_B": torch.randn(n_lora, r, generator=gen)}
    trainable = {"x", "bias", "lora_A", "lora_B"} | ({"weight"} if train_weight else set())
    return {k: None if t is None else t.requires_grad_(k in trainable) for k, t in tensors.items()}


def forward_backward(fn, inputs, dy):
    leaves = {k: None if t is None else t.detach().clone().requires_grad_(t.requires_grad)
              for k, t in inputs.items()}
    y = fn(**leaves)
    y.backward(dy)
    return y, {k: t.grad for k, t in leaves.items() if t is not None and t.requires_grad}


@pytest.mark.parametrize("variant", list(PARTS))
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("bias,train_weight", [(True, False), (False, True)])
def test_matches_reference(variant, dropout_p, bias, train_weight):
    out_features, parts = PARTS[variant]
    inputs = make_inputs(out_features, parts, bias, train_weight)
    scaling = 0.5
    dy = torch.randn(*inputs["x"].shape[:-1], out_features)

    torch.manual_seed(11)
    def ours(x, weight, bias, lora_A, lora_B):
        return onednn_lora_linear(x, weight, bias,
                                  LoRACall(lora_A, lora_B, scaling, dropout_p, parts))

    y, grads = forward_backward(ours, inputs, dy)

    torch.manual_seed(11)  # the same draw: the mask the path used
    x = inputs["x"]
    dropped = dropped_mask(x.reshape(-1, x.shape[-1]).shape, dropout_p, x.device).view(x.shape)

    def reference(x, weight, bias, lora_A, lora_B):
        lora_input = x.masked_fill(dropped, 0.0) / (1 - dropout_p) if dropout_p > 0 else None
        if parts is None:
            return lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, lora_input)
        return merged_lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, parts,
                                            lora_input)

    y_ref, grads_ref = forward_backward(reference, inputs, dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-5, msg=name)


def test_dropout_keeps_each_element_with_probability_one_minus_p():
    torch.manual_seed(0)
    dropped = dropped_mask(torch.Size([1000, 1000]), 0.05, torch.device("cpu"))
    assert dropped.dtype == torch.bool
    assert abs(dropped.float().mean().item() - 0.05) < 1e-3  # 4.5 standard deviations
    # Independent elements: neighbours are dropped together as often as chance says.
    both = (dropped[:, 1:] & dropped[:, :-1]).float().mean().item()
    assert abs(both - 0.05 ** 2) < 3e-4


def test_linear_fuses_bias_and_addend():
    x, weight, bias, add = torch.randn(9, 16), torch.randn(5, 16), torch.randn(5), torch.randn(9, 5)
    torch.testing.assert_close(linear(x, weight, bias, add), x @ weight.t() + bias + add)
    torch.testing.assert_close(linear(x, weight.t().contiguous().t()), x @ weight.t())
    torch.testing.assert_close(linear(x[:0], weight), torch.zeros(0, 5))
    scale = torch.rand(5)  # DoRA's m/n as the post-op, after the bias
    torch.testing.assert_close(linear(x, weight, bias, col_scale=scale),
                               (x @ weight.t() + bias) * scale)
    with pytest.raises(ValueError, match="one post-op"):
        linear(x, weight, add=add, col_scale=scale)


def test_layer_in_bf16_falls_back_to_the_reference(monkeypatch):
    use_settings(monkeypatch, backend="onednn")
    layer = lora.Linear(16, 8, r=2, lora_alpha=4).to(torch.bfloat16)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    expected = lora_linear_reference(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B,
                                     layer.scaling)
    torch.testing.assert_close(layer(x), expected)
