"""Compile every kernel and autotune config for real GPUs, without a GPU.

The interpreter hides what only the compiler sees: shapes tl.dot refuses, shared
memory beyond what a device has. Triton ships ptxas, so each config is compiled
ahead of time for sm_90 (H100, 227 KB of shared memory) and sm_86 (consumer
GPUs, 99 KB), specialised as a launch at Phi-3-mini's qkv shape would be.
Prints one JSON line per compiled config; exits non-zero on any failure.

Run without TRITON_INTERPRET: python tests/gpu_compile_check.py
"""
import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lorakernels.ops import gemm_lowrank as gemm_ops
from lorakernels.ops import lora_linear as ops
from lorakernels.ops import nf4_dequant as nf4_ops
from lorakernels.ops import rms_norm as rms_norm_ops
from lorakernels.ops import rope as rope_ops
from lorakernels.ops import swiglu as swiglu_ops

TARGETS = {90: 232448, 86: 101376}  # compute capability -> max shared memory per block (bytes)
M, K, N, R, RANK = 4096, 3072, 9216, 48, 16  # qkv with LoRA on three parts, r = 16
BLOCK_R = 64

# Each kernel's runtime arguments as a launch passes them: pointer dtypes, or int values.
KERNEL_ARGS = {
    "_lora_shrink_kernel": dict(
        x_ptr="bf16", a_ptr="fp32", s_ptr="fp32", M=M, K=K, R=R, stride_xm=K, stride_xk=1,
        stride_ar=K, stride_ak=1, seed=12345, M_BUCKET=M),
    "_gemm_lowrank_kernel": dict(
        x_ptr="bf16", w_ptr="bf16", absmax_q_ptr="bf16", absmax_scale_ptr="bf16", out_ptr="bf16",
        p_ptr="fp32", q_ptr="fp32", q_row_ptr="i32", q_off_ptr="i32", bias_ptr="bf16", M=M, N=N,
        K=K, R=R, Q_RANK=RANK, scaling=2.0, seed=12345, absmax_offset=0.01, M_BUCKET=M,
        stride_xm=K, stride_xk=1, stride_wk=1, stride_wn=K, stride_om=N, stride_on=1,
        stride_q_row=RANK, stride_q_rank=1),
    "_lora_grad_s_b_kernel": dict(
        dy_ptr="bf16", s_ptr="fp32", b_ptr="fp32", b_row_ptr="i32", b_off_ptr="i32", ds_ptr="fp32",
        db_ptr="fp32", M=M, N=N, R=R, RANK=RANK, scaling=2.0, M_BUCKET=M, stride_dym=N,
        stride_dyn=1, stride_b_row=RANK, stride_b_rank=1),
    "_lora_grad_a_kernel": dict(
        ds_ptr="fp32", x_ptr="bf16", da_ptr="fp32", M=M, K=K, R=R, stride_xm=K, stride_xk=1,
        seed=12345, M_BUCKET=M),
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
                         HAS_LOWRANK=True, W_NF4=False, CAST_FP32=False, PRECISION="tf32", BLOCK_R=BLOCK_R,
                         EMULATE_BF16_RTNE=False, COMPUTE_DW=True)


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


# The GEMM reading an NF4 weight in its K-loop, as at small M (generation): the forward's
# orientation (w = Wᵀ) with the LoRA epilogue, and the backward's (w = W, stride_wk = K)
# without a low-rank term, the base-only layer's launch.
NF4_GEMM = dict(M=16, M_BUCKET=16, w_ptr="u8", absmax_q_ptr="i8", absmax_scale_ptr="fp32",
                W_NF4=True)
NF4_GEMM_BACKWARD = dict(NF4_GEMM, stride_wk=K, stride_wn=1, HAS_LOWRANK=False)


def source(kernel, config: triton.Config, variant=None):
    """An ASTSource specialised like the JIT does: 16-divisible values and pointers, ints == 1 constant."""
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
        elif value == 1:
            signature[name] = "constexpr"
            constexprs[name] = 1
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    return ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)


def main() -> int:
    kernels = [
        (gemm_ops._gemm_lowrank_kernel, gemm_ops.GEMM_CONFIGS, True),
        (gemm_ops._gemm_lowrank_kernel, gemm_ops.GEMM_CONFIGS, True, NF4_GEMM),
        (gemm_ops._gemm_lowrank_kernel, gemm_ops.GEMM_CONFIGS, True, NF4_GEMM_BACKWARD),
        (ops._lora_shrink_kernel, ops.ROW_CONFIGS, False),
        (ops._lora_grad_s_b_kernel, ops.ROW_CONFIGS, False),
        (ops._lora_grad_a_kernel, ops.ROW_CONFIGS, False),
        (rms_norm_ops._rms_norm_forward_kernel, RMS_NORM_CONFIGS, False),
        (rms_norm_ops._rms_norm_backward_kernel, RMS_NORM_CONFIGS, False),
        (swiglu_ops._swiglu_forward_kernel, SWIGLU_CONFIGS, False),
        (swiglu_ops._swiglu_backward_kernel, SWIGLU_CONFIGS, False),
        (rope_ops._rope_kernel, ROPE_CONFIGS, False),
        (nf4_ops._nf4_dequant_kernel, NF4_DEQUANT_CONFIGS, False),
    ]
    failures = 0
    for arch, limit in TARGETS.items():
        for kernel, configs, pruned, *variant in kernels:
            for config in configs:
                estimate = (gemm_ops._gemm_shared_memory(config, 2, BLOCK_R, bool(variant)) if pruned
                            else None)
                if pruned and estimate > limit:
                    continue  # the autotuner's prune drops it on this device
                record = dict(kernel=kernel.__name__, sm=arch, config=str(config),
                              nf4=bool(variant))
                try:
                    compiled = triton.compile(
                        source(kernel, config, *variant), target=GPUTarget("cuda", arch, 32),
                        options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
                    shared = compiled.metadata.shared
                    record.update(shared=shared, limit=limit, estimate=estimate)
                    ok = shared <= limit and (estimate is None or shared <= estimate)
                except Exception as error:  # report every failing config, not just the first
                    record.update(error=str(error)[:500])
                    ok = False
                record["ok"] = ok
                failures += not ok
                print(json.dumps(record), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
