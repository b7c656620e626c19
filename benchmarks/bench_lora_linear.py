"""Benchmark one LoRA linear layer, y = x·Wᵀ + s·(dropout(x)·Aᵀ)·Bᵀ, against its frozen base GEMM.

Providers, side by side in one process, all in one dtype (x, W, A, B; bf16 by default):
  base   the base GEMM alone: forward x·Wᵀ, backward dx = dy·W only (W is frozen)
  eager  PEFT-style: F.linear(x, W) + (dropout(x) @ Aᵀ @ Bᵀ)·s, torch autograd
  addmm  S = dropout(x)·Aᵀ folded into the base output by one torch.addmm, torch autograd
  fused  ours: lorakernels.ops.lora_linear.fused_lora_linear (Triton)
Modes, timed separately: forward (as in training, autograd recording); backward
(``y.backward(dy)`` on a graph built once outside the timed region); both (forward + backward).
x, A and B require grad, W does not; their grads are set to None before every timed call.

Per (shape, M, provider, mode) it reports the median time (p20/p80 in the JSON), the
effective base-GEMM throughput (2·M·N·K FLOPs per base GEMM: forward 1, backward 1 (dx
only), both 2; LoRA FLOPs are not counted), the ratio to base in the same mode, and the
floor of that ratio, (base_ms + extra_bytes / bandwidth) / base_ms. extra_bytes are what
the fused kernels read beyond the base GEMMs (lorakernels/ops/lora_linear.py): forward x
once more (F1); backward x and dy once more (B3, B1); both, the two added. The bandwidth
is a device-to-device copy timed in the same run.

Run:
    python benchmarks/bench_lora_linear.py                  # Phi-3-mini, M = 1024, 4096, 16384, bf16
    python benchmarks/bench_lora_linear.py --tokens 4096 --shapes qkv down
    python benchmarks/bench_lora_linear.py --smoke                  # one tiny fp32 case

Without CUDA it runs the tiny case under TRITON_INTERPRET=1 as a smoke test of the
script itself (its times mean nothing). Results: a markdown table on stdout, and
``<out-dir>/lora_linear_<device>.json`` and ``.md``.
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
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import torch
import torch.nn.functional as F

ON_CUDA = torch.cuda.is_available()
if not ON_CUDA:
    # Triton picks interpreter or compiler when kernels are decorated: set it before importing them.
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmark this checkout's kernels

import triton  # noqa: E402
import triton.testing  # noqa: E402

from lorakernels.ops.lora_linear import dropout_mask, fused_lora_linear  # noqa: E402
from lorakernels.ops.triton_utils import INTERPRETING  # noqa: E402
from lorakernels.reference import lora_linear_reference  # noqa: E402

# Phi-3-mini's linear layers, name -> (K in, N out).
PHI3_MINI_SHAPES = {"qkv": (3072, 9216), "o": (3072, 3072), "gate_up": (3072, 16384),
                    "down": (8192, 3072)}
SMOKE_SHAPES = {"tiny": (64, 96)}
SMOKE_TOKENS = [64]
SMOKE_DTYPE = torch.float32
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SCALING = 2.0  # lora_alpha = 2·r; the scale does not change the cost
SEED = 1234
QUANTILES = [0.5, 0.2, 0.8]
COPY_BYTES = {"cuda": 256 << 20, "cpu": 32 << 20}
CPU_REPS = 5
# Fused output vs the fp32 reference: max |error| / max |reference|, as tests/test_lora_kernels.py.
REL_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}


@dataclass
class Inputs:
    """One case: x [M, K], weight [N, K] (frozen), lora_A [r, K], lora_B [N, r], dy [M, N]."""

    x: torch.Tensor
    weight: torch.Tensor
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    dy: torch.Tensor
    dropout_p: float

    @property
    def trainable(self) -> List[torch.Tensor]:
        return [self.x, self.lora_A, self.lora_B]


def make_inputs(M: int, K: int, N: int, r: int, dtype: torch.dtype, dropout_p: float,
                device: str) -> Inputs:
    gen = torch.Generator(device).manual_seed(SEED)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    # B is random, not PEFT's zeros, so that the correctness check sees the low-rank term.
    return Inputs(
        x=randn(M, K).requires_grad_(),
        weight=randn(N, K, scale=K ** -0.5),
        lora_A=randn(r, K, scale=K ** -0.5).requires_grad_(),
        lora_B=randn(N, r, scale=r ** -0.5).requires_grad_(),
        dy=randn(M, N),
        dropout_p=dropout_p,
    )


# ----------------------------------------------------------------------------- providers


def base(t: Inputs) -> torch.Tensor:
    return F.linear(t.x, t.weight)


def eager(t: Inputs) -> torch.Tensor:
    y = F.linear(t.x, t.weight)  # PEFT's order: the base layer, then the low-rank term
    return y + (F.dropout(t.x, t.dropout_p) @ t.lora_A.T @ t.lora_B.T) * SCALING


def addmm(t: Inputs) -> torch.Tensor:
    s = F.dropout(t.x, t.dropout_p) @ t.lora_A.T
    return torch.addmm(F.linear(t.x, t.weight), s, t.lora_B.T, alpha=SCALING)


def fused(t: Inputs) -> torch.Tensor:
    return fused_lora_linear(t.x, t.weight, None, t.lora_A, t.lora_B, SCALING, t.dropout_p, SEED)


PROVIDERS: Dict[str, Callable[[Inputs], torch.Tensor]] = {
    "base": base, "eager": eager, "addmm": addmm, "fused": fused,
}


# ----------------------------------------------------------------------------- modes


def forward_step(provider, t: Inputs) -> Callable[[], object]:
    return lambda: provider(t)


def backward_step(provider, t: Inputs) -> Callable[[], object]:
    y = provider(t)  # the graph is built once, outside the timed region
    return lambda: y.backward(t.dy, retain_graph=True)


def forward_backward_step(provider, t: Inputs) -> Callable[[], object]:
    return lambda: provider(t).backward(t.dy)


MODES = {"forward": forward_step, "backward": backward_step, "both": forward_backward_step}
BASE_GEMMS = {"forward": 1, "backward": 1, "both": 2}


def extra_elements(mode: str, M: int, K: int, N: int) -> int:
    """Elements the fused kernels read beyond the base GEMMs: x in F1; dy in B1, x in B3."""
    forward, backward = M * K, M * K + M * N
    return {"forward": forward, "backward": backward, "both": forward + backward}[mode]


# ----------------------------------------------------------------------------- timing


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


def copy_bandwidth_gbps(timer, device: str) -> float:
    """Bytes read + written per second by one large device-to-device copy, in GB/s."""
    nbytes = COPY_BYTES[device]
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    median_ms = timer(lambda: dst.copy_(src), [])[0]
    return 2 * nbytes / (median_ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------- one case


def check_fused(t: Inputs, case: str) -> None:
    """Fused output against the fp32 reference, given the kernels' own dropout mask.

    Run with the benchmark's dropout p (exact, as the mask is the kernels' own) so that the
    first fused call, which autotunes, tunes the kernel variant that is then timed:
    the autotune key does not include the dropout flag.
    """
    with torch.no_grad():
        y = fused(t).float()
        x = t.x.float()
        mask = (dropout_mask(*x.shape, t.dropout_p, SEED, x.device) if t.dropout_p > 0 else 1.0)
        ref = lora_linear_reference(x, t.weight.float(), None, t.lora_A.float(), t.lora_B.float(),
                                    SCALING, lora_input=x * mask)
    error = ((y - ref).abs().max() / ref.abs().max()).item()
    tol = REL_TOL[t.x.dtype]
    if not error < tol:
        raise SystemExit(
            f"fused_lora_linear is wrong for {case}: relative max error {error:.3g} against "
            f"lorakernels.reference (tolerance {tol:g} in {t.x.dtype}); not timing it"
        )


def bench_case(name: str, K: int, N: int, M: int, args, timer, bandwidth_gbps: float,
               device: str) -> List[dict]:
    t = make_inputs(M, K, N, args.rank, args.dtype, args.dropout, device)
    check_fused(t, f"{name} (K={K}, N={N}, M={M})")
    rows = []
    for mode, build in MODES.items():
        times = {provider: timer(build(fn, t), t.trainable) for provider, fn in PROVIDERS.items()}
        base_ms = times["base"][0]
        extra_ms = extra_elements(mode, M, K, N) * t.x.element_size() / (bandwidth_gbps * 1e9) * 1e3
        flops = BASE_GEMMS[mode] * 2 * M * N * K
        for provider, (median, p20, p80) in times.items():
            rows.append(dict(
                shape=name, M=M, K=K, N=N, r=args.rank, provider=provider, mode=mode,
                median_ms=median, p20_ms=p20, p80_ms=p80, tflops=flops / (median * 1e-3) / 1e12,
                ratio_to_base=median / base_ms,
                floor_ratio=1.0 if provider == "base" else (base_ms + extra_ms) / base_ms,
            ))
    return rows


# ----------------------------------------------------------------------------- reporting


def device_label() -> str:
    if not ON_CUDA:
        return "cpu-interpreter"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def markdown_table(rows: List[dict]) -> str:
    lines = ["| shape | M | K→N | mode | provider | median ms | TFLOP/s | × base | floor |",
             "|---|---:|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['M']} | {r['K']}→{r['N']} | {r['mode']} | {r['provider']} "
            f"| {r['median_ms']:.3f} | {r['tflops']:.1f} | {r['ratio_to_base']:.3f} "
            f"| {r['floor_ratio']:.3f} |"
        )
    return "\n".join(lines)


def markdown_report(result: dict, command: str) -> str:
    smoke = " (smoke test: times mean nothing)" if result["smoke"] else ""
    return "\n".join([
        f"# LoRA linear benchmark on {result['device']}{smoke}",
        "",
        f"torch {result['torch']}, triton {result['triton']}, python {result['python']}; "
        f"{result['date']}; copy bandwidth {result['bandwidth_gbps']:.1f} GB/s; "
        f"r={result['config']['rank']}, dropout {result['config']['dropout']}, "
        f"{result['config']['dtype']}",
        "",
        f"Command: `{command}`",
        "",
        "TFLOP/s: base-GEMM FLOPs only. × base: median / base's median in the same mode. "
        "floor: the least × base the fused kernels' extra reads allow at this bandwidth.",
        "",
        markdown_table(result["rows"]),
        "",
    ])


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark one LoRA linear layer: base GEMM, eager, addmm and fused providers.")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384], metavar="M",
                        help="token counts M to run (default: 1024 4096 16384)")
    parser.add_argument("--shapes", nargs="+", choices=list(PHI3_MINI_SHAPES),
                        default=list(PHI3_MINI_SHAPES),
                        help="Phi-3-mini layers to run (default: all)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank r (default: 16)")
    parser.add_argument("--dropout", type=float, default=0.05,
                        help="LoRA dropout p (default: 0.05)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16",
                        help="dtype of x, W, A and B for every provider (default: bfloat16)")
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"),
                        help="where to write lora_linear_<device>.json and .md "
                             "(default: benchmarks/results)")
    parser.add_argument("--smoke", action="store_true",
                        help="one tiny fp32 case (K=64, N=96, M=64) in place of --shapes, --tokens "
                             "and --dtype; forced without CUDA. On a GPU its files get a _smoke "
                             "suffix.")
    args = parser.parse_args(argv)
    args.dtype = DTYPES[args.dtype]
    return args


def result_header(smoke: bool) -> dict:
    """What every result file starts with: device, date, versions, and whether it was a smoke run."""
    return {
        "device": device_label(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "smoke": smoke,
    }


def smoke_mode(args) -> bool:
    """Whether to run the tiny smoke case: asked for, or forced without CUDA (interpreter only)."""
    if not ON_CUDA and not INTERPRETING:
        raise SystemExit("no CUDA device: the CPU smoke test needs TRITON_INTERPRET=1 (or unset)")
    return args.smoke or not ON_CUDA


def main(argv=None) -> None:
    args = parse_args(argv)
    smoke = smoke_mode(args)
    shapes = SMOKE_SHAPES if smoke else {name: PHI3_MINI_SHAPES[name] for name in args.shapes}
    tokens = SMOKE_TOKENS if smoke else args.tokens
    if smoke:
        args.dtype = SMOKE_DTYPE
    device = "cuda" if ON_CUDA else "cpu"
    timer = gpu_timer if ON_CUDA else cpu_timer

    bandwidth = copy_bandwidth_gbps(timer, device)
    rows = []
    for name, (K, N) in shapes.items():
        for M in tokens:
            rows += bench_case(name, K, N, M, args, timer, bandwidth, device)

    label = device_label()
    result = {
        **result_header(smoke),
        "config": {
            "shapes": {name: {"K": K, "N": N} for name, (K, N) in shapes.items()},
            "tokens": tokens, "rank": args.rank, "dropout": args.dropout,
            "dtype": str(args.dtype).removeprefix("torch."), "scaling": SCALING, "seed": SEED,
            "providers": list(PROVIDERS), "modes": list(MODES),
            "timer": ("triton.testing.do_bench(warmup=25, rep=100)" if ON_CUDA
                      else f"time.perf_counter, {CPU_REPS} calls after 1 warm-up"),
            "copy_bytes": COPY_BYTES[device], "triton_interpret": INTERPRETING,
        },
        "bandwidth_gbps": bandwidth,
        "rows": rows,
    }
    write_results(result, markdown_report, f"lora_linear_{label}", smoke, args.out_dir)


def write_results(result: dict, markdown_report, stem: str, smoke: bool, out_dir: Path) -> None:
    """Print the markdown report and write ``<stem>.json`` and ``.md`` (``_smoke`` on a GPU smoke run)."""
    report = markdown_report(result, shlex.join(["python", *sys.argv]))
    print(report)
    stem += "_smoke" if smoke and ON_CUDA else ""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / f"{stem}.md").write_text(report)
    print(f"wrote {out_dir / stem}.json and .md")


if __name__ == "__main__":
    main()
