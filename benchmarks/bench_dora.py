"""Benchmark one DoRA layer: ours against our LoRA layer and PEFT's DoRA, forward + backward.

Also records the largest tensor each provider creates: ours must never build W + s·B·A.
Methodology: docs/benchmarks.md.

    python benchmarks/bench_dora.py                      # fp32, M 512, 1536 → 4608 (qkv-like), r 16
    python benchmarks/bench_dora.py --dropout 0.05       # train.py's default dropout
    python benchmarks/bench_dora.py --smoke              # a tiny case: a test of the script

Results: a markdown table on stdout, and ``<out-dir>/dora_<device>.json`` and ``.md``.
"""
import argparse

from common import (
    DEVICE, ON_CUDA, SEED, add_output_args, command_line, device_label, device_name, prepare_script,
    time_ms,
    timing_config, utc_now, versions, write_results)

import peft
import torch
from peft.tuners.lora.layer import Linear as PeftLinear
from torch.utils._pytree import tree_flatten
from torch.utils._python_dispatch import TorchDispatchMode

import lorakernels as lora

PROVIDERS = ("lora", "dora", "peft_dora")
SMOKE = dict(tokens=32, in_features=64, out_features=96, rank=4)


def build_layers(K: int, N: int, r: int, alpha: float, dtype: torch.dtype, dropout: float) -> dict:
    """The three providers over one random base weight [N, K], with equal A, B and magnitude."""
    gen = torch.Generator().manual_seed(SEED)
    weight = (torch.randn(N, K, generator=gen) * K ** -0.5).to(DEVICE, dtype)
    lora_A = torch.randn(r, K, generator=gen) * K ** -0.5
    lora_B = torch.randn(N, r, generator=gen) * r ** -0.5  # random, not zeros: the update counts
    layers = {}
    for name, use_dora in (("lora", False), ("dora", True)):
        layer = lora.Linear(K, N, r=r, lora_alpha=alpha, lora_dropout=dropout, bias=False,
                            merge_weights=False, use_dora=use_dora, device=DEVICE, dtype=dtype)
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.lora_A.copy_(lora_A)
            layer.lora_B.copy_(lora_B)
            if use_dora:
                layer.reset_dora_magnitude()
        layers[name] = layer
    base = torch.nn.Linear(K, N, bias=False, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        base.weight.copy_(weight)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, use_dora=True,
                             target_modules=["proj"])
    theirs = PeftLinear(base, "default", config=config, r=r, lora_alpha=alpha, use_dora=True,
                        lora_dropout=dropout)
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(lora_A)
        theirs.lora_B["default"].weight.copy_(lora_B)
        theirs.lora_magnitude_vector["default"].weight.copy_(layers["dora"].lora_magnitude)
    layers["peft_dora"] = theirs.to(DEVICE)
    return layers


def trainable(layer: torch.nn.Module):
    return [p for p in layer.parameters() if p.requires_grad]


def step(layer: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor):
    """One forward + backward, as a training step runs the layer."""
    return lambda: layer(x).backward(dy)


def storages(tree) -> set:
    return {t.untyped_storage().data_ptr() for t in tree_flatten(tree)[0]
            if isinstance(t, torch.Tensor)}


class LargestNewTensor(TorchDispatchMode):
    """Every ATen op, forward and backward, seen as it runs: the bytes of the largest output
    that is new memory (views of an input, such as W's transpose, are not)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = storages((args, kwargs))
        for tensor in tree_flatten(out)[0]:
            new = isinstance(tensor, torch.Tensor) and (
                tensor.untyped_storage().data_ptr() not in inputs)
            if new:
                self.bytes = max(self.bytes, tensor.numel() * tensor.element_size())
        return out


def largest_new_tensor(fn) -> int:
    """Bytes of the largest tensor any op allocates while ``fn`` runs."""
    with LargestNewTensor() as mode:
        fn()
    return mode.bytes


def check_equal(layers: dict, x: torch.Tensor) -> float:
    """Max |ours - PEFT's| / max |PEFT's| of the DoRA outputs (dropout off): the providers
    compute the same layer."""
    with torch.no_grad():
        layers["dora"].eval(), layers["peft_dora"].eval()
        ours, theirs = layers["dora"](x).float(), layers["peft_dora"](x).float()
        layers["dora"].train(), layers["peft_dora"].train()
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def markdown_report(result: dict, command: str) -> str:
    c, s = result["config"], result["summary"]
    lines = [
        f"# DoRA layer: ours vs our LoRA vs PEFT's DoRA ({result['device_name']})", "",
        f"torch {result['torch']}, peft {result['peft']}, python {result['python']}; "
        f"{result['date']}", "",
        f"M {c['tokens']}, {c['in_features']} → {c['out_features']}, r {c['rank']}, "
        f"{c['dtype']}, forward + backward, lora_dropout {c['dropout']:g}; {c['timer']}; "
        f"providers in turn, {c['repeats']} runs each, the fastest run's numbers", "",
        "| provider | median ms | p20 ms | p80 ms | vs our LoRA | run medians ms "
        "| largest tensor MiB |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for row in result["rows"]:
        runs = ", ".join(f"{ms:.1f}" for ms in row["run_medians_ms"])
        lines.append(f"| {row['provider']} | {row['median_ms']:.2f} | {row['p20_ms']:.2f} | "
                     f"{row['p80_ms']:.2f} | {row['ratio_to_lora']:.2f}× | {runs} | "
                     f"{row['largest_tensor_bytes'] / 2**20:.1f} |")
    below = "stays below" if s["no_weight_sized_temporary"] else "reaches"
    lines += ["", f"Ours vs PEFT's DoRA: {s['speedup_vs_peft']:.2f}× faster; ours vs our LoRA: "
                  f"{s['dora_vs_lora']:.2f}×. One [N, K] weight is "
                  f"{s['weight_bytes'] / 2**20:.1f} MiB; the largest tensor our DoRA creates "
                  f"{below} it. Outputs agree with PEFT's to {s['max_rel_error_vs_peft']:.1e}.",
              "", f"Reproduce: `{command}`", ""]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark one DoRA layer against LoRA and PEFT's DoRA.")
    parser.add_argument("--tokens", type=int, default=512, help="rows M of x (default: 512)")
    parser.add_argument("--in-features", type=int, default=1536, help="K (default: 1536)")
    parser.add_argument("--out-features", type=int, default=4608,
                        help="N (default: 4608, qkv-like)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank r (default: 16)")
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="lora_dropout of every provider, active in the timed steps (default: "
                             "0, PEFT's default; with p > 0 DoRA runs a second base GEMM)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timing runs per provider, taken in turn; the fastest counts "
                             "(default: 3)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"],
                        default="bfloat16" if ON_CUDA else "float32",
                        help="dtype of x and W (default: float32 on CPU, bfloat16 on a GPU)")
    add_output_args(parser, "dora", "tiny case (M 32, 64 → 96, r 4): a test of the script")
    return parser.parse_args(argv)


def time_providers(layers: dict, x: torch.Tensor, dy: torch.Tensor, repeats: int) -> dict:
    """Provider -> its runs' [median, p20, p80] ms. Providers take turns, ``repeats`` times,
    so that drift spreads over all of them."""
    timings = {name: [] for name in PROVIDERS}
    for _ in range(repeats):
        for name in PROVIDERS:
            layer = layers[name]
            timings[name].append(time_ms(step(layer, x, dy), [x, *trainable(layer)]))
    return timings


def provider_rows(layers: dict, timings: dict, x: torch.Tensor, dy: torch.Tensor) -> list:
    """Each provider's fastest run (load from elsewhere only adds time), its largest new
    tensor, and its time relative to our LoRA's."""
    rows = []
    for name in PROVIDERS:
        median, p20, p80 = min(timings[name])
        rows.append(dict(provider=name, median_ms=median, p20_ms=p20, p80_ms=p80,
                         run_medians_ms=[t[0] for t in timings[name]],
                         largest_tensor_bytes=largest_new_tensor(step(layers[name], x, dy))))
    for row in rows:
        row["ratio_to_lora"] = row["median_ms"] / rows[0]["median_ms"]
    return rows


def summary_of(rows: list, weight_bytes: int, error: float) -> dict:
    by_name = {row["provider"]: row for row in rows}
    return dict(
        dora_vs_lora=by_name["dora"]["ratio_to_lora"],
        speedup_vs_peft=by_name["peft_dora"]["median_ms"] / by_name["dora"]["median_ms"],
        weight_bytes=weight_bytes,
        no_weight_sized_temporary=by_name["dora"]["largest_tensor_bytes"] < weight_bytes,
        max_rel_error_vs_peft=error,
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.smoke:
        args.tokens, args.in_features, args.out_features, args.rank = SMOKE.values()
        args.repeats = 1
    M, K, N, r = args.tokens, args.in_features, args.out_features, args.rank
    dtype = getattr(torch, args.dtype)
    layers = build_layers(K, N, r, 2.0 * r, dtype, args.dropout)
    gen = torch.Generator().manual_seed(SEED + M)
    x = torch.randn(M, K, generator=gen).to(DEVICE, dtype).requires_grad_()
    dy = torch.randn(M, N, generator=gen).to(DEVICE, dtype)
    error = check_equal(layers, x)
    if not error < (1e-4 if dtype == torch.float32 else 2e-2):
        raise SystemExit(f"our DoRA layer differs from PEFT's by {error:.3g} (relative): "
                         "not timing it")
    rows = provider_rows(layers, time_providers(layers, x, dy, args.repeats), x, dy)
    result = {"device": device_label(cpu="cpu"), "device_name": device_name(), "date": utc_now(),
              **versions("peft"), "smoke": args.smoke,
              "config": dict(tokens=M, in_features=K, out_features=N, rank=r, dtype=args.dtype,
                             dropout=args.dropout, repeats=args.repeats, **timing_config()),
              "rows": rows, "summary": summary_of(rows, N * K * dtype.itemsize, error)}
    stem = f"dora_{result['device']}" + ("_smoke" if args.smoke else "")
    write_results(result, markdown_report(result, command_line()), args.out_dir, stem)


if __name__ == "__main__":
    prepare_script()
    main()
