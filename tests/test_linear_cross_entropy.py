"""Chunked linear + cross entropy (lorakernels.ops.linear_cross_entropy) against the plain formula.

Loss and every gradient (hidden; weight when trainable; lora_A, lora_B) are compared
with ``linear_cross_entropy_reference``, whose gradients come from autograd through
full [N, V] logits. Errors are max |ours - reference| over max |reference|:
- fp32: 1e-5. Only the order of fp32 sums differs (the chunk's softmax is built as
  exp(z - max) / sum instead of exp(log_softmax)); observed errors are ~3e-7.
- bf16/fp16: 2e-2 for gradients. Both sides round the same fp32 d_logits to the input
  dtype and run the same low-precision matmuls, but the weight gradient is rounded once
  per chunk and summed in fp32 (the reference rounds once at the end), and with LoRA the
  reference rounds the logits to bf16 before the loss while we keep them fp32: each a
  difference of ~1 ulp (2^-8 = 0.004 for bf16), observed ≤ 0.006. The loss is compared at
  1e-5 without LoRA (same bf16 logits, fp32 sums) and 1e-2 with it.
A wrong gradient (a missing mask, a missing -onehot, a wrong scale, a lost chunk) is an
error of order one; ``test_gradcheck_float64`` checks the gradients against finite
differences, independently of the reference, and ``test_tolerance_catches_a_wrong_gradient``
shows the comparison fails for a gradient that is wrong in one row.
"""
import json

import pytest
import torch

from lorakernels.ops.linear_cross_entropy import default_chunk_size, linear_cross_entropy
from lorakernels.reference import linear_cross_entropy_reference

IGNORE = -100
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def assert_rel_close(actual, expected, rel, what):
    assert actual.shape == expected.shape, (f"{what}: shape {tuple(actual.shape)} "
                                            f"vs {tuple(expected.shape)}")
    error = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    scale = expected.double().abs().max().item() if expected.numel() else 0.0
    assert error <= rel * scale + 1e-7, f"{what}: max error {error:.3g} vs scale {scale:.3g}"


def make_case(N=50, H=24, V=70, dtype=torch.float32, weight_grad=False, rank=0, seed=0,
              ignore_every=4, device="cpu"):
    """hidden [N, H], weight [V, H] in ``dtype``; fp32 LoRA factors when rank > 0 (as apply_lora
    makes them)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(device, dtype).requires_grad_()
    # Logits of order a few units, as at an LM head: a peaked but not one-hot softmax.
    weight = (torch.randn(V, H, generator=g) / H**0.5 * 2).to(device, dtype)
    weight.requires_grad_(weight_grad)
    labels = torch.randint(0, V, (N,), generator=g)
    if ignore_every:
        labels[::ignore_every] = IGNORE
    labels = labels.to(device)
    lora = None
    if rank:
        lora_A = (torch.randn(rank, H, generator=g) / H**0.5).to(device).requires_grad_()
        lora_B = (torch.randn(V, rank, generator=g) * 0.5).to(device).requires_grad_()
        lora = (lora_A, lora_B, 2.0)
    return hidden, weight, labels, lora


def grad_inputs(hidden, weight, lora):
    inputs = {"hidden": hidden}
    if weight.requires_grad:
        inputs["weight"] = weight
    if lora is not None:
        inputs["lora_A"], inputs["lora_B"] = lora[0], lora[1]
    return inputs


def loss_and_grads(fn, hidden, weight, labels, lora, **kwargs):
    inputs = grad_inputs(hidden, weight, lora)
    loss = fn(hidden, weight, labels, lora=lora, **kwargs)
    grads = torch.autograd.grad(loss, list(inputs.values()))
    return loss, dict(zip(inputs, grads))


def check_against_reference(case, chunk_size, dtype, loss_tol=1e-5):
    hidden, weight, labels, lora = case
    loss, grads = loss_and_grads(linear_cross_entropy, hidden, weight, labels, lora,
                                 chunk_size=chunk_size)
    ref_loss, ref_grads = loss_and_grads(linear_cross_entropy_reference, hidden, weight, labels,
                                         lora)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_rel_close(loss, ref_loss, loss_tol, "loss")
    for name, ref_grad in ref_grads.items():
        assert grads[name].dtype == ref_grad.dtype, name
        assert_rel_close(grads[name], ref_grad, GRAD_TOL[dtype], f"grad {name}")


# 7 leaves a last chunk of 1; 64 > N
@pytest.mark.parametrize("chunk_size", [1, 7, 16, 50, 64, None])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_fp32_matches_reference(chunk_size, weight_grad):
    check_against_reference(make_case(weight_grad=weight_grad), chunk_size, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk_size", [13, 64])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_low_precision_matches_reference(dtype, chunk_size, weight_grad):
    check_against_reference(make_case(dtype=dtype, weight_grad=weight_grad), chunk_size, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_grad", [False, True])
@pytest.mark.parametrize("chunk_size", [9, 128])
def test_lora_head_matches_reference(dtype, weight_grad, chunk_size):
    case = make_case(dtype=dtype, weight_grad=weight_grad, rank=4)
    check_against_reference(case, chunk_size, dtype,
                            loss_tol=1e-5 if dtype == torch.float32 else 1e-2)


def test_gradcheck_float64():
    """Gradients against finite differences, not against the reference (fp64 accumulates in
    fp64)."""
    hidden, weight, labels, lora = make_case(N=11, H=5, V=9, dtype=torch.float64, weight_grad=True,
                                             ignore_every=3)
    g = torch.Generator().manual_seed(1)
    lora_A = torch.randn(2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    lora_B = torch.randn(9, 2, generator=g, dtype=torch.float64, requires_grad=True)

    def loss(h, w, a, b):
        return linear_cross_entropy(h, w, labels, chunk_size=4, lora=(a, b, 0.7))

    assert torch.autograd.gradcheck(loss, (hidden, weight, lora_A, lora_B))


def test_tolerance_catches_a_wrong_gradient():
    """The fp32 comparison fails when one row's gradient is wrong, e.g. an ignored row left
    unmasked."""
    hidden, weight, labels, lora = make_case()
    _, grads = loss_and_grads(linear_cross_entropy, hidden, weight, labels, lora, chunk_size=16)
    unmasked = labels.clone()
    unmasked[0] = 3  # row 0 is ignored in ``labels``; give it a loss
    _, wrong = loss_and_grads(linear_cross_entropy_reference, hidden, weight, unmasked, lora)
    with pytest.raises(AssertionError):
        assert_rel_close(grads["hidden"], wrong["hidden"], GRAD_TOL[torch.float32], "hidden")


def test_ignored_rows_get_zero_gradient_and_no_loss():
    hidden, weight, labels, _ = make_case(weight_grad=True)
    loss = linear_cross_entropy(hidden, weight, labels, chunk_size=8)
    loss.backward()
    ignored = labels == IGNORE
    assert ignored.any()
    assert torch.all(hidden.grad[ignored] == 0)
    assert torch.all(hidden.grad[~ignored].abs().sum(1) > 0)
    kept = linear_cross_entropy(hidden[~ignored], weight, labels[~ignored], chunk_size=8)
    assert_rel_close(loss, kept, 1e-6, "loss without the ignored rows")


@pytest.mark.parametrize("N", [0, 10])
def test_all_ignored_gives_zero_loss_and_zero_grads(N):
    hidden, weight, labels, lora = make_case(N=N, weight_grad=True, rank=3, ignore_every=0)
    labels = torch.full((N,), IGNORE)
    loss, grads = loss_and_grads(linear_cross_entropy, hidden, weight, labels, lora, chunk_size=4)
    assert loss.dtype == torch.float32 and loss.item() == 0.0
    for name, grad in grads.items():
        assert torch.all(grad == 0), name
    ref_loss = linear_cross_entropy_reference(hidden, weight, labels, lora=lora)
    assert ref_loss.item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_scales_by_grad_output_and_can_run_twice(dtype):
    hidden, weight, labels, lora = make_case(dtype=dtype, weight_grad=True, rank=2)
    loss = linear_cross_entropy(hidden, weight, labels, chunk_size=16, lora=lora)
    inputs = list(grad_inputs(hidden, weight, lora).values())
    scale = 1 / 37  # as the training loop's 1/target-tokens; not exact in bf16
    once = torch.autograd.grad(loss, inputs, retain_graph=True)
    scaled = torch.autograd.grad(loss * scale, inputs, retain_graph=True)
    again = torch.autograd.grad(loss, inputs)
    # grad_hidden is kept in the input dtype, scaled in fp32 and rounded once: exactly
    # (bf16 x) · scale rounded, not x · bf16(scale), which is off by up to 0.4% everywhere.
    assert torch.equal(scaled[0], (once[0].float() * torch.tensor(scale)).to(dtype))
    for a, b, c in zip(once, scaled, again):
        # The others are kept in fp32 and rounded after scaling: within one rounding.
        assert_rel_close(b, a.float() * scale, 1e-6 if b.dtype == torch.float32 else 2**-7,
                         "scaled")
        assert torch.equal(a, c)  # saved gradients are not scaled in place


def test_no_grad_computes_the_loss_only():
    hidden, weight, labels, lora = make_case(rank=2)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, labels, chunk_size=16, lora=lora)
        ref = linear_cross_entropy_reference(hidden, weight, labels, lora=lora)
    assert loss.grad_fn is None and not loss.requires_grad
    assert_rel_close(loss, ref, 1e-5, "loss")


def test_default_chunk_size():
    assert default_chunk_size(32064, "cuda") == 2**26 // 32064 == 2092  # 256 MB of fp32 logits
    assert default_chunk_size(32064, "cpu") == 2**23 // 32064
    assert default_chunk_size(10**9) == 1


def test_shape_errors_name_the_shapes():
    hidden, weight, labels, lora = make_case(N=6, H=4, V=5)
    with pytest.raises(ValueError, match=r"\[N, H\].*\(2, 3, 4\)"):
        linear_cross_entropy(hidden.reshape(2, 3, 4), weight, labels)
    with pytest.raises(ValueError, match=r"weight \(5, 3\) for hidden \(6, 4\)"):
        linear_cross_entropy(hidden, weight[:, :3], labels)
    with pytest.raises(ValueError, match=r"labels \(5,\) for hidden \(6, 4\)"):
        linear_cross_entropy(hidden, weight, labels[:5])
    with pytest.raises(ValueError, match=r"share a dtype"):
        linear_cross_entropy(hidden, weight.double(), labels)
    with pytest.raises(ValueError, match=r"lora_A must be \[r, H\] with H = 4, got \(2, 3\)"):
        linear_cross_entropy(hidden, weight, labels,
                             lora=(torch.zeros(2, 3), torch.zeros(5, 2), 1.0))
    with pytest.raises(ValueError, match=r"lora_B must be \[V, r\] = \[5, 2\].*got \(4, 2\)"):
        linear_cross_entropy(hidden, weight, labels,
                             lora=(torch.zeros(2, 4), torch.zeros(4, 2), 1.0))
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(hidden, weight, labels, chunk_size=0)
    bad = torch.tensor([0, 1, 5, IGNORE, 2, 3])
    with pytest.raises(ValueError, match=r"label 5 at row 2 is outside \[0, 5\)"):
        linear_cross_entropy(hidden, weight, bad)


def peak_cpu_bytes(fn, trace_path) -> int:
    """Peak bytes held by torch's CPU allocator while ``fn`` runs, above what was held before.

    From the profiler's memory events: each carries the allocator's running total.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    prof.export_chrome_trace(str(trace_path))
    events = [e["args"] for e in json.loads(trace_path.read_text())["traceEvents"]
              if e.get("name") == "[memory]"]
    assert events, "the profiler recorded no memory events"
    before = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(e["Total Allocated"] for e in events) - before


def test_peak_memory_is_one_chunk_not_the_logits(tmp_path):
    """Forward + backward: the reference holds several [N, V] fp32 tensors, we hold one [c, V]
    chunk."""
    N, H, V, chunk = 512, 32, 4000, 64
    hidden, weight, labels, _ = make_case(N=N, H=H, V=V)
    logits_bytes, chunk_bytes = N * V * 4, chunk * V * 4

    def step(fn, **kwargs):
        hidden.grad = None
        fn(hidden, weight, labels, **kwargs).backward()

    ours = peak_cpu_bytes(lambda: step(linear_cross_entropy, chunk_size=chunk),
                          tmp_path / "ours.json")
    reference = peak_cpu_bytes(lambda: step(linear_cross_entropy_reference), tmp_path / "ref.json")
    assert reference >= 2 * logits_bytes  # the measurement sees the logits and their gradient
    # By design: grad_hidden and the returned gradient ([N, H] each), the chunk's logits
    # (overwritten by their gradient) and [c]-sized row stats; one spare chunk of slack.
    assert ours <= 2 * N * H * 4 + 2 * chunk_bytes, (ours, chunk_bytes)
    assert ours < logits_bytes / 4 < reference / 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_phi3_mini_head_memory_on_gpu():
    """N=8192 tokens, V=32064, H=3072 bf16, frozen head: same loss and grad, a fraction of the
    memory."""
    N, H, V = 8192, 3072, 32064
    torch.manual_seed(0)
    hidden = torch.randn(N, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(V, H, device="cuda") / H**0.5 * 2).to(torch.bfloat16)
    labels = torch.randint(0, V, (N,), device="cuda")
    labels[::5] = IGNORE

    def measure(fn):
        hidden.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss = fn(hidden, weight, labels)
        loss.backward()
        torch.cuda.synchronize()
        return loss.detach(), hidden.grad.clone(), torch.cuda.max_memory_allocated() - before

    loss, grad, ours = measure(linear_cross_entropy)
    ref_loss, ref_grad, reference = measure(linear_cross_entropy_reference)
    chunk_fp32 = default_chunk_size(V, "cuda") * V * 4  # ≤ 256 MB
    print(f"peak above inputs: ours {ours / 2**20:.0f} MiB, reference {reference / 2**20:.0f} MiB")
    # cuBLAS may round a chunk's bf16 logits differently
    assert_rel_close(loss, ref_loss, 1e-3, "loss")
    assert_rel_close(grad, ref_grad, GRAD_TOL[torch.bfloat16], "grad hidden")
    assert reference > 2 * N * V * 4  # fp32 logits and their gradient, 1 GB each
    # grad_hidden, the returned gradient and .grad ([N, H] bf16 each) plus a chunk's
    # fp32 logits, its bf16 copies before and after the loss, and cuBLAS workspace.
    assert ours < 3 * N * H * 2 + 3 * chunk_fp32 + 64 * 2**20
    assert ours < reference / 4
