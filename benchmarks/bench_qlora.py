"""Benchmark QLoRA: the Phi-3 base's memory in NF4 against bf16, and one LoRA layer over an NF4
weight against the same layer over a dense bf16 weight.

Memory (``--sections memory``)
  computed  exact bytes from the shapes, for --model (Phi-3-mini-4k by default): nf4_nbytes
            (lorakernels/nf4.py) for every decoder linear weight, bf16 for the rest (embedding,
            norms, LM head, which stay dense as in QLoRA). Arithmetic: valid on any machine.
  measured  on a GPU, torch.cuda.memory_allocated held by a random base of --model built for
            real, once in bf16 and then (the bf16 one freed) once in NF4. Both are built on the
            meta device and materialised on the GPU; the NF4 one is filled layer by layer by
            NF4Linear.quantize_weight(N(0, 0.02²) in bf16), so its peak (also reported) is the
            4-bit model plus one dense weight and its quantisation's temporaries. Without CUDA
            the smoke run builds phi3-tiny on the CPU and counts its tensors' bytes instead
            (labelled "counted on cpu", not a GPU measurement).
  Also listed: the dequantisation scratch buffer the dequant path holds (the largest decoder
  weight, dense), which is not part of the base.

Layers (``--sections layers``): y = x·Wᵀ + s·(dropout(x)·Aᵀ)·Bᵀ on the fused Triton kernels
(lorakernels.ops.lora_linear.fused_lora_linear), Phi-3-mini shapes, x and dy bf16, A and B fp32
(as apply_lora makes them), r 16, alpha 32, dropout 0.05. Providers, in one process:
  bf16         W dense bf16 [N, K]: our bf16 LoRA layer, the baseline
  nf4_fused    W an NF4Weight (quantize_nf4 of that W), read as 4-bit tiles inside the GEMM's
               K-loop: lorakernels.ops.lora_linear.NF4_FUSED_MAX_ROWS monkeypatched to 1 << 30
  nf4_dequant  the same NF4 weight dequantised whole into the shared scratch buffer, then the
               dense kernels: NF4_FUSED_MAX_ROWS monkeypatched to 0
  nf4_default  NF4_FUSED_MAX_ROWS left at the library's value (64 when written): the dispatch
               as it ships (the path it took is in the ``path`` column)
The patch covers the provider's check, warm-up and timing, forward and backward (the backward
dispatches on dy's rows by the same constant), and is undone after each.
Modes: forward (autograd recording) and both (forward + backward, x, A and B requiring grad;
grads set to None outside the timing), bench_lora_linear.py's step builders and timers:
triton.testing.do_bench medians (p20/p80 in the JSON) on a GPU.

Per row: median ms, base-GEMM TFLOP/s (2·M·N·K per base GEMM: forward 1, both 2), × bf16 (median
/ bf16's median, same shape, M and mode), and the floor: the larger of bytes / copy bandwidth
and FLOPs / matmul throughput, both measured in the same run (a device-to-device copy and a
square torch.matmul in x's dtype). Bytes: the base GEMMs' activations (x read, y written;
backward dy read, dx written), the fused kernels' extra reads (bench_lora_linear.extra_elements)
and the weight once per base GEMM in the form that path reads it: dense 2·N·K; fused
nf4_nbytes(N·K); dequant nf4_nbytes(N·K) read plus 2·N·K written and 2·N·K read again. LoRA
parameters, S and dS (≤ r/K of the traffic) are not counted.

Summary: the crossover M per shape and mode (the smallest M at which nf4_dequant beats
nf4_fused), a recommendation for NF4_FUSED_MAX_ROWS from the forward + backward crossovers,
and the targets: NF4 base ≤ 0.3× bf16 bytes; nf4_default forward + backward ≤ 1.10× bf16 at
M = 4096; nf4_default forward faster than bf16 at M ≤ 16.

Run:
    python benchmarks/bench_qlora.py                          # memory + qkv, gate_up at M = 16 .. 4096
    python benchmarks/bench_qlora.py --sections layers --shapes qkv o gate_up down
    python benchmarks/bench_qlora.py --tokens 32 64 128 --sections layers   # refine the crossover
    python benchmarks/bench_qlora.py --smoke --out-dir /tmp/bench           # tiny, any machine

Without CUDA it runs the smoke case (K=64, N=64, M = 16 and 72; the memory of phi3-tiny
counted on the CPU) under TRITON_INTERPRET=1 as a test of the script itself: its times mean
nothing and say so. Results: markdown on stdout, and
``<out-dir>/qlora_<device>.json`` and ``.md`` (``_smoke`` suffix for a smoke run on a GPU).
"""
import argparse
import contextlib
import dataclasses
import gc
import itertools
import math
import os
import platform
import sys
from pathlib import Path
from typing import List, Optional

import torch

ON_CUDA = torch.cuda.is_available()
if not ON_CUDA:
    # Triton picks interpreter or compiler when kernels are decorated: set it before importing them.
    os.environ.setdefault("TRITON_INTERPRET", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))                 # benchmark this checkout's kernels
sys.path.insert(0, str(ROOT / "benchmarks"))  # and share bench_lora_linear's timing and floor helpers

import lorakernels.ops.lora_linear as lora_ops  # noqa: E402
from bench_lora_linear import (BASE_GEMMS, CPU_REPS, Inputs, copy_bandwidth_gbps,  # noqa: E402
                               cpu_timer, device_label, extra_elements, forward_backward_step,
                               forward_step, gpu_timer, result_header, smoke_mode,
                               write_results)
from lorakernels.nf4 import NF4Weight, dequantize_nf4_reference, nf4_nbytes, quantize_nf4  # noqa: E402
from lorakernels.nf4_layers import NF4FrozenWeight  # noqa: E402
from lorakernels.ops.triton_utils import INTERPRETING  # noqa: E402
from lorakernels.reference import lora_linear_reference  # noqa: E402
from model import PRESETS, Phi3Config, Phi3ForCausalLM  # noqa: E402
from model.phi3 import Phi3RotaryEmbedding  # noqa: E402
from model.quantization import quantize_decoder_linears  # noqa: E402

# Phi-3-mini's linear layers, name -> (K in, N out): bench_lora_linear.py's table.
PHI3_MINI_SHAPES = {"qkv": (3072, 9216), "o": (3072, 3072), "gate_up": (3072, 16384),
                    "down": (8192, 3072)}
DEFAULT_SHAPES = ["qkv", "gate_up"]
DEFAULT_TOKENS = [16, 64, 256, 1024, 4096]
SMOKE_SHAPES = {"tiny": (64, 64)}
SMOKE_TOKENS = [16, 72]  # one on each side of the shipped NF4_FUSED_MAX_ROWS
SMOKE_MODEL = "phi3-tiny"
DTYPE = torch.bfloat16          # x, dy, the dense base and what the NF4 weight dequantises to
ADAPTER_DTYPE = torch.float32   # lora_A, lora_B: as apply_lora creates them
SEED = 1234
INIT_STD = 0.02                 # random base weights, as Hugging Face initialises Phi-3
MATMUL_SIZE = {"cuda": 8192, "cpu": 256}
REL_TOL = 2e-2                  # bf16 output vs the fp32 reference (tests/test_qlora_kernels.py)

SHIPPED_FUSED_MAX_ROWS = lora_ops.NF4_FUSED_MAX_ROWS
# NF4_FUSED_MAX_ROWS per provider: None leaves the library's value; bf16 has no NF4 weight.
PROVIDERS = {"bf16": None, "nf4_fused": 1 << 30, "nf4_dequant": 0, "nf4_default": None}
MODES = {"forward": forward_step, "both": forward_backward_step}
TARGET_MEMORY_RATIO = 0.3
TARGET_BOTH_RATIO, TARGET_BOTH_M = 1.10, 4096
TARGET_FORWARD_MAX_M = 16


# ----------------------------------------------------------------------------- memory


def meta_base(config: Phi3Config, nf4: bool) -> Phi3ForCausalLM:
    """The base on the meta device, bf16, its decoder linears empty NF4Linear layers if ``nf4``."""
    with torch.device("meta"):
        model = Phi3ForCausalLM(config)
    model.to(DTYPE)  # before quantising: .to(dtype) would also cast the NF4 layers' fp32 scales
    if nf4:
        quantize_decoder_linears(model, DTYPE)
    return model


def nf4_layers(model) -> List[NF4FrozenWeight]:
    return [m for m in model.modules() if isinstance(m, NF4FrozenWeight)]


def computed_base_bytes(config: Phi3Config) -> dict:
    """Exact bytes of the base from its shapes: NF4 decoder linears (nf4_nbytes) vs all bf16."""
    model = meta_base(config, nf4=True)
    quantized = [math.prod(m.weight_shape) for m in nf4_layers(model)]
    dense = sum(p.numel() for p in model.parameters())  # embedding, norms, LM head
    elem = DTYPE.itemsize
    bf16 = (sum(quantized) + dense) * elem
    nf4 = sum(nf4_nbytes(n) for n in quantized) + dense * elem
    return dict(quantized_weights=sum(quantized), dense_weights=dense, bf16_bytes=bf16,
                nf4_bytes=nf4, ratio=nf4 / bf16, scratch_bytes=max(quantized) * elem)


def random_base(config: Phi3Config, nf4: bool, device: str) -> Phi3ForCausalLM:
    """A random base on ``device`` that never holds a dense copy of its NF4 layers' weights."""
    model = meta_base(config, nf4)
    model.to_empty(device=device)  # NF4 layers: empty buffers of their final sizes
    gen = torch.Generator(device).manual_seed(SEED)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)  # RMSNorm weights
            else:
                p.normal_(0.0, INIT_STD, generator=gen)
        for layer in nf4_layers(model):
            dense = torch.empty(layer.weight_shape, dtype=DTYPE, device=device)
            layer.quantize_weight(dense.normal_(0.0, INIT_STD, generator=gen), DTYPE)
            del dense
    model.model.rotary_emb = Phi3RotaryEmbedding(config).to(device)  # its buffers were on meta
    return model


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind the model's parameters and buffers."""
    storages = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def free_memory() -> None:
    gc.collect()
    if ON_CUDA:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def measured_base_bytes(config: Phi3Config, nf4: bool) -> dict:
    """On CUDA: memory_allocated held by the built base, and the peak while building it.
    On CPU: the bytes of its tensors, counted (no allocator to ask)."""
    free_memory()
    if not ON_CUDA:
        model = random_base(config, nf4, "cpu")
        held = tensor_bytes(model)
        del model
        return dict(held_bytes=held, peak_bytes=None)
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model = random_base(config, nf4, "cuda")
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - before
    peak = torch.cuda.max_memory_allocated() - before
    del model
    free_memory()
    return dict(held_bytes=held, peak_bytes=peak)


def memory_section(model_name: str, measure_model: str) -> dict:
    computed = {name: computed_base_bytes(Phi3Config.from_name(name))
                for name in dict.fromkeys([model_name, measure_model])}
    config = Phi3Config.from_name(measure_model)
    bf16 = measured_base_bytes(config, nf4=False)  # built and freed before the NF4 one
    nf4 = measured_base_bytes(config, nf4=True)
    method = ("torch.cuda.memory_allocated after building it (peak: max_memory_allocated "
              "during the build)" if ON_CUDA else
              "counted on cpu: bytes of its tensors' storages (not a GPU measurement)")
    return dict(computed=computed, measured=dict(
        model=measure_model, method=method, bf16=bf16, nf4=nf4,
        ratio=nf4["held_bytes"] / bf16["held_bytes"]))


# ----------------------------------------------------------------------------- layers


@dataclasses.dataclass
class QLoRAInputs(Inputs):
    """bench_lora_linear's case (weight: the dense bf16 W) plus ``nf4``: quantize_nf4(W)."""

    nf4: Optional[NF4Weight] = None


@contextlib.contextmanager
def nf4_path(provider: str):
    """Force the provider's NF4 path by monkeypatching NF4_FUSED_MAX_ROWS; undo it after."""
    forced = PROVIDERS[provider]
    saved = lora_ops.NF4_FUSED_MAX_ROWS
    if forced is not None:
        lora_ops.NF4_FUSED_MAX_ROWS = forced
    try:
        yield
    finally:
        lora_ops.NF4_FUSED_MAX_ROWS = saved


def path_taken(provider: str, M: int) -> str:
    """dense, fused (4-bit tiles in the K-loop) or dequant (scratch + dense kernels)."""
    if provider == "bf16":
        return "dense"
    limit = PROVIDERS[provider]
    limit = SHIPPED_FUSED_MAX_ROWS if limit is None else limit
    return "fused" if M <= limit else "dequant"


def make_weights(K: int, N: int, device: str):
    gen = torch.Generator(device).manual_seed(SEED)
    dense = (torch.randn(N, K, generator=gen, device=device) * K ** -0.5).to(DTYPE)
    return dense, quantize_nf4(dense)


def make_inputs(M: int, K: int, N: int, weights, r: int, dropout_p: float,
                device: str) -> QLoRAInputs:
    gen = torch.Generator(device).manual_seed(SEED + M)

    def randn(*shape, scale=1.0, dtype=DTYPE):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    dense, nf4 = weights
    # B is random, not PEFT's zeros, so that the correctness check sees the low-rank term.
    return QLoRAInputs(
        x=randn(M, K).requires_grad_(), weight=dense,
        lora_A=randn(r, K, scale=K ** -0.5, dtype=ADAPTER_DTYPE).requires_grad_(),
        lora_B=randn(N, r, scale=r ** -0.5, dtype=ADAPTER_DTYPE).requires_grad_(),
        dy=randn(M, N), dropout_p=dropout_p, nf4=nf4,
    )


def layer_provider(provider: str, scaling: float):
    """A provider in bench_lora_linear's sense: inputs → y."""
    def run(t: QLoRAInputs) -> torch.Tensor:
        weight = t.weight if provider == "bf16" else t.nf4
        return lora_ops.fused_lora_linear(t.x, weight, None, t.lora_A, t.lora_B, scaling,
                                          t.dropout_p, SEED)
    return run


def check_provider(provider: str, t: QLoRAInputs, scaling: float, case: str) -> None:
    """Its output against the fp32 reference on the weight it was given (NF4: dequantised).

    Run with the benchmark's dropout so that the first call, which autotunes, tunes the
    variant that is then timed (the autotune key holds the dropout flag).
    """
    with torch.no_grad():
        y = layer_provider(provider, scaling)(t).float()
        x = t.x.float()
        mask = (lora_ops.dropout_mask(*x.shape, t.dropout_p, SEED, x.device)
                if t.dropout_p > 0 else 1.0)
        weight = t.weight if provider == "bf16" else dequantize_nf4_reference(t.nf4, DTYPE)
        ref = lora_linear_reference(x, weight.float(), None, t.lora_A.float(), t.lora_B.float(),
                                    scaling, lora_input=x * mask)
    error = ((y - ref).abs().max() / ref.abs().max()).item()
    if not error < REL_TOL:
        raise SystemExit(f"{provider} is wrong for {case}: relative max error {error:.3g} against "
                         f"lorakernels.reference (tolerance {REL_TOL:g}); not timing it")


def min_bytes(path: str, mode: str, M: int, K: int, N: int) -> int:
    """Bytes a path must move at least (see the module docstring)."""
    elem = DTYPE.itemsize
    gemms = BASE_GEMMS[mode]
    activations = gemms * (M * K + M * N) + extra_elements(mode, M, K, N)
    weight = {"dense": elem * N * K, "fused": nf4_nbytes(N * K),
              "dequant": nf4_nbytes(N * K) + 2 * elem * N * K}[path]
    return activations * elem + gemms * weight


def matmul_tflops(timer, device: str) -> float:
    """Achieved throughput of one square torch.matmul in DTYPE: the compute roof of the floor."""
    n = MATMUL_SIZE[device]
    a = torch.randn(n, n, device=device).to(DTYPE)
    b = torch.randn(n, n, device=device).to(DTYPE)
    median_ms = timer(lambda: a @ b, [])[0]
    return 2 * n ** 3 / (median_ms * 1e-3) / 1e12


def bench_shape(name: str, K: int, N: int, tokens: List[int], args, timer, roofs: dict,
                device: str) -> List[dict]:
    weights = make_weights(K, N, device)
    rows = []
    for M in tokens:
        t = make_inputs(M, K, N, weights, args.rank, args.dropout, device)
        case = f"{name} (K={K}, N={N}, M={M})"
        for provider in PROVIDERS:
            with nf4_path(provider):
                check_provider(provider, t, args.scaling, case)
        times = {}
        for mode, build in MODES.items():
            for provider in PROVIDERS:
                with nf4_path(provider):
                    times[mode, provider] = timer(build(layer_provider(provider, args.scaling), t),
                                                  t.trainable)
        for (mode, provider), (median, p20, p80) in times.items():
            path = path_taken(provider, M)
            flops = BASE_GEMMS[mode] * 2 * M * N * K
            nbytes = min_bytes(path, mode, M, K, N)
            memory_ms = nbytes / (roofs["bandwidth_gbps"] * 1e9) * 1e3
            compute_ms = flops / (roofs["matmul_tflops"] * 1e12) * 1e3
            rows.append(dict(
                shape=name, M=M, K=K, N=N, r=args.rank, provider=provider, path=path, mode=mode,
                median_ms=median, p20_ms=p20, p80_ms=p80, tflops=flops / (median * 1e-3) / 1e12,
                ratio_to_bf16=median / times[mode, "bf16"][0], min_bytes=nbytes,
                floor_ms=max(memory_ms, compute_ms),
                floor_bound="memory" if memory_ms >= compute_ms else "compute",
            ))
        del t
    return rows


# ----------------------------------------------------------------------------- summary


def crossovers(rows: List[dict]) -> List[dict]:
    """Per shape and mode: the smallest M where nf4_dequant beats nf4_fused, and how clean it is."""
    out = []
    for shape, mode in dict.fromkeys((r["shape"], r["mode"]) for r in rows):
        median = {(r["provider"], r["M"]): r["median_ms"] for r in rows
                  if r["shape"] == shape and r["mode"] == mode}
        tokens = sorted({M for _, M in median})
        dequant_wins = [M for M in tokens if median["nf4_dequant", M] < median["nf4_fused", M]]
        first = dequant_wins[0] if dequant_wins else None
        out.append(dict(
            shape=shape, mode=mode, crossover_M=first,
            # the largest M tested below the crossover (fused wins there and at every smaller M)
            fused_best_up_to=(max(tokens) if first is None else
                              max([M for M in tokens if M < first], default=None)),
            monotonic=dequant_wins == [M for M in tokens if first is not None and M >= first],
            tokens=tokens,
        ))
    return out


def recommendation(cross: List[dict]) -> dict:
    """NF4_FUSED_MAX_ROWS from the forward + backward crossovers of every shape (one constant)."""
    both = [c for c in cross if c["mode"] == "both"]
    if not both:
        return dict(value=None, text="no forward + backward rows: no recommendation")
    bounds = [c["fused_best_up_to"] for c in both]
    tokens = both[0]["tokens"]
    if any(b is None for b in bounds):
        value = 0
        text = (f"dequant+dense beats the fused path already at M={tokens[0]} for "
                f"{', '.join(c['shape'] for c in both if c['fused_best_up_to'] is None)}: set "
                f"NF4_FUSED_MAX_ROWS below {tokens[0]} (0: always dequantise)")
    else:
        value = min(bounds)
        above = [M for M in tokens if M > value]
        where = (f"the crossover lies in ({value}, {above[0]}]" if above else
                 f"fused wins at every M tested (up to {value}); the crossover is higher")
        text = (f"NF4_FUSED_MAX_ROWS = {value} (fused wins up to there for every shape; {where}; "
                f"run --tokens between them to refine)")
    if any(not c["monotonic"] for c in both):
        text += "; NOTE: the winner flips more than once with M for some shape, see the table"
    verdict = ("keep" if value == SHIPPED_FUSED_MAX_ROWS else "change") + \
        f" (shipped: {SHIPPED_FUSED_MAX_ROWS})"
    return dict(value=value, text=f"{text}; {verdict}")


def targets(memory: Optional[dict], rows: List[dict], model_name: str) -> List[dict]:
    """Each target with its measured value(s) and whether it is met; None where not measured."""
    out = []
    if memory is not None:
        computed = memory["computed"][model_name]["ratio"]
        out.append(dict(target=f"{model_name} base NF4 ≤ {TARGET_MEMORY_RATIO}× bf16 (computed)",
                        values={"computed": computed}, met=computed <= TARGET_MEMORY_RATIO))
        measured = memory["measured"]
        label = "measured" if ON_CUDA else "counted on cpu"
        if measured["model"] == model_name:  # the smoke run builds phi3-tiny: not the target's model
            out.append(dict(target=f"{model_name} base NF4 ≤ {TARGET_MEMORY_RATIO}× bf16 ({label})",
                            values={label: measured["ratio"]},
                            met=measured["ratio"] <= TARGET_MEMORY_RATIO))

    def ratios(mode, keep_m):
        return {f"{r['shape']} M={r['M']}": r["ratio_to_bf16"] for r in rows
                if r["provider"] == "nf4_default" and r["mode"] == mode and keep_m(r["M"])}

    both = ratios("both", lambda M: M == TARGET_BOTH_M)
    out.append(dict(target=f"nf4_default forward+backward ≤ {TARGET_BOTH_RATIO}× bf16 at "
                           f"M={TARGET_BOTH_M}",
                    values=both, met=all(v <= TARGET_BOTH_RATIO for v in both.values()) if both
                    else None))
    forward = ratios("forward", lambda M: M <= TARGET_FORWARD_MAX_M)
    out.append(dict(target=f"nf4_default forward faster than bf16 at M ≤ {TARGET_FORWARD_MAX_M}",
                    values=forward, met=all(v < 1.0 for v in forward.values()) if forward else None))
    return out


# ----------------------------------------------------------------------------- reporting


def gb(nbytes: Optional[int]) -> str:
    """Exact bytes, and GB for reading."""
    return "—" if nbytes is None else f"{nbytes:,} B ({nbytes / 1e9:.3f} GB)"


def memory_markdown(memory: dict) -> List[str]:
    lines = ["## Base weights in memory", "",
             "| model | how | bf16 | NF4 | NF4 / bf16 | NF4 build peak |", "|---|---|---:|---:|---:|---:|"]
    for name, c in memory["computed"].items():
        lines.append(f"| {name} | computed from shapes | {gb(c['bf16_bytes'])} | {gb(c['nf4_bytes'])} "
                     f"| {c['ratio']:.4f} | — |")
    m = memory["measured"]
    how = "measured (memory_allocated)" if ON_CUDA else "counted on cpu (not a GPU measurement)"
    lines.append(f"| {m['model']} | {how} | {gb(m['bf16']['held_bytes'])} | "
                 f"{gb(m['nf4']['held_bytes'])} | {m['ratio']:.4f} | {gb(m['nf4']['peak_bytes'])} |")
    computed = memory["computed"].items()
    weights = ", ".join(f"{n}: {c['quantized_weights'] / 1e9:.3f} G weights" for n, c in computed)
    scratch = ", ".join(f"{n}: {gb(c['scratch_bytes'])}" for n, c in computed)
    lines += ["", f"Computed: nf4_nbytes for decoder linear weights ({weights}), bf16 for the "
              "embedding, norms and LM head. Not in the base: the dequant path's scratch buffer, "
              f"the largest decoder weight dense ({scratch}). Measured: {m['method']}.", ""]
    return lines


def layer_markdown(rows: List[dict]) -> List[str]:
    lines = ["| shape | M | K→N | mode | provider | path | median ms | TFLOP/s | × bf16 | floor ms "
             "| bound | × floor |", "|---|---:|---|---|---|---|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['M']} | {r['K']}→{r['N']} | {r['mode']} | {r['provider']} "
            f"| {r['path']} | {r['median_ms']:.4f} | {r['tflops']:.1f} | {r['ratio_to_bf16']:.3f} "
            f"| {r['floor_ms']:.4f} | {r['floor_bound']} | {r['median_ms'] / r['floor_ms']:.2f} |")
    return lines


def summary_markdown(result: dict) -> List[str]:
    smoke = result["smoke"]
    lines = []
    if result["crossovers"]:
        lines += ["## Crossover: nf4_dequant vs nf4_fused", "",
                  "| shape | mode | dequant first wins at M | fused best up to M | one switch |",
                  "|---|---|---:|---:|---|"]
        for c in result["crossovers"]:
            lines.append(f"| {c['shape']} | {c['mode']} | {c['crossover_M'] or 'never'} "
                         f"| {c['fused_best_up_to'] if c['fused_best_up_to'] is not None else '—'} "
                         f"| {'yes' if c['monotonic'] else 'no'} |")
        prefix = "(smoke: not a recommendation) " if smoke else ""
        lines += ["", f"Recommendation: {prefix}{result['recommendation']['text']}", ""]
    lines += ["## Targets" + (" (smoke: the times mean nothing; computed bytes are exact)"
                              if smoke else ""), "",
              "| target | value | met |", "|---|---|---|"]
    for t in result["targets"]:
        values = ", ".join(f"{k}: {v:.3f}" for k, v in t["values"].items()) or "not measured"
        met = {True: "yes", False: "NO", None: "—"}[t["met"]]
        lines.append(f"| {t['target']} | {values} | {met} |")
    return lines + [""]


def markdown_report(result: dict, command: str) -> str:
    config = result["config"]
    smoke = (" (smoke test on cpu under TRITON_INTERPRET: times mean nothing)" if
             result["smoke"] and not ON_CUDA else " (smoke test: times mean nothing)"
             if result["smoke"] else "")
    lines = [f"# QLoRA benchmark on {result['device']}{smoke}", "",
             f"torch {result['torch']}, triton {result['triton']}, python {result['python']}; "
             f"{result['date']}", "", f"Command: `{command}`", ""]
    if result["memory"] is not None:
        lines += memory_markdown(result["memory"])
    if result["rows"]:
        roofs = result["roofs"]
        lines += [
            "## One LoRA layer over an NF4 vs a bf16 weight", "",
            f"r={config['rank']}, alpha {config['alpha']} (scale {config['scaling']:g}), dropout "
            f"{config['dropout']}, x/dy {config['dtype']}, A/B {config['adapter_dtype']}; copy "
            f"bandwidth {roofs['bandwidth_gbps']:.1f} GB/s, matmul {roofs['matmul_tflops']:.1f} "
            f"TFLOP/s (measured in this run). Paths forced by monkeypatching "
            f"lorakernels.ops.lora_linear.NF4_FUSED_MAX_ROWS: nf4_fused = 1 << 30, nf4_dequant = 0; "
            f"nf4_default leaves it at {config['shipped_nf4_fused_max_rows']}.", "",
            "TFLOP/s: base-GEMM FLOPs only. × bf16: median / bf16's median, same shape, M and mode. "
            "floor: max(least bytes / bandwidth, FLOPs / matmul throughput); × floor: median / floor.",
            "",
        ]
        lines += layer_markdown(result["rows"]) + [""]
    lines += summary_markdown(result)
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark QLoRA: base memory in NF4 vs bf16, and one LoRA layer over an NF4 "
                    "weight (fused-in-K-loop, dequant+dense, default dispatch) vs bf16.")
    parser.add_argument("--sections", nargs="+", choices=["memory", "layers"],
                        default=["memory", "layers"], help="what to run (default: both)")
    parser.add_argument("--model", choices=sorted(PRESETS), default="phi3-mini-4k",
                        help="preset whose base memory is computed and, on a GPU, measured "
                             "(default: phi3-mini-4k)")
    parser.add_argument("--tokens", type=int, nargs="+", default=DEFAULT_TOKENS, metavar="M",
                        help=f"token counts M (default: {' '.join(map(str, DEFAULT_TOKENS))})")
    parser.add_argument("--shapes", nargs="+", choices=list(PHI3_MINI_SHAPES), default=DEFAULT_SHAPES,
                        help=f"Phi-3-mini layers to run (default: {' '.join(DEFAULT_SHAPES)})")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank r (default: 16)")
    parser.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha (default: 32)")
    parser.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout p (default: 0.05)")
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"),
                        help="where to write qlora_<device>.json and .md (default: benchmarks/results)")
    parser.add_argument("--smoke", action="store_true",
                        help=f"tiny case (K=64, N=64, M={' '.join(map(str, SMOKE_TOKENS))}; memory of "
                             f"{SMOKE_MODEL} built, phi3-mini-4k computed) in place of --shapes and "
                             "--tokens; forced without CUDA. On a GPU its files get a _smoke suffix.")
    args = parser.parse_args(argv)
    args.scaling = args.alpha / args.rank
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    smoke = smoke_mode(args)
    shapes = SMOKE_SHAPES if smoke else {name: PHI3_MINI_SHAPES[name] for name in args.shapes}
    tokens = SMOKE_TOKENS if smoke else sorted(set(args.tokens))
    measure_model = SMOKE_MODEL if smoke else args.model
    device = "cuda" if ON_CUDA else "cpu"
    timer = gpu_timer if ON_CUDA else cpu_timer

    memory = (memory_section(args.model, measure_model) if "memory" in args.sections else None)
    rows, roofs = [], None
    if "layers" in args.sections:
        roofs = dict(bandwidth_gbps=copy_bandwidth_gbps(timer, device),
                     matmul_tflops=matmul_tflops(timer, device))
        for name, (K, N) in shapes.items():
            rows += bench_shape(name, K, N, tokens, args, timer, roofs, device)
    cross = crossovers(rows)

    label = device_label()
    result = {
        **result_header(smoke),
        "device_name": torch.cuda.get_device_name() if ON_CUDA else platform.processor() or "cpu",
        "config": {
            "sections": args.sections, "model": args.model, "measured_model": measure_model,
            "shapes": {name: {"K": K, "N": N} for name, (K, N) in shapes.items()},
            "tokens": tokens, "rank": args.rank, "alpha": args.alpha, "scaling": args.scaling,
            "dropout": args.dropout, "dtype": str(DTYPE).removeprefix("torch."),
            "adapter_dtype": str(ADAPTER_DTYPE).removeprefix("torch."), "seed": SEED,
            "providers": {p: ("forced " + str(v) if v is not None else "library default")
                          for p, v in PROVIDERS.items()},
            "shipped_nf4_fused_max_rows": SHIPPED_FUSED_MAX_ROWS,
            "modes": list(MODES),
            "timer": ("triton.testing.do_bench(warmup=25, rep=100)" if ON_CUDA
                      else f"time.perf_counter, {CPU_REPS} calls after 1 warm-up"),
            "matmul_size": MATMUL_SIZE[device], "triton_interpret": INTERPRETING,
        },
        "memory": memory,
        "roofs": roofs,
        "rows": rows,
        "crossovers": cross,
        "recommendation": recommendation(cross),
        "targets": targets(memory, rows, args.model),
    }
    write_results(result, markdown_report, f"qlora_{label}", smoke, args.out_dir)


if __name__ == "__main__":
    main()
