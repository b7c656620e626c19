"""TrainConfig: every train.py option, from defaults, a YAML file and kebab-case flags, in that
order."""
import argparse
import dataclasses
import math
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Union

import yaml

from lorakernels.settings import ATTENTIONS
from model.config import (DEFAULT_TARGETS, DTYPE_CHOICES, QUANTIZE_CHOICES, ArgumentError,
                          check_device_name)

if TYPE_CHECKING:
    from lorakernels.adapters import AdapterLayout

# Options left unset take these; the phi3-tiny demo (a random base) needs a higher learning
# rate, shorter sequences and more passes to show its loss falling within a minute on a CPU.
MODEL_DEFAULTS = {"lr": 2e-4, "max_seq_len": 2048, "epochs": 1.0}
TINY_DEMO_DEFAULTS = {"lr": 3e-3, "max_seq_len": 512, "epochs": 10.0}
# Each step seeds torch with seed · 1,000,003 + ...: below 2^32 that stays inside torch's 64 bits.
MAX_SEED = 2**32


@dataclass
class TrainConfig:
    """Defaults train the embedded phi3-tiny on the shipped example chats in about a minute on
    CPU."""

    data: str = "examples/chat.jsonl"
    data_split: str = "train"
    data_config: Optional[str] = None
    data_revision: Optional[str] = None
    data_format: str = "auto"
    data_field: Optional[str] = None
    data_cache: str = "auto"
    eval_data: Optional[str] = None
    eval_split: Optional[str] = None
    eval_fraction: Optional[float] = None
    model: str = "phi3-tiny"
    tokenizer: Optional[str] = None
    output: str = "runs/phi3-lora"
    max_steps: Optional[int] = None
    epochs: Optional[float] = None
    lr: Optional[float] = None
    batch_size: int = 4
    global_batch_size: Optional[int] = None
    grad_accum: int = 1
    max_seq_len: Optional[int] = None
    packing: bool = True
    train_on_prompt: bool = False
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    target_modules: List[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    rank_pattern: Dict[str, int] = field(default_factory=dict)
    alpha_pattern: Dict[str, float] = field(default_factory=dict)
    layers_to_transform: List[int] = field(default_factory=list)
    use_rslora: bool = False
    use_dora: bool = False
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    dtype: str = "auto"
    quantize: str = "none"
    device: str = "auto"
    grad_checkpointing: Union[bool, str] = False
    strategy: str = "ddp"
    save_every: int = 0
    save_total_limit: Optional[int] = None
    eval_every: int = 0
    log_every: int = 1
    report_to: str = "none"
    attention: Optional[str] = None
    resume: Optional[str] = None
    overwrite: bool = False
    allow_changed_resume: bool = False
    plan_memory: bool = False
    plan_json: Optional[str] = None
    plan_world_size: int = 1

    def __post_init__(self):
        defaults = TINY_DEMO_DEFAULTS if self.model == "phi3-tiny" else MODEL_DEFAULTS
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"--{flag(f.name)} must be a finite number, got {value}")
        positive = ("epochs", "lr", "batch_size", "grad_accum", "max_seq_len", "lora_r",
                    "lora_alpha", "log_every", "plan_world_size")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"--{flag(name)} must be positive, got {getattr(self, name)}")
        for name in ("max_steps", "save_total_limit", "global_batch_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{flag(name)} must be positive, got {value}")
        if not str(self.output).strip():
            raise ValueError("--output must name a directory, got ''")
        if not 0 <= self.seed < MAX_SEED:
            raise ValueError(f"--seed must be in [0, 2**32), got {self.seed}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.plan_json is not None:
            self.plan_memory = True
        self.grad_checkpointing = checkpointing_mode(self.grad_checkpointing,
                                                     "--grad-checkpointing")
        check_device_flag(self.device)  # whether the machine has it: check_environment
        if self.strategy not in ("ddp", "fsdp"):
            raise ValueError(f"--strategy must be ddp or fsdp, got {self.strategy!r}")
        if self.report_to not in ("none", "tensorboard"):
            raise ValueError(f"--report-to must be none or tensorboard, got {self.report_to!r}")
        if self.attention is not None and self.attention not in ATTENTIONS:
            raise ValueError(f"--attention must be one of {', '.join(ATTENTIONS)}, "
                             f"got {self.attention!r}")
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, "
                             f"got {self.dtype!r}")
        if self.quantize not in QUANTIZE_CHOICES:
            raise ValueError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, "
                             f"got {self.quantize!r}")
        if self.quantize != "none" and self.strategy == "fsdp":
            raise ValueError("--quantize nf4 works with --strategy ddp, not fsdp: FSDP shards "
                             "parameters, and the 4-bit base weights are buffers")
        if self.overwrite and self.resume:
            raise ValueError("--overwrite replaces the run in --output and --resume continues it: "
                             "give one of them")
        if self.layers_to_transform and isinstance(self.lora_targets(), str):
            raise ValueError("--layers-to-transform applies to --target-modules names, not to a "
                             "regex or all-linear (PEFT ignores it there): put the layers in the "
                             "regex")
        if any(r < 1 for r in self.rank_pattern.values()):
            raise ValueError(f"--rank-pattern ranks must be >= 1, got {self.rank_pattern}")
        if self.use_dora and "embed_tokens" in self.target_modules:
            raise ValueError("--use-dora applies to linear targets only: drop embed_tokens from "
                             "--target-modules")
        self.check_data_options()
        if (self.max_grad_norm < 0 or self.weight_decay < 0 or self.save_every < 0
                or self.eval_every < 0):
            raise ValueError("--max-grad-norm, --weight-decay, --save-every and --eval-every "
                             "must be >= 0")

    def check_data_options(self) -> None:
        from .data_sources import FORMATS

        if self.data_format not in FORMATS:
            raise ValueError(f"--data-format must be one of {', '.join(FORMATS)}, "
                             f"got {self.data_format!r}")
        held_out = [name for name in ("eval_data", "eval_split", "eval_fraction")
                    if getattr(self, name) is not None]
        if len(held_out) > 1:
            raise ValueError(f"give one of {', '.join('--' + flag(n) for n in held_out)}")
        if self.eval_fraction is not None and not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"--eval-fraction must be in (0, 1), got {self.eval_fraction}")


    def lora_targets(self) -> Union[str, List[str]]:
        """--target-modules as PEFT reads target_modules: one value that is all-linear or has
        regex characters is a regex over the whole module path, else names or path suffixes."""
        from lorakernels.adapters import ALL_LINEAR  # torch: not needed to read the flags

        if len(self.target_modules) == 1 and (self.target_modules[0] == ALL_LINEAR or any(
                c in self.target_modules[0] for c in "*+?()[]|^$\\")):
            return self.target_modules[0]
        return list(self.target_modules)

    def lora_layout(self) -> "AdapterLayout":
        """The LoRA options as PEFT's adapter_config.json holds them."""
        from lorakernels.adapters import AdapterLayout

        return AdapterLayout(self.lora_targets(),
                             layers_to_transform=self.layers_to_transform or None,
                             rank_pattern=self.rank_pattern, alpha_pattern=self.alpha_pattern)
def check_environment(config: TrainConfig) -> None:
    """What ``config`` asks of this machine, checked as the run starts, before any work: the
    device exists, FlexAttention has a GPU to train on, the TensorBoard package is there."""
    from model.build import resolve_device

    from .tensorboard_log import summary_writer_class

    device = resolve_device(config.device)  # cuda without a GPU, or an unknown device
    if config.attention == "flex" and device.type != "cuda":
        raise ValueError("--attention flex trains on CUDA only (torch has no FlexAttention "
                         "backward on CPU); use auto or sdpa on a CPU")
    if config.report_to == "tensorboard":
        summary_writer_class()


HELP = {
    "data": "training data: a .jsonl/.json file, .parquet/.csv/.arrow files (or their folder) or "
            "a Hugging Face dataset id (docs/data.md)",
    "data_split": "the split of --data to train on (datasets and hub ids)",
    "data_config": "the configuration (subset) of a hub dataset",
    "data_revision": "the revision (branch, tag or commit) of a hub dataset",
    "data_format": "auto (from each dataset's keys), messages, sharegpt, alpaca, "
                   "prompt-completion or text",
    "data_field": "the column holding the messages (messages and sharegpt formats)",
    "data_cache": "where tokenized data is kept between runs: auto (the Hugging Face datasets "
                  "cache, $HF_DATASETS_CACHE), none, or a folder",
    "eval_data": "held-out chats for loss and perplexity (same sources as --data)",
    "eval_split": "evaluate on this split of --data",
    "eval_fraction": "evaluate on a seeded fraction of --data, held out of training",
    "model": "a preset (phi3-tiny, phi3-mini-4k, ...), a checkpoint directory or a hub id",
    "tokenizer": "tokenizer.json or its directory (default: a checkpoint's own; for a preset, "
                 "the shipped phi3-tiny tokenizer, model/assets/phi3-tiny/)",
    "output": "run directory: metrics.jsonl, checkpoint-STEP/, final/",
    "max_steps": "optimizer steps (default: --epochs over the data)",
    "epochs": "passes over the data when --max-steps is not given",
    "lr": "peak learning rate (AdamW, cosine decay after warmup)",
    "batch_size": "packed sequences per micro-batch",
    "global_batch_size": "sequences per optimizer step over all processes and micro-batches; "
                         "sets --batch-size per process (must divide evenly)",
    "grad_accum": "micro-batches per optimizer step",
    "max_seq_len": "tokens per packed sequence; longer chats are truncated (and counted)",
    "packing": "pack several chats per sequence (attention never crosses them)",
    "train_on_prompt": "also train on system and user turns (default: assistant replies only)",
    "lora_r": "LoRA rank", "lora_alpha": "LoRA alpha (scale alpha/r)",
    "lora_dropout": "LoRA dropout",
    "target_modules": "modules that get LoRA (qkv_proj o_proj gate_up_proj down_proj lm_head "
                      "embed_tokens, or path suffixes), all-linear, or one regex over the module "
                      "path (PEFT's target_modules)",
    "rank_pattern": "per-module ranks, PATTERN=R (PEFT's rank_pattern: a regex matching the end "
                    "of the module path, e.g. qkv_proj=32)",
    "alpha_pattern": "per-module alphas, PATTERN=ALPHA (PEFT's alpha_pattern)",
    "layers_to_transform": "decoder layer indices that get LoRA (PEFT's layers_to_transform; "
                           "default: all)",
    "use_rslora": "scale alpha/sqrt(r) instead of alpha/r",
    "use_dora": "DoRA: a trained magnitude per output row over the LoRA update (PEFT's use_dora; "
                "fastest with --lora-dropout 0)",
    "warmup_ratio": "fraction of steps with linear warmup",
    "weight_decay": "AdamW weight decay", "max_grad_norm": "gradient clipping norm (0: off)",
    "seed": "seed for initialisation, data order and dropout",
    "dtype": "auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16 or float16",
    "quantize": "none, or nf4: QLoRA, the decoder's linear weights held in 4 bits (NF4)",
    "device": "auto, cpu, cuda or cuda:N",
    "grad_checkpointing": "recompute layer activations in backward to save memory; alone or "
                          "on-device: keep each layer's input on the device; offload: in pinned "
                          "host memory, back one layer ahead of its backward (CUDA; on a CPU the "
                          "same as on-device; docs/long_context.md) (default: off)",
    "strategy": "under torchrun: ddp (each process holds the model) or fsdp (the model sharded)",
    "save_every": "checkpoint every N steps (0: only at the end)",
    "save_total_limit": "keep only the newest N step checkpoints",
    "eval_every": "evaluate every N steps (0: only at the end, when --eval-data is given)",
    "log_every": "write metrics every N steps",
    "report_to": "none, or tensorboard: also write the metrics to OUTPUT/tensorboard/",
    "attention": "auto (FlexAttention for packed or windowed batches on CUDA, SDPA otherwise), "
                 "flex or sdpa (unset: LORAKERNELS_ATTENTION's, else auto)",
    "resume": "continue from the newest checkpoint in --output, or from PATH",
    "allow_changed_resume": "let --resume continue a run whose data or training settings "
                            "(lr, batch, LoRA shape, seed, ...) have changed since the checkpoint",
    "overwrite": "replace the run already in --output (its metrics.jsonl, checkpoint-*/, final/ "
                 "and tensorboard/ are removed when training starts; other files stay)",
    "plan_memory": "print the peak of live tensor bytes of one optimizer step of this run and "
                   "its breakdown, computed on fake weights (no GPU needed: --device cuda "
                   "plans the CUDA path), then exit without training (docs/memory.md)",
    "plan_json": "also write the memory plan as JSON to PATH (implies --plan-memory)",
    "plan_world_size": "plan one rank of a torchrun run of N processes under --strategy (ddp: "
                       "the model and DDP's buckets; fsdp: its shards), at the per-rank batch "
                       "--global-batch-size gives; counted in this one process (default 1)",
}


def check_device_flag(name: str) -> None:
    """--device spelled as a device, or one line naming the flag."""
    try:
        check_device_name(name)
    except ArgumentError as error:
        raise ValueError(error.as_flag()) from None


def device_path(name: str) -> str:
    """The code path (cpu or cuda) that --device ``name`` selects; ``auto``: this machine's.
    A plan of a CUDA run takes the CUDA path on a machine without a GPU."""
    check_device_flag(name)
    if name == "auto":
        import torch  # here, not at import: reading the flags needs no torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name.split(":")[0]


CHECKPOINTING_MODES = {"true": True, "on-device": True, "false": False, "off": False,
                       "offload": "offload"}


def checkpointing_mode(value, where: str) -> Union[bool, str]:
    """--grad-checkpointing's value: True (on-device), False or "offload", from a bool or
    one of CHECKPOINTING_MODES (a flag's or a YAML file's spelling)."""
    if isinstance(value, bool):
        return value
    mode = CHECKPOINTING_MODES.get(str(value).strip().lower()) if isinstance(value, str) else None
    if mode is None:
        raise ValueError(f"{where} must be true, false, on-device or offload, got {short(value)}")
    return mode


def flag(name: str) -> str:
    return name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py", description="LoRA fine-tuning of Phi-3 on chat data (lorakernels).",
        argument_default=argparse.SUPPRESS,  # only flags the user gave override the YAML file
    )
    parser.add_argument("--config", type=Path, help="YAML file with any of the options below")
    for f in dataclasses.fields(TrainConfig):
        name, kind = f"--{flag(f.name)}", f.type
        help_text = HELP[f.name]
        if "(default:" not in help_text:  # a help text may say its default in its own words
            help_text += f" (default: {describe_default(f)})"
        if kind is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, help=help_text)
        elif f.name == "grad_checkpointing":
            parser.add_argument(name, nargs="?", const=True, metavar="on-device|offload",
                                help=help_text)
            parser.add_argument(f"--no-{flag(f.name)}", dest=f.name, action="store_false",
                                help="keep every activation (the default)")
        elif f.name == "resume":
            parser.add_argument(name, nargs="?", const="latest", metavar="PATH", help=help_text)
        elif f.name == "target_modules":
            parser.add_argument(name, nargs="+", metavar="NAME", help=help_text)
        elif kind in PATTERN_TYPES:
            parser.add_argument(name, nargs="+", metavar="PATTERN=VALUE", help=help_text,
                                type=pattern_entry(name, PATTERN_TYPES[kind]))
        elif kind == List[int]:
            parser.add_argument(name, nargs="+", metavar="N", type=int, help=help_text)
        else:
            parser.add_argument(name, type=scalar_type(kind), help=help_text)
    return parser


PATTERN_TYPES = {Dict[str, int]: int, Dict[str, float]: float}


def pattern_entry(name: str, value_type):
    """argparse type for one PATTERN=VALUE of ``name``; the entries are joined into a dict later."""
    def parse(text: str):
        pattern, sep, value = text.rpartition("=")
        try:
            if sep and pattern:
                return pattern, value_type(value)
        except ValueError:
            pass
        raise argparse.ArgumentTypeError(f"{name} takes PATTERN={value_type.__name__.upper()}, "
                                         f"got {text!r}")
    return parse


def scalar_type(kind):
    return {int: int, float: float, str: str, Optional[int]: int, Optional[float]: float,
            Optional[str]: str}[kind]


def describe_default(f: dataclasses.Field) -> str:
    if f.name in MODEL_DEFAULTS:
        return f"{MODEL_DEFAULTS[f.name]}; {TINY_DEMO_DEFAULTS[f.name]} for phi3-tiny"
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if isinstance(value, (list, dict)) and not value:
        return "none"
    return " ".join(value) if isinstance(value, list) else str(value)


def read_yaml(path: Path) -> dict:
    """Options from a YAML mapping; keys in kebab or snake case; unknown keys are an error."""
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ValueError(f"--config {path}: no such file") from None
    except yaml.YAMLError as error:
        raise ValueError(f"--config {path}: not valid YAML ({error})") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of option: value")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    options = {str(key).replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(k for k in options if k not in known)
    if unknown:
        raise ValueError(f"--config {path}: unknown keys {', '.join(flag(k) for k in unknown)}")
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    return {name: coerce(value, types[name], f"--config {path}: {flag(name)}")
            for name, value in options.items()}


def short(value) -> str:
    """A YAML value for an error message: a few items, two levels deep, however big it is."""
    shortener = reprlib.Repr()
    shortener.maxlevel, shortener.maxlist, shortener.maxdict = 2, 4, 4
    return shortener.repr(value)


def coerce(value, kind, where: str):
    """A YAML value of the option's type, or a ValueError saying where and what was expected:
    never truncated or cast (2.7 is no batch size, true no alpha), and the value shown short
    (an alias bomb would take minutes to print)."""
    if value is None and kind in (Optional[int], Optional[float], Optional[str]):
        return None
    if kind == Union[bool, str]:  # --grad-checkpointing
        return checkpointing_mode(value, where)
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {short(value)}")
        return value
    if kind in PATTERN_TYPES:
        wanted = PATTERN_TYPES[kind]
        if not isinstance(value, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and wanted(v) == v
                for v in value.values()):
            raise ValueError(f"{where} must be a mapping of pattern: {wanted.__name__}, "
                             f"got {value!r}")
        return {str(k): wanted(v) for k, v in value.items()}
    if kind == List[int]:
        if not isinstance(value, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ValueError(f"{where} must be a list of layer indices, got {value!r}")
        return value
    if kind == List[str]:
        items = value.split() if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise ValueError(f"{where} must be a list of names, got {short(value)}")
        return items
    expected = scalar_type(kind)
    # YAML 1.1 reads 1e-4 (no dot) as a string: a float option takes what float() reads.
    allowed = (int, float, str) if expected is float else (expected,)
    if isinstance(value, bool) or not isinstance(value, allowed):
        raise ValueError(f"{where} must be {expected.__name__}, got {short(value)}")
    try:
        return expected(value)
    except ValueError:
        raise ValueError(f"{where} must be float, got {short(value)}") from None


def parse_config(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """Defaults, then the --config YAML, then explicit flags."""
    given = vars(build_parser().parse_args(argv))
    for name in ("rank_pattern", "alpha_pattern"):
        if name in given:
            given[name] = dict(given[name])
    options = read_yaml(given.pop("config")) if "config" in given else {}
    options.update(given)
    return TrainConfig(**options)
