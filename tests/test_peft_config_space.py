"""PEFT's LoRA config space: adapters PEFT itself makes with each target-selection option load
into our model with PEFT's logits (random Phi-3 and Phi-4-mini-layout checkpoints), our saved
copy reloads in PEFT with the same logits, and what we cannot load is refused in one line.

The table in docs/adapters.md lists these cases."""
import json
import warnings

import peft
import pytest
import torch
import transformers

from lorakernels.adapters import ADAPTER_CONFIG_FILE, AdapterLayout, save_peft_adapter
from model import Phi3ForCausalLM
from model.lora import apply_lora, apply_peft_adapter
from test_adapters import SMALL
from test_phi4_model import PHI4_MINI

LAYOUTS = {"phi3": SMALL, "phi4-mini": PHI4_MINI}
LINEAR = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
# PEFT LoraConfig options (beyond r=4, lora_alpha=8) per case; each loads and round-trips.
CASES = {
    "all-linear": dict(target_modules="all-linear"),
    "regex": dict(target_modules=r".*\.(qkv_proj|down_proj)"),
    "path-suffixes": dict(target_modules=["self_attn.qkv_proj", "layers.1.mlp.gate_up_proj"]),
    "exclude-list": dict(target_modules=LINEAR,
                         exclude_modules=["model.layers.0.self_attn.o_proj"]),
    "exclude-regex": dict(target_modules=LINEAR, exclude_modules=r".*\.1\.mlp\..*"),
    "rank-alpha-pattern": dict(target_modules=LINEAR,
                               rank_pattern={"qkv_proj": 8, "model.layers.1.mlp.down_proj": 2},
                               alpha_pattern={"o_proj": 3}),
    "rank-pattern-rslora": dict(target_modules=LINEAR, rank_pattern={"gate_up_proj": 6},
                                use_rslora=True),
    "layers-to-transform": dict(target_modules=LINEAR, layers_to_transform=[1],
                                layers_pattern="layers"),
    "layers-to-transform-int": dict(target_modules=LINEAR, layers_to_transform=0),
    "modules-to-save": dict(target_modules=LINEAR, modules_to_save=["lm_head"]),
    "lora-bias": dict(target_modules=["qkv_proj", "down_proj"], lora_bias=True),
}


@pytest.fixture(params=sorted(LAYOUTS))
def checkpoint(request, tmp_path):
    torch.manual_seed(0)
    config = transformers.Phi3Config(**LAYOUTS[request.param], attn_implementation="eager")
    transformers.Phi3ForCausalLM(config).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def hf_base(checkpoint):
    return transformers.Phi3ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)


def peft_adapter(checkpoint, directory, **options):
    """A PEFT model with ``options``, its adapter (and saved-whole modules) randomised, saved."""
    model = peft.get_peft_model(hf_base(checkpoint), peft.LoraConfig(
        r=4, lora_alpha=8, task_type="CAUSAL_LM", **options))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lora_bias on layers without a bias; embeddings saved
        model.save_pretrained(directory)
    return model.eval()


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out)


def ids():
    return torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))


def lora_paths(model):
    return {name.removeprefix("base_model.model.").rpartition(".lora_A")[0]
            for name, _ in model.named_parameters() if ".lora_A" in name}


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_loads_with_peft_logits_and_round_trips(case, checkpoint, tmp_path):
    reference = peft_adapter(checkpoint, tmp_path / "peft", **CASES[case])
    ours = apply_peft_adapter(Phi3ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32),
                              tmp_path / "peft").eval()
    assert lora_paths(ours) == {p.removesuffix(".default") for p in lora_paths(reference)}
    want = logits(reference, ids())
    torch.testing.assert_close(logits(ours, ids()), want, rtol=1e-4, atol=1e-4)

    save_peft_adapter(ours, tmp_path / "ours")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = peft.PeftModel.from_pretrained(hf_base(checkpoint), tmp_path / "ours").eval()
    assert not [w for w in caught if "missing" in str(w.message).lower()
                or "unexpected" in str(w.message).lower()]
    torch.testing.assert_close(logits(again, ids()), want, rtol=1e-4, atol=1e-4)


def test_apply_lora_takes_peft_options_and_peft_reloads_them(tmp_path):
    """Trained here with a regex, rank/alpha patterns and layers_to_transform: PEFT builds the
    same layers from the saved config and gives the same logits."""
    torch.manual_seed(0)
    transformers.Phi3ForCausalLM(transformers.Phi3Config(**SMALL)).save_pretrained(tmp_path / "b")
    layout = AdapterLayout(r".*\.layers\.\d+\.(self_attn\.qkv_proj|mlp\.down_proj)",
                           rank_pattern={"qkv_proj": 6}, alpha_pattern={"down_proj": 2.0})
    model = apply_lora(Phi3ForCausalLM.from_pretrained(tmp_path / "b", dtype=torch.float32),
                       r=4, lora_alpha=8, targets=layout)
    layers = {p: m for p, m in model.named_modules() if hasattr(m, "lora_A")}
    assert {(p.rpartition(".")[2], m.r, m.lora_alpha) for p, m in layers.items()} == {
        ("qkv_proj", 6, 8), ("down_proj", 4, 2.0)}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.2)
    save_peft_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG_FILE).read_text())
    assert (config["target_modules"], config["rank_pattern"], config["alpha_pattern"]) == (
        layout.target_modules, {"qkv_proj": 6}, {"down_proj": 2.0})
    loaded = peft.PeftModel.from_pretrained(hf_base(tmp_path / "b"), tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(loaded, ids()), logits(model.eval(), ids()),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("targets, options", [
    ("all-linear", {}),
    (LINEAR, dict(layers_to_transform=[0])),
    (LINEAR, dict(exclude_modules=["o_proj"], rank_pattern={"model.layers.1.mlp.down_proj": 2})),
], ids=["all-linear", "layers-to-transform", "exclude-rank-pattern"])
def test_apply_lora_selects_what_peft_selects(targets, options, tmp_path):
    torch.manual_seed(0)
    transformers.Phi3ForCausalLM(transformers.Phi3Config(**SMALL)).save_pretrained(tmp_path)
    reference = peft.get_peft_model(hf_base(tmp_path), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, **options))
    ours = apply_lora(Phi3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32), r=4,
                      lora_alpha=8, targets=AdapterLayout(targets, **options))
    peft_ranks = {p.removesuffix(".default"): m.r["default"]
                  for p, m in reference.base_model.model.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert {p: m.r for p, m in ours.named_modules() if hasattr(m, "lora_A")} == peft_ranks


def edit_config(directory, **changes):
    path = directory / ADAPTER_CONFIG_FILE
    config = json.loads(path.read_text())
    config.update(changes)
    for key in [k for k, v in changes.items() if v is KeyError]:
        del config[key]
    path.write_text(json.dumps(config))


@pytest.fixture()
def plain_adapter(tmp_path):
    torch.manual_seed(0)
    transformers.Phi3ForCausalLM(transformers.Phi3Config(**SMALL)).save_pretrained(tmp_path / "b")
    peft_adapter(tmp_path / "b", tmp_path / "a", target_modules=LINEAR)
    return tmp_path / "b", tmp_path / "a"


def load_ours(base, adapter):
    return apply_peft_adapter(Phi3ForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)


@pytest.mark.parametrize("changes, message", [
    (dict(target_modules=KeyError), r"target_modules is missing"),
    (dict(r=0), r"r must be a positive integer, got 0"),
    (dict(r="4"), r"r must be a positive integer, got '4'"),
    (dict(lora_alpha="8"), r"lora_alpha must be a number, got '8'"),
    (dict(rank_pattern={"qkv_proj": 0}), r"rank_pattern must be a mapping .* positive rank"),
    (dict(target_modules=[1, 2]), r"target_modules must be a regex string or a list"),
    (dict(init_lora_weights="pissa"), r"init_lora_weights 'pissa' changed the base weights .*"
                                      r"path_initial_model_for_weight_conversion"),
    (dict(init_lora_weights="olora"), r"init_lora_weights 'olora' changed the base"),
    (dict(init_lora_weights="loftq"), r"init_lora_weights 'loftq' changed the base"),
    (dict(init_lora_weights="corda"), r"init_lora_weights 'corda' changed the base"),
    (dict(layer_replication=[[0, 1]]), r"unsupported PEFT options set: layer_replication"),
], ids=["no-target_modules", "r-0", "r-string", "alpha-string", "rank-pattern-0",
        "target-ints", "pissa", "olora", "loftq", "corda", "layer-replication"])
def test_bad_adapter_config_is_refused_in_one_line(plain_adapter, changes, message):
    base, adapter = plain_adapter
    edit_config(adapter, **changes)
    with pytest.raises(ValueError, match=rf"^{adapter / ADAPTER_CONFIG_FILE}: {message}") as error:
        load_ours(base, adapter)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("text, message", [
    ('{"peft_type": "LORA", "r": 4,', "not valid JSON"),
    ('[{"peft_type": "LORA"}]', "expected a JSON object of LoRA options, got a list"),
])
def test_unreadable_adapter_config_is_refused_in_one_line(plain_adapter, text, message):
    base, adapter = plain_adapter
    (adapter / ADAPTER_CONFIG_FILE).write_text(text)
    with pytest.raises(ValueError, match=rf"^{adapter / ADAPTER_CONFIG_FILE}: {message}"):
        load_ours(base, adapter)


def test_config_without_r_and_alpha_takes_peft_defaults(tmp_path):
    torch.manual_seed(0)
    transformers.Phi3ForCausalLM(transformers.Phi3Config(**SMALL)).save_pretrained(tmp_path / "b")
    model = peft.get_peft_model(hf_base(tmp_path / "b"), peft.LoraConfig(target_modules=LINEAR))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.2)
    model.save_pretrained(tmp_path / "a")
    edit_config(tmp_path / "a", r=KeyError, lora_alpha=KeyError)
    reloaded = peft.PeftModel.from_pretrained(hf_base(tmp_path / "b"), tmp_path / "a").eval()
    ours = load_ours(tmp_path / "b", tmp_path / "a").eval()
    torch.testing.assert_close(logits(ours, ids()), logits(reloaded, ids()), rtol=1e-4, atol=1e-4)


def test_pissa_loads_once_converted_by_peft(tmp_path):
    """Unconverted, PiSSA is refused (above); PEFT's conversion makes a plain adapter of rank 2r
    on the original base, which loads with the logits of the PiSSA-trained model."""
    torch.manual_seed(0)
    transformers.Phi3ForCausalLM(transformers.Phi3Config(**SMALL)).save_pretrained(tmp_path / "b")
    model = peft.get_peft_model(hf_base(tmp_path / "b"), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=LINEAR, init_lora_weights="pissa_niter_2"))
    model.peft_config["default"].init_lora_weights = True
    model.save_pretrained(tmp_path / "init")
    with torch.no_grad():  # "training"
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(tmp_path / "converted",
                          path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    assert json.loads((tmp_path / "converted" / ADAPTER_CONFIG_FILE).read_text())["r"] == 8
    ours = load_ours(tmp_path / "b", tmp_path / "converted").eval()
    torch.testing.assert_close(logits(ours, ids()), logits(model.eval(), ids()),
                               rtol=1e-4, atol=1e-4)


def test_train_py_options_are_written_back_for_peft(tmp_path):
    """train.py with a path-suffix list, layers_to_transform, rank and alpha patterns: PEFT
    rebuilds the same layers from final/ over the same base, with the same logits."""
    from adapter_base import preset_seed
    from model.build import load_model
    from training.config import parse_config
    from training.loop import train

    config = parse_config(["--data", "examples/chat.jsonl", "--output", str(tmp_path / "run"),
                           "--max-steps", "2", "--max-seq-len", "64", "--device", "cpu",
                           "--target-modules", "qkv_proj", "mlp.down_proj",
                           "--layers-to-transform", "1", "--rank-pattern", "qkv_proj=8",
                           "--alpha-pattern", "down_proj=4", "--lora-dropout", "0"])
    assert (config.rank_pattern, config.alpha_pattern) == ({"qkv_proj": 8}, {"down_proj": 4.0})
    train(config, log=lambda _: None)
    final = tmp_path / "run" / "final"
    saved = json.loads((final / ADAPTER_CONFIG_FILE).read_text())
    assert (saved["layers_to_transform"], saved["rank_pattern"]) == ([1], {"qkv_proj": 8})
    seed = preset_seed("phi3-tiny", final, None)
    ours, _ = load_model("phi3-tiny", torch.float32, torch.device("cpu"), seed, adapter=final)
    assert {(p, m.r, m.lora_alpha) for p, m in ours.named_modules() if hasattr(m, "lora_A")} == {
        ("model.layers.1.self_attn.qkv_proj", 8, 32.0), ("model.layers.1.mlp.down_proj", 16, 4.0)}
    base, _ = load_model("phi3-tiny", torch.float32, torch.device("cpu"), seed)
    base.save_pretrained(tmp_path / "base")
    reference = peft.PeftModel.from_pretrained(hf_base(tmp_path / "base"), final).eval()
    tokens = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(ours.eval(), tokens), logits(reference, tokens),
                               rtol=1e-4, atol=1e-4)
