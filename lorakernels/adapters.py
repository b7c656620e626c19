"""LoRA adapters in and out: PEFT's adapter directory, loralib's state dict, merged weights.

``save_peft_adapter``/``load_peft_adapter`` speak PEFT's LoRA format
(``adapter_model.safetensors`` + ``adapter_config.json``), so an adapter trained
here loads with ``peft.PeftModel.from_pretrained`` on transformers' Phi-3 and
back; DoRA layers carry their magnitude under PEFT's ``lora_magnitude_vector`` with
``use_dora: true``. ``save_lora_state_dict``/``load_lora_state_dict`` keep loralib's keys
(and ``lora_magnitude`` for DoRA, which loralib lacks).
``merge_lora`` folds the adapters into plain layers for a standalone checkpoint.
Every load checks every key and shape and names what does not match.
"""
import json
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor, distribute_tensor

from .weight_files import atomic_write, key_mismatch_message, match_keys, open_safetensors
from .layers import Embedding, Linear, LoRALayer
from .nf4_layers import NF4Layer
from .params import lora_state_dict

ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
LORA_FILE = "lora.safetensors"
# PEFT's keys are the wrapped model's: PeftModel.base_model (LoraModel).model (the transformer).
PEFT_PREFIX = "base_model.model."
# PEFT config options that change the adapter's math or its key set beyond what our layers
# hold; each is falsy (off) by default.
UNSUPPORTED_PEFT_OPTIONS = (
    "layer_replication", "trainable_token_indices", "target_parameters", "alora_invocation_tokens",
)
PEFT_DEFAULT_R = PEFT_DEFAULT_ALPHA = 8  # LoraConfig's defaults for a config without them
# init_lora_weights values that leave the base weights alone (B·A = 0 at init, or random
# factors saved as they are); PiSSA, OLoRA, CorDA, LoftQ and LoRA-GA rewrite the base instead.
BASE_KEEPING_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")

ALL_LINEAR = "all-linear"  # PEFT's shorthand: every linear layer but the output head

PathLike = Union[str, Path]
TargetModules = Union[str, Sequence[str]]


def _lora_layers(model: nn.Module) -> Dict[str, LoRALayer]:
    """Every layer with a low-rank path, by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer) and m.has_lora}


def _peft_lora_layers(model: nn.Module) -> Dict[str, LoRALayer]:
    """The LoRA layers, refusing any that PEFT's LoRA format cannot hold."""
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers "
                         "(apply LoRA first, e.g. model.lora.apply_lora)")
    other = [name for name, m in layers.items() if not isinstance(m, (Linear, Embedding))]
    if other:
        raise ValueError("PEFT's format holds LoRA Linear and Embedding layers only, not: "
                         + ", ".join(other))
    per_part = [name for name, m in layers.items()
                if isinstance(m, Linear) and m.lora_parts is not None
                and len(m.lora_parts.split_sizes) > 1]
    if per_part:
        raise ValueError(
            f"per-part LoRA on fused projections ({', '.join(per_part)}) has no PEFT equivalent: "
            "PEFT keeps one A/B pair per module, these layers have one pair per part (q, k, v or "
            "gate, up); apply LoRA with per_part=False to exchange adapters with PEFT"
        )
    return layers


def _peft_factor_keys(path: str, layer: LoRALayer) -> Tuple[str, str]:
    """PEFT's file keys for ``layer``'s A and B (without the adapter name, as PEFT saves them).

    Same shapes as ours, no transpose: Linear A [r, in], B [out, r]; Embedding A
    [r, num_embeddings], B [embedding_dim, r], stored in a ParameterDict, hence no ``.weight``.
    """
    if isinstance(layer, Embedding):
        return f"{PEFT_PREFIX}{path}.lora_embedding_A", f"{PEFT_PREFIX}{path}.lora_embedding_B"
    return f"{PEFT_PREFIX}{path}.lora_A.weight", f"{PEFT_PREFIX}{path}.lora_B.weight"


def _peft_key_map(layers: Dict[str, LoRALayer]) -> Dict[str, str]:
    """PEFT file key → our state-dict key, for every LoRA factor, B bias and DoRA magnitude."""
    keys = {}
    for path, layer in layers.items():
        key_a, key_b = _peft_factor_keys(path, layer)
        keys[key_a], keys[key_b] = f"{path}.lora_A", f"{path}.lora_B"
        if _uses_dora(layer):
            keys[f"{PEFT_PREFIX}{path}.lora_magnitude_vector"] = f"{path}.lora_magnitude"
        if "lora_B_bias" in layer._parameters:
            keys[f"{PEFT_PREFIX}{path}.lora_B.bias"] = f"{path}.lora_B_bias"
    return keys


def _saved_whole_keys(model: nn.Module, layout: Optional["AdapterLayout"]) -> Dict[str, str]:
    """PEFT file key → our key for each parameter of the modules in ``modules_to_save``."""
    if layout is None or not layout.modules_to_save:
        return {}
    return {f"{PEFT_PREFIX}{name}": name for name, _ in model.named_parameters()
            if layout.saves_whole(name.rpartition(".")[0])}


def _uses_dora(layer: LoRALayer) -> bool:
    return bool(getattr(layer, "use_dora", False))


def _shared_hyperparameters(layers: Dict[str, LoRALayer]) -> Dict[str, object]:
    """use_rslora, use_dora and lora_dropout: PEFT's config holds each once (r and alpha may
    differ per layer: ``_rank_and_alpha``).

    Embeddings are left out of the dropout check: neither PEFT nor we apply dropout to them.
    """
    values = {
        "use_rslora": {name: bool(m.use_rslora) for name, m in layers.items()},
        "use_dora": {name: _uses_dora(m) for name, m in layers.items()},
        "lora_dropout": {name: m.lora_dropout.p for name, m in layers.items()
                         if not isinstance(m, Embedding)},
    }
    shared = {}
    for option, by_layer in values.items():
        groups: Dict[object, List[str]] = {}
        for name, value in by_layer.items():
            groups.setdefault(value, []).append(name)
        if len(groups) > 1:
            listing = "; ".join(f"{value!r}: {', '.join(names)}" for value, names in groups.items())
            raise ValueError(f"LoRA layers differ in {option} ({listing}); PEFT's "
                             "adapter_config.json holds one value for all layers")
        shared[option] = next(iter(groups), 0.0)  # 0.0: only embeddings, which have no dropout
    return shared


def _pattern_for(values: Dict[str, float], given: Dict[str, float]
                 ) -> Tuple[float, Dict[str, float]]:
    """A default and a PEFT pattern that give every layer its value: ``given`` (the layout's own
    pattern) over the commonest value of the layers it leaves alone when that is exact, else
    full module paths for the layers that differ from the commonest value."""
    rest = [v for path, v in values.items()
            if _pattern_value(given, path, None) is None] or list(values.values())
    default = Counter(rest).most_common(1)[0][0]
    if all(_pattern_value(given, path, default) == v for path, v in values.items()):
        return default, dict(given)
    default = Counter(values.values()).most_common(1)[0][0]
    return default, {path: v for path, v in values.items() if v != default}


def _rank_and_alpha(layers: Dict[str, LoRALayer], layout: Optional["AdapterLayout"]
                    ) -> Dict[str, object]:
    """adapter_config.json's r, lora_alpha, rank_pattern and alpha_pattern for these layers."""
    layout = layout or AdapterLayout(())
    r, rank_pattern = _pattern_for({p: m.r for p, m in layers.items()}, layout.rank_pattern)
    alpha, alpha_pattern = _pattern_for({p: m.lora_alpha for p, m in layers.items()},
                                        layout.alpha_pattern)
    return {"r": r, "lora_alpha": alpha, "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern}


def _matches(patterns: TargetModules, path: str) -> bool:
    """PEFT's rule: a string is a regex matched against the whole path, a list names path
    suffixes."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, path) is not None
    return path in patterns or any(path.endswith(f".{p}") for p in patterns)


def _layer_index(path: str, layers_pattern: Optional[Tuple[str, ...]]) -> Optional[int]:
    """The first numbered segment of ``path`` (after one of ``layers_pattern``), as PEFT
    reads it."""
    patterns = layers_pattern or (r"[^.]*",)
    for pattern in patterns:
        found = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", path)
        if found:
            return int(found.group(1))
    return None


def _pattern_value(patterns: Dict[str, float], path: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: the first key matching the end of the path."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


@dataclass(frozen=True)
class AdapterLayout:
    """Where a PEFT LoRA adapter sits in a model: the adapter_config.json keys that say which
    modules get LoRA (with PEFT's matching rules), with what rank and alpha, which modules are
    saved whole and whether B has a bias. Field names and meanings are PEFT's LoraConfig's.

    ``target_modules``: a regex over the whole module path, or path suffixes (a tuple);
    ``"all-linear"`` is resolved by ``resolve`` into the paths of every linear but the head.
    """

    target_modules: TargetModules
    exclude_modules: Optional[TargetModules] = None
    layers_to_transform: Optional[Tuple[int, ...]] = None
    layers_pattern: Optional[Tuple[str, ...]] = None
    rank_pattern: Dict[str, int] = field(default_factory=dict)
    alpha_pattern: Dict[str, float] = field(default_factory=dict)
    modules_to_save: Tuple[str, ...] = ()
    lora_bias: bool = False

    def __post_init__(self):
        for name in ("target_modules", "exclude_modules", "layers_pattern"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                object.__setattr__(self, name, tuple(value))
        for name in ("layers_pattern", "layers_to_transform"):
            value = getattr(self, name)
            if isinstance(value, (str, int)):
                object.__setattr__(self, name, (value,))
        object.__setattr__(self, "modules_to_save", tuple(self.modules_to_save or ()))
        object.__setattr__(self, "rank_pattern", dict(self.rank_pattern or {}))
        object.__setattr__(self, "alpha_pattern", dict(self.alpha_pattern or {}))

    def saves_whole(self, path: str) -> bool:
        """PEFT's modules_to_save rule: the path ends with one of the names (no dot needed)."""
        return any(path.endswith(name) for name in self.modules_to_save)

    def selects(self, path: str) -> bool:
        """Whether the module at ``path`` gets LoRA: PEFT's ``check_target_module_exists``."""
        if self.exclude_modules and _matches(self.exclude_modules, path):
            return False
        if any(re.match(rf"(^|.*\.){m}($|\..*)", path) for m in self.modules_to_save):
            return False
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, path) is not None
        if path in self.target_modules:
            return True
        if not any(path.endswith(f".{t}") for t in self.target_modules):
            return False
        if not self.layers_to_transform:
            return True
        return _layer_index(path, self.layers_pattern) in self.layers_to_transform

    def rank(self, path: str, r: int) -> int:
        return int(_pattern_value(self.rank_pattern, path, r))

    def alpha(self, path: str, lora_alpha: float) -> float:
        return _pattern_value(self.alpha_pattern, path, lora_alpha)

    def resolve(self, model: nn.Module) -> "AdapterLayout":
        """``all-linear`` as PEFT expands it: the path of every nn.Linear but the output head."""
        if not (isinstance(self.target_modules, str) and self.target_modules.lower() == ALL_LINEAR):
            return self
        head = getattr(model, "lm_head", None)
        paths = tuple(sorted(path for path, module in model.named_modules()
                             if isinstance(module, nn.Linear) and module is not head))
        return replace(self, target_modules=paths)

    @classmethod
    def from_config(cls, config: dict) -> "AdapterLayout":
        """The layout an adapter_config.json (checked by ``read_peft_config``) describes."""
        return cls(config["target_modules"], config.get("exclude_modules"),
                   config.get("layers_to_transform"), config.get("layers_pattern"),
                   config.get("rank_pattern") or {}, config.get("alpha_pattern") or {},
                   config.get("modules_to_save") or (), bool(config.get("lora_bias")))

    def config(self) -> Dict[str, object]:
        """These fields as adapter_config.json holds them."""
        def listed(value):
            return value if value is None or isinstance(value, str) else list(value)
        return {
            "target_modules": listed(self.target_modules),
            "exclude_modules": listed(self.exclude_modules),
            "layers_to_transform": listed(self.layers_to_transform),
            "layers_pattern": listed(self.layers_pattern),
            "rank_pattern": dict(self.rank_pattern), "alpha_pattern": dict(self.alpha_pattern),
            "modules_to_save": list(self.modules_to_save) or None, "lora_bias": self.lora_bias,
        }


def _check_targets(model: nn.Module, layers: Dict[str, LoRALayer], layout: "AdapterLayout",
                   source: str, strict: bool) -> None:
    """PEFT puts LoRA on exactly the Linear/Embedding modules the config targets: same set as
    ours?"""
    targeted = {
        path for path, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Embedding)) and layout.selects(path)
    }
    untargeted = sorted(set(layers) - targeted)
    without_lora = sorted(targeted - set(layers))
    if not untargeted and not without_lora:
        return
    problems = [f"{label} ({len(paths)}): {', '.join(paths[:20])}" for label, paths in (
        ("LoRA layers not in target_modules", untargeted),
        ("target_modules without LoRA in the model", without_lora)) if paths]
    _report(f"{source}: target_modules {layout.target_modules!r} do not match the model's LoRA "
            "layers:\n  " + "\n  ".join(problems), strict)


def _report(message: str, strict: bool) -> None:
    """A mismatch is an error, or with ``strict=False`` a warning: never silent."""
    if strict:
        raise ValueError(message)
    warnings.warn(message, stacklevel=2)


def _copy_into(model: nn.Module, tensors: Dict[str, torch.Tensor]) -> None:
    """Copy tensors into the model's state; merged layers are unmerged around it so the base weight
    never mixes an old update with new factors."""
    merged = [layer for layer in _lora_layers(model).values() if layer.merged]
    for layer in merged:
        layer.set_merged(False)
    state = model.state_dict()
    with torch.no_grad():
        for key, tensor in tensors.items():
            target = state[key]
            if isinstance(target, DTensor):  # an FSDP-sharded model takes its shard of each tensor
                tensor = distribute_tensor(tensor.to(target.device), target.device_mesh,
                                           target.placements)
            target.copy_(tensor)
    for layer in merged:
        layer.set_merged(True)


def _tensor_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``model.state_dict()`` without its non-tensor entries (an NF4 layer's extra state is a
    dict: its quantised weight)."""
    return {key: value for key, value in model.state_dict().items() if torch.is_tensor(value)}


def _shapes(state: Dict[str, torch.Tensor]) -> Dict[str, tuple]:
    return {key: tuple(tensor.shape) for key, tensor in state.items()}


def normalise_peft_key(key: str) -> str:
    """Drop the adapter name PEFT keeps in memory (``lora_A.default.weight``,
    ``lora_magnitude_vector.default.weight``), as its saved files do."""
    key = re.sub(r"\.lora_magnitude_vector\.default\.weight$", ".lora_magnitude_vector", key)
    return re.sub(r"\.(lora_(?:embedding_)?[AB])\.default(?=\.weight$|$)", r".\1", key)


def lora_key_from_peft(name: str) -> str:
    """Our state-dict key for a PEFT LoRA factor's name, in memory or in a file:
    ``base_model.model.X.lora_A.default.weight`` → ``X.lora_A`` (embeddings' too)."""
    key = normalise_peft_key(name).removeprefix(PEFT_PREFIX).removesuffix(".weight")
    return re.sub(r"\.lora_embedding_([AB])$", r".lora_\1", key)


def _base_weight_key(file_key: str, state: Dict[str, torch.Tensor]) -> Optional[str]:
    """Our key for a base weight PEFT saved next to the adapter, or None.

    PEFT saves the full embedding matrices (``...embed_tokens.base_layer.weight``, and
    ``lm_head``'s when it is a LoRA layer) whenever an embedding is a target; loading the
    file puts them back into the base model, so we do the same.
    """
    if not file_key.startswith(PEFT_PREFIX):
        return None
    key = file_key[len(PEFT_PREFIX):].replace(".base_layer.", ".")
    return key if key in state and "lora_" not in key else None


def _save_tensors(tensors: Dict[str, torch.Tensor], path: Path) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, {"format": "pt"}))


def _layout_for_saving(model: nn.Module, layers: Dict[str, LoRALayer],
                       target_modules: Union[None, TargetModules, AdapterLayout]) -> AdapterLayout:
    """The layout to write: ``target_modules`` (names, a regex or a whole AdapterLayout) over the
    one ``apply_lora`` left on the model; by default the model's, else the layers' leaf names."""
    layout = getattr(model, "lora_layout", None)
    if isinstance(target_modules, AdapterLayout):
        layout = target_modules
    elif target_modules is not None:
        layout = (replace(layout, target_modules=target_modules) if layout is not None
                  else AdapterLayout(target_modules))
    elif layout is None:
        layout = AdapterLayout(tuple(sorted({path.rpartition(".")[2] for path in layers})))
    return layout.resolve(model)


def save_peft_adapter(model: nn.Module, directory: PathLike,
                      base_model_name_or_path: Optional[PathLike] = None,
                      target_modules: Union[None, TargetModules, AdapterLayout] = None,
                      state: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` as PEFT's LoRA saves them.

    ``target_modules`` (or a whole ``AdapterLayout``) defaults to the layout ``apply_lora``
    kept on the model, else the leaf names of the LoRA layers; either way it must select
    exactly the LoRA layers, or PEFT would report missing keys. Layers' own r and alpha go
    into rank_pattern/alpha_pattern; modules_to_save are written whole. Factors keep their
    dtype (fp32 from ``apply_lora``). ``state`` replaces ``model.state_dict()`` (e.g. the
    whole tensors gathered from an FSDP-sharded model; missing modules_to_save tensors are
    taken from the model).
    """
    layers = _peft_lora_layers(model)
    shared = _shared_hyperparameters(layers)
    layout = _layout_for_saving(model, layers, target_modules)
    _check_targets(model, layers, layout, "save_peft_adapter", strict=True)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    full_state = model.state_dict()
    state = full_state if state is None else {**full_state, **state}
    keys = {**_peft_key_map(layers), **_saved_whole_keys(model, layout)}
    _save_tensors({peft_key: state[key] for peft_key, key in keys.items()},
                  directory / ADAPTER_WEIGHTS_FILE)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": (None if base_model_name_or_path is None
                                    else str(base_model_name_or_path)),
        "revision": None,
        "inference_mode": True,
        **_rank_and_alpha(layers, layout),
        "lora_dropout": shared["lora_dropout"],
        "use_rslora": shared["use_rslora"],
        **layout.config(),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_dora": shared["use_dora"],
    }
    atomic_write(directory / ADAPTER_CONFIG_FILE,
                  lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, sort_keys=True)
                                                   + "\n"))


def recorded_base_model(directory: PathLike) -> Optional[str]:
    """The base an adapter directory records (adapter_config.json's ``base_model_name_or_path``),
    or None when it records none or its config cannot be read (loading the adapter names why)."""
    try:
        config = json.loads((Path(directory) / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    return base if isinstance(base, str) and base else None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_names(value, allow_str: bool = True) -> bool:
    return ((allow_str and isinstance(value, str))
            or (isinstance(value, list) and all(isinstance(v, str) for v in value)))


# key → (what it must be, check), for the keys whose type a bad file gets wrong.
PEFT_CONFIG_TYPES = {
    "r": ("a positive integer", lambda v: _is_int(v) and v > 0),
    "lora_alpha": ("a number", _is_number),
    "lora_dropout": ("a number in [0, 1]", lambda v: _is_number(v) and 0 <= v <= 1),
    "use_rslora": ("true or false", lambda v: isinstance(v, bool)),
    "use_dora": ("true or false", lambda v: isinstance(v, bool)),
    "lora_bias": ("true or false", lambda v: isinstance(v, bool)),
    "target_modules": ("a regex string or a list of module names", _is_names),
    "exclude_modules": ("a regex string or a list of module names",
                        lambda v: v is None or _is_names(v)),
    "layers_to_transform": ("a layer index or a list of them", lambda v: v is None or _is_int(v)
                            or (isinstance(v, list) and all(_is_int(i) for i in v))),
    "layers_pattern": ("a name or a list of names", lambda v: v is None or _is_names(v)),
    "modules_to_save": ("a list of module names",
                        lambda v: v is None or _is_names(v, allow_str=False)),
    "rank_pattern": ("a mapping of module pattern to positive rank", lambda v: v is None or (
        isinstance(v, dict) and all(_is_int(r) and r > 0 for r in v.values()))),
    "alpha_pattern": ("a mapping of module pattern to alpha", lambda v: v is None or (
        isinstance(v, dict) and all(_is_number(a) for a in v.values()))),
}


def _check_init(value, source: Path) -> None:
    """Adapters whose init rewrote the base weights hold factors for that rewritten base."""
    if any(value is keep or (isinstance(value, str) and value == keep)
           for keep in BASE_KEEPING_INITS):
        return
    raise ValueError(
        f"{source}: init_lora_weights {value!r} changed the base weights when the adapter was "
        "created (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA), so it fits only that changed base; convert "
        "it to a plain LoRA adapter with PEFT: save_pretrained(..., "
        "path_initial_model_for_weight_conversion=<the adapter saved at init>)")


def read_peft_config(path: PathLike) -> dict:
    """adapter_config.json as a dict, refused in one line naming the file and key when PEFT
    would refuse it or load it into something other than our layers (r and lora_alpha
    default to PEFT's 8)."""
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file (not a PEFT adapter directory)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object of LoRA options, "
                         f"got a {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type is {config.get('peft_type')!r}, not 'LORA'")
    if config.get("target_modules") is None:
        raise ValueError(f"{path}: target_modules is missing (PEFT has no default for Phi-3)")
    for key, (expected, check) in PEFT_CONFIG_TYPES.items():
        if key in config and not check(config[key]):
            raise ValueError(f"{path}: {key} must be {expected}, got {config[key]!r}")
    unsupported = [option for option in UNSUPPORTED_PEFT_OPTIONS if config.get(option)]
    if unsupported:
        raise ValueError(f"{path}: unsupported PEFT options set: "
                         + ", ".join(f"{o}={config[o]!r}" for o in unsupported))
    _check_init(config.get("init_lora_weights", True), path)
    return {"r": PEFT_DEFAULT_R, "lora_alpha": PEFT_DEFAULT_ALPHA, **config}


def _check_peft_config(config: dict, model: nn.Module, layers: Dict[str, LoRALayer],
                       source: Path, strict: bool) -> AdapterLayout:
    """The file's layout, once its r, alpha, rsLoRA, DoRA and targets match the model's layers."""
    layout = AdapterLayout.from_config(config).resolve(model)
    shared = _shared_hyperparameters(layers)
    wrong = [f"{option}: file {config.get(option, False)!r}, model {shared[option]!r}"
             for option in ("use_rslora", "use_dora")
             if bool(config.get(option, False)) != shared[option]]
    r, alpha = config.get("r", PEFT_DEFAULT_R), config.get("lora_alpha", PEFT_DEFAULT_ALPHA)
    for path, layer in layers.items():
        want_r, want_alpha = layout.rank(path, r), layout.alpha(path, alpha)
        if (want_r, want_alpha) != (layer.r, layer.lora_alpha):
            wrong.append(f"{path}: file r {want_r!r}, lora_alpha {want_alpha!r}; "
                         f"model r {layer.r!r}, lora_alpha {layer.lora_alpha!r}")
    if wrong:
        raise ValueError(f"{source} does not match the model's LoRA layers: "
                         f"{'; '.join(wrong[:4])}{' ...' if len(wrong) > 4 else ''}")
    with_bias = {path for path, m in layers.items() if "lora_B_bias" in m._parameters}
    if with_bias != (set(layers) if layout.lora_bias else set()):
        raise ValueError(f"{source}: lora_bias is {layout.lora_bias} but "
                         f"{len(with_bias)} of the model's {len(layers)} LoRA layers have one")
    _check_targets(model, layers, layout, str(source), strict)
    return layout


def load_peft_adapter(model: nn.Module, directory: PathLike, strict: bool = True) -> None:
    """Load a PEFT LoRA adapter directory (ours or PEFT's) into a model that already has LoRA
    layers.

    Each layer's r and lora_alpha (rank_pattern/alpha_pattern included), use_rslora, use_dora,
    lora_bias and the targets must match the model's layers, and every key and shape the
    file's (keys with or without PEFT's ``.default`` adapter name; modules_to_save whole).
    With ``strict=False`` missing or unexpected keys and targets are a warning naming them,
    and the rest loads; other mismatches always raise. Nothing is copied until all checks pass.
    """
    directory = Path(directory)
    layers = _peft_lora_layers(model)
    config_file, weights_file = directory / ADAPTER_CONFIG_FILE, directory / ADAPTER_WEIGHTS_FILE
    layout = _check_peft_config(read_peft_config(config_file), model, layers, config_file, strict)
    lora_keys = {**_peft_key_map(layers), **_saved_whole_keys(model, layout)}
    state = _tensor_state(model)
    with open_safetensors(weights_file) as reader:
        sources, seen, unexpected, misshaped = match_keys(
            reader, _shapes(state),
            lambda file_key: lora_keys.get(normalise_peft_key(file_key))
            or _base_weight_key(file_key, state))
        missing = [peft_key for peft_key, key in lora_keys.items() if key not in seen]
        if misshaped or missing or unexpected:
            message = key_mismatch_message(str(weights_file), missing, unexpected, misshaped)
            if misshaped:
                raise ValueError(message)
            _report(message, strict)
        tensors = {key: reader.get_tensor(file_key) for key, file_key in sources.items()}
    _copy_into(model, tensors)


def _lora_file(path: PathLike) -> Path:
    """``path`` itself, or ``path/lora.safetensors`` for a directory; safetensors only."""
    path = Path(path)
    if path.is_dir():
        return path / LORA_FILE
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: LoRA state dicts are stored as .safetensors only")
    return path


def save_lora_state_dict(model: nn.Module, path: PathLike, bias: str = "none",
                         state: Optional[Dict[str, torch.Tensor]] = None) -> Path:
    """Write loralib's ``lora_state_dict(model, bias)`` to a safetensors file; returns its path.

    ``state``: the LoRA tensors to write instead (e.g. gathered from an FSDP-sharded model).
    """
    path = _lora_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_tensors(lora_state_dict(model, bias) if state is None else state, path)
    return path


def load_lora_state_dict(model: nn.Module, path: PathLike) -> None:
    """Load a file from ``save_lora_state_dict``: every LoRA key of the model must be there with its
    shape; besides them only bias keys of the model are accepted (``bias="all"``/
    ``"lora_only"``)."""
    path = _lora_file(path)
    state = _tensor_state(model)
    expected = set(lora_state_dict(model))
    with open_safetensors(path) as reader:
        sources, seen, unexpected, misshaped = match_keys(
            reader, _shapes(state),
            lambda key: key if key in expected or (key in state and "bias" in key) else None)
        tensors = {key: reader.get_tensor(file_key) for key, file_key in sources.items()}
    missing = expected - seen
    if missing or unexpected or misshaped:
        raise ValueError(key_mismatch_message(str(path), missing, unexpected, misshaped))
    _copy_into(model, tensors)


def _plain_twin(layer: LoRALayer) -> nn.Module:
    """The torch layer ``layer`` adapts, built on meta and given ``layer``'s own weight and bias."""
    if isinstance(layer, Embedding):
        plain = nn.Embedding(layer.num_embeddings, layer.embedding_dim,
                             padding_idx=layer.padding_idx,
                             max_norm=layer.max_norm, norm_type=layer.norm_type,
                             scale_grad_by_freq=layer.scale_grad_by_freq, sparse=layer.sparse,
                             device="meta")
    else:
        bias = layer.live_bias()  # with lora_bias, the layer's bias plus s·lora_B_bias
        plain = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None,
                          device="meta")
        plain.bias = bias if bias is None or bias is layer.bias else nn.Parameter(bias.detach())
    plain.weight = layer.weight
    return plain


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight and swap each LoRA layer for a plain layer.

    Same math as the layers' eval-merge (``weight += delta_weight()`` in the weight's dtype;
    the delta is computed in the factors' dtype, fp32 from ``apply_lora``). Parameter names
    stay Hugging Face's, so ``save_pretrained`` writes a plain Phi-3 checkpoint. In place;
    returns ``model``.
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}
    other = [name for name, m in layers.items() if not isinstance(m, (Linear, Embedding))]
    if other:
        raise ValueError("merge_lora supports LoRA Linear and Embedding layers only, not: "
                         + ", ".join(other))
    quantized = [name for name, m in layers.items() if isinstance(m, NF4Layer)]
    if quantized:
        raise ValueError(f"merge_lora cannot merge into 4-bit (NF4) weights ({quantized[0]}, ...): "
                         "load the base without quantisation, apply the adapter, then merge")
    if any(m.fan_in_fan_out for m in layers.values() if isinstance(m, Linear)):
        raise ValueError("merge_lora does not support fan_in_fan_out layers: "
                         "nn.Linear holds [out, in]")
    names_of: Dict[int, List[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    tied = [names_of[id(m.weight)] for m in layers.values()
            if m.has_lora and len(names_of[id(m.weight)]) > 1]
    if tied:
        listing = "; ".join(" = ".join(n) for n in tied)
        raise ValueError(f"cannot merge LoRA into tied weights ({listing}): "
                         "the update would change every module sharing the weight")
    for name, layer in layers.items():
        if layer.has_lora:
            layer.set_merged(True)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, _plain_twin(layer))
    return model
