"""Benchmark one LoRA linear layer, y = x·Wᵀ + s·(dropout(x)·Aᵀ)·Bᵀ, against its frozen base GEMM.

Providers base, eager, addmm and our fused Triton kernels at Phi-3-mini's projections,
forward, backward and both, each beside its ratio to the base GEMM and that ratio's floor.
Methodology: docs/benchmarks.md.

    python benchmarks/bench_lora_linear.py          # Phi-3-mini, M = 1024, 4096, 16384, bf16
    python benchmarks/bench_lora_linear.py --tokens 4096 --shapes qkv down
    python benchmarks/bench_lora_linear.py --smoke          # one tiny fp32 case

Without CUDA it runs the tiny case in Triton's interpreter (re-running itself with
TRITON_INTERPRET=1): a test of the script, its times mean nothing. Results: a markdown table
on stdout, and ``<out-dir>/lora_linear_<device>.json`` and ``.md``.
"""
import argparse
from typing import Callable, Dict, List

from common import (
    COPY_BYTES, DEVICE, PHI3_MINI_SHAPES, SEED, Inputs, add_layer_args, add_output_args,
    backward_step, check_fused, command_line, copy_bandwidth_gbps, extra_elements,
    forward_backward_step, forward_step, fused, linear_shapes, make_inputs, prepare_script,
    random_weight, result_header, result_stem, smoke_mode, time_ms, timed_row, timing_config,
    versions_line, write_results)

import torch
import torch.nn.functional as F

SMOKE_SHAPES = {"tiny": (64, 96)}
SMOKE_TOKENS = [64]
SMOKE_DTYPE = torch.float32
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SCALING = 2.0  # lora_alpha = 2·r; the scale does not change the cost


# ----------------------------------------------------------------------------- providers


def base(t: Inputs) -> torch.Tensor:
    return F.linear(t.x, t.weight)


def eager(t: Inputs) -> torch.Tensor:
    y = F.linear(t.x, t.weight)  # PEFT's order: the base layer, then the low-rank term
    return y + (F.dropout(t.x, t.dropout_p) @ t.lora_A.T @ t.lora_B.T) * SCALING


def addmm(t: Inputs) -> torch.Tensor:
    s = F.dropout(t.x, t.dropout_p) @ t.lora_A.T
    return torch.addmm(F.linear(t.x, t.weight), s, t.lora_B.T, alpha=SCALING)


PROVIDERS: Dict[str, Callable[[Inputs], torch.Tensor]] = {
    "base": base, "eager": eager, "addmm": addmm, "fused": lambda t: fused(t, SCALING),
}
MODES = {"forward": forward_step, "backward": backward_step, "both": forward_backward_step}


# ----------------------------------------------------------------------------- one case


def bench_case(name: str, t: Inputs, bandwidth_gbps: float) -> List[dict]:
    """Every provider in every mode on one case, with × base and its floor."""
    (M, K), N = t.x.shape, t.weight.shape[0]
    check_fused(t, t.weight, SCALING, "fused_lora_linear", f"{name} (K={K}, N={N}, M={M})")
    rows = []
    for mode, build in MODES.items():
        times = {provider: time_ms(build(fn, t), t.trainable) for provider, fn in PROVIDERS.items()}
        base_ms = times["base"][0]
        extra_ms = extra_elements(mode, M, K, N) * t.x.element_size() / (bandwidth_gbps * 1e9) * 1e3
        for provider, provider_times in times.items():
            rows.append(dict(
                timed_row(name, M, K, N, t.lora_A.shape[0], provider, mode, provider_times),
                ratio_to_base=provider_times[0] / base_ms,
                floor_ratio=1.0 if provider == "base" else (base_ms + extra_ms) / base_ms,
            ))
    return rows


# ----------------------------------------------------------------------------- reporting


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
        f"{versions_line(result)}; copy bandwidth {result['bandwidth_gbps']:.1f} GB/s; "
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
    add_layer_args(parser, shapes=list(PHI3_MINI_SHAPES), tokens=[1024, 4096, 16384])
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16",
                        help="dtype of x, W, A and B for every provider (default: bfloat16)")
    add_output_args(parser, "lora_linear",
                    "one tiny fp32 case (K=64, N=96, M=64) in place of --shapes, --tokens and "
                    "--dtype; forced without CUDA. On a GPU its files get a _smoke suffix.")
    args = parser.parse_args(argv)
    args.dtype = DTYPES[args.dtype]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    smoke = smoke_mode(args)
    model_shapes = linear_shapes(args.model)
    shapes = SMOKE_SHAPES if smoke else {name: model_shapes[name] for name in args.shapes}
    tokens = SMOKE_TOKENS if smoke else args.tokens
    if smoke:
        args.dtype = SMOKE_DTYPE

    bandwidth = copy_bandwidth_gbps()
    rows = []
    for name, (K, N) in shapes.items():
        weight = random_weight(K, N, args.dtype)
        for M in tokens:
            rows += bench_case(name, make_inputs(M, weight, args.rank, args.dropout, args.dtype),
                               bandwidth)

    result = {
        **result_header(smoke),
        "config": {
            "shapes": {name: {"K": K, "N": N} for name, (K, N) in shapes.items()},
            "tokens": tokens, "rank": args.rank, "dropout": args.dropout,
            "dtype": str(args.dtype).removeprefix("torch."), "scaling": SCALING, "seed": SEED,
            "providers": list(PROVIDERS), "modes": list(MODES),
            **timing_config(), "copy_bytes": COPY_BYTES[DEVICE],
        },
        "bandwidth_gbps": bandwidth,
        "rows": rows,
    }
    write_results(result, markdown_report(result, command_line()), args.out_dir,
                  result_stem("lora_linear", smoke))


if __name__ == "__main__":
    prepare_script(triton_interpreter=True)
    main()
