"""The fused row-wise kernels (RMSNorm, SwiGLU, RoPE) against eager PyTorch and model/phi3.py.

On CPU these run under TRITON_INTERPRET=1 (tests/conftest.py) with small shapes:
rows of 96 (Phi-3's head dim, not a power of two), 7 rows, leading dims, strided
inputs and incoming gradients, and block sizes shrunk by monkeypatch so every loop
takes several steps.

Each output and gradient is checked three ways (``check``):
- against the op's ``*_reference`` (eager PyTorch, model/phi3.py's math) in the
  same dtype, as max |kernel - eager| <= rel · max |float64 truth|, with
  rel = 2e-6 in fp32 (only the fp32 summation order and fp32 rounding differ),
  2^-6 in bf16 and 2^-9 in fp16: two ulps at the largest magnitude. The kernels
  compute in fp32 and round once where eager also rounds intermediates (silu,
  x·cos, dy·w, ...), each by at most half an ulp of a value no larger than about
  that magnitude (measured: at most half the tolerance). RMSNorm's forward
  replicates eager's rounding points, so in bf16/fp16 it must also be
  bit-identical on all but a stray element or two (``exact``);
- in bf16/fp16, against float64 on the same inputs: the kernel's max error may be
  at most 1.5× eager's (plus a quarter ulp) and its mean error at most 1.05×
  eager's, so the tolerance above never hides a kernel less accurate than the
  eager code it replaces (truncating instead of rounding fails here);
- the references (what model/phi3.py's modules run on the eager backend) equal
  transformers' Phi-3 bit for bit.
Mutations tried by hand (wrong sign or term, skipped rounding, lost stride, row
or column block, head loop, batch index, dw partials) all fail at least one test.
"""
import pytest
import torch
import torch.nn.functional as F

from lorakernels.ops import rms_norm as rms_norm_ops
from lorakernels.ops import rope as rope_ops
from lorakernels.ops import swiglu as swiglu_ops
from lorakernels.ops.rms_norm import rms_norm
from lorakernels.ops.rope import apply_rope
from lorakernels.ops.swiglu import swiglu
from lorakernels.reference import rms_norm_reference, swiglu_reference
from lorakernels.reference import rope_reference as apply_rope_reference
from model import Phi3Config
from model import phi3

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
REL = {torch.float32: 2e-6, torch.bfloat16: 2.0 ** -6, torch.float16: 2.0 ** -9}
ULP = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


def randn(*shape, scale=1.0, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)


def leaf(t, dtype=None):
    """A copy of t with t's strides (a strided view stays strided), requiring grad."""
    copy = torch.empty_strided(t.shape, t.stride(), dtype=dtype or t.dtype, device=t.device)
    return copy.copy_(t.detach()).requires_grad_()


def check(name, got, eager, truth, exact=False, rounded=None):
    """got (kernel) and eager in one dtype, truth in float64 from the same inputs.

    ``rounded``: the dtype the computation rounds to, when narrower than the output's.
    """
    assert got.dtype == eager.dtype and got.shape == eager.shape, name
    dtype = rounded or got.dtype
    scale = truth.abs().max().item()
    diff = (got.double() - eager.double()).abs().max().item()
    assert diff <= REL[dtype] * scale, f"{name}: kernel vs eager {diff:.3g}, scale {scale:.3g}"
    if exact and dtype != torch.float32:  # in fp32 the sum order shows in the last bit
        mismatched = (got != eager).sum().item()
        assert mismatched <= max(2, got.numel() // 1000), f"{name}: {mismatched} elements differ"
    if dtype != torch.float32:
        err_kernel, err_eager = (got.double() - truth).abs(), (eager.double() - truth).abs()
        worst, worst_eager = err_kernel.max().item(), err_eager.max().item()
        assert worst <= 1.5 * worst_eager + 0.25 * ULP[dtype] * scale, \
            f"{name}: kernel's max error {worst:.3g} vs eager's {worst_eager:.3g}"
        # On average at least as accurate: catches biased rounding (truncation) too.
        mean, mean_eager = err_kernel.mean().item(), err_eager.mean().item()
        assert mean <= 1.05 * mean_eager + 1e-3 * ULP[dtype] * scale, \
            f"{name}: kernel's mean error {mean:.3g} vs eager's {mean_eager:.3g}"


# ----------------------------------------------------------------------------- RMSNorm


def rms_norm_truth(x, weight, eps):
    x = x.double()
    return weight.double() * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def run_rms_norm(x, weight, eps=1e-5, weight_grad=True):
    # normed is rounded to x's dtype even where the output is fp32 (an fp32 weight)
    """Kernel, eager reference and float64 truth: output, dx and dweight."""
    dy = randn(*x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), seed=7)
    results = []
    for fn, cast in ((rms_norm, None), (rms_norm_reference, None), (rms_norm_truth, torch.float64)):
        xi = leaf(x, cast)
        wi = leaf(weight, cast) if weight_grad else weight.detach().to(cast or weight.dtype)
        y = fn(xi, wi, eps)
        y.backward(dy.to(y.dtype))
        results.append((y.detach(), xi.grad, wi.grad if weight_grad else None))
    (y, dx, dw), (y_e, dx_e, dw_e), (y_t, dx_t, dw_t) = results
    check("y", y, y_e, y_t, exact=True, rounded=x.dtype)
    check("dx", dx, dx_e, dx_t)
    if weight_grad:
        check("dweight", dw, dw_e, dw_t)
    else:
        assert dw is None
    return y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 96), (2, 3, 96), (200, 96), (5, 1000)])
def test_rms_norm(shape, dtype):
    # (200, 96): 16 rows a program, and 4 backward programs of 64 rows, the last with 8.
    x = randn(*shape, scale=2.0, dtype=dtype)
    weight = (1 + randn(shape[-1], scale=0.2, seed=1)).to(dtype)
    run_rms_norm(x, weight)


def test_rms_norm_one_row_per_program_and_strided_input():
    # Rows of 3072 (Phi-3-mini's hidden size): one row a program, 4 backward programs of 2
    # rows; x is every other row of a larger tensor, read by strides.
    x = randn(14, 3072, dtype=torch.bfloat16)[::2]
    weight = (1 + randn(3072, scale=0.2, seed=1)).to(torch.bfloat16)
    run_rms_norm(x, weight)


def test_rms_norm_frozen_weight_and_mixed_dtypes():
    x = randn(7, 96, dtype=torch.bfloat16)
    weight = 1 + randn(96, scale=0.2, seed=1)  # fp32 weight, bf16 x: fp32 out, as eager promotes
    assert run_rms_norm(x, weight, weight_grad=False).dtype == torch.float32
    run_rms_norm(x, weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_equals_phi3_module(dtype):
    norm = phi3.Phi3RMSNorm(96, eps=1e-6).to(DEVICE, dtype)
    with torch.no_grad():
        norm.weight.add_(randn(96, scale=0.3).to(dtype))
    x = randn(3, 7, 96, scale=3.0, dtype=dtype)
    x_mod, x_ker = leaf(x), leaf(x)
    y_mod = norm(x_mod)
    assert torch.equal(rms_norm_reference(x, norm.weight, norm.eps), y_mod)
    hf_phi3 = pytest.importorskip("transformers.models.phi3.modeling_phi3")
    hf_norm = hf_phi3.Phi3RMSNorm(96, eps=1e-6).to(DEVICE, dtype)
    with torch.no_grad():
        hf_norm.weight.copy_(norm.weight)
        assert torch.equal(hf_norm(x), y_mod)
    dy = randn(*x.shape, dtype=dtype, seed=3)
    y_mod.backward(dy)
    dw_mod, norm.weight.grad = norm.weight.grad, None
    y_ker = rms_norm(x_ker, norm.weight, norm.eps)
    y_ker.backward(dy)
    scale = y_mod.abs().max().item()
    assert (y_ker.double() - y_mod.double()).abs().max().item() <= REL[dtype] * scale
    if dtype != torch.float32:
        assert (y_ker != y_mod).sum().item() <= 2  # eager's rounding points, replicated
    for got, want in ((x_ker.grad, x_mod.grad), (norm.weight.grad, dw_mod)):
        assert got.dtype == want.dtype
        assert (got.double() - want.double()).abs().max() <= REL[dtype] * want.abs().max() * 2


# ----------------------------------------------------------------------------- SwiGLU


def run_swiglu(gate_up):
    # The incoming gradient is a strided view too: the first half of a wider tensor.
    dout = randn(*gate_up.shape, dtype=gate_up.dtype, seed=7)[..., :gate_up.shape[-1] // 2]
    results = []
    for fn, cast in ((swiglu, None), (swiglu_reference, None), (swiglu_reference, torch.float64)):
        g = leaf(gate_up, cast)
        out = fn(g)
        out.backward(dout.to(out.dtype))
        results.append((out.detach(), g.grad))
    (out, dg), (out_e, dg_e), (out_t, dg_t) = results
    half = gate_up.shape[-1] // 2
    check("out", out, out_e, out_t)
    check("dgate", dg[..., :half], dg_e[..., :half], dg_t[..., :half])
    check("dup", dg[..., half:], dg_e[..., half:], dg_t[..., half:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 2 * 96), (2, 3, 2 * 40)])
def test_swiglu(shape, dtype):
    run_swiglu(randn(*shape, scale=3.0, dtype=dtype))


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # σ(-200): exp(200) = inf
def test_swiglu_strided_input_several_column_blocks_and_saturated_gates(monkeypatch):
    monkeypatch.setattr(swiglu_ops, "MAX_BLOCK", 32)  # I = 96: three column blocks
    gate_up = randn(7, 3, 2 * 96, scale=3.0, dtype=torch.bfloat16)[:, 1]  # row stride 3·192
    gate_up[0, :8] = torch.tensor([-200.0, -30.0, -12.0, 0.0, 12.0, 30.0, 200.0, -0.0])
    assert not gate_up.is_contiguous()
    run_swiglu(gate_up)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_equals_phi3_mlp(dtype):
    config = Phi3Config.from_name("phi3-tiny")  # intermediate size 688: not a power of two
    mlp = phi3.Phi3MLP(config).to(DEVICE, dtype)
    x = randn(2, 3, config.hidden_size, dtype=dtype)
    outputs = []
    for forward in (mlp, lambda v: mlp.down_proj(swiglu(mlp.gate_up_proj(v)))):
        xi = leaf(x)
        y = forward(xi)
        y.square().sum().backward()
        outputs.append((y.detach(), xi.grad, mlp.gate_up_proj.weight.grad,
                        mlp.down_proj.weight.grad))
        mlp.zero_grad(set_to_none=True)
    with torch.no_grad():
        gate_up = mlp.gate_up_proj(x)
        gate, up = gate_up.chunk(2, dim=-1)
        assert torch.equal(swiglu_reference(gate_up), up * F.silu(gate))
    for name, got, want in zip(("y", "dx", "dgate_up_w", "ddown_w"), *outputs):
        rel = 1e-5 if dtype == torch.float32 else 2.0 ** -5  # after a GEMM in bf16 too
        error = (got.double() - want.double()).abs().max().item()
        assert error <= rel * want.abs().max().item(), f"{name}: {error:.3g}"


# ----------------------------------------------------------------------------- RoPE


def qkv_heads(B, T, n_heads, n_kv_heads, head_dim, dtype, seed=0):
    """q, k as model/phi3.py makes them: transposed views of one fused qkv projection."""
    qkv = randn(B, T, (n_heads + 2 * n_kv_heads) * head_dim, dtype=dtype, seed=seed)
    q, k, _ = qkv.split((n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim), dim=-1)
    return (q.view(B, T, n_heads, head_dim).transpose(1, 2),
            k.view(B, T, n_kv_heads, head_dim).transpose(1, 2))


def rotary(config, position_ids, dtype):
    return phi3.Phi3RotaryEmbedding(config).to(DEVICE)(position_ids.to(DEVICE), dtype)


def run_rope(q, k, cos, sin):
    # Incoming gradients [B, H, T, D] as transposed [B, T, H, D] buffers, as SDPA's may be.
    dq_out = randn(q.shape[0], q.shape[2], q.shape[1], q.shape[3], dtype=q.dtype,
                   seed=5).transpose(1, 2)
    dk_out = randn(k.shape[0], k.shape[2], k.shape[1], k.shape[3], dtype=k.dtype,
                   seed=6).transpose(1, 2)
    results = []
    for fn, cast in ((apply_rope, None), (apply_rope_reference, None),
                     (apply_rope_reference, torch.float64)):
        qi, ki = leaf(q, cast), leaf(k, cast)
        q_out, k_out = fn(qi, ki, cos.to(cast or cos.dtype), sin.to(cast or sin.dtype))
        torch.autograd.backward((q_out, k_out), (dq_out.to(q_out.dtype), dk_out.to(k_out.dtype)))
        results.append((q_out.detach(), k_out.detach(), qi.grad, ki.grad))
    for name, got, eager, truth in zip(("q", "k", "dq", "dk"), *results):
        check(name, got, eager, truth)
    return results[0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_gqa_on_qkv_views_with_phi3_cos_sin(dtype):
    config = Phi3Config(hidden_size=4 * 96, num_attention_heads=4, num_key_value_heads=2)
    q, k = qkv_heads(2, 7, 4, 2, 96, dtype)
    position_ids = torch.stack([torch.arange(7), torch.tensor([0, 1, 2, 0, 1, 2, 3])])  # packed
    cos, sin = rotary(config, position_ids, dtype)
    q_out, k_out, _, _ = run_rope(q, k, cos, sin)
    assert q_out.shape == q.shape and k_out.shape == k.shape and q_out.is_contiguous()


def test_rope_longrope_positions_past_the_original_context():
    config = Phi3Config.from_name("phi3-mini-128k")  # long factors and attention scaling > 1
    q, k = qkv_heads(1, 5, 3, 1, config.head_dim, torch.bfloat16)
    cos, sin = rotary(config, torch.arange(5000, 5005)[None], torch.bfloat16)
    run_rope(q, k, cos, sin)


@pytest.mark.parametrize("head_dim", [16, 128])
def test_rope_head_loop_broadcast_batch_and_unequal_halves(monkeypatch, head_dim):
    monkeypatch.setattr(rope_ops, "TILE", head_dim)  # 2 heads a step: q's 3 heads take 2
    q = randn(2, 5, 3, head_dim).transpose(1, 2)  # [B, H, T, D] from a [B, T, H, D] buffer
    k = randn(2, 2, 5, head_dim, seed=1)  # contiguous: its head stride is not q's
    # A batch of one broadcasts; cos/sin halves differ, so the backward must be the exact
    # transpose, not just a rotation by -sin.
    cos, sin = randn(1, 5, head_dim, seed=2), randn(1, 5, head_dim, seed=3)
    run_rope(q, k, cos, sin)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_partial_rotary_passes_the_other_dims_through(monkeypatch, dtype):
    # Phi-4-mini's layout scaled down: 128-dim heads, the first 96 rotated (LongRoPE, long
    # factors), 3 query heads per KV head; two heads a step so the head loop runs.
    monkeypatch.setattr(rope_ops, "TILE", 2 * 64)
    config = Phi3Config(hidden_size=6 * 128, num_attention_heads=6, num_key_value_heads=2,
                        partial_rotary_factor=0.75, max_position_embeddings=64,
                        original_max_position_embeddings=16,
                        rope_scaling={"type": "longrope", "short_factor": [1.0] * 48,
                                      "long_factor": [1.0 + i / 4 for i in range(48)]})
    q, k = qkv_heads(2, 5, 6, 2, 128, dtype)
    cos, sin = rotary(config, torch.arange(20, 25).expand(2, 5), dtype)
    assert cos.shape == (2, 5, 96)
    q_out, k_out, dq, dk = run_rope(q, k, cos, sin)
    assert torch.equal(q_out[..., 96:], q[..., 96:]) and torch.equal(k_out[..., 96:], k[..., 96:])
    assert not torch.equal(q_out[..., :96], q[..., :96])


def test_rope_partial_equals_transformers_phi3():
    hf_phi3 = pytest.importorskip("transformers.models.phi3.modeling_phi3")
    q, k = qkv_heads(2, 7, 4, 2, 16, torch.float32)
    cos, sin = randn(2, 7, 12, seed=3), randn(2, 7, 12, seed=4)
    q_ref, k_ref = apply_rope_reference(q, k, cos, sin)
    q_hf, k_hf = hf_phi3.apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(q_ref, q_hf) and torch.equal(k_ref, k_hf)


def test_rope_equals_transformers_phi3():
    hf_phi3 = pytest.importorskip("transformers.models.phi3.modeling_phi3")
    config = Phi3Config(hidden_size=4 * 96, num_attention_heads=4, num_key_value_heads=2)
    q, k = qkv_heads(2, 7, 4, 2, 96, torch.bfloat16)
    cos, sin = rotary(config, torch.arange(7).expand(2, 7), torch.bfloat16)
    q_ref, k_ref = apply_rope_reference(q, k, cos, sin)
    q_hf, k_hf = hf_phi3.apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(q_ref, q_hf) and torch.equal(k_ref, k_hf)
    q_out, k_out = apply_rope(q, k, cos, sin)
    for got, want in ((q_out, q_ref), (k_out, k_ref)):
        assert (got.double() - want.double()).abs().max() <= REL[torch.bfloat16] * want.abs().max()


# ----------------------------------------------------------------------------- errors


def test_unsupported_dtypes():
    x64 = randn(3, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match="rms_norm supports float16, bfloat16 and float32; x is"):
        rms_norm(x64, torch.ones(8, device=DEVICE), 1e-5)
    with pytest.raises(TypeError, match="swiglu supports float16, bfloat16 and float32"):
        swiglu(x64)
    q = randn(1, 2, 3, 8)
    with pytest.raises(TypeError, match="apply_rope supports .* cos is torch.float64"):
        apply_rope(q, q, randn(1, 3, 8, dtype=torch.float64), randn(1, 3, 8))
    with pytest.raises(TypeError, match="one dtype"):
        apply_rope(q, q, randn(1, 3, 8, dtype=torch.bfloat16), randn(1, 3, 8, dtype=torch.bfloat16))


def test_bad_shapes():
    with pytest.raises(ValueError, match=r"needs weight \[8\], got weight \(7,\)"):
        rms_norm(randn(3, 8), randn(7), 1e-5)
    with pytest.raises(ValueError, match="rows of at most 32768"):
        rms_norm(randn(1, 32769), randn(32769), 1e-5)
    with pytest.raises(ValueError, match=r"gate_up \[..., 2·I\]"):
        swiglu(randn(3, 7))
    q = randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="even head dim from 2 to 256"):
        apply_rope(randn(1, 2, 3, 7), randn(1, 2, 3, 7), randn(1, 3, 7), randn(1, 3, 7))
    with pytest.raises(ValueError, match="differ in batch, length or head dim"):
        apply_rope(q, randn(1, 2, 4, 8), randn(1, 3, 8), randn(1, 3, 8))
    with pytest.raises(ValueError, match=r"cos must be \[B, T, R\]"):
        apply_rope(q, q, randn(3, 8), randn(1, 3, 8))
    with pytest.raises(ValueError,
                       match="even number of dims from 2 to the head dim 8; cos/sin have 10"):
        apply_rope(q, q, randn(1, 3, 10), randn(1, 3, 10))
    with pytest.raises(ValueError, match=r"sin must be \[B, T, R\] = \[1, 3, 6\]"):
        apply_rope(q, q, randn(1, 3, 6), randn(1, 3, 8))
    with pytest.raises(ValueError, match="no gradient for cos or sin"):
        apply_rope(q, q, randn(1, 3, 8).requires_grad_(), randn(1, 3, 8))


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    for module in (rms_norm_ops, swiglu_ops, rope_ops):
        monkeypatch.setattr(module, "INTERPRETING", False)
    x = torch.randn(3, 8)
    with pytest.raises(RuntimeError, match="CUDA device .*TRITON_INTERPRET=1"):
        rms_norm(x, torch.ones(8), 1e-5)
    with pytest.raises(RuntimeError, match="CUDA tensor .*TRITON_INTERPRET=1"):
        swiglu(x)
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(RuntimeError, match="CUDA device .*TRITON_INTERPRET=1"):
        apply_rope(q, q, torch.randn(1, 3, 8), torch.randn(1, 3, 8))


# ----------------------------------------------------------------------------- GPU, full size


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="Phi-3-mini shapes need a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_phi3_mini_shapes_on_gpu(dtype):
    config = Phi3Config.from_name("phi3-mini-4k")
    B, T = 2, 2048
    x = randn(B, T, config.hidden_size, scale=2.0, dtype=dtype)
    run_rms_norm(x, (1 + randn(config.hidden_size, scale=0.2, seed=1)).to(dtype))
    run_swiglu(randn(B, T, 2 * config.intermediate_size, scale=3.0, dtype=dtype))
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    q, k = qkv_heads(B, T, heads, kv_heads, config.head_dim, dtype)
    cos, sin = rotary(config, torch.arange(T).expand(B, T), dtype)
    run_rope(q, k, cos, sin)
    # GQA as Phi-3-medium has it: 40 query heads, 10 key/value heads, head dim 128.
    q, k = qkv_heads(1, 512, 40, 10, 128, dtype)
    medium = Phi3Config.from_name("phi3-medium-4k")
    run_rope(q, k, *rotary(medium, torch.arange(512)[None], dtype))
    # Phi-4-mini: 24 query, 8 KV heads of 128 dims, the first 96 rotated, long factors.
    q, k = qkv_heads(1, 512, 24, 8, 128, dtype)
    mini = Phi3Config.from_name("phi4-mini")
    run_rope(q, k, *rotary(mini, torch.arange(4096, 4608)[None], dtype))
