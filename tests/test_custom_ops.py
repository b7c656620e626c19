"""Every Triton launch is a torch custom op (``torch.library.custom_op``) with a fake
implementation: ``opcheck`` runs each real op (under the interpreter on CPU) against its fake
one (shapes, dtypes, strides, schema, autograd registration); a whole LoRA, DoRA or QLoRA
call allocates the same bytes on fake tensors as on real ones; and a decoder layer with LoRA
on the Triton backend traces under torch.compile(fullgraph=True) without a graph break."""
import contextlib

import pytest
import torch
import torch._dynamo
from torch._subclasses.fake_tensor import FakeTensorMode

from lorakernels import settings
from lorakernels.dora import row_sq_norms
from lorakernels.functional import dora_linear, lora_linear
from lorakernels.lora_call import LoRACall
from lorakernels.memory_count import LiveBytes
from lorakernels.nf4 import quantize_nf4
# Importing an op's module registers it.
import lorakernels.ops.cublas_epilogue  # noqa: F401
import lorakernels.ops.lora_linear  # noqa: F401
import lorakernels.ops.rms_norm  # noqa: F401
import lorakernels.ops.rope  # noqa: F401
import lorakernels.ops.swiglu  # noqa: F401
from lorakernels.parts import LoRAParts
from training.memory_plan import forget_process_caches

ops = torch.ops.lorakernels
ALL_OPS = ("swiglu_forward", "swiglu_backward", "rms_norm_forward", "rms_norm_backward",
           "rope_rotate", "nf4_dequantize", "fused_gemm", "add_lowrank", "lora_shrink",
           "lora_grad_s_b", "lora_grad_a")


def randn(*shape, dtype=torch.float32, grad=False):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def bits(M, K):
    """A dropout mask's bits [M, ceil(K/32)] int32, as F1 writes them."""
    return torch.randint(-2**31, 2**31 - 1, (M, -(-K // 32)), dtype=torch.int32)


def nf4_tensors(N, K):
    q = quantize_nf4(torch.randn(N, K))
    return q, [q.absmax_q, q.absmax_scale]


def op_cases():
    M, K, N, R = 8, 64, 48, 4
    q, absmax = nf4_tensors(N, K)
    lowrank = [randn(M, R), randn(N, R), None, None, None]
    dropped = [randn(M, R), randn(N, R), None, None, bits(M, N)]
    b_row = torch.arange(N, dtype=torch.int32) % 24
    b_off = torch.zeros(N, dtype=torch.int32)
    yield "swiglu_forward", (randn(M, 2 * N, grad=True),)
    yield "swiglu_backward", (randn(M, N), randn(M, 2 * N))
    yield "rms_norm_forward", (randn(M, K, grad=True), randn(K, grad=True), 1e-5)
    yield "rms_norm_backward", (randn(M, K), randn(M, K), randn(K), randn(M).abs(), True)
    cos, sin = randn(2, 5, 16), randn(2, 5, 16)
    yield "rope_rotate", (randn(2, 4, 5, 16, grad=True), randn(2, 2, 5, 16, grad=True), cos, sin,
                          False)
    yield "rope_rotate", (randn(2, 4, 5, 32), randn(2, 2, 5, 32), cos, sin, True)  # partial
    yield "nf4_dequantize", (q.packed, *absmax, q.absmax_offset, torch.empty(N, K))
    yield "fused_gemm", (randn(M, K), randn(N, K).t(), [None, None, *lowrank, randn(N), None,
                                                        None], [0.0, 0.5, 0.0], [])
    yield "fused_gemm", (randn(M, K), q.packed, [*absmax, *dropped, None, randn(N), None],
                         [q.absmax_offset, 0.5, 0.25], [N, K, 1])
    yield "fused_gemm", (randn(M, N), q.packed, [*absmax, *[None] * 8], [q.absmax_offset, 0, 0],
                         [N, K, 0])
    yield "add_lowrank", (randn(M, N), [*dropped, randn(N), randn(N)], [0.5, 0.25])
    yield "lora_shrink", (randn(M, K), randn(R, K), 0.0, 0)
    yield "lora_shrink", (randn(M, K), randn(R, K), 0.25, 7)
    yield "lora_grad_s_b", (randn(M, N), randn(M, 2 * R), randn(24, R),
                            [b_row, b_off, None, None, None], 0.5, R, False)
    yield "lora_grad_s_b", (randn(M, N), randn(M, R), randn(N, R),
                            [None, None, randn(N), randn(M, N), randn(N)], 0.5, R, True)
    yield "lora_grad_a", (randn(M, R), randn(M, K), 0.0, None)
    yield "lora_grad_a", (randn(M, R), randn(M, K), 0.25, bits(M, K))


@pytest.mark.parametrize("case", list(op_cases()), ids=lambda case: case[0])
def test_opcheck(case):
    name, args = case
    torch.library.opcheck(getattr(ops, name).default, args,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))


def test_every_launch_is_covered():
    assert {name for name, _ in op_cases()} == set(ALL_OPS)
    for name in ALL_OPS:
        assert torch._library.simple_registry.singleton.find(f"lorakernels::{name}").fake_impl \
            .kernel is not None


def _peak_bytes(call, fake: bool) -> int:
    """Peak live bytes of ``call()`` forward and backward, on real or fake tensors."""
    forget_process_caches()
    torch.manual_seed(0)
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    with settings.override(backend="triton"), mode, LiveBytes() as count:
        call().float().sum().backward()
    forget_process_caches()
    return count.peak_bytes


def _lora_call(dora=False, nf4=False, parts=None, dropout_p=0.0, rows=40):
    K, N, r = 64, 96, 4
    groups = 1 if parts is None else parts.num_enabled
    n_lora = N if parts is None else parts.lora_out_features

    def call():
        x = torch.randn(rows, K, requires_grad=True)
        weight = torch.randn(N, K)
        A, B = torch.randn(r * groups, K, requires_grad=True), torch.randn(n_lora, r,
                                                                          requires_grad=True)
        base = quantize_nf4(weight) if nf4 else weight
        if dora:
            lora = LoRACall(A, B, 0.5, magnitude=torch.rand(N, requires_grad=True) + 0.5)
            return dora_linear(x, base, None, lora, row_sq_norms(weight).float())
        return lora_linear(x, base, torch.randn(N), LoRACall(A, B, 0.5, dropout_p, parts))
    return call


@pytest.mark.parametrize("options", [
    dict(), dict(dropout_p=0.25), dict(parts=LoRAParts((32, 32, 32), (True, False, True))),
    dict(dora=True), dict(nf4=True), dict(nf4=True, rows=8), dict(nf4=True, dora=True)],
    ids=["lora", "dropout", "parts", "dora", "nf4 dequantised", "nf4 tiles", "nf4 dora"])
def test_fake_call_allocates_what_the_real_one_does(options):
    """The fake implementations' outputs are the real launches': the same peak of live bytes
    over a whole forward and backward (up to 16 bytes: the LoRA calls' fake and real peaks
    differ by 8, a scalar outside the ops, not yet traced)."""
    real = _peak_bytes(_lora_call(**options), fake=False)
    assert real > 10_000
    assert _peak_bytes(_lora_call(**options), fake=True) == pytest.approx(real, abs=16)


def _decoder_layer():
    from model.config import Phi3Config
    from model.lora import apply_lora
    from model.phi3 import Phi3ForCausalLM

    torch.manual_seed(0)
    config = Phi3Config.from_name("phi3-tiny")
    model = Phi3ForCausalLM(config)
    apply_lora(model, r=4, lora_dropout=0.0)
    x = torch.randn(1, 16, config.hidden_size, requires_grad=True)
    cos, sin = model.model.rotary_emb(torch.arange(16)[None], x.dtype)
    return model.model.layers[0], (x, cos, sin)


def _called_ops(graph_module) -> set:
    """lorakernels ops called in a graph and its subgraphs (autograd.Function bodies)."""
    return {str(node.target).split(".")[1] for gm in graph_module.modules()
            if isinstance(gm, torch.fx.GraphModule) for node in gm.graph.nodes
            if node.op == "call_function" and str(node.target).startswith("lorakernels.")}


def test_decoder_layer_compiles_without_a_graph_break():
    """Dynamo traces one LoRA decoder layer on the Triton backend whole (fake tensors only:
    nothing runs), every kernel an op in the graph."""
    layer, args = _decoder_layer()
    torch._dynamo.reset()
    with settings.override(backend="triton"):
        explained = torch._dynamo.explain(layer)(*args)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert len(explained.graphs) == 1
    called = _called_ops(explained.graphs[0])
    assert {"rms_norm_forward", "rope_rotate", "swiglu_forward", "lora_shrink",
            "fused_gemm"} <= called


def test_compiled_decoder_layer_matches_eager():
    """fullgraph with AOTAutograd (aot_eager: the joint forward/backward graph traced on fake
    tensors, then run by the interpreter): the compiled layer's output and gradients are the
    eager ones."""
    layer, (x, cos, sin) = _decoder_layer()
    torch._dynamo.reset()
    with settings.override(backend="triton"):
        eager = layer(x, cos, sin)
        eager.sum().backward()
        eager_grads = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()
                                          if p.requires_grad]
        layer.zero_grad(), x.grad.zero_()
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")(x, cos, sin)
        compiled.sum().backward()
    grads = [x.grad] + [p.grad for p in layer.parameters() if p.requires_grad]
    torch.testing.assert_close(compiled, eager)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want)
