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
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Union

import torch
import torch.nn as nn

import lorakernels as lora
from lorakernels.adapters import (ADAPTER_CONFIG_FILE, AdapterLayout, load_peft_adapter,
                                  read_peft_config)
from lorakernels.nf4_layers import NF4Layer, NF4Linear, NF4MergedLinear

from .config import DEFAULT_TARGETS
from .phi3 import Phi3ForCausalLM

SUPPORTED_TARGETS = DEFAULT_TARGETS + ("lm_head", "embed_tokens")
Targets = Union[str, Iterable[str], AdapterLayout]


def _part_sizes(name: str, model: Phi3ForCausalLM, out_features: int):
    if name == "qkv_proj":
        return model.config.qkv_split_sizes
    if name == "gate_up_proj":
        return (out_features // 2, out_features // 2)
    return None


@dataclass(frozen=True)
class TwinOptions:
    """One module's LoRA: its rank and alpha (from the layout's patterns) and the shared options."""
    r: int
    lora_alpha: float
    lora_dropout: float
    use_rslora: bool
    use_dora: bool
    lora_bias: bool


def _lora_twin(module: nn.Module, name: str, model: Phi3ForCausalLM, options: TwinOptions,
               per_part: bool) -> nn.Module:
    """The LoRA layer for ``module``, built on the meta device, then given the module's weight."""
    # No merge on eval(): merging into a bf16 weight and back is lossy; merge_lora does it once.
    common = dict(r=options.r, lora_alpha=options.lora_alpha, use_rslora=options.use_rslora,
                  merge_weights=False, device="meta")
    nf4 = isinstance(module, NF4Layer)
    if isinstance(module, nn.Embedding):
        twin = lora.Embedding(module.num_embeddings, module.embedding_dim,
                              padding_idx=module.padding_idx, **common)
    else:
        sizes = _part_sizes(name, model, module.out_features) if per_part else None
        cls_options = dict(common, lora_dropout=options.lora_dropout, bias=module.bias is not None,
                           use_dora=options.use_dora)
        if options.lora_bias:
            cls_options["lora_bias"] = True
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
    for factor in ("lora_A", "lora_B", "lora_magnitude", "lora_B_bias"):
        if factor in twin._parameters:
            shape = twin._parameters[factor].shape
            setattr(twin, factor, nn.Parameter(torch.empty(shape, device=device,
                                                           dtype=torch.float32)))
    twin.reset_lora_parameters()
    return twin


def _layout(model: nn.Module, targets: Targets) -> AdapterLayout:
    """``targets`` as an AdapterLayout, ``all-linear`` resolved against ``model``."""
    if not isinstance(targets, AdapterLayout):
        targets = AdapterLayout(targets if isinstance(targets, str) else tuple(targets))
    return targets.resolve(model)


def _selected_modules(model: nn.Module, layout: AdapterLayout) -> Dict[str, nn.Module]:
    """The modules ``layout`` gives LoRA (not yet LoRA layers); unknown or unfit targets raise."""
    selected = {path: module for path, module in model.named_modules()
                if path and layout.selects(path)
                and not (isinstance(module, lora.LoRALayer) and module.has_lora)}
    unfit = [path for path, module in selected.items()
             if not isinstance(module, (nn.Linear, nn.Embedding))]
    if unfit:
        raise ValueError(f"target_modules {layout.target_modules!r} select modules that are "
                         f"neither linear nor embedding: {', '.join(unfit[:5])}")
    if not isinstance(layout.target_modules, str):
        paths = [path for path, m in model.named_modules()
                 if isinstance(m, (nn.Linear, nn.Embedding))]
        unknown = [t for t in layout.target_modules
                   if not any(p == t or p.endswith(f".{t}") for p in paths)]
        if unknown:
            raise ValueError(f"unknown LoRA targets {unknown}; supported: "
                             f"{', '.join(SUPPORTED_TARGETS)} (or paths ending with them)")
    if not selected:
        raise ValueError(f"target_modules {layout.target_modules!r} select no module of the model")
    return selected


def _check_options(selected: Dict[str, nn.Module], layout: AdapterLayout, use_dora: bool,
                   per_part: bool) -> None:
    embeddings = [path for path, m in selected.items() if isinstance(m, nn.Embedding)]
    if use_dora and embeddings:
        raise ValueError("use_dora applies to linear targets only, not embed_tokens")
    if layout.lora_bias and (embeddings or use_dora or per_part):
        raise ValueError("lora_bias applies to linear targets without DoRA or per_part, as in PEFT")


def _save_whole(model: nn.Module, layout: AdapterLayout) -> List[str]:
    """Make the modules in ``modules_to_save`` trainable copies (untied from any shared weight)."""
    paths = [path for path, _ in model.named_modules() if path and layout.saves_whole(path)]
    missing = [name for name in layout.modules_to_save
               if not any(path.endswith(name) for path in paths)]
    if missing:
        raise ValueError(f"modules_to_save {missing} match no module of the model")
    for path in paths:
        module = model.get_submodule(path)
        for name, param in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(param.detach().clone(), requires_grad=True))
    return paths


def apply_lora(model: Phi3ForCausalLM, r: int = 16, lora_alpha: float = 32,
               lora_dropout: float = 0.0, targets: Targets = DEFAULT_TARGETS,
               use_rslora: bool = False, per_part: bool = False,
               use_dora: bool = False) -> Phi3ForCausalLM:
    """Swap every module ``targets`` selects for its LoRA twin, then train only LoRA parameters
    (and the modules saved whole).

    ``targets``, with PEFT's ``target_modules`` rules: names or path suffixes (``qkv_proj``,
    ``layers.0.mlp.down_proj``), one regex string matched against the whole module path, or
    ``"all-linear"``; or an ``AdapterLayout`` adding PEFT's exclude_modules,
    layers_to_transform/layers_pattern, rank_pattern/alpha_pattern (per-module r and alpha over
    ``r``/``lora_alpha``), modules_to_save and lora_bias. The layout stays on the model
    (``model.lora_layout``) for ``save_peft_adapter``.
    """
    layout = _layout(model, targets)
    selected = _selected_modules(model, layout)
    _check_options(selected, layout, use_dora, per_part)
    for full_name, module in selected.items():
        parent_name, _, name = full_name.rpartition(".")
        rank = layout.rank(full_name, r)
        if isinstance(rank, bool) or rank < 1:
            raise ValueError(f"rank_pattern gives {full_name} r={rank!r}; r must be >= 1")
        options = TwinOptions(rank, layout.alpha(full_name, lora_alpha), lora_dropout, use_rslora,
                              use_dora, layout.lora_bias)
        setattr(model.get_submodule(parent_name), name,
                _lora_twin(module, name, model, options, per_part))
    lora.mark_only_lora_as_trainable(model)
    _save_whole(model, layout)
    model.lora_layout = _combined(getattr(model, "lora_layout", None), layout)
    return model


def _combined(old: Optional[AdapterLayout], new: AdapterLayout) -> Optional[AdapterLayout]:
    """The layout of a model given LoRA twice: the union of two plain name lists, else none
    (``save_peft_adapter`` then describes the layers by their names)."""
    if old is None:
        return new
    plain = AdapterLayout(old.target_modules)
    if old == plain and new == AdapterLayout(new.target_modules) and not any(
            isinstance(t, str) for t in (old.target_modules, new.target_modules)):
        return AdapterLayout(tuple(dict.fromkeys(old.target_modules + new.target_modules)))
    return None


def apply_peft_adapter(model: Phi3ForCausalLM, directory: Union[str, Path]) -> Phi3ForCausalLM:
    """The LoRA layers a PEFT adapter directory's adapter_config.json describes, with its
    weights."""
    directory = Path(directory)
    settings = read_peft_config(directory / ADAPTER_CONFIG_FILE)
    apply_lora(model, r=settings["r"], lora_alpha=settings["lora_alpha"],
               targets=AdapterLayout.from_config(settings),
               use_rslora=settings.get("use_rslora", False),
               use_dora=settings.get("use_dora", False))
    load_peft_adapter(model, directory)
    return model
