"""LoRA injection into Phi-3 by module name: the fused projections become our LoRA layers.

The frozen base weight is shared, not copied; LoRA parameters are created in fp32
(optimizer state stays fp32 over a bf16 base). By default a fused projection
(``qkv_proj``, ``gate_up_proj``) gets one A/B pair over its whole output, as
PEFT does, so adapters move to PEFT unchanged; ``per_part=True`` gives each part
its own pair (loralib's MergedLinear, grouped-query split sizes included).
A 4-bit base (``model.quantization``) gets the NF4 twins, with the same LoRA parameters.
``use_dora=True`` makes every Linear target a DoRA layer (an fp32 magnitude per output row,
initialised to the weight's row norms, as PEFT).
"""
import json
from pathlib import Path
from typing import Iterable, Union

import torch
import torch.nn as nn

import lorakernels as lora
from lorakernels.adapters import ADAPTER_CONFIG_FILE, load_peft_adapter
from lorakernels.nf4_layers import NF4Layer, NF4Linear, NF4MergedLinear

from .config import DEFAULT_TARGETS
from .phi3 import Phi3ForCausalLM

SUPPORTED_TARGETS = DEFAULT_TARGETS + ("lm_head", "embed_tokens")


def _part_sizes(name: str, model: Phi3ForCausalLM, out_features: int):
    if name == "qkv_proj":
        return model.config.qkv_split_sizes
    if name == "gate_up_proj":
        return (out_features // 2, out_features // 2)
    return None


def _lora_twin(module: nn.Module, name: str, model: Phi3ForCausalLM, r: int, lora_alpha: float,
               lora_dropout: float, use_rslora: bool, per_part: bool, use_dora: bool) -> nn.Module:
    """The LoRA layer for ``module``, built on the meta device, then given the module's weight."""
    # No merge on eval(): merging into a bf16 weight and back is lossy; merge_lora does it once.
    options = dict(r=r, lora_alpha=lora_alpha, use_rslora=use_rslora, merge_weights=False,
                   device="meta")
    nf4 = isinstance(module, NF4Layer)
    if isinstance(module, nn.Embedding):
        twin = lora.Embedding(module.num_embeddings, module.embedding_dim,
                              padding_idx=module.padding_idx, **options)
    else:
        sizes = _part_sizes(name, model, module.out_features) if per_part else None
        cls_options = dict(options, lora_dropout=lora_dropout, bias=module.bias is not None,
                           use_dora=use_dora)
        if nf4:
            cls_options["dtype"] = module.weight_dtype
        if sizes:
            cls = NF4MergedLinear if nf4 else lora.MergedLinear
            twin = cls(module.in_features, module.out_features, split_sizes=sizes,
                       enable_lora=[True] * len(sizes), **cls_options)
        else:
            twin = (NF4Linear if nf4 else lora.Linear)(module.in_features, module.out_features,
                                                       **cls_options)
        twin.bias = module.bias
    if nf4:
        twin.set_nf4_weight(module.nf4_weight)
    else:
        twin.weight = module.weight
    device = twin.weight_packed.device if nf4 else module.weight.device
    twin.lora_A = nn.Parameter(torch.empty(twin.lora_A.shape, device=device, dtype=torch.float32))
    twin.lora_B = nn.Parameter(torch.empty(twin.lora_B.shape, device=device, dtype=torch.float32))
    if use_dora:
        twin.lora_magnitude = nn.Parameter(torch.empty(twin.lora_magnitude.shape, device=device,
                                                       dtype=torch.float32))
    twin.reset_lora_parameters()
    return twin


def apply_lora(model: Phi3ForCausalLM, r: int = 16, lora_alpha: float = 32, lora_dropout: float = 0.0,
               targets: Iterable[str] = DEFAULT_TARGETS, use_rslora: bool = False,
               per_part: bool = False, use_dora: bool = False) -> Phi3ForCausalLM:
    """Swap every module named in ``targets`` for its LoRA twin, then train only LoRA parameters."""
    targets = tuple(targets)
    unknown = sorted(set(targets) - set(SUPPORTED_TARGETS))
    if unknown:
        raise ValueError(f"unknown LoRA targets {unknown}; supported: {', '.join(SUPPORTED_TARGETS)}")
    if use_dora and "embed_tokens" in targets:
        raise ValueError("use_dora applies to linear targets only, not embed_tokens")
    replaced = 0
    for full_name, module in list(model.named_modules()):
        parent_name, _, name = full_name.rpartition(".")
        if name in targets and not (isinstance(module, lora.LoRALayer) and module.has_lora):
            twin = _lora_twin(module, name, model, r, lora_alpha, lora_dropout, use_rslora, per_part,
                              use_dora)
            setattr(model.get_submodule(parent_name), name, twin)
            replaced += 1
    if replaced == 0:
        raise ValueError(f"no module named {list(targets)} in the model")
    lora.mark_only_lora_as_trainable(model)
    return model


def apply_peft_adapter(model: Phi3ForCausalLM, directory: Union[str, Path]) -> Phi3ForCausalLM:
    """The LoRA layers a PEFT adapter directory's adapter_config.json describes, with its weights."""
    directory = Path(directory)
    config_file = directory / ADAPTER_CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{directory}: no {ADAPTER_CONFIG_FILE} (not a PEFT adapter directory)")
    settings = json.loads(config_file.read_text())
    apply_lora(model, r=settings["r"], lora_alpha=settings["lora_alpha"],
               targets=settings["target_modules"], use_rslora=settings.get("use_rslora", False),
               use_dora=settings.get("use_dora", False))
    load_peft_adapter(model, directory)
    return model
