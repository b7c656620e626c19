"""TrainConfig: every train.py option, from defaults, a YAML file and kebab-case flags, in that order."""
import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import yaml

from lorakernels.functional import ATTENTION_CHOICES
from model.build import resolve_device
from model.lora import DEFAULT_TARGETS
from model.quantization import QUANTIZE_CHOICES

from .tensorboard_log import summary_writer_class

# Options left unset take these; the phi3-tiny demo (a random base) needs a higher learning
# rate, shorter sequences and more passes to show its loss falling within a minute on a CPU.
MODEL_DEFAULTS = {"lr": 2e-4, "max_seq_len": 2048, "epochs": 1.0}
TINY_DEMO_DEFAULTS = {"lr": 3e-3, "max_seq_len": 512, "epochs": 10.0}


@dataclass
class TrainConfig:
    """Defaults train the embedded phi3-tiny on the shipped example chats in about a minute on CPU."""

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
    use_rslora: bool = False
    use_dora: bool = False
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    dtype: str = "auto"
    quantize: str = "none"
    device: str = "auto"
    grad_checkpointing: bool = False
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

    def __post_init__(self):
        defaults = TINY_DEMO_DEFAULTS if self.model == "phi3-tiny" else MODEL_DEFAULTS
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"--{flag(f.name)} must be a finite number, got {value}")
        positive = ("epochs", "lr", "batch_size", "grad_accum", "max_seq_len", "lora_r", "lora_alpha",
                    "log_every")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"--{flag(name)} must be positive, got {getattr(self, name)}")
        for name in ("max_steps", "save_total_limit", "global_batch_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{flag(name)} must be positive, got {value}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        resolve_device(self.device)  # cuda without a GPU, or an unknown device, stops here
        if self.strategy not in ("ddp", "fsdp"):
            raise ValueError(f"--strategy must be ddp or fsdp, got {self.strategy!r}")
        if self.report_to not in ("none", "tensorboard"):
            raise ValueError(f"--report-to must be none or tensorboard, got {self.report_to!r}")
        if self.report_to == "tensorboard":
            summary_writer_class()  # a missing package stops here, before any work
        if self.attention is not None and self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"--attention must be one of {', '.join(ATTENTION_CHOICES)}, "
                             f"got {self.attention!r}")
        if self.attention == "flex" and resolve_device(self.device).type != "cuda":
            raise ValueError("--attention flex trains on CUDA only (torch has no FlexAttention "
                             "backward on CPU); use auto or sdpa on a CPU")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.quantize not in QUANTIZE_CHOICES:
            raise ValueError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, "
                             f"got {self.quantize!r}")
        if self.quantize != "none" and self.strategy == "fsdp":
            raise ValueError("--quantize nf4 works with --strategy ddp, not fsdp: FSDP shards "
                             "parameters, and the 4-bit base weights are buffers")
        if self.overwrite and self.resume:
            raise ValueError("--overwrite replaces the run in --output and --resume continues it: "
                             "give one of them")
        if self.use_dora and "embed_tokens" in self.target_modules:
            raise ValueError("--use-dora applies to linear targets only: drop embed_tokens from "
                             "--target-modules")
        self.check_data_options()
        if self.max_grad_norm < 0 or self.weight_decay < 0 or self.save_every < 0 or self.eval_every < 0:
            raise ValueError("--max-grad-norm, --weight-decay, --save-every and --eval-every must be >= 0")

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
    "tokenizer": "tokenizer.json or its directory (default: the model's, or phi3-tiny's)",
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
    "lora_r": "LoRA rank", "lora_alpha": "LoRA alpha (scale alpha/r)", "lora_dropout": "LoRA dropout",
    "target_modules": "modules that get LoRA (qkv_proj o_proj gate_up_proj down_proj lm_head embed_tokens)",
    "use_rslora": "scale alpha/sqrt(r) instead of alpha/r",
    "use_dora": "DoRA: a trained magnitude per output row over the LoRA update (PEFT's use_dora; "
                "fastest with --lora-dropout 0)",
    "warmup_ratio": "fraction of steps with linear warmup",
    "weight_decay": "AdamW weight decay", "max_grad_norm": "gradient clipping norm (0: off)",
    "seed": "seed for initialisation, data order and dropout",
    "dtype": "auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16 or float16",
    "quantize": "none, or nf4: QLoRA, the decoder's linear weights held in 4 bits (NF4)",
    "device": "auto, cpu, cuda or cuda:N",
    "grad_checkpointing": "recompute layer activations in backward to save memory",
    "strategy": "under torchrun: ddp (each process holds the model) or fsdp (the model sharded)",
    "save_every": "checkpoint every N steps (0: only at the end)",
    "save_total_limit": "keep only the newest N step checkpoints",
    "eval_every": "evaluate every N steps (0: only at the end, when --eval-data is given)",
    "log_every": "write metrics every N steps",
    "report_to": "none, or tensorboard: also write the metrics to OUTPUT/tensorboard/",
    "attention": "auto (FlexAttention for packed or windowed batches on CUDA, SDPA otherwise), "
                 "flex or sdpa; sets LORAKERNELS_ATTENTION for the run (unset: that variable's, "
                 "else auto)",
    "resume": "continue from the newest checkpoint in --output, or from PATH",
    "allow_changed_resume": "let --resume continue a run whose data or training settings "
                            "(lr, batch, LoRA shape, seed, ...) have changed since the checkpoint",
    "overwrite": "replace the run already in --output (its metrics.jsonl, checkpoint-*/, final/ "
                 "and tensorboard/ are removed when training starts; other files stay)",
}


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
        help_text = f"{HELP[f.name]} (default: {describe_default(f)})"
        if kind is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, help=help_text)
        elif f.name == "resume":
            parser.add_argument(name, nargs="?", const="latest", metavar="PATH", help=help_text)
        elif f.name == "target_modules":
            parser.add_argument(name, nargs="+", metavar="NAME", help=help_text)
        else:
            parser.add_argument(name, type=scalar_type(kind), help=help_text)
    return parser


def scalar_type(kind):
    return {int: int, float: float, str: str, Optional[int]: int, Optional[float]: float,
            Optional[str]: str}[kind]


def describe_default(f: dataclasses.Field) -> str:
    if f.name in MODEL_DEFAULTS:
        return f"{MODEL_DEFAULTS[f.name]}; {TINY_DEMO_DEFAULTS[f.name]} for phi3-tiny"
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
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


def coerce(value, kind, where: str):
    """A YAML value as the option's type, or a ValueError saying where and what was expected."""
    if value is None and kind in (Optional[int], Optional[float], Optional[str]):
        return None
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        return value
    if kind == List[str]:
        items = value.split() if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise ValueError(f"{where} must be a list of names, got {value!r}")
        return items
    try:
        return scalar_type(kind)(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be {scalar_type(kind).__name__}, got {value!r}") from None


def parse_config(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """Defaults, then the --config YAML, then explicit flags."""
    given = vars(build_parser().parse_args(argv))
    options = read_yaml(given.pop("config")) if "config" in given else {}
    options.update(given)
    return TrainConfig(**options)
