"""Our layers against loralib 0.1.2: same state dicts, outputs and gradients, both directions."""
import copy

import pytest
import torch
import torch.nn as nn

import lorakernels as lora
from conftest import use_settings

loralib = pytest.importorskip("loralib")  # not on the GPU image: skip, do not fail collection

# (our class, loralib class, constructor kwargs, input maker)
LINEAR_IN = lambda: torch.randn(3, 5, 10)  # noqa: E731
LAYER_CASES = {
    "linear": (lora.Linear, loralib.Linear,
               dict(in_features=10, out_features=7, r=4, lora_alpha=8), LINEAR_IN),
    "linear_no_bias": (lora.Linear, loralib.Linear,
                       dict(in_features=10, out_features=7, r=4, lora_alpha=8, bias=False),
                       LINEAR_IN),
    "linear_fan_in_fan_out": (lora.Linear, loralib.Linear,
                              dict(in_features=10, out_features=7, r=2, lora_alpha=3,
                                   fan_in_fan_out=True),
                              LINEAR_IN),
    "merged_qv": (lora.MergedLinear, loralib.MergedLinear,
                  dict(in_features=10, out_features=12, r=3, lora_alpha=6,
                       enable_lora=[True, False, True]),
                  LINEAR_IN),
    "merged_all": (lora.MergedLinear, loralib.MergedLinear,
                   dict(in_features=10, out_features=12, r=2, lora_alpha=2,
                        enable_lora=[True, True, True]),
                   LINEAR_IN),
    "merged_fan_in_fan_out": (lora.MergedLinear, loralib.MergedLinear,
                              dict(in_features=10, out_features=8, r=2, lora_alpha=4,
                                   enable_lora=[False, True], fan_in_fan_out=True),
                              LINEAR_IN),
    "embedding": (lora.Embedding, loralib.Embedding,
                  dict(num_embeddings=20, embedding_dim=6, r=3, lora_alpha=6),
                  lambda: torch.randint(0, 20, (4, 7))),
    "embedding_padding": (lora.Embedding, loralib.Embedding,
                          dict(num_embeddings=20, embedding_dim=6, r=2, padding_idx=0),
                          lambda: torch.randint(0, 20, (4, 7))),
    "conv2d": (lora.Conv2d, loralib.Conv2d,
               dict(in_channels=3, out_channels=4, kernel_size=3, r=2, lora_alpha=4),
               lambda: torch.randn(2, 3, 8, 8)),
    "conv2d_groups": (lora.Conv2d, loralib.Conv2d,
                      dict(in_channels=4, out_channels=6, kernel_size=3, r=2, groups=2,
                           padding=1),
                      lambda: torch.randn(2, 4, 6, 6)),
    # loralib's Conv1d/Conv3d only work with kernel_size 1.
    "conv1d_k1": (lora.Conv1d, loralib.Conv1d,
                  dict(in_channels=3, out_channels=5, kernel_size=1, r=2),
                  lambda: torch.randn(2, 3, 9)),
    "conv3d_k1": (lora.Conv3d, loralib.Conv3d,
                  dict(in_channels=3, out_channels=5, kernel_size=1, r=2),
                  lambda: torch.randn(2, 3, 4, 4, 4)),
}


def randomise_lora(layer: nn.Module) -> None:
    """Give every LoRA factor non-zero values: a zero B (or A) would hide errors in the other."""
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.5)


def outputs_and_grads(layer: nn.Module, x: torch.Tensor):
    x = x.clone().requires_grad_(x.is_floating_point())
    y = layer(x)
    y.backward(torch.randn_like(y, generator=torch.Generator().manual_seed(1)))
    grads = {n: p.grad for n, p in layer.named_parameters() if p.requires_grad}
    return y.detach(), (x.grad if x.requires_grad else None), grads


@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_same_seed_gives_loralibs_initial_state(case):
    ours_cls, theirs_cls, kwargs, _ = LAYER_CASES[case]
    torch.manual_seed(0)
    ours = ours_cls(**kwargs)
    torch.manual_seed(0)
    theirs = theirs_cls(**kwargs)
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert list(ours_state) == list(theirs_state)
    for key in theirs_state:
        assert torch.equal(ours_state[key], theirs_state[key]), key
    assert ours.scaling == theirs.scaling
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in theirs.named_parameters() if p.requires_grad
    }


@pytest.mark.parametrize("direction", ["loralib_to_ours", "ours_to_loralib"])
@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_state_dict_interchange_gives_same_outputs_and_grads(case, direction):
    ours_cls, theirs_cls, kwargs, make_input = LAYER_CASES[case]
    torch.manual_seed(0)
    ours, theirs = ours_cls(**kwargs), theirs_cls(**kwargs)
    source, target = (theirs, ours) if direction == "loralib_to_ours" else (ours, theirs)
    randomise_lora(source)
    with torch.no_grad():  # a random base too, so nothing depends on sharing the seed
        for name, param in source.named_parameters():
            if "lora_" not in name:
                param.copy_(torch.randn_like(param))
    target.load_state_dict(source.state_dict(), strict=True)

    x = make_input()
    y_ours, dx_ours, grads_ours = outputs_and_grads(ours, x)
    y_theirs, dx_theirs, grads_theirs = outputs_and_grads(theirs, x)
    torch.testing.assert_close(y_ours, y_theirs)
    if dx_theirs is not None:
        torch.testing.assert_close(dx_ours, dx_theirs)
    assert set(grads_ours) == set(grads_theirs)
    for name in grads_theirs:
        torch.testing.assert_close(grads_ours[name], grads_theirs[name], msg=name)

    # eval() merges in both libraries: merged outputs and merged weights agree too.
    ours.eval(), theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, msg=key)


@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_merge_on_eval_equals_unmerged_and_unmerges_on_train(case):
    ours_cls, _, kwargs, make_input = LAYER_CASES[case]
    torch.manual_seed(0)
    layer = ours_cls(**kwargs)
    randomise_lora(layer)
    base_weight = layer.lora_base_weight.detach().clone()
    x = make_input()
    with torch.no_grad():
        unmerged = layer(x)
        layer.eval()
        assert layer.merged
        assert not torch.allclose(layer.lora_base_weight, base_weight)
        torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
        layer.train()
        assert not layer.merged
        torch.testing.assert_close(layer.lora_base_weight, base_weight, rtol=1e-6, atol=1e-6)


def test_no_merge_when_merge_weights_false():
    layer = lora.Linear(6, 4, r=2, merge_weights=False)
    randomise_lora(layer)
    weight = layer.weight.detach().clone()
    layer.eval()
    assert not layer.merged and torch.equal(layer.weight, weight)


def test_rank_zero_layers_are_plain_torch_layers():
    ours, plain = lora.Linear(6, 4), nn.Linear(6, 4)
    assert list(ours.state_dict()) == ["weight", "bias"]
    ours.load_state_dict(plain.state_dict())
    x = torch.randn(2, 6)
    torch.testing.assert_close(ours(x), plain(x))
    assert ours.weight.requires_grad


def test_dropout_draws_like_loralib(monkeypatch):
    """Same RNG state: our eager path drops exactly the elements loralib drops."""
    use_settings(monkeypatch, backend="eager")  # oneDNN's path draws its mask otherwise
    torch.manual_seed(0)
    theirs = loralib.Linear(10, 7, r=4, lora_alpha=8, lora_dropout=0.3)
    ours = lora.Linear(10, 7, r=4, lora_alpha=8, lora_dropout=0.3)
    randomise_lora(theirs)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(4, 10)
    torch.manual_seed(5)
    y_theirs = theirs(x)
    torch.manual_seed(5)
    y_ours = ours(x)
    torch.testing.assert_close(y_ours, y_theirs)
    assert not torch.allclose(y_ours, ours.eval()(x)), "dropout had no effect"


def twin_models():
    """The same small model built from loralib and from lorakernels."""

    def build(lib):
        torch.manual_seed(0)
        return nn.ModuleDict({
            "embed": lib.Embedding(20, 8, r=2),
            "qkv": lib.MergedLinear(8, 24, r=2, enable_lora=[True, False, True]),
            "proj": lib.Linear(8, 8, r=2),
            "proj_no_lora": lib.Linear(8, 8),
            "conv": lib.Conv2d(2, 2, 3, r=1),
            "plain": nn.Linear(8, 8),
            "norm": nn.LayerNorm(8),
        })

    return build(lora), build(loralib)


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_mark_only_lora_as_trainable_matches_loralib(bias):
    ours, theirs = twin_models()
    lora.mark_only_lora_as_trainable(ours, bias=bias)
    loralib.mark_only_lora_as_trainable(theirs, bias=bias)
    ours_flags = {n: p.requires_grad for n, p in ours.named_parameters()}
    theirs_flags = {n: p.requires_grad for n, p in theirs.named_parameters()}
    assert ours_flags == theirs_flags
    assert any(ours_flags.values()) and not all(ours_flags.values())


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_lora_state_dict_matches_loralib(bias):
    ours, theirs = twin_models()
    randomise_lora(theirs)
    ours.load_state_dict(theirs.state_dict())
    ours_sd = lora.lora_state_dict(ours, bias=bias)
    theirs_sd = loralib.lora_state_dict(theirs, bias=bias)
    assert list(ours_sd) == list(theirs_sd)
    for key in theirs_sd:
        assert torch.equal(ours_sd[key], theirs_sd[key]), key


def test_lora_checkpoint_round_trip_as_in_the_cookbook():
    """Base checkpoint first, then the LoRA-only checkpoint, both strict=False."""
    ours, theirs = twin_models()
    randomise_lora(theirs)
    fresh = copy.deepcopy(ours)
    fresh.load_state_dict(theirs.state_dict(), strict=False)
    result = fresh.load_state_dict(loralib.lora_state_dict(theirs), strict=False)
    assert not result.unexpected_keys
    x = torch.randn(3, 8)
    torch.testing.assert_close(fresh["qkv"](x), theirs["qkv"](x))
