"""Compile every kernel and autotune config for real GPUs, without a GPU.

The interpreter hides what only the compiler sees: shapes tl.dot refuses, shared
memory beyond what a device has. Triton ships ptxas, so each config is compiled
ahead of time for sm_90 (H100, 227 KB of shared memory) and sm_86 (consumer
GPUs, 99 KB), specialised as a launch at Phi-3-mini's qkv shape would be.
Each config's cubin is read with cuobjdump (tests/kernel_resources.py): registers,
spills, shared memory, SASS instructions, tensor-core kind, atomics and fences.
Prints one JSON line per compiled config; exits non-zero when one fails to compile,
exceeds shared memory, or is a LoRA kernel's config that spills (the configs compiled
per target are what the autotuner's prune keeps there: on sm_90, the Hopper set).

Run without TRITON_INTERPRET: python tests/gpu_compile_check.py [--sm 90] [--report PREFIX]
(the committed table: --report benchmarks/results/kernel_resources).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lorakernels.ops import fused_gemm as gemm_ops
from lorakernels.ops import lora_linear as ops
from lorakernels.ops import cublas_epilogue as epilogue_ops
from lorakernels.ops import nf4_dequant as nf4_ops
from lorakernels.ops import rms_norm as rms_norm_ops
from lorakernels.ops import rope as rope_ops
from lorakernels.ops import swiglu as swiglu_ops
from kernel_resources import cubin_resources
from lorakernels.ops.triton_utils import next_block

TARGETS = {90: 232448, 86: 101376}  # compute capability -> max shared memory per block (bytes)
M, K, N, R, RANK = 4096, 3072, 9216, 48, 16  # qkv with LoRA on three parts, r = 16
BLOCK_R = 64

# Each kernel's runtime arguments as a launch passes them: pointer dtypes, or int values.
KERNEL_ARGS = {
    "_lora_shrink_kernel": dict(
        x_ptr="bf16", a_ptr="fp32", s_ptr="fp32", mask_ptr="i32", M=M, K=K, R=R, stride_xm=K,
        stride_xk=1, stride_ar=K, stride_ak=1, seed=12345, M_BUCKET=M),
    "_gemm_lowrank_kernel": dict(
        x_ptr="bf16", w_ptr="bf16", absmax_q_ptr="bf16", absmax_scale_ptr="bf16", out_ptr="bf16",
        p_ptr="fp32", q_ptr="fp32", q_row_ptr="i32", q_off_ptr="i32", bias_ptr="bf16",
        mask_ptr="i32", col_scale_ptr="fp32", k_scale_ptr="fp32", M=M, N=N, K=K, R=R, Q_RANK=RANK,
        scaling=2.0, absmax_offset=0.01, M_BUCKET=M, stride_xm=K, stride_xk=1, stride_wk=1,
        stride_wn=K, stride_om=N, stride_on=1, stride_q_row=RANK, stride_q_rank=1),
    "_lora_grad_s_b_kernel": dict(
        dy_ptr="bf16", s_ptr="fp32", b_ptr="fp32", b_row_ptr="i32", b_off_ptr="i32", ds_ptr="fp32",
        db_ptr="fp32", col_scale_ptr="fp32", y_ptr="bf16", bias_ptr="bf16", dm_ptr="fp32", M=M, N=N,
        R=R, RANK=RANK, scaling=2.0, M_BUCKET=M, stride_dym=N, stride_dyn=1, stride_b_row=RANK,
        stride_b_rank=1, stride_db_part=N * RANK, stride_ym=N, stride_yn=1),
    "_lora_grad_a_kernel": dict(
        ds_ptr="fp32", x_ptr="bf16", mask_ptr="i32", da_ptr="fp32", M=M, K=K, R=R, stride_xm=K,
        stride_xk=1, rows_per_split=384, M_BUCKET=M),
    # The cuBLAS path's epilogue, as F2 adds s·S·B̂ᵀ into y (B2 below: D⊙(dS·A) into dx).
    "_lowrank_epilogue_kernel": dict(
        out_ptr="bf16", p_ptr="fp32", q_ptr="fp32", q_row_ptr="i32", q_off_ptr="i32",
        mask_ptr="i32", col_scale_ptr="fp32", bias_ptr="bf16", M=M, N=N, R=R, Q_RANK=RANK,
        scaling=2.0, M_BUCKET=M, stride_om=N, stride_on=1, stride_q_row=RANK, stride_q_rank=1),
    # Row-wise fused ops at Phi-3-mini's shapes: hidden 3072, intermediate 8192, q/k as
    # transposed views of qkv [B, T, 9216] (32 heads of 96), cos/sin [B, T, 96].
    "_rms_norm_forward_kernel": dict(
        x_ptr="bf16", w_ptr="bf16", y_ptr="bf16", rstd_ptr="fp32", n_rows=M, n_cols=K, eps=1e-5,
        stride_xm=K, stride_xn=1, stride_ym=K, stride_yn=1),
    "_rms_norm_backward_kernel": dict(
        dy_ptr="bf16", x_ptr="bf16", w_ptr="bf16", rstd_ptr="fp32", dx_ptr="bf16",
        dw_partial_ptr="fp32", n_rows=M, n_cols=K, rows_per_program=32, stride_dym=K, stride_dyn=1,
        stride_xm=K, stride_xn=1, stride_dxm=K, stride_dxn=1),
    "_swiglu_forward_kernel": dict(
        gate_ptr="bf16", up_ptr="bf16", out_ptr="bf16", n_cols=8192, stride_in_m=16384,
        stride_in_n=1, stride_out_m=8192, stride_out_n=1),
    "_swiglu_backward_kernel": dict(
        dout_ptr="bf16", gate_ptr="bf16", up_ptr="bf16", dgate_ptr="bf16", dup_ptr="bf16",
        n_cols=8192, stride_dout_m=8192, stride_dout_n=1, stride_in_m=16384, stride_in_n=1,
        stride_din_m=16384, stride_din_n=1),
    "_rope_kernel": dict(
        q_ptr="bf16", k_ptr="bf16", cos_ptr="bf16", sin_ptr="bf16", q_out_ptr="bf16",
        k_out_ptr="bf16", T=2048, n_q_heads=32, n_k_heads=32, half=48,
        stride_qb=2048 * N, stride_qh=96, stride_qt=N, stride_qd=1,
        stride_kb=2048 * N, stride_kh=96, stride_kt=N, stride_kd=1,
        stride_cb=2048 * 96, stride_ct=96, stride_cd=1, stride_sb=2048 * 96, stride_st=96,
        stride_sd=1, stride_qob=32 * 2048 * 96, stride_qoh=2048 * 96, stride_qot=96, stride_qod=1,
        stride_kob=32 * 2048 * 96, stride_koh=2048 * 96, stride_kot=96, stride_kod=1),
    # Phi-3-mini's qkv weight [9216, 3072] in NF4: 442368 blocks of 64, absmax in groups of 256.
    "_nf4_dequant_kernel": dict(
        packed_ptr="u8", absmax_q_ptr="i8", absmax_scale_ptr="fp32", out_ptr="bf16",
        n_blocks=N * K // 64, absmax_offset=0.01),
}
COMMON_CONSTEXPRS = dict(P=0.05, HAS_DROPOUT=True, HAS_BIAS=True, GATHER_Q=True, GATHER_B=True,
                         HAS_LOWRANK=True, W_NF4=False, CAST_FP32=False, PRECISION="tf32",
                         BLOCK_R=BLOCK_R,
                         EMULATE_BF16_RTNE=False, COMPUTE_DW=True, DETERMINISTIC=False,
                         HAS_COL_SCALE=False, HAS_K_SCALE=False, DORA=False)


def _launch_configs(settings, sizes, **extra):
    """The triton.Configs the fused ops' launchers pick for these row sizes (deduplicated)."""
    configs = {}
    for size in sizes:
        meta, warps = settings(*size) if isinstance(size, tuple) else settings(size)
        meta = {**meta, **extra}
        configs[(tuple(sorted(meta.items())), warps)] = triton.Config(meta, num_warps=warps)
    return list(configs.values())


# Row lengths: a short row (several rows a program), Phi-3-mini, Phi-3-medium, the largest allowed.
RMS_NORM_CONFIGS = _launch_configs(rms_norm_ops.rms_norm_settings,
                                   [96, 3072, 5120, rms_norm_ops.MAX_ROW])
SWIGLU_CONFIGS = _launch_configs(swiglu_ops.swiglu_settings, [96, 688, 8192, 17920])
# (heads, rotated dims): tiny, Phi-3-mini, Phi-4-mini (96 of 128), Phi-3-medium and Phi-4, the
# largest head dim; forward and backward.
ROPE_CONFIGS = [config for backward in (False, True) for config in _launch_configs(
    rope_ops.rope_settings, [(4, 16), (32, 96), (24, 96), (40, 128), (64, rope_ops.MAX_HEAD_DIM)],
    BACKWARD=backward)]
NF4_DEQUANT_CONFIGS = [triton.Config(nf4_ops.nf4_dequant_settings()[0],
                                     num_warps=nf4_ops.nf4_dequant_settings()[1])]


# The GEMM's launches. F2: x·Wᵀ (w = Wᵀ, stride_wk = 1) with bias and the parts' B̂ gather.
# B2: dx = dy·W + D⊙(dS·A) (w = W, K = 9216 → N = 3072, q = Aᵀ), with and without dropout.
# NF4: the 4-bit weight read in the K-loop, as at small M (generation): the forward's
# orientation with the LoRA epilogue, and the backward's without a low-rank term.
F2 = dict(HAS_DROPOUT=False)
B2 = dict(N=K, K=N, stride_xm=N, stride_wk=K, stride_wn=1, stride_om=K, Q_RANK=R, stride_q_row=1,
          stride_q_rank=K, HAS_BIAS=False, GATHER_Q=False, HAS_DROPOUT=False)
B2_DROPOUT = dict(B2, HAS_DROPOUT=True)
NF4_GEMM = dict(F2, M=16, M_BUCKET=16, w_ptr="u8", absmax_q_ptr="i8", absmax_scale_ptr="fp32",
                W_NF4=True)
NF4_GEMM_BACKWARD = dict(NF4_GEMM, stride_wk=K, stride_wn=1, HAS_LOWRANK=False)
NO_DROPOUT = dict(HAS_DROPOUT=False)
EPILOGUE_B2 = dict(N=K, stride_om=K, Q_RANK=R, stride_q_row=1, stride_q_rank=K, GATHER_Q=False,
                   HAS_DROPOUT=False)
EPILOGUE_B2_DROPOUT = dict(EPILOGUE_B2, HAS_DROPOUT=True)
# DoRA (dropout 0): m/n in F2's epilogue, on dy's columns in B2's K-loop and in B1, which
# also reads the forward's output for m's gradient; the cuBLAS path's F2 epilogue scales too.
DORA_F2 = dict(F2, HAS_COL_SCALE=True)
DORA_B2 = dict(B2, HAS_K_SCALE=True)
DORA_B1 = dict(DORA=True)
DORA_EPILOGUE_F2 = dict(NO_DROPOUT, HAS_COL_SCALE=True)


SPILL_FREE = (gemm_ops._gemm_lowrank_kernel, ops._lora_shrink_kernel, ops._lora_grad_s_b_kernel,
              ops._lora_grad_a_kernel, epilogue_ops._lowrank_epilogue_kernel)


def compiled_kernels():
    """(kernel, variant name, variant, configs, GEMM?) for every launch the ops make."""
    gemm, row = gemm_ops._gemm_lowrank_kernel, ops.ROW_CONFIGS
    return [
        (gemm, "F2", F2, gemm_ops.GEMM_CONFIGS, True),
        (gemm, "B2", B2, gemm_ops.GEMM_CONFIGS, True),
        (gemm, "B2 dropout", B2_DROPOUT, gemm_ops.GEMM_CONFIGS, True),
        (gemm, "DoRA F2", DORA_F2, gemm_ops.GEMM_CONFIGS, True),
        (gemm, "DoRA B2", DORA_B2, gemm_ops.GEMM_CONFIGS, True),
        (gemm, "NF4 F2", NF4_GEMM, gemm_ops.NF4_GEMM_CONFIGS, True),
        (gemm, "NF4 base dy·W", NF4_GEMM_BACKWARD, gemm_ops.NF4_GEMM_CONFIGS, True),
        (ops._lora_shrink_kernel, "F1", NO_DROPOUT, row, False),
        (ops._lora_shrink_kernel, "F1 dropout", {}, row, False),
        (ops._lora_grad_s_b_kernel, "B1", {}, row, False),
        (ops._lora_grad_s_b_kernel, "DoRA B1", DORA_B1, ops.DORA_B1_CONFIGS, False),
        (ops._lora_grad_s_b_kernel, "B1 deterministic", dict(DETERMINISTIC=True), [ops.ROW_PINNED],
         False),
        (ops._lora_grad_a_kernel, "B3", NO_DROPOUT, row, False),
        (ops._lora_grad_a_kernel, "B3 dropout", {}, row, False),
        (epilogue_ops._lowrank_epilogue_kernel, "F2 epilogue", NO_DROPOUT,
         epilogue_ops.EPILOGUE_CONFIGS, False),
        (epilogue_ops._lowrank_epilogue_kernel, "DoRA F2 epilogue", DORA_EPILOGUE_F2,
         epilogue_ops.EPILOGUE_CONFIGS, False),
        (epilogue_ops._lowrank_epilogue_kernel, "B2 epilogue", EPILOGUE_B2,
         epilogue_ops.EPILOGUE_CONFIGS, False),
        (epilogue_ops._lowrank_epilogue_kernel, "B2 dropout epilogue", EPILOGUE_B2_DROPOUT,
         epilogue_ops.EPILOGUE_CONFIGS, False),
        (rms_norm_ops._rms_norm_forward_kernel, "", {}, RMS_NORM_CONFIGS, False),
        (rms_norm_ops._rms_norm_backward_kernel, "", {}, RMS_NORM_CONFIGS, False),
        (swiglu_ops._swiglu_forward_kernel, "", {}, SWIGLU_CONFIGS, False),
        (swiglu_ops._swiglu_backward_kernel, "", {}, SWIGLU_CONFIGS, False),
        (rope_ops._rope_kernel, "", {}, ROPE_CONFIGS, False),
        (nf4_ops._nf4_dequant_kernel, "", {}, NF4_DEQUANT_CONFIGS, False),
    ]


def source(kernel, config: triton.Config, variant=None):
    """An ASTSource specialised like the JIT does: 16-divisible values and pointers, ints == 1
    constant, except the arguments a kernel marks do_not_specialize."""
    variant = variant or {}
    args = {**KERNEL_ARGS[kernel.__name__], **variant}
    values = {**COMMON_CONSTEXPRS, **variant, **config.kwargs}
    constexprs = {name: values[name] for name in kernel.arg_names
                  if name in COMMON_CONSTEXPRS or name in config.kwargs}
    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        value = args.get(name)
        if name in constexprs:
            signature[name] = "constexpr"
        elif isinstance(value, str):
            signature[name] = "*" + value
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif kernel.params[index].do_not_specialize:
            signature[name] = "i32"
        elif value == 1:
            signature[name] = "constexpr"
            constexprs[name] = 1
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    return ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)


def config_name(config: triton.Config) -> str:
    """128x256x64 w8 s3 for a GEMM config; the meta-parameters as key=value otherwise."""
    kw = config.kwargs
    if "BLOCK_N" in kw and "BLOCK_M" in kw:
        shape = "x".join(str(kw[b]) for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if b in kw)
    else:
        shape = " ".join(f"{k}={v}" for k, v in kw.items())
    return f"{shape} w{config.num_warps} s{config.num_stages}"


def check(kernel, variant_name, variant, config, gemm, arch, limit) -> dict:
    """Compile one config for one target and read its resources; ok unless it fails a rule.

    The rules: it compiles, fits the device's shared memory, a GEMM's shared memory is
    within the autotuner's estimate, and a LoRA kernel does not spill (on sm_90: its Hopper
    set). Other kernels' spills are reported, not failed.
    """
    estimate = (gemm_ops._gemm_shared_memory(config, 2, BLOCK_R, variant.get("W_NF4", False))
                if gemm else None)
    record = dict(kernel=kernel.__name__, variant=variant_name, sm=arch,
                  config=config_name(config), estimate=estimate, limit=limit)
    start = time.perf_counter()
    try:
        compiled = triton.compile(
            source(kernel, config, variant), target=GPUTarget("cuda", arch, 32),
            options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
        record.update(cubin_resources(compiled.asm["cubin"], compiled.metadata.shared))
    except Exception as error:  # report every failing config, not just the first
        record.update(error=str(error)[:500], ok=False)
        return record
    record["seconds"] = round(time.perf_counter() - start, 2)
    problems = [p for p, bad in [
        ("shared memory over the device's", record["shared"] > limit),
        ("shared memory over the estimate",
         estimate is not None and record["dynamic_shared"] > estimate),
        ("spills", kernel in SPILL_FREE and record["stack_bytes"] > 0),
    ] if bad]
    record.update(ok=not problems, problems=problems)
    return record


# Phi-3-mini's LoRA projections at r = 16: (name, LoRA parts, R). The kernels' constexprs
# differ by BLOCK_R and by the part gather only; N, K and strides are all divisible by 16.
PHI3_MINI_PROJECTIONS = [("qkv", 3, 48), ("o", 1, 16), ("gate_up", 2, 32), ("down", 1, 16)]
LORA_ROLES = ("F1", "F2", "B1", "B2", "B3")


def step_compilations(records) -> list:
    """Lines estimating what a Phi-3-mini training step compiles, from sm_90's records."""
    variants = {(next_block(R), parts > 1) for _, parts, R in PHI3_MINI_PROJECTIONS}
    configs = {role: len({r["config"] for r in records if r["sm"] == 90 and r["variant"] == name})
               for role, name in zip(LORA_ROLES,
                                     ("F1 dropout", "F2", "B1", "B2 dropout", "B3 dropout"))}
    lora = [r for r in records if r["sm"] == 90 and r["kernel"] in {k.__name__ for k in SPILL_FREE}
            and "seconds" in r]
    if not lora or not all(configs.values()):
        return []
    seconds = sum(r["seconds"] for r in lora) / len(lora)
    total = len(variants) * sum(configs.values())
    return ["## Compiling a Phi-3-mini training step", "",
            f"Four LoRA projections (r = 16, dropout on) give {len(variants)} distinct "
            f"(BLOCK_R, part gather) variants of each of F1, F2, B1, B2, B3; with "
            f"{'/'.join(str(configs[r]) for r in LORA_ROLES)} sm_90 configs per role that is "
            f"{total} compilations once (seed and M are not specialised, so later steps and "
            f"batch sizes add none; each new M bucket is autotuned, not recompiled), "
            f"{len(variants) * len(LORA_ROLES)} with LORAKERNELS_AUTOTUNE=0. At {seconds:.1f} s "
            f"per compile (the mean here, one CPU core) the first step compiles for about "
            f"{total * seconds / 60:.1f} minutes with autotuning, "
            f"{len(variants) * len(LORA_ROLES) * seconds:.0f} s without.", ""]


def markdown(records) -> str:
    """The report as a table, one row per kernel × variant × config × target."""
    columns = ["kernel", "variant", "sm", "config", "registers", "stack_bytes", "spill_stores",
               "shared", "sass", "tensor_core", "mma", "atomics", "fences", "seconds", "ok"]
    lines = ["# Kernel resources (sm_90 and sm_86, compiled without a GPU)", "",
             "Written by `python tests/gpu_compile_check.py --report "
             "benchmarks/results/kernel_resources`; read from each cubin with Triton's cuobjdump. "
             "Shapes: Phi-3-mini's qkv (M = 4096, K = 3072, N = 9216, r = 16 on three parts). "
             "stack_bytes > 0 means spills; sass counts instructions per thread; fences are "
             "GPU-scope MEMBAR and CCTL.", "", *step_compilations(records),
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in records:
        lines.append("| " + " | ".join(str(r.get(c, r.get("error", ""))) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sm", type=int, nargs="+", default=list(TARGETS),
                        help="targets to compile for (default: 90 86)")
    parser.add_argument("--report", metavar="PREFIX",
                        help="also write PREFIX.json and PREFIX.md (the resource table)")
    parser.add_argument("--only", metavar="NAME",
                        help="only kernels or variants whose name contains NAME (e.g. B2)")
    args = parser.parse_args()
    records = []
    for arch in args.sm:
        limit = TARGETS[arch]
        for kernel, variant_name, variant, configs, gemm in compiled_kernels():
            if args.only and args.only not in f"{kernel.__name__} {variant_name}":
                continue
            if gemm:  # what the autotuner's prune keeps on this device
                configs = gemm_ops.fitting_configs(configs, limit, 2, BLOCK_R,
                                                   variant.get("W_NF4", False))
            for config in configs:
                records.append(check(kernel, variant_name, variant, config, gemm, arch, limit))
                print(json.dumps(records[-1]), flush=True)
    if args.report:
        Path(args.report + ".json").write_text(json.dumps(records, indent=1) + "\n")
        Path(args.report + ".md").write_text(markdown(records))
    return 0 if all(r["ok"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
