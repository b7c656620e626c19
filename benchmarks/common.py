"""What the benchmark scripts share: setup, arguments, result files, Phi-3 shapes and presets,
the one-LoRA-layer timing harness of bench_lora_linear.py and bench_qlora.py, and the
transformers + PEFT training side (model, padded batches, step) of bench_train.py and bench_cli.py.

Scripts import it as ``common`` (Python puts a script's own folder on sys.path); importing it
changes nothing. They measure the lorakernels, model and training packages as installed
(``pip install -e .``); each script calls prepare_script() before its main().
"""
import argparse
import json
import os
import platform
import re
import shlex
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import triton.testing

import lorakernels
from lorakernels.lora_call import LoRACall
from lorakernels.ops.lora_linear import dropout_mask, fused_lora_linear
from lorakernels.ops.triton_utils import INTERPRETING
from lorakernels.reference import BaseWeight, lora_linear_reference
from model import PRESETS, Phi3Config, Phi3ForCausalLM
from model.build import random_model
from model.tokenizer import Phi3Tokenizer, load_tokenizer
from training.data import IGNORE, read_chats, tokenize_chats

ON_CUDA = torch.cuda.is_available()
ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if ON_CUDA else "cpu"
SEED = 1234
RESULTS_DIR = Path("benchmarks/results")
DATA = ROOT / "examples" / "chat.jsonl"
DATA_SEED = 42  # train.py's default --seed; also the transformers + PEFT side's shuffle


# ----------------------------------------------------------------------------- before main


def prepare_script(triton_interpreter: bool = False) -> None:
    """What a script does before its main(): say when the lorakernels it imports is not this
    checkout's, so that nobody times other code unawares; and for a script that launches
    Triton kernels (``triton_interpreter``), without CUDA, re-run it with TRITON_INTERPRET=1
    in its environment, as Triton reads that only when kernels are decorated (at import). A
    TRITON_INTERPRET already set is kept (0 ends in smoke_mode's one-line message)."""
    package = Path(lorakernels.__file__).resolve().parents[1]
    if package != ROOT:
        print(f"note: this measures lorakernels in {package}, not this checkout ({ROOT}); "
              "run `pip install -e .` here to measure this one", file=sys.stderr)
    if triton_interpreter and not ON_CUDA and "TRITON_INTERPRET" not in os.environ:
        print("no CUDA device: running again under Triton's interpreter (TRITON_INTERPRET=1)",
              file=sys.stderr, flush=True)
        argv = [sys.executable, *sys.orig_argv[1:]]
        os.execve(sys.executable, argv, {**os.environ, "TRITON_INTERPRET": "1"})


# ----------------------------------------------------------------------------- device, versions


def device_label(cpu: str = "cpu-interpreter") -> str:
    """The device in result file names: the GPU's name as a slug, or ``cpu`` on a CPU."""
    if not ON_CUDA:
        return cpu
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def device_name() -> str:
    """The GPU's name, or the CPU's model name (from /proc/cpuinfo where there is one) and
    core count."""
    if ON_CUDA:
        return torch.cuda.get_device_name()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    except OSError:
        models = []
    return f"{models[0] if models else platform.processor() or 'CPU'} ({os.cpu_count()} cores)"


def versions(*packages: str) -> dict:
    """Python's version and torch's, triton's and ``packages``' (None where not installed)."""
    found = {"python": platform.python_version()}
    for package in ("torch", "triton", *packages):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def result_header(smoke: bool) -> dict:
    """What every kernel result file starts with: device, date, versions, and whether it was a
    smoke run."""
    return {"device": device_label(), "date": utc_now(), **versions(), "smoke": smoke}


def versions_line(result: dict) -> str:
    """The report's line for result_header's versions and date."""
    return (f"torch {result['torch']}, triton {result['triton']}, python {result['python']}; "
            f"{result['date']}")


# ----------------------------------------------------------------------------- arguments, files


def add_output_args(parser: argparse.ArgumentParser, stem: str, smoke_help: str) -> None:
    """--out-dir (where ``<stem>_<device>.json`` and ``.md`` go) and --smoke."""
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR,
                        help=f"where to write {stem}_<device>.json and .md "
                             f"(default: {RESULTS_DIR})")
    parser.add_argument("--smoke", action="store_true", help=smoke_help)


def smoke_mode(args) -> bool:
    """Whether to run the tiny smoke case: asked for, or forced without CUDA (interpreter only)."""
    if not ON_CUDA and not INTERPRETING:
        raise SystemExit("no CUDA device: the CPU smoke test needs TRITON_INTERPRET=1 (or unset)")
    return args.smoke or not ON_CUDA


def result_stem(name: str, smoke: bool) -> str:
    """``<name>_<device>``, ``_smoke`` added on a GPU smoke run (without one every run is a
    smoke run)."""
    return f"{name}_{device_label()}" + ("_smoke" if smoke and ON_CUDA else "")


def command_line() -> str:
    """How this script was run, for the report."""
    return shlex.join(["python", *sys.argv])


def write_results(result: dict, report: str, out_dir: Path, stem: str) -> None:
    """Print the markdown report and write ``<stem>.json`` and ``.md``."""
    print(report)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / f"{stem}.md").write_text(report)
    print(f"wrote {out_dir / stem}.json and .md")


# ----------------------------------------------------------------------------- Phi-3 presets


def linear_shapes(model: str) -> Dict[str, Tuple[int, int]]:
    """A preset's LoRA target linears, name -> (K in, N out)."""
    config = Phi3Config.from_name(model)
    h, inter = config.hidden_size, config.intermediate_size
    return {"qkv": (h, sum(config.qkv_split_sizes)), "o": (h, h), "gate_up": (h, 2 * inter),
            "down": (inter, h)}


PHI3_MINI = "phi3-mini-4k"
PHI3_MINI_SHAPES = linear_shapes(PHI3_MINI)


def random_base(config: Phi3Config, dtype: torch.dtype, device: str,
                quantize: Optional[str] = None) -> Phi3ForCausalLM:
    """The benchmarks' random base (model.build.random_model from SEED): the same weights
    every run."""
    return random_model(config, dtype, device, SEED, quantize)


def write_random_base(config: Phi3Config, dtype: torch.dtype, device: str,
                      directory: Path) -> Phi3ForCausalLM:
    """random_base saved with our save_pretrained and the tiny tokenizer beside it: a checkpoint
    that train.py (model.build.load_model) and transformers both load. Returns the model."""
    model = random_base(config, dtype, device)
    model.save_pretrained(directory)
    load_tokenizer().save_pretrained(directory)
    return model


# ----------------------------------------------------------------------------- transformers + PEFT


def hf_peft_model(checkpoint: str, dtype: torch.dtype, device: str, r: int, lora_alpha: float,
                  lora_dropout: float, targets: Sequence[str]):
    """transformers' Phi3ForCausalLM (attn_implementation="sdpa") from ``checkpoint``, wrapped by
    peft.get_peft_model(LoraConfig(...)); the adapters in fp32 over the frozen base, as ours."""
    import peft
    import transformers

    base = transformers.Phi3ForCausalLM.from_pretrained(checkpoint, dtype=dtype,
                                                        attn_implementation="sdpa").to(device)
    model = peft.get_peft_model(base, peft.LoraConfig(
        r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=list(targets),
        bias="none", task_type="CAUSAL_LM"))
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return model


def set_hf_checkpointing(model, enabled: bool) -> None:
    """Gradient checkpointing on or off in hf_peft_model's base, non-reentrant. Either call
    also makes the embedding output require grad (PEFT + checkpointing): HF's own default."""
    base = model.get_base_model()
    # transformers 5 renamed gradient_checkpointing_enable (now a deprecated alias).
    if hasattr(base, "activation_checkpointing_enable"):
        enable = base.activation_checkpointing_enable
        disable = base.activation_checkpointing_disable
        kwargs = {"activation_checkpointing_kwargs": {"use_reentrant": False}}
    else:
        enable, disable = base.gradient_checkpointing_enable, base.gradient_checkpointing_disable
        kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
    enable(**kwargs) if enabled else disable()


def write_long_chats(source, path: Path, chats_per_conversation: int) -> Path:
    """Multi-turn conversations of ``chats_per_conversation`` consecutive chats of ``source``
    each (their user and assistant turns; system prompts dropped), as many as whole groups
    fit, in train.py's format at ``path``. With the example chats (~44 tokens each) 40 make a
    conversation of ~1,600-1,800 tokens: a batch of conversations is then about as many tokens
    as a batch of packed rows, on both sides of a comparison."""
    chats = read_chats(source)
    groups = [chats[i:i + chats_per_conversation]
              for i in range(0, len(chats) - chats_per_conversation + 1, chats_per_conversation)]
    with path.open("w") as out:
        for group in groups:
            turns = [m for chat in group for m in chat if m["role"] != "system"]
            out.write(json.dumps({"messages": turns}) + "\n")
    return path


def padded_conversations(conversations: Sequence[Tuple[List[int], List[int]]], pad_id: int) -> dict:
    """(ids, labels) pairs as a transformers batch: one conversation a row, right-padded to the
    longest; attention_mask 0 and labels -100 on the padding."""
    length = max(len(ids) for ids, _ in conversations)

    def pad(values, fill):
        return torch.tensor([v + [fill] * (length - len(v)) for v in values], dtype=torch.long)

    return {"input_ids": pad([ids for ids, _ in conversations], pad_id),
            "attention_mask": pad([[1] * len(ids) for ids, _ in conversations], 0),
            "labels": pad([labels for _, labels in conversations], IGNORE)}


def hf_batches(tokenizer: Phi3Tokenizer, data, batch_size: int, max_seq_len: int,
               steps: int) -> List[dict]:
    """What a transformers + PEFT script trains on: the chats shuffled once (DATA_SEED),
    ``batch_size`` conversations a batch (no packing), each cut to ``max_seq_len`` tokens,
    padded by padded_conversations. Tokens and targets are train.py's (training.data)."""
    examples, _ = tokenize_chats(read_chats(data), tokenizer, max_seq_len, train_on_prompt=False)
    conversations = [(e.input_ids, [i if t else IGNORE for i, t in zip(e.input_ids, e.targets)])
                     for e in examples]
    shuffle = torch.Generator().manual_seed(DATA_SEED)
    order = torch.randperm(len(conversations), generator=shuffle).tolist()
    return [padded_conversations([conversations[order[(step * batch_size + i) % len(order)]]
                                  for i in range(batch_size)], tokenizer.pad_id)
            for step in range(steps)]


def unpacked(batch: dict, pad_id: int) -> dict:
    """A packed batch (training.data: segment_ids, -1 on padding) as its conversations one per
    row, in padded_conversations' layout: the same tokens and targets for transformers."""
    conversations = []
    for ids, labels, segments in zip(batch["input_ids"].tolist(), batch["labels"].tolist(),
                                     batch["segment_ids"].tolist()):
        for segment in sorted(set(segments) - {-1}):
            keep = [i for i, s in enumerate(segments) if s == segment]
            conversations.append(([ids[i] for i in keep], [labels[i] for i in keep]))
    return padded_conversations(conversations, pad_id)


def data_tokens(batch: dict) -> int:
    """The batch's non-padding tokens: attention_mask's ones (transformers), segment ids >= 0
    (ours)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int((batch["segment_ids"] >= 0).sum())


def conversations(batch: dict) -> int:
    """Conversations in a batch: one a row with an attention mask (HF), else each row's segments."""
    if "attention_mask" in batch:
        return int((batch["attention_mask"].sum(dim=1) > 0).sum())
    return int((batch["segment_ids"].max(dim=1).values + 1).sum())


def hf_training_step(model, params, optimizer, batch: dict,
                     max_grad_norm: float) -> Tuple[float, float]:
    """A transformers + PEFT script's step: Hugging Face's own loss (full logits, upcast to fp32,
    mean over the shifted labels), backward, clip_grad_norm_, AdamW, zero_grad. ``batch`` is on
    the model's device. Returns (loss, the gradient norm before clipping)."""
    loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 labels=batch["labels"], use_cache=False).loss
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item(), grad_norm.item()


# ----------------------------------------------------------------------------- one LoRA layer


# Fused output vs the fp32 reference: max |error| / max |reference|, as tests/test_lora_kernels.py.
REL_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}


@dataclass
class Inputs:
    """One case: x [M, K], weight [N, K] (frozen; dense or NF4), lora_A [r, K], lora_B [N, r],
    dy [M, N]."""

    x: torch.Tensor
    weight: BaseWeight
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    dy: torch.Tensor
    dropout_p: float

    @property
    def trainable(self) -> List[torch.Tensor]:
        return [self.x, self.lora_A, self.lora_B]


def random_weight(K: int, N: int, dtype: torch.dtype) -> torch.Tensor:
    """A frozen base weight [N, K] with entries N(0, 1/K), so outputs keep the inputs' scale."""
    gen = torch.Generator(DEVICE).manual_seed(SEED)
    return (torch.randn(N, K, generator=gen, device=DEVICE) * K ** -0.5).to(dtype)


def make_inputs(M: int, weight: torch.Tensor, r: int, dropout_p: float,
                adapter_dtype: torch.dtype) -> Inputs:
    """M rows over ``weight``: x and dy in its dtype, A and B in ``adapter_dtype``."""
    N, K = weight.shape
    gen = torch.Generator(DEVICE).manual_seed(SEED + M)

    def randn(*shape, scale=1.0, dtype=weight.dtype):
        return (torch.randn(*shape, generator=gen, device=DEVICE) * scale).to(dtype)

    # B is random, not PEFT's zeros, so that the correctness check sees the low-rank term.
    return Inputs(
        x=randn(M, K).requires_grad_(), weight=weight,
        lora_A=randn(r, K, scale=K ** -0.5, dtype=adapter_dtype).requires_grad_(),
        lora_B=randn(N, r, scale=r ** -0.5, dtype=adapter_dtype).requires_grad_(),
        dy=randn(M, N), dropout_p=dropout_p,
    )


def fused(t: Inputs, scaling: float) -> torch.Tensor:
    """Our layer: lorakernels.ops.lora_linear.fused_lora_linear (Triton), no bias."""
    return fused_lora_linear(t.x, t.weight, None,
                             LoRACall(t.lora_A, t.lora_B, scaling, t.dropout_p), SEED)


def check_fused(t: Inputs, dense_weight: torch.Tensor, scaling: float, name: str,
                case: str) -> None:
    """fused(t) against the fp32 reference over ``dense_weight`` (t's weight, or what its NF4
    weight dequantises to), given the kernels' own dropout mask; exits if it is wrong.

    Run with the benchmark's dropout p (exact, as the mask is the kernels' own) so that the
    first call, which autotunes, tunes the variant that is then timed: the autotune keys
    hold the dropout flag.
    """
    with torch.no_grad():
        y = fused(t, scaling).float()
        x = t.x.float()
        mask = dropout_mask(*x.shape, t.dropout_p, SEED, x.device) if t.dropout_p > 0 else 1.0
        ref = lora_linear_reference(x, dense_weight.float(), None, t.lora_A.float(),
                                    t.lora_B.float(), scaling, lora_input=x * mask)
    error = ((y - ref).abs().max() / ref.abs().max()).item()
    tol = REL_TOL[t.x.dtype]
    if not error < tol:
        raise SystemExit(f"{name} is wrong for {case}: relative max error {error:.3g} against "
                         f"lorakernels.reference (tolerance {tol:g} in {t.x.dtype}); not timing it")


def add_layer_args(parser: argparse.ArgumentParser, shapes: Sequence[str],
                   tokens: Sequence[int]) -> None:
    """--tokens, --shapes, --rank and --dropout: the one-layer case, with these defaults."""
    parser.add_argument("--tokens", type=int, nargs="+", default=list(tokens), metavar="M",
                        help=f"token counts M to run (default: {' '.join(map(str, tokens))})")
    parser.add_argument("--model", choices=sorted(PRESETS), default=PHI3_MINI,
                        help=f"preset whose layer shapes are run (default: {PHI3_MINI})")
    parser.add_argument("--shapes", nargs="+", choices=list(PHI3_MINI_SHAPES), default=list(shapes),
                        help=f"the model's layers to run (default: {' '.join(shapes)})")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank r (default: 16)")
    parser.add_argument("--dropout", type=float, default=0.05,
                        help="LoRA dropout p (default: 0.05)")


# ----------------------------------------------------------------------------- modes


Provider = Callable[[Inputs], torch.Tensor]


def forward_step(provider: Provider, t: Inputs) -> Callable[[], object]:
    return lambda: provider(t)


def backward_step(provider: Provider, t: Inputs) -> Callable[[], object]:
    y = provider(t)  # the graph is built once, outside the timed region
    return lambda: y.backward(t.dy, retain_graph=True)


def forward_backward_step(provider: Provider, t: Inputs) -> Callable[[], object]:
    return lambda: provider(t).backward(t.dy)


BASE_GEMMS = {"forward": 1, "backward": 1, "both": 2}


def base_flops(mode: str, M: int, K: int, N: int) -> int:
    """FLOPs of the base GEMMs alone (backward: dx only, W is frozen); LoRA's are not counted."""
    return BASE_GEMMS[mode] * 2 * M * N * K


def extra_elements(mode: str, M: int, K: int, N: int) -> int:
    """Elements the fused kernels read beyond the base GEMMs: x in F1; dy in B1, x in B3."""
    forward, backward = M * K, M * K + M * N
    return {"forward": forward, "backward": backward, "both": forward + backward}[mode]


def timed_row(shape: str, M: int, K: int, N: int, r: int, provider: str, mode: str,
              times: Sequence[float]) -> dict:
    """A result row's case, its [median, p20, p80] ms and its base-GEMM TFLOP/s."""
    median, p20, p80 = times
    return dict(shape=shape, M=M, K=K, N=N, r=r, provider=provider, mode=mode, median_ms=median,
                p20_ms=p20, p80_ms=p80, tflops=base_flops(mode, M, K, N) / (median * 1e-3) / 1e12)


# ----------------------------------------------------------------------------- timing


QUANTILES = [0.5, 0.2, 0.8]
CPU_REPS = 5
COPY_BYTES = {"cuda": 256 << 20, "cpu": 32 << 20}


def gpu_timer(fn: Callable, grads: Sequence[torch.Tensor]) -> List[float]:
    """[median, p20, p80] ms by triton.testing.do_bench, grads set to None outside the timing."""
    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=list(grads),
                                   quantiles=QUANTILES)


def cpu_timer(fn: Callable, grads: Sequence[torch.Tensor]) -> List[float]:
    """[median, p20, p80] ms of CPU_REPS calls after a warm-up: do_bench's protocol, host clock."""
    fn()
    times = []
    for _ in range(CPU_REPS):
        for g in grads:
            g.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return torch.tensor(times, dtype=torch.float64).quantile(
        torch.tensor(QUANTILES, dtype=torch.float64)).tolist()


time_ms = gpu_timer if ON_CUDA else cpu_timer  # [median, p20, p80] ms on this machine


def timing_config() -> dict:
    """How the times were taken, for a result's config."""
    timer = ("triton.testing.do_bench(warmup=25, rep=100)" if ON_CUDA
             else f"time.perf_counter, {CPU_REPS} calls after 1 warm-up")
    return {"timer": timer, "triton_interpret": INTERPRETING}


def copy_bandwidth_gbps() -> float:
    """Bytes read + written per second by one large device-to-device copy, in GB/s."""
    nbytes = COPY_BYTES[DEVICE]
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    median_ms = time_ms(lambda: dst.copy_(src), [])[0]
    return 2 * nbytes / (median_ms * 1e-3) / 1e9
