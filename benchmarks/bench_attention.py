"""Benchmark packed attention: FlexAttention, conversations re-batched, masked SDPA, causal SDPA.

One layer's attention over the example chats packed into rows of T tokens, forward and
forward + backward, each provider checked against masked SDPA first. Methodology:
docs/benchmarks.md.

    python benchmarks/bench_attention.py                      # the device's defaults
    python benchmarks/bench_attention.py --repeats 3          # on a shared machine
    python benchmarks/bench_attention.py --smoke --out-dir /tmp/bench

Results: a markdown table on stdout, and ``<out-dir>/attention_<device>.json`` and ``.md``.
"""
import argparse
import time
from typing import Callable, List

from common import (
    DEVICE, ON_CUDA, ROOT, SEED, add_output_args, command_line, device_label, device_name,
    prepare_script, result_header, time_ms, timing_config, versions_line, write_results)

import torch

from lorakernels import settings
from lorakernels.attention import AttentionPlan, attention, attention_plan
from lorakernels.ops.flex_attention import computed_fraction, packed_block_mask
from model import Phi3Config
from model.build import load_model
from training.config import TrainConfig
from training.data import collate
from training.data import prepare_rows

DATA = ROOT / "examples" / "chat.jsonl"
PROVIDERS = ("masked", "conversations", "flex", "causal")
CPU_PROVIDERS = ("masked", "conversations", "causal")
MODES = ("both", "forward")
REL_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
GPU_DEFAULTS = dict(layouts=["phi3-mini-4k", "phi3-medium-4k"], lengths=[2048, 4096], tokens=8192)
CPU_DEFAULTS = dict(layouts=["phi3-tiny", "phi3-mini-4k"], lengths=[512, 2048], tokens=2048)
SMOKE = dict(layouts=["phi3-tiny"], lengths=[128], tokens=128)


def packed_segments(length: int, rows: int) -> torch.Tensor:
    """Segment ids [rows, length] of the example data packed to ``length`` (padding -1): the
    first rows."""
    _, tokenizer = load_model("phi3-tiny", torch.float32, torch.device("cpu"))
    packed, _ = prepare_rows(str(DATA), tokenizer, TrainConfig(max_seq_len=length, data=str(DATA)))
    packed = [packed[i % len(packed)] for i in range(rows)]
    segments = collate(packed, tokenizer.pad_id)["segment_ids"]
    if segments.shape[1] < length:  # every row came out short: pad to the case's T
        pad = segments.new_full((rows, length - segments.shape[1]), -1)
        segments = torch.cat([segments, pad], dim=1)
    return segments


def plan_for(provider: str, segments: torch.Tensor, window, length: int) -> AttentionPlan:
    """The provider's plan, through lorakernels.attention's own planner where it has one."""
    if provider == "causal":
        return AttentionPlan("causal")
    if provider == "masked":
        from lorakernels.reference import attention_mask

        return AttentionPlan("masked", mask=attention_mask(length, length, segments, window,
                                                           segments.device))
    with settings.override(attention={"conversations": "sdpa", "flex": "flex"}[provider]):
        plan = attention_plan(segments, length, length, window, segments.device)
    assert plan.kind == provider, plan.kind
    return plan


def timed_plan_ms(build: Callable[[], object]) -> float:
    build()
    if ON_CUDA:
        torch.cuda.synchronize()
    start = time.perf_counter()
    build()
    if ON_CUDA:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def attention_step(q, k, v, plan: AttentionPlan, dy: torch.Tensor, mode: str) -> Callable:
    """One layer's attention under ``plan``: forward + backward (``both``) or forward only."""
    if mode == "both":
        return lambda: attention(q, k, v, plan).backward(dy)

    def forward():
        with torch.no_grad():
            attention(q, k, v, plan)
    return forward


def best_of(step: Callable, leaves, repeats: int) -> dict:
    """The lowest of ``repeats`` timings' medians, every median, and the GPU's peak memory."""
    if ON_CUDA:
        torch.cuda.reset_peak_memory_stats()
    medians = [time_ms(step, leaves) for _ in range(repeats)]
    best = min(medians, key=lambda t: t[0])
    peak = torch.cuda.max_memory_allocated() / 2**20 if ON_CUDA else None
    return dict(median_ms=best[0], p20_ms=best[1], p80_ms=best[2],
                all_medians_ms=[m[0] for m in medians], peak_memory_mb=peak)


def check_against(reference: torch.Tensor, got: torch.Tensor, tol: float, provider: str,
                  case: str) -> None:
    """Exits, naming the provider and case, when ``got`` is not the masked SDPA's output."""
    error = ((got.float() - reference.float()).abs().max() / reference.abs().max()).item()
    if not error < tol:
        raise SystemExit(f"{provider} is wrong for {case}: relative max error {error:.3g} "
                         "against masked SDPA; not timing it")


def bench_case(layout: str, length: int, rows: int, providers, dtype, repeats: int) -> List[dict]:
    """Every provider in every mode on one layout at T = ``length``, checked first."""
    config = Phi3Config.from_name(layout)
    H, Hk, D, window = (config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                        config.sliding_window)
    segments = packed_segments(length, rows).to(DEVICE)
    gen = torch.Generator(DEVICE).manual_seed(SEED)

    def randn(*shape, grad=True):
        return torch.randn(*shape, generator=gen, device=DEVICE).to(dtype).requires_grad_(grad)

    q, k, v = randn(rows, H, length, D), randn(rows, Hk, length, D), randn(rows, Hk, length, D)
    dy = randn(rows, H, length, D, grad=False)
    case = dict(layout=layout, heads=H, kv_heads=Hk, head_dim=D, T=length, rows=rows,
                conversations=int(sum(len(set(r.tolist()) - {-1}) for r in segments.cpu())),
                window=window)
    fraction = computed_fraction(packed_block_mask(segments, length, window, torch.device(DEVICE)))
    plans = {p: plan_for(p, segments, window, length) for p in providers}
    with torch.no_grad():
        reference = attention(q, k, v, plans.get("masked") or plan_for(
            "masked", segments, window, length))
    out = []
    for provider, plan in plans.items():
        if provider != "causal":
            with torch.no_grad():
                check_against(reference, attention(q, k, v, plan), REL_TOL[dtype], provider,
                              f"{layout} T {length}")
        plan_ms = 0.0 if provider == "causal" else timed_plan_ms(
            lambda provider=provider: plan_for(provider, segments, window, length))
        for mode in MODES:
            if mode == "both" and provider == "flex" and not ON_CUDA:
                continue  # no FlexAttention backward on CPU
            out.append(dict(case, provider=provider, mode=mode, plan_ms=plan_ms,
                            blocks_computed=fraction,
                            **best_of(attention_step(q, k, v, plan, dy, mode), [q, k, v],
                                      repeats)))
    return out


def markdown_report(result: dict, command: str) -> str:
    lines = [f"# Packed attention on {result['device_name']}", "",
             f"`{command}`; {versions_line(result)}", "",
             "Example data (examples/chat.jsonl) packed to T; ms per call of one layer's attention "
             "(best median of --repeats); ratio = masked / provider (higher is better).", "",
             "| layout | heads | T | rows | convs | blocks computed | provider | mode | ms | "
             "vs masked | plan ms | peak MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    masked = {(r["layout"], r["T"], r["mode"]): r["median_ms"] for r in result["rows"]
              if r["provider"] == "masked"}
    for r in result["rows"]:
        base = masked.get((r["layout"], r["T"], r["mode"]))
        ratio = f"{base / r['median_ms']:.2f}×" if base else "-"
        peak = "-" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"
        lines.append(f"| {r['layout']} | {r['heads']}/{r['kv_heads']}×{r['head_dim']} | {r['T']} | "
                     f"{r['rows']} | {r['conversations']} | {r['blocks_computed']:.1%} | "
                     f"{r['provider']} | {r['mode']} | {r['median_ms']:.2f} | {ratio} | "
                     f"{r['plan_ms']:.2f} | {peak} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layouts", nargs="+", help="presets whose head layouts are run")
    parser.add_argument("--lengths", nargs="+", type=int, metavar="T", help="packed row lengths")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS,
                        help=f"default: {' '.join(PROVIDERS)} on a GPU, "
                             f"{' '.join(CPU_PROVIDERS)} on a CPU")
    parser.add_argument("--repeats", type=int, default=1,
                        help="time each case N times, keep the best")
    add_output_args(parser, "attention", "phi3-tiny at T 128, one row: a quick end-to-end check")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    defaults = SMOKE if args.smoke else GPU_DEFAULTS if ON_CUDA else CPU_DEFAULTS
    layouts = args.layouts or defaults["layouts"]
    lengths = args.lengths or defaults["lengths"]
    providers = args.providers or (PROVIDERS if ON_CUDA else CPU_PROVIDERS)
    dtype = torch.bfloat16 if ON_CUDA else torch.float32
    rows = []
    for layout in layouts:
        for length in lengths:
            rows += bench_case(layout, length, max(1, defaults["tokens"] // length), providers,
                               dtype, args.repeats)
    result = {**result_header(args.smoke), "device_name": device_name(),
              "config": {"layouts": layouts, "lengths": lengths, "providers": list(providers),
                         "modes": list(MODES), "dtype": str(dtype).removeprefix("torch."),
                         "data": str(DATA.relative_to(ROOT)), "repeats": args.repeats,
                         "threads": torch.get_num_threads(), **timing_config()},
              "rows": rows}
    stem = f"attention_{device_label('cpu')}" + ("_smoke" if args.smoke and ON_CUDA else "")
    write_results(result, markdown_report(result, command_line()), args.out_dir, stem)


if __name__ == "__main__":
    prepare_script()
    main()
