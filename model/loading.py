"""Hugging Face safetensors checkpoints in and out: single file or shards with an index.

Weights go straight to the target dtype and device tensor by tensor (peak host
memory about one tensor, never a full fp32 copy). Every key and shape is checked;
a mismatch stops with the missing, unexpected and mis-shaped names listed.
"""
import json
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch
import torch.nn as nn
from safetensors.torch import save_file

from lorakernels.nf4_layers import NF4Layer
from lorakernels.weight_files import (atomic_write, key_mismatch_message, match_keys,
                                     open_safetensors)

from .config import Phi3Config

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def resolve_checkpoint_dir(path_or_repo_id: Union[str, Path],
                           revision: Optional[str] = None) -> Path:
    """A local directory as is; otherwise a hub repo id through huggingface_hub's cache.

    ``HF_HUB_OFFLINE=1`` makes the hub path use only what is cached.
    """
    local = Path(path_or_repo_id).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise ValueError(f"{local} is a file; pass the checkpoint directory")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(
            str(path_or_repo_id), revision=revision,
            allow_patterns=["*.json", "*.safetensors", "tokenizer.model"],
        ))
    except Exception as error:
        # offline, no such repo, gated, not a repo id: one line, not a traceback
        reason = (str(error).strip().splitlines() or [""])[0]
        raise ValueError(f"{path_or_repo_id}: not a local directory, and the Hugging Face hub "
                         f"did not provide it ({type(error).__name__}: {reason})") from None


def shard_files(directory: Path) -> List[Path]:
    index = directory / INDEX_FILE
    if index.exists():
        return [directory / name for name in sorted(set(_weight_map(index).values()))]
    if (directory / SINGLE_FILE).exists():
        return [directory / SINGLE_FILE]
    raise FileNotFoundError(
        f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} (found: "
        f"{', '.join(sorted(p.name for p in directory.iterdir())) or 'nothing'})"
    )


def _weight_map(index: Path) -> Dict[str, str]:
    """The index's tensor → shard map; each shard a plain file name in the checkpoint's own
    directory (a name like ../x.safetensors or /etc/passwd would read a file outside it)."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (ValueError, AttributeError):  # not JSON, not UTF-8, not an object
        raise ValueError(f"{index}: not a JSON object with a weight_map (damaged)") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index}: no weight_map of tensor name → shard file")
    for name in weight_map.values():
        if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
            raise ValueError(f"{index}: shard {name!r} is not a file name in {index.parent}")
    return weight_map


def check_weight(tensor: torch.Tensor, name: str, source: Path) -> None:
    """A base weight is floating point and finite: an int or bool tensor would be cast, a NaN
    would make every answer empty."""
    if not tensor.is_floating_point():
        raise ValueError(f"{source}: {name} is {str(tensor.dtype).removeprefix('torch.')}, not a "
                         f"floating-point tensor")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{source}: {name} holds NaN or infinite values")


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor, dtype: torch.dtype) -> None:
    """Into its parameter in ``dtype``, or quantised into an NF4 layer (from the file's values)."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if isinstance(module, NF4Layer) and attr == "weight":
        module.quantize_weight(tensor, dtype)
        return
    old = module._parameters[attr]
    module._parameters[attr] = nn.Parameter(tensor.to(dtype), requires_grad=old.requires_grad)


def _expected_shapes(model: nn.Module) -> Dict[str, tuple]:
    """Checkpoint name → shape for every parameter, and the dense weight of every NF4 layer."""
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    expected.update({f"{name}.weight": m.weight_shape for name, m in model.named_modules()
                     if isinstance(m, NF4Layer)})
    return expected


def load_safetensors_checkpoint(model: nn.Module, directory: Path, dtype: torch.dtype,
                                device: Union[str, torch.device]) -> None:
    """Fill ``model``'s parameters (possibly on the meta device) from the checkpoint's shards.

    NF4 layers are quantised as their tensor arrives: peak memory is the 4-bit model
    plus one dense tensor (and its quantisation's temporaries), never the dense model.
    """
    expected = _expected_shapes(model)
    # A tied weight's second name (lm_head.weight under tie_word_embeddings): some checkpoints
    # still carry the tensor; as in transformers, the first name's tensor is the one used.
    aliases = {name for name, _ in model.named_parameters(remove_duplicate=False)} - set(expected)
    seen, unexpected, misshaped = set(), [], []
    device = torch.device(device)
    for shard in shard_files(directory):
        with open_safetensors(shard, device) as reader:
            sources, shard_seen, shard_unexpected, shard_misshaped = match_keys(
                reader, expected, lambda name: name if name in expected else None)
            for name, file_key in sources.items():
                tensor = reader.get_tensor(file_key)
                check_weight(tensor, file_key, shard)
                _set_tensor(model, name, tensor, dtype)
        seen |= shard_seen
        unexpected += [key for key in shard_unexpected if key not in aliases]
        misshaped += shard_misshaped
    missing = set(expected) - seen
    if missing or unexpected or misshaped:
        raise ValueError(key_mismatch_message(str(directory), missing, unexpected, misshaped))


def save_safetensors_checkpoint(state: Dict[str, torch.Tensor], config: Phi3Config,
                                directory: Union[str, Path],
                                max_shard_bytes: Optional[int] = None) -> None:
    """config.json plus model.safetensors, or Hugging Face-named shards and their index."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    shards: List[Dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        atomic_write(directory / SINGLE_FILE, lambda tmp: save_file(shards[0], tmp, metadata))
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            atomic_write(directory / name, lambda tmp, shard=shard: save_file(shard, tmp, metadata))
            weight_map.update({key: name for key in shard})
        total_size = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        atomic_write(directory / INDEX_FILE,
                      lambda tmp: Path(tmp).write_text(json.dumps(index, indent=2) + "\n"))
    atomic_write(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(
        json.dumps(config.to_hf_dict(dtype), indent=2) + "\n"))
