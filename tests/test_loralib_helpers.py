"""loralib's MergedLinear helpers (lora_ind, zero_pad, merge_AB), its ConvLoRA name, and its
current Conv layout (the conv's weight/bias registered at the top level) against loralib."""
import loralib
import pytest
import torch
import torch.nn as nn

import lorakernels as lora


def same_parameters(ours, theirs, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in theirs.parameters():
            param.copy_(torch.randn(param.shape, generator=gen))
    ours.load_state_dict(theirs.state_dict())


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("enable", [[True, False, True], [False, True, False]])
def test_merged_linear_helpers_equal_loralib(enable, fan_in_fan_out):
    options = dict(r=2, lora_alpha=4, enable_lora=enable, fan_in_fan_out=fan_in_fan_out)
    theirs, ours = loralib.MergedLinear(8, 12, **options), lora.MergedLinear(8, 12, **options)
    same_parameters(ours, theirs)
    assert torch.equal(ours.lora_ind, theirs.lora_ind)
    rows = torch.randn(4 * sum(enable), 5)
    torch.testing.assert_close(ours.zero_pad(rows), theirs.zero_pad(rows))
    torch.testing.assert_close(ours.merge_AB(), theirs.merge_AB())


def current_loralib_conv(*args, **kwargs):
    """loralib's Conv2d as its repository has it now: the conv's parameters also registered
    at the top level (``weight``, ``bias`` next to ``conv.weight``, ``conv.bias``)."""
    layer = loralib.Conv2d(*args, **kwargs)
    for name, param in list(layer.conv.named_parameters()):
        layer.register_parameter(name, param)
    return layer


@pytest.mark.parametrize("drop_conv_keys", [False, True], ids=["both", "top-level-only"])
def test_current_loralib_conv_state_dict_loads_strictly(drop_conv_keys):
    theirs = current_loralib_conv(3, 6, 3, r=2, lora_alpha=4)
    ours = lora.Conv2d(3, 6, 3, r=2, lora_alpha=4)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in theirs.parameters():
            param.copy_(torch.randn(param.shape, generator=gen))
    state = theirs.state_dict()
    assert {"weight", "bias", "conv.weight", "conv.bias"} <= set(state)
    if drop_conv_keys:
        state = {k: v for k, v in state.items() if not k.startswith("conv.")}
    ours.load_state_dict(state)  # strict
    torch.testing.assert_close(ours.conv.bias, theirs.bias)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(ours(x), theirs(x))


def test_conv_lora_takes_the_conv_module_as_loralib():
    layer = lora.ConvLoRA(nn.Conv1d, 3, 4, 1, r=2)
    assert isinstance(layer.conv, nn.Conv1d) and isinstance(lora.Conv2d(3, 4, 1), lora.ConvLoRA)
    reference = loralib.ConvLoRA(nn.Conv1d, 3, 4, 1, r=2)
    assert {k: v.shape for k, v in layer.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()}
