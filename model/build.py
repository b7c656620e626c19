"""A model ready to run, from plain arguments: what train.py, generate.py, merge.py and the
benchmarks share. A preset is built with random weights from a seed (the embedded default
and the benchmarks need no download); anything else is a checkpoint directory or hub id.
"""
import dataclasses
import difflib
from pathlib import Path
from typing import List, Optional, Tuple, Union

import torch

from lorakernels.adapters import ADAPTER_WEIGHTS_FILE
from lorakernels.nf4_layers import NF4Layer
from lorakernels.weight_files import open_safetensors

from .config import PRESETS, ArgumentError, Phi3Config, check_device_name
from .loading import CONFIG_FILE, check_weight, resolve_checkpoint_dir
from .lora import apply_peft_adapter
from .phi3 import Phi3ForCausalLM
from .quantization import quantize_decoder_linears, uses_nf4
from .tokenizer import Phi3Tokenizer, load_tokenizer, read_eos_ids

INIT_STD = 0.02  # Hugging Face's initializer_range for Phi-3: random weights of that spread


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when there is one, else the CPU; ``cpu``, ``cuda`` or ``cuda:N`` checked
    against the GPUs this machine has, so a bad device stops before any work."""
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ArgumentError("device", name, "no CUDA GPU is visible to PyTorch here; use cpu or "
                                            "auto")
    if (device.type == "cuda" and device.index is not None
            and device.index >= torch.cuda.device_count()):
        raise ArgumentError("device", name, f"there are only {torch.cuda.device_count()} GPU(s)")
    return device


def check_model_name(name: str) -> None:
    """A name that is no preset, no path and no model in the hub cache, but close to a preset, is a
    typo: say which preset was meant instead of failing to download it."""
    if name in PRESETS or Path(name).expanduser().exists():
        return
    close = difflib.get_close_matches(name, list(PRESETS), n=1, cutoff=0.75)
    if close and not in_hub_cache(name):
        raise ArgumentError("model", name, "not a preset, a directory or a model in the hub "
                            f"cache (did you mean {close[0]}?)")


def hub_cached_config(repo_id: str) -> Optional[str]:
    """The path of a hub model's config.json in the local cache, or None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(repo_id, CONFIG_FILE)
    except Exception:  # not a valid repo id, no huggingface_hub: not in the cache
        return None
    return path if isinstance(path, str) else None


def in_hub_cache(repo_id: str) -> bool:
    return hub_cached_config(repo_id) is not None


def recorded_name(model: str) -> str:
    """How a run records its base in adapter_config.json: a local directory by its absolute
    path (found again from any working directory), a preset or hub id as given."""
    path = Path(model).expanduser()
    return str(path.resolve()) if model not in PRESETS and path.is_dir() else model


def base_config(name: str) -> Optional[Phi3Config]:
    """A preset's, a checkpoint directory's or a cached hub model's architecture, read without
    any weights; None when it cannot be known here (a hub id not downloaded)."""
    if name in PRESETS:
        return Phi3Config.from_name(name)
    path = Path(name).expanduser()
    if path.is_dir():
        return Phi3Config.from_json(path / CONFIG_FILE) if (path / CONFIG_FILE).is_file() else None
    cached = hub_cached_config(name)
    return Phi3Config.from_json(cached) if cached else None


def config_differences(a: Phi3Config, b: Phi3Config) -> List[str]:
    """The architecture numbers in which two configs differ, as ``name a vs b``."""
    return [f"{f.name} {getattr(a, f.name)} vs {getattr(b, f.name)}"
            for f in dataclasses.fields(Phi3Config)
            if f.name != "extra" and getattr(a, f.name) != getattr(b, f.name)]


def base_differences(model: str, recorded: str) -> Optional[List[str]]:
    """How ``model`` differs from the base an adapter records: [] for the same base, None when
    the recorded one cannot be read here. A preset (random weights) is only itself."""
    if model == recorded:
        return []
    if model in PRESETS or recorded in PRESETS:  # a preset's random weights are no other base
        mine, other = base_config(model), base_config(recorded)
        return (config_differences(mine, other) if mine and other else []) or [
            f"a preset's random weights are not {model if recorded in PRESETS else recorded}"]
    ours, theirs = Path(model).expanduser(), Path(recorded).expanduser()
    if ours.is_dir() and theirs.is_dir() and ours.resolve() == theirs.resolve():
        return []
    mine, other = base_config(model), base_config(recorded)
    if mine is None or other is None:
        return None
    return config_differences(mine, other)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 base weights on GPU, fp32 on CPU; otherwise torch's dtype name."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def random_model(config: Phi3Config, dtype: torch.dtype, device: Union[str, torch.device],
                 seed: int, quantize: Optional[str] = None) -> Phi3ForCausalLM:
    """Random weights (norms 1, the rest normal with std INIT_STD), the same for a seed on any
    device and with or without ``quantize``.

    Built on the meta device and drawn tensor by tensor on the CPU, so memory peaks at
    the model plus one fp32 tensor; ``quantize="nf4"`` quantises each decoder linear
    as it is drawn, so a dense copy of those weights never exists.
    """
    with torch.device("meta"):
        model = Phi3ForCausalLM(config)
    model.to(dtype)  # before quantising: .to(dtype) would also cast the NF4 layers' fp32 scales
    if uses_nf4(quantize):
        quantize_decoder_linears(model, dtype)
    model.to_empty(device=device)
    model.tie_weights()  # to_empty gave the head and the embedding separate storage
    generator = torch.Generator().manual_seed(seed)

    def draw(shape) -> torch.Tensor:
        return torch.empty(shape).normal_(0.0, INIT_STD, generator=generator).to(device, dtype)

    drawn = set()  # a tied weight is drawn once
    with torch.no_grad():
        for module in model.modules():  # in checkpoint order, NF4 or not: the same values
            if isinstance(module, NF4Layer):
                module.quantize_weight(draw(module.weight_shape), dtype)
            for param in module.parameters(recurse=False):
                if id(param) in drawn:
                    continue
                drawn.add(id(param))
                if param.dim() == 1:
                    param.fill_(1.0)  # RMSNorm weights (Phi-3 has no biases)
                else:
                    param.copy_(draw(param.shape))
    model.init_rotary(device)
    return model


def load_model(name_or_path: str, dtype: torch.dtype, device: torch.device, seed: int = 0,
               quantize: Optional[str] = None, tokenizer: Optional[str] = None,
               adapter: Optional[Union[str, Path]] = None
               ) -> Tuple[Phi3ForCausalLM, Phi3Tokenizer]:
    """A preset (random weights from ``seed``) with the tiny tokenizer, or a checkpoint with its
    own.

    ``tokenizer``: a tokenizer.json or its directory instead of the default one.
    ``adapter``: a PEFT adapter directory whose LoRA layers and weights are added.
    """
    if name_or_path in PRESETS:
        model = random_model(Phi3Config.from_name(name_or_path), dtype, device, seed, quantize)
        loaded_tokenizer = load_tokenizer(tokenizer)
    else:
        check_model_name(name_or_path)
        directory = resolve_checkpoint_dir(name_or_path)
        model = Phi3ForCausalLM.from_pretrained(directory, dtype=dtype, device=device,
                                                quantize=quantize)
        loaded_tokenizer = load_tokenizer(tokenizer or directory)
        loaded_tokenizer.add_eos_ids(read_eos_ids(directory))  # when the tokenizer is elsewhere
    if loaded_tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {loaded_tokenizer.vocab_size} tokens but the model's "
                         f"vocabulary only {model.config.vocab_size}")
    if adapter is not None:
        check_adapter_weights(Path(adapter))
        apply_peft_adapter(model, adapter)
    return model, loaded_tokenizer


def check_adapter_weights(directory: Path) -> None:
    """Every tensor of the adapter floating point and finite, as a base checkpoint's are."""
    path = directory / ADAPTER_WEIGHTS_FILE
    if not path.is_file():
        return  # loading the adapter names what is missing
    with open_safetensors(path) as reader:
        for key in reader.keys():
            check_weight(reader.get_tensor(key), key, path)
