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
# PEFT config options that change the adapter's math or its key set beyond what a
# uniform-rank loralib-style model holds; each is falsy (off) by default.
UNSUPPORTED_PEFT_OPTIONS = (
    "lora_bias", "rank_pattern", "alpha_pattern", "layers_to_transform",
    "layer_replication", "modules_to_save", "trainable_token_indices", "target_parameters",
    "alora_invocation_tokens",
)

PathLike = Union[str, Path]
TargetModules = Union[str, Sequence[str]]


def _lora_layers(model: nn.Module) -> Dict[str, LoRALayer]:
    """Every layer with a low-rank path, by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer) and m.has_lora}


def _peft_lora_layers(model: nn.Module) -> Dict[str, LoRALayer]:
    """The LoRA layers, refusing any that PEFT's LoRA format cannot hold."""
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers (apply LoRA first, e.g. model.lora.apply_lora)")
    other = [name for name, m in layers.items() if not isinstance(m, (Linear, Embedding))]
    if other:
        raise ValueError("PEFT's format holds LoRA Linear and Embedding layers only, not: "
                         + ", ".join(other))
    per_part = [name for name, m in layers.items()
                if isinstance(m, Linear) and m.lora_parts is not None and len(m.lora_parts.split_sizes) > 1]
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
    """PEFT file key → our state-dict key, for every LoRA factor and DoRA magnitude."""
    keys = {}
    for path, layer in layers.items():
        key_a, key_b = _peft_factor_keys(path, layer)
        keys[key_a], keys[key_b] = f"{path}.lora_A", f"{path}.lora_B"
        if _uses_dora(layer):
            keys[f"{PEFT_PREFIX}{path}.lora_magnitude_vector"] = f"{path}.lora_magnitude"
    return keys


def _uses_dora(layer: LoRALayer) -> bool:
    return bool(getattr(layer, "use_dora", False))


def _shared_hyperparameters(layers: Dict[str, LoRALayer]) -> Dict[str, object]:
    """r, lora_alpha, use_rslora, use_dora and lora_dropout: PEFT's config holds each once.

    Embeddings are left out of the dropout check: neither PEFT nor we apply dropout to them.
    """
    values = {
        "r": {name: m.r for name, m in layers.items()},
        "lora_alpha": {name: m.lora_alpha for name, m in layers.items()},
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
            raise ValueError(f"LoRA layers differ in {option} ({listing}); PEFT's adapter_config.json "
                             "holds one value for all layers")
        shared[option] = next(iter(groups), 0.0)  # 0.0: only embeddings, which have no dropout
    return shared


def _matches(patterns: TargetModules, path: str) -> bool:
    """PEFT's rule: a string is a regex matched against the whole path, a list names path suffixes."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, path) is not None
    return path in patterns or any(path.endswith(f".{p}") for p in patterns)


def _check_targets(model: nn.Module, layers: Dict[str, LoRALayer], target_modules: TargetModules,
                   exclude_modules: Optional[TargetModules], source: str, strict: bool) -> None:
    """PEFT puts LoRA on exactly the Linear/Embedding modules the config targets: same set as ours?"""
    targeted = {
        path for path, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Embedding)) and _matches(target_modules, path)
        and not (exclude_modules and _matches(exclude_modules, path))
    }
    untargeted = sorted(set(layers) - targeted)
    without_lora = sorted(targeted - set(layers))
    if not untargeted and not without_lora:
        return
    problems = [f"{label} ({len(paths)}): {', '.join(paths[:20])}" for label, paths in (
        ("LoRA layers not in target_modules", untargeted),
        ("target_modules without LoRA in the model", without_lora)) if paths]
    _report(f"{source}: target_modules {target_modules!r} do not match the model's LoRA layers:\n  "
            + "\n  ".join(problems), strict)


def _report(message: str, strict: bool) -> None:
    """A mismatch is an error, or with ``strict=False`` a warning: never silent."""
    if strict:
        raise ValueError(message)
    warnings.warn(message)


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


def save_peft_adapter(model: nn.Module, directory: PathLike,
                      base_model_name_or_path: Optional[PathLike] = None,
                      target_modules: Optional[TargetModules] = None,
                      state: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` as PEFT's LoRA saves them.

    ``target_modules`` defaults to the leaf names of the LoRA layers; either way it must
    select exactly the LoRA layers, or PEFT would report missing keys. Factors keep their
    dtype (fp32 from ``apply_lora``). ``state`` replaces ``model.state_dict()`` (e.g. the
    whole tensors gathered from an FSDP-sharded model).
    """
    layers = _peft_lora_layers(model)
    shared = _shared_hyperparameters(layers)
    if target_modules is None:
        target_modules = sorted({path.rpartition(".")[2] for path in layers})
    _check_targets(model, layers, target_modules, None, "save_peft_adapter", strict=True)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict() if state is None else state
    _save_tensors({peft_key: state[key] for peft_key, key in _peft_key_map(layers).items()},
                  directory / ADAPTER_WEIGHTS_FILE)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None if base_model_name_or_path is None else str(base_model_name_or_path),
        "revision": None,
        "inference_mode": True,
        "r": shared["r"],
        "lora_alpha": shared["lora_alpha"],
        "lora_dropout": shared["lora_dropout"],
        "use_rslora": shared["use_rslora"],
        "target_modules": target_modules if isinstance(target_modules, str) else list(target_modules),
        "exclude_modules": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": shared["use_dora"],
        "lora_bias": False,
    }
    atomic_write(directory / ADAPTER_CONFIG_FILE,
                  lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))


def recorded_base_model(directory: PathLike) -> Optional[str]:
    """The base an adapter directory records (adapter_config.json's ``base_model_name_or_path``),
    or None when it records none or its config cannot be read (loading the adapter names why)."""
    try:
        config = json.loads((Path(directory) / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    return base if isinstance(base, str) and base else None


def _check_peft_config(config: dict, model: nn.Module, layers: Dict[str, LoRALayer],
                       source: Path, strict: bool) -> None:
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{source}: peft_type is {config.get('peft_type')!r}, not 'LORA'")
    unsupported = [option for option in UNSUPPORTED_PEFT_OPTIONS if config.get(option)]
    if unsupported:
        raise ValueError(f"{source}: unsupported PEFT options set: "
                         + ", ".join(f"{o}={config[o]!r}" for o in unsupported))
    shared = _shared_hyperparameters(layers)
    wrong = [f"{option}: file {config.get(option, False)!r}, model {shared[option]!r}"
             for option in ("r", "lora_alpha", "use_rslora", "use_dora")
             if config.get(option, False) != shared[option]]
    if wrong:
        raise ValueError(f"{source} does not match the model's LoRA layers: {'; '.join(wrong)}")
    _check_targets(model, layers, config.get("target_modules") or [], config.get("exclude_modules"),
                   str(source), strict)


def load_peft_adapter(model: nn.Module, directory: PathLike, strict: bool = True) -> None:
    """Load a PEFT LoRA adapter directory (ours or PEFT's) into a model that already has LoRA layers.

    r, lora_alpha, use_rslora, use_dora and target_modules must match the model's layers, and every
    key and shape the file's (keys with or without PEFT's ``.default`` adapter name). With
    ``strict=False`` missing or unexpected keys and targets are a warning naming them, and
    the rest loads; other mismatches always raise. Nothing is copied until all checks pass.
    """
    directory = Path(directory)
    layers = _peft_lora_layers(model)
    config_file, weights_file = directory / ADAPTER_CONFIG_FILE, directory / ADAPTER_WEIGHTS_FILE
    _check_peft_config(json.loads(config_file.read_text()), model, layers, config_file, strict)
    lora_keys = _peft_key_map(layers)
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
    shape; besides them only bias keys of the model are accepted (``bias="all"``/``"lora_only"``)."""
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
        plain = nn.Embedding(layer.num_embeddings, layer.embedding_dim, padding_idx=layer.padding_idx,
                             max_norm=layer.max_norm, norm_type=layer.norm_type,
                             scale_grad_by_freq=layer.scale_grad_by_freq, sparse=layer.sparse,
                             device="meta")
    else:
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        plain.bias = layer.bias
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
        raise ValueError("merge_lora does not support fan_in_fan_out layers: nn.Linear holds [out, in]")
    names_of: Dict[int, List[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    tied = [names_of[id(m.weight)] for m in layers.values() if m.has_lora and len(names_of[id(m.weight)]) > 1]
    if tied:
        raise ValueError(f"cannot merge LoRA into tied weights ({'; '.join(' = '.join(n) for n in tied)}): "
                         "the update would change every module sharing the weight")
    for name, layer in layers.items():
        if layer.has_lora:
            layer.set_merged(True)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, _plain_twin(layer))
    return model
