"""Benchmark QLoRA: the Phi-3 base's memory in NF4 against bf16, and one LoRA layer over an NF4
weight against the same layer over a dense bf16 weight.

Memory: computed from the shapes for --model, and on a GPU measured. Layers: the fused
kernels over a bf16 weight, over NF4 read in the K-loop, over NF4 dequantised first, and as
dispatched; then the crossover M between the NF4 paths, a recommended NF4_FUSED_MAX_ROWS and
the targets. Methodology: docs/benchmarks.md.

    python benchmarks/bench_qlora.py                  # memory + qkv, gate_up at M = 16 .. 4096
    python benchmarks/bench_qlora.py --sections layers --shapes qkv o gate_up down
    python benchmarks/bench_qlora.py --tokens 32 64 128 --sections layers   # refine the crossover
    python benchmarks/bench_qlora.py --smoke --out-dir /tmp/bench           # tiny, any machine

Without CUDA it runs the smoke case in Triton's interpreter (re-running itself with
TRITON_INTERPRET=1): its times mean nothing and say so. Results: markdown on stdout, and
``<out-dir>/qlora_<device>.json`` and ``.md`` (``_smoke`` suffix for a smoke run on a GPU).
"""
import argparse
import dataclasses
import gc
import itertools
import math
from typing import Dict, List, Optional

from common import (
    BASE_GEMMS, DEVICE, ON_CUDA, PHI3_MINI, SEED, BaseWeight, Inputs,
    add_layer_args, add_output_args, base_flops, check_fused, command_line, copy_bandwidth_gbps,
    device_name, extra_elements, forward_backward_step, forward_step, fused, make_inputs,
    linear_shapes, prepare_script, random_base, random_weight, result_header, result_stem,
    smoke_mode, time_ms, timed_row, timing_config, versions_line, write_results)

import torch

from lorakernels.nf4 import NF4_FUSED_MAX_ROWS, dequantize_nf4_reference, nf4_nbytes, quantize_nf4
from lorakernels.nf4_layers import NF4Layer
from model import Phi3Config, Phi3ForCausalLM
from model.quantization import quantize_decoder_linears

DEFAULT_SHAPES = ["qkv", "gate_up"]
DEFAULT_TOKENS = [16, 64, 256, 1024, 4096]
SMOKE_SHAPES = {"tiny": (64, 64)}
SMOKE_TOKENS = [16, 72]  # one on each side of the shipped NF4_FUSED_MAX_ROWS
SMOKE_MODEL = "phi3-tiny"
DTYPE = torch.bfloat16          # x, dy, the dense base and what the NF4 weight dequantises to
ADAPTER_DTYPE = torch.float32   # lora_A, lora_B: as apply_lora creates them
MATMUL_SIZE = {"cuda": 8192, "cpu": 256}

# fused_max_rows of each provider's NF4 weight: None leaves the library's NF4_FUSED_MAX_ROWS;
# bf16 has no NF4 weight.
PROVIDERS = {"bf16": None, "nf4_fused": 1 << 30, "nf4_dequant": 0, "nf4_default": None}
MODES = {"forward": forward_step, "both": forward_backward_step}
TARGET_MEMORY_RATIO = 0.3
TARGET_BOTH_RATIO, TARGET_BOTH_M = 1.10, 4096
TARGET_FORWARD_MAX_M = 16


# ----------------------------------------------------------------------------- memory


def meta_base(config: Phi3Config) -> Phi3ForCausalLM:
    """The NF4 base on the meta device, bf16: shapes only, for counting bytes."""
    with torch.device("meta"):
        model = Phi3ForCausalLM(config)
    model.to(DTYPE)  # before quantising: .to(dtype) would also cast the NF4 layers' fp32 scales
    quantize_decoder_linears(model, DTYPE)
    return model


def nf4_layers(model) -> List[NF4Layer]:
    return [m for m in model.modules() if isinstance(m, NF4Layer)]


def computed_base_bytes(config: Phi3Config) -> dict:
    """Exact bytes of the base from its shapes: NF4 decoder linears (nf4_nbytes) vs all bf16."""
    model = meta_base(config)
    quantized = [math.prod(m.weight_shape) for m in nf4_layers(model)]
    dense = sum(p.numel() for p in model.parameters())  # embedding, norms, LM head
    elem = DTYPE.itemsize
    bf16 = (sum(quantized) + dense) * elem
    nf4 = sum(nf4_nbytes(n) for n in quantized) + dense * elem
    return dict(quantized_weights=sum(quantized), dense_weights=dense, bf16_bytes=bf16,
                nf4_bytes=nf4, ratio=nf4 / bf16, scratch_bytes=max(quantized) * elem)


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
    quantize = "nf4" if nf4 else None
    free_memory()
    if not ON_CUDA:
        return dict(held_bytes=tensor_bytes(random_base(config, DTYPE, DEVICE, quantize)),
                    peak_bytes=None)
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model = random_base(config, DTYPE, DEVICE, quantize)
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


def fused_max_rows(provider: str) -> int:
    """The crossover the provider's NF4 weight carries: forced, or the library's default."""
    forced = PROVIDERS[provider]
    return NF4_FUSED_MAX_ROWS if forced is None else forced


def path_taken(provider: str, M: int) -> str:
    """dense, fused (4-bit tiles in the K-loop) or dequant (scratch + dense kernels)."""
    if provider == "bf16":
        return "dense"
    return "fused" if M <= fused_max_rows(provider) else "dequant"


def provider_weights(dense: torch.Tensor) -> Dict[str, BaseWeight]:
    """Each provider's W: ``dense`` itself, or one quantize_nf4 of it with the provider's
    crossover."""
    nf4 = quantize_nf4(dense)
    return {provider: dense if provider == "bf16" else
            dataclasses.replace(nf4, fused_max_rows=fused_max_rows(provider))
            for provider in PROVIDERS}


def min_bytes(path: str, mode: str, M: int, K: int, N: int) -> int:
    """Bytes a path must move at least (see the module docstring)."""
    elem = DTYPE.itemsize
    gemms = BASE_GEMMS[mode]
    activations = gemms * (M * K + M * N) + extra_elements(mode, M, K, N)
    weight = {"dense": elem * N * K, "fused": nf4_nbytes(N * K),
              "dequant": nf4_nbytes(N * K) + 2 * elem * N * K}[path]
    return activations * elem + gemms * weight


def matmul_tflops() -> float:
    """Achieved throughput of one square torch.matmul in DTYPE: the compute roof of the floor."""
    n = MATMUL_SIZE[DEVICE]
    a = torch.randn(n, n, device=DEVICE).to(DTYPE)
    b = torch.randn(n, n, device=DEVICE).to(DTYPE)
    median_ms = time_ms(lambda: a @ b, [])[0]
    return 2 * n ** 3 / (median_ms * 1e-3) / 1e12


def floor_fields(path: str, mode: str, M: int, K: int, N: int, roofs: dict) -> dict:
    """The row's least bytes and its floor: the larger of the memory and the compute time."""
    nbytes = min_bytes(path, mode, M, K, N)
    memory_ms = nbytes / (roofs["bandwidth_gbps"] * 1e9) * 1e3
    compute_ms = base_flops(mode, M, K, N) / (roofs["matmul_tflops"] * 1e12) * 1e3
    return dict(min_bytes=nbytes, floor_ms=max(memory_ms, compute_ms),
                floor_bound="memory" if memory_ms >= compute_ms else "compute")


def bench_case(name: str, cases: Dict[str, Inputs], reference_weights: Dict[str, torch.Tensor],
               scaling: float, roofs: dict) -> List[dict]:
    """Every provider (its own Inputs) in every mode on one shape and M, checked first."""
    t = cases["bf16"]
    (M, K), N, r = t.x.shape, t.weight.shape[0], t.lora_A.shape[0]
    for provider, case in cases.items():
        check_fused(case, reference_weights[provider], scaling, provider,
                    f"{name} (K={K}, N={N}, M={M})")
    times = {(mode, provider): time_ms(build(lambda c: fused(c, scaling), case), t.trainable)
             for mode, build in MODES.items() for provider, case in cases.items()}
    rows = []
    for (mode, provider), provider_times in times.items():
        path = path_taken(provider, M)
        rows.append(dict(timed_row(name, M, K, N, r, provider, mode, provider_times), path=path,
                         ratio_to_bf16=provider_times[0] / times[mode, "bf16"][0],
                         **floor_fields(path, mode, M, K, N, roofs)))
    return rows


def bench_shape(name: str, K: int, N: int, tokens: List[int], args, roofs: dict) -> List[dict]:
    """One shape at every M: the weights are drawn and quantised once."""
    dense = random_weight(K, N, DTYPE)
    weights = provider_weights(dense)
    dequantized = dequantize_nf4_reference(weights["nf4_default"], DTYPE)
    reference_weights = {p: dense if p == "bf16" else dequantized for p in PROVIDERS}
    rows = []
    for M in tokens:
        t = make_inputs(M, dense, args.rank, args.dropout, ADAPTER_DTYPE)
        cases = {p: dataclasses.replace(t, weight=w) for p, w in weights.items()}
        rows += bench_case(name, cases, reference_weights, args.scaling, roofs)
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
    """NF4_FUSED_MAX_ROWS (lorakernels/nf4.py) from the forward + backward crossovers of every
    shape."""
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
    verdict = ("keep" if value == NF4_FUSED_MAX_ROWS else "change") + \
        f" (shipped: {NF4_FUSED_MAX_ROWS}, lorakernels/nf4.py)"
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
        # The smoke run builds phi3-tiny: not the target's model.
        if measured["model"] == model_name:
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
                    values=forward,
                    met=all(v < 1.0 for v in forward.values()) if forward else None))
    return out


# ----------------------------------------------------------------------------- reporting


def gb(nbytes: Optional[int]) -> str:
    """Exact bytes, and GB for reading."""
    return "—" if nbytes is None else f"{nbytes:,} B ({nbytes / 1e9:.3f} GB)"


def memory_markdown(memory: dict) -> List[str]:
    lines = ["## Base weights in memory", "",
             "| model | how | bf16 | NF4 | NF4 / bf16 | NF4 build peak |",
             "|---|---|---:|---:|---:|---:|"]
    for name, c in memory["computed"].items():
        lines.append(f"| {name} | computed from shapes | {gb(c['bf16_bytes'])} "
                     f"| {gb(c['nf4_bytes'])} | {c['ratio']:.4f} | — |")
    m = memory["measured"]
    how = "measured (memory_allocated)" if ON_CUDA else "counted on cpu (not a GPU measurement)"
    lines.append(f"| {m['model']} | {how} | {gb(m['bf16']['held_bytes'])} | "
                 f"{gb(m['nf4']['held_bytes'])} | {m['ratio']:.4f} "
                 f"| {gb(m['nf4']['peak_bytes'])} |")
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
    lines = [f"# QLoRA benchmark on {result['device']}{smoke}", "", versions_line(result), "",
             f"Command: `{command}`", ""]
    if result["memory"] is not None:
        lines += memory_markdown(result["memory"])
    if result["rows"]:
        roofs = result["roofs"]
        lines += [
            "## One LoRA layer over an NF4 vs a bf16 weight", "",
            f"r={config['rank']}, alpha {config['alpha']} (scale {config['scaling']:g}), dropout "
            f"{config['dropout']}, x/dy {config['dtype']}, A/B {config['adapter_dtype']}; copy "
            f"bandwidth {roofs['bandwidth_gbps']:.1f} GB/s, matmul {roofs['matmul_tflops']:.1f} "
            f"TFLOP/s (measured in this run). Paths forced by each NF4 weight's fused_max_rows "
            f"(an NF4 layer's nf4_fused_max_rows): nf4_fused = 1 << 30, nf4_dequant = 0; "
            f"nf4_default keeps NF4_FUSED_MAX_ROWS (lorakernels/nf4.py) = "
            f"{config['shipped_nf4_fused_max_rows']}.", "",
            "TFLOP/s: base-GEMM FLOPs only. × bf16: median / bf16's median, same shape, M and "
            "mode. floor: max(least bytes / bandwidth, FLOPs / matmul throughput); × floor: "
            "median / floor.",
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
    add_layer_args(parser, shapes=DEFAULT_SHAPES, tokens=DEFAULT_TOKENS)  # --model: also the
    # preset whose base memory is computed and, on a GPU, measured
    parser.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha (default: 32)")
    add_output_args(parser, "qlora",
                    f"tiny case (K=64, N=64, M={' '.join(map(str, SMOKE_TOKENS))}; memory of "
                    f"{SMOKE_MODEL} built, {PHI3_MINI} computed) in place of --shapes and "
                    "--tokens; forced without CUDA. On a GPU its files get a _smoke suffix.")
    args = parser.parse_args(argv)
    args.scaling = args.alpha / args.rank
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    smoke = smoke_mode(args)
    model_shapes = linear_shapes(args.model)
    shapes = SMOKE_SHAPES if smoke else {name: model_shapes[name] for name in args.shapes}
    tokens = SMOKE_TOKENS if smoke else sorted(set(args.tokens))
    measure_model = SMOKE_MODEL if smoke else args.model

    memory = (memory_section(args.model, measure_model) if "memory" in args.sections else None)
    rows, roofs = [], None
    if "layers" in args.sections:
        roofs = dict(bandwidth_gbps=copy_bandwidth_gbps(), matmul_tflops=matmul_tflops())
        for name, (K, N) in shapes.items():
            rows += bench_shape(name, K, N, tokens, args, roofs)
    cross = crossovers(rows)

    result = {
        **result_header(smoke),
        "device_name": device_name(),
        "config": {
            "sections": args.sections, "model": args.model, "measured_model": measure_model,
            "shapes": {name: {"K": K, "N": N} for name, (K, N) in shapes.items()},
            "tokens": tokens, "rank": args.rank, "alpha": args.alpha, "scaling": args.scaling,
            "dropout": args.dropout, "dtype": str(DTYPE).removeprefix("torch."),
            "adapter_dtype": str(ADAPTER_DTYPE).removeprefix("torch."), "seed": SEED,
            "providers": {p: ("forced " + str(v) if v is not None else "library default")
                          for p, v in PROVIDERS.items()},
            "shipped_nf4_fused_max_rows": NF4_FUSED_MAX_ROWS,
            "modes": list(MODES),
            **timing_config(), "matmul_size": MATMUL_SIZE[DEVICE],
        },
        "memory": memory,
        "roofs": roofs,
        "rows": rows,
        "crossovers": cross,
        "recommendation": recommendation(cross),
        "targets": targets(memory, rows, args.model),
    }
    write_results(result, markdown_report(result, command_line()), args.out_dir,
                  result_stem("qlora", smoke))


if __name__ == "__main__":
    prepare_script(triton_interpreter=True)
    main()
