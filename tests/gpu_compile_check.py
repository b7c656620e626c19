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

from lorakernels.ops import lora_linear as ops

TARGETS = {90: 232448, 86: 101376}  # compute capability -> max shared memory per block (bytes)
M, K, N, R, RANK = 4096, 3072, 9216, 48, 16  # qkv with LoRA on three parts, r = 16
BLOCK_R = 64

# Each kernel's runtime arguments as a launch passes them: pointer dtypes, or int values.
KERNEL_ARGS = {
    "_lora_shrink_kernel": dict(
        x_ptr="bf16", a_ptr="fp32", s_ptr="fp32", M=M, K=K, R=R, stride_xm=K, stride_xk=1,
        stride_ar=K, stride_ak=1, seed=12345, M_BUCKET=M),
    "_gemm_lowrank_kernel": dict(
        x_ptr="bf16", w_ptr="bf16", out_ptr="bf16", p_ptr="fp32", q_ptr="fp32", q_row_ptr="i32",
        q_off_ptr="i32", bias_ptr="bf16", M=M, N=N, K=K, R=R, Q_RANK=RANK, scaling=2.0, seed=12345,
        M_BUCKET=M, stride_xm=K, stride_xk=1, stride_wk=1, stride_wn=K, stride_om=N, stride_on=1,
        stride_q_row=RANK, stride_q_rank=1),
    "_lora_grad_s_b_kernel": dict(
        dy_ptr="bf16", s_ptr="fp32", b_ptr="fp32", b_row_ptr="i32", b_off_ptr="i32", ds_ptr="fp32",
        db_ptr="fp32", M=M, N=N, R=R, RANK=RANK, scaling=2.0, M_BUCKET=M, stride_dym=N,
        stride_dyn=1, stride_b_row=RANK, stride_b_rank=1),
    "_lora_grad_a_kernel": dict(
        ds_ptr="fp32", x_ptr="bf16", da_ptr="fp32", M=M, K=K, R=R, stride_xm=K, stride_xk=1,
        seed=12345, M_BUCKET=M),
}
COMMON_CONSTEXPRS = dict(P=0.05, HAS_DROPOUT=True, HAS_BIAS=True, GATHER_Q=True, GATHER_B=True,
                         CAST_FP32=False, PRECISION="tf32", BLOCK_R=BLOCK_R)


def source(kernel, config: triton.Config):
    """An ASTSource specialised like the JIT does: 16-divisible values and pointers, ints == 1 constant."""
    args = KERNEL_ARGS[kernel.__name__]
    constexprs = {name: value for name, value in {**COMMON_CONSTEXPRS, **config.kwargs}.items()
                  if name in kernel.arg_names}
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
        (ops._gemm_lowrank_kernel, ops.GEMM_CONFIGS, True),
        (ops._lora_shrink_kernel, ops.ROW_CONFIGS, False),
        (ops._lora_grad_s_b_kernel, ops.ROW_CONFIGS, False),
        (ops._lora_grad_a_kernel, ops.ROW_CONFIGS, False),
    ]
    failures = 0
    for arch, limit in TARGETS.items():
        for kernel, configs, pruned in kernels:
            for config in configs:
                estimate = ops._gemm_shared_memory(config, 2, BLOCK_R) if pruned else None
                if pruned and estimate > limit:
                    continue  # the autotuner's prune drops it on this device
                record = dict(kernel=kernel.__name__, sm=arch, config=str(config))
                try:
                    compiled = triton.compile(
                        source(kernel, config), target=GPUTarget("cuda", arch, 32),
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
