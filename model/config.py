"""Phi3Config: the architecture numbers, read from a checkpoint's config.json or a named preset."""
import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

# config.json keys that carry no meaning for this implementation (all zero or bookkeeping in
# every published Phi-3 checkpoint); anything else unknown is an error, not silently dropped.
class ArgumentError(ValueError):
    """A build argument (``argument``: model, device, ...) whose value cannot work; the
    command-line tools say it as their flag (``as_flag``)."""

    def __init__(self, argument: str, value, reason: str):
        super().__init__(f"{argument} {value}: {reason}")
        self.argument, self.value, self.reason = argument, value, reason

    def as_flag(self) -> str:
        return f"--{self.argument.replace('_', '-')} {self.value}: {self.reason}"


DEVICE_NAME = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


def check_device_name(name: str) -> None:
    """A device spelled as one: auto, cpu, cuda or cuda:N (whether this machine has it is
    ``build.resolve_device``'s to say)."""
    if not DEVICE_NAME.fullmatch(name):
        raise ArgumentError("device", name, "unknown device; use auto, cpu, cuda or cuda:N")


# Phi-3's four decoder projections: the LoRA targets by default (PEFT's module names).
DEFAULT_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
# The dtypes a model's weights may be loaded in; auto: bf16 on a GPU, fp32 on a CPU.
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
# How the decoder's linear weights may be held: dense, or in 4 bits (QLoRA's NF4).
QUANTIZE_CHOICES = ("none", "nf4")
IGNORED_HF_KEYS = {
    "architectures", "auto_map", "model_type", "torch_dtype", "dtype", "transformers_version",
    "use_cache", "attention_dropout", "embd_pdrop", "resid_pdrop", "attention_bias",
    "initializer_range", "_name_or_path", "output_attentions",
    "output_hidden_states", "return_dict",
}


SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
         "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
         "original_max_position_embeddings")
MAX_PARAMETERS = 10**12  # phi4 has 1.5e10; beyond this a size is a typo, not a model


@dataclass
class Phi3Config:
    vocab_size: int = 32064
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    # RoPE rotates the first int(head_dim · factor) dims of each head, the rest pass through
    # (Phi-4-mini: 0.75, so 96 of 128).
    partial_rotary_factor: float = 1.0
    # LongRoPE: {"type": "longrope", "short_factor": [...], "long_factor": [...]}
    # (rotary_dim/2 each).
    rope_scaling: Optional[dict] = None
    sliding_window: Optional[int] = 2047
    rms_norm_eps: float = 1e-5
    hidden_act: str = "silu"
    bos_token_id: int = 1
    eos_token_id: int = 32000
    pad_token_id: int = 32000
    tie_word_embeddings: bool = False
    extra: dict = field(default_factory=dict, repr=False)  # ignored keys, kept for save_pretrained

    def __post_init__(self):
        self._check_types()
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (Phi-3 uses silu)")
        if not 0 < self.partial_rotary_factor <= 1 or self.rotary_dim % 2 or self.rotary_dim == 0:
            raise ValueError(f"partial_rotary_factor {self.partial_rotary_factor} must give an "
                             f"even number of rotated dims from 2 to head_dim {self.head_dim}, "
                             f"got int({self.head_dim} * {self.partial_rotary_factor}) = "
                             f"{self.rotary_dim}")
        if self.rope_scaling is not None:
            self.rope_scaling = dict(self.rope_scaling)
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind not in ("longrope", "su", "default"):  # "su" is LongRoPE's first name
                raise ValueError(f"rope_scaling type {kind!r} is not supported (longrope only)")
            if kind == "default":
                self.rope_scaling = None
            else:
                half = self.rotary_dim // 2
                for key in ("short_factor", "long_factor"):
                    count = len(self.rope_scaling.get(key, ()))
                    if count != half:
                        raise ValueError(f"rope_scaling.{key} must have rotary_dim/2 = {half} "
                                         f"values (head_dim {self.head_dim} × "
                                         f"partial_rotary_factor {self.partial_rotary_factor} = "
                                         f"{self.rotary_dim} rotated dims), got {count}")

    def _check_types(self) -> None:
        """Sizes are positive integers, eps and theta positive numbers, rope_scaling a mapping;
        and the model fits in memory at all (a typo of 10^9 would allocate for minutes)."""
        for name in SIZES:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("rope_theta", "rms_norm_eps", "partial_rotary_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        for name in ("sliding_window", "bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 0):
                raise ValueError(f"{name} must be a non-negative integer or null, got {value!r}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise ValueError(f"rope_scaling must be a mapping or null, got {self.rope_scaling!r}")
        if self.parameter_count > MAX_PARAMETERS:
            raise ValueError(f"{self.parameter_count:.3g} parameters (hidden_size "
                             f"{self.hidden_size}, intermediate_size {self.intermediate_size}, "
                             f"{self.num_hidden_layers} layers, vocab_size {self.vocab_size}) is "
                             f"beyond any Phi model; check config.json's sizes")

    @property
    def parameter_count(self) -> int:
        """About how many weights the model holds (embedding and head counted twice)."""
        per_layer = 4 * self.hidden_size ** 2 + 3 * self.hidden_size * self.intermediate_size
        return 2 * self.vocab_size * self.hidden_size + self.num_hidden_layers * per_layer

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """Leading dims of each head that RoPE rotates: int(head_dim · partial_rotary_factor)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def qkv_split_sizes(self):
        """Rows of q, k and v in ``qkv_proj``: unequal under grouped-query attention."""
        kv = self.num_key_value_heads * self.head_dim
        return (self.hidden_size, kv, kv)

    @property
    def rope_attention_scaling(self) -> float:
        """LongRoPE's cos/sin scale sqrt(1 + ln(L/L0)/ln(L0)); 1 without LongRoPE."""
        factor = self.max_position_embeddings / self.original_max_position_embeddings
        if self.rope_scaling is None or factor <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(factor) / math.log(self.original_max_position_embeddings))

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "Phi3Config":
        """From Hugging Face's config.json keys; unknown keys are an error naming the source."""
        values = dict(values)
        if "rope_parameters" in values and "rope_scaling" not in values:  # transformers 5 layout
            params = dict(values.pop("rope_parameters") or {})
            values.setdefault("rope_theta", params.pop("rope_theta", 10000.0))
            for key in ("partial_rotary_factor", "original_max_position_embeddings"):
                if key in params:
                    values.setdefault(key, params.pop(key))
            kind = params.get("rope_type", params.get("type", "default"))
            values["rope_scaling"] = None if kind == "default" else params
        known = {f.name for f in fields(cls)} - {"extra"}
        extra = {k: values.pop(k) for k in list(values) if k in IGNORED_HF_KEYS}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown Phi-3 config keys {unknown}")
        if values.get("original_max_position_embeddings") is None:
            values["original_max_position_embeddings"] = values.get("max_position_embeddings", 4096)
        for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
            if isinstance(values.get(key), list):  # some configs list several; the first is the EOS
                values[key] = values[key][0]
        try:
            return cls(**values, extra=extra)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None

    @classmethod
    def from_json(cls, path) -> "Phi3Config":
        path = Path(path)
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: not a JSON object of config keys")
        return cls.from_dict(values, source=str(path))

    @classmethod
    def from_name(cls, name: str) -> "Phi3Config":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return cls(**PRESETS[name])

    def to_hf_dict(self, dtype: str = "bfloat16") -> dict:
        """config.json as Hugging Face writes it for Phi3ForCausalLM."""
        values = asdict(self)
        extra = values.pop("extra")
        return {**extra, **values, "architectures": ["Phi3ForCausalLM"], "model_type": "phi3",
                "torch_dtype": dtype}


LONGROPE_FACTORS = json.loads(
    (Path(__file__).parent / "assets" / "longrope_factors.json").read_text())
LONG_CONTEXT = dict(max_position_embeddings=131072, original_max_position_embeddings=4096,
                    sliding_window=262144)

PRESETS = {
    # The embedded default: a few million parameters, Phi-3's layout and special tokens.
    # Vocabulary: the shipped tokenizer's 1035 tokens padded to a multiple of 64, as Phi-3 pads.
    "phi3-tiny": dict(vocab_size=1088, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                      original_max_position_embeddings=4096,
                      sliding_window=2047, eos_token_id=1024, pad_token_id=1024),
    # phi3-tiny's width with Phi-3-mini-128k's context: LongRoPE (the first 32 of its 48 factor
    # pairs, for 64-dim heads) past 4096 positions, the 2047 window. Long-context tests and
    # benchmarks on a CPU (docs/long_context.md).
    "phi3-tiny-128k": dict(vocab_size=1088, hidden_size=256, intermediate_size=688,
                           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                           max_position_embeddings=131072, original_max_position_embeddings=4096,
                           sliding_window=2047, eos_token_id=1024, pad_token_id=1024,
                           rope_scaling={"type": "longrope", **{
                               key: LONGROPE_FACTORS["phi3-mini-128k"][key][:32]
                               for key in ("short_factor", "long_factor")}}),
    "phi3-mini-4k": dict(),
    "phi3-mini-128k": dict(LONG_CONTEXT, rope_scaling=LONGROPE_FACTORS["phi3-mini-128k"]),
    "phi3.5-mini": dict(LONG_CONTEXT, rope_scaling=LONGROPE_FACTORS["phi3.5-mini"]),
    "phi3-medium-4k": dict(hidden_size=5120, intermediate_size=17920, num_hidden_layers=40,
                           num_attention_heads=40, num_key_value_heads=10),
    # microsoft/phi-4 (14 B): Phi-3-medium's shapes with a 100k vocabulary, 16k positions,
    # rope_theta 250000, no sliding window; untied. Special ids are its tokenizer's <|endoftext|>.
    "phi4": dict(vocab_size=100352, hidden_size=5120, intermediate_size=17920, num_hidden_layers=40,
                 num_attention_heads=40, num_key_value_heads=10, max_position_embeddings=16384,
                 original_max_position_embeddings=16384, rope_theta=250000.0, sliding_window=None,
                 bos_token_id=100257, eos_token_id=100257, pad_token_id=100257),
    # microsoft/Phi-4-mini-instruct (3.8 B): 24 query / 8 KV heads of 128 dims, RoPE on the first
    # 96 (LongRoPE factors for those 48 pairs), embeddings tied to the LM head, 200k vocabulary.
    "phi4-mini": dict(LONG_CONTEXT, vocab_size=200064, hidden_size=3072, intermediate_size=8192,
                      num_hidden_layers=32, num_attention_heads=24, num_key_value_heads=8,
                      partial_rotary_factor=0.75, rope_scaling=LONGROPE_FACTORS["phi4-mini"],
                      tie_word_embeddings=True, bos_token_id=199999, eos_token_id=200020,
                      pad_token_id=199999),
}
