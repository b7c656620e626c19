"""Linear layer + cross entropy in row chunks: the LM head's loss without its [N, V] logits.

Models call it through ``lorakernels.functional.lm_head_loss(head, hidden, labels)``,
which passes a LoRA head's adapter as ``lora=(A, B, scaling)`` (or, when that head's
dropout is live, takes the plain logits path: dropout is not drawn here)::

    # hidden [N, H], weight [V, H], labels [N], bias [V] or None
    loss_sum = linear_cross_entropy(hidden, weight, labels, lora=None, bias=None)

``loss_sum`` equals ``F.cross_entropy((hidden @ weight.T + bias).float(), labels,
ignore_index=-100, reduction="sum")`` (``reference.linear_cross_entropy_reference``), as an fp32
scalar.

How: an autograd.Function walks the rows in chunks of ``chunk_size``. For each
chunk, forward computes the logits (matmul in the inputs' dtype, then fp32),
the loss, and at once the gradient of the loss with respect to the logits,
``softmax - onehot`` (zero on ignored rows), which it turns into that chunk's
gradients: ``d_hidden = d_logits·W`` (rows of a [N, H] buffer), and only for
inputs that need them ``d_W += d_logitsᵀ·hidden`` (fp32), ``d_bias``, ``d_B``, ``d_A``. It
keeps those gradients instead of logits; backward only scales them by the
incoming gradient. Peak extra memory is one chunk's fp32 logits (overwritten in
place by their gradient; bf16/fp16 inputs add a copy in their dtype) plus the
gradients, which are the size of the inputs themselves.
Without grad mode (evaluation) only the loss is computed, chunk by chunk.

The same approach as Liger-Kernel's fused linear cross entropy, written here in
plain PyTorch, so it runs on any device; the work is the same two (three with a
trainable weight) matmuls the unchunked loss does, in chunks. The two with the
[V, H] weight run on oneDNN for fp32 CPU tensors (see ``onednn_lora_linear.linear``).
"""
from typing import NamedTuple, Optional, Union

import torch
from torch._subclasses.fake_tensor import is_fake

from ..reference import LoRAAdapter
from .onednn_lora_linear import linear

# Elements of one chunk's fp32 logits. GPU: 2**26 = 256 MB (2092 rows at V = 32064), large
# enough that the chunk's GEMMs stay efficient. CPU: 2**23 = 32 MB (261 rows), measured
# faster there than large chunks: at N=2048, V=32064, H=256 on 2 cores, forward+backward took
# 0.16 s in bf16 (0.29 s as one 2048-row chunk) and 0.43 s in fp32 (0.48 s).
DEFAULT_CHUNK_ELEMENTS = {"cuda": 2**26, "cpu": 2**23}


def default_chunk_size(vocab_size: int, device: Union[str, torch.device] = "cuda") -> int:
    """Rows per chunk so that one chunk's fp32 logits are at most 256 MB on GPU, 32 MB on CPU."""
    elements = DEFAULT_CHUNK_ELEMENTS.get(torch.device(device).type, DEFAULT_CHUNK_ELEMENTS["cuda"])
    return max(1, elements // max(1, vocab_size))


def _check_inputs(hidden, weight, labels, lora, chunk_size, bias) -> None:
    if hidden.dim() != 2:
        raise ValueError("hidden must be [N, H] (flatten batch and time first), "
                         f"got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"weight must be [V, H] with H = hidden.shape[1] = {hidden.shape[1]}, "
            f"got weight {tuple(weight.shape)} for hidden {tuple(hidden.shape)}"
        )
    if labels.shape != hidden.shape[:1]:
        raise ValueError(
            f"labels must be [N] with N = hidden.shape[0] = {hidden.shape[0]}, "
            f"got labels {tuple(labels.shape)} for hidden {tuple(hidden.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")
    if hidden.dtype != weight.dtype:
        raise ValueError("hidden and weight must share a dtype, "
                         f"got {hidden.dtype} and {weight.dtype}")
    if not hidden.dtype.is_floating_point:
        raise ValueError(f"hidden must be floating point, got dtype {hidden.dtype}")
    if bias is not None and (bias.shape != weight.shape[:1] or bias.dtype != weight.dtype):
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}] in the weight's dtype "
                         f"{weight.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if lora is not None:
        if len(lora) != 3:
            raise ValueError("lora must be (lora_A, lora_B, scaling)")
        lora_A, lora_B, _ = lora
        V, H = weight.shape
        if lora_A.dim() != 2 or lora_A.shape[1] != H:
            raise ValueError(f"lora_A must be [r, H] with H = {H}, got {tuple(lora_A.shape)}")
        if lora_B.dim() != 2 or lora_B.shape != (V, lora_A.shape[0]):
            raise ValueError(
                f"lora_B must be [V, r] = [{V}, {lora_A.shape[0]}] "
                f"for weight {tuple(weight.shape)} "
                f"and lora_A {tuple(lora_A.shape)}, got {tuple(lora_B.shape)}"
            )
        if lora_A.dtype != lora_B.dtype:
            raise ValueError("lora_A and lora_B must share a dtype, "
                             f"got {lora_A.dtype} and {lora_B.dtype}")


def _check_label_range(labels: torch.Tensor, ignore_index: int, vocab_size: int) -> torch.Tensor:
    """The [N] bool mask of rows that carry a loss; raises on labels outside [0, V).

    Fake labels (FakeTensorMode: a memory plan) have no values to check.
    """
    valid = labels != ignore_index
    if is_fake(labels):
        return valid
    bad = valid & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):  # one host sync per call; F.cross_entropy would fail less clearly
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"label {int(labels[row])} at row {row} is outside [0, {vocab_size}) "
            f"and is not ignore_index={ignore_index}"
        )
    return valid


def _chunk_logits(h, weight, bias, lora, acc_dtype):
    """[c, V] logits in ``acc_dtype`` (a fresh tensor, safe to overwrite); also h·Aᵀ with LoRA."""
    logits = linear(h, weight, bias).to(acc_dtype)
    if lora is None:
        return logits, None
    lora_A, lora_B, scaling = lora
    low = h.to(lora_A.dtype) @ lora_A.t()  # [c, r], in the adapters' dtype as in the layer
    logits.addmm_(low.to(acc_dtype), lora_B.t().to(acc_dtype), alpha=scaling)
    return logits, low


def _chunk_loss(logits, target, valid):
    """Summed loss of a chunk's rows that carry one."""
    lse = torch.logsumexp(logits, dim=1)
    picked = logits.gather(1, target[:, None]).squeeze(1)
    return torch.where(valid, lse - picked, torch.zeros_like(lse)).sum()


def _chunk_loss_and_grad_logits(logits, target, valid):
    """Summed loss of a chunk and d loss / d logits = softmax - onehot, zero on ignored rows.

    The gradient is built in place of ``logits`` (which it overwrites) with one exp
    pass: e = exp(z - max), softmax = e / sum(e), lse = max + log(sum(e)).
    """
    picked = logits.gather(1, target[:, None])
    row_max = logits.amax(dim=1, keepdim=True)
    exps = logits.sub_(row_max).exp_()
    row_sum = exps.sum(dim=1, keepdim=True)
    loss = torch.where(valid[:, None], row_max + row_sum.log() - picked,
                       torch.zeros_like(picked)).sum()
    keep = valid[:, None].to(exps.dtype)
    grad_logits = exps.mul_(keep / row_sum)
    grad_logits.scatter_add_(1, target[:, None], -keep)
    return loss, grad_logits


def linear_cross_entropy_loss_only(hidden, weight, labels, ignore_index, chunk_size, lora=None,
                                   bias=None):
    """The summed loss, chunk by chunk, with no gradients kept (evaluation)."""
    acc_dtype = torch.promote_types(hidden.dtype, torch.float32)
    valid = _check_label_range(labels, ignore_index, weight.shape[0])
    target = torch.where(valid, labels, torch.zeros_like(labels)).long()
    loss = torch.zeros((), dtype=acc_dtype, device=hidden.device)
    with torch.no_grad():
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            logits, _ = _chunk_logits(hidden[rows], weight, bias, lora, acc_dtype)
            loss += _chunk_loss(logits, target[rows], valid[rows])
    return loss


class LossOptions(NamedTuple):
    """The loss's numbers that take no gradient: the LoRA scale, the label that carries no
    loss, the rows of a chunk."""

    scaling: float
    ignore_index: int
    chunk_size: int


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Loss and every needed gradient in forward, chunk by chunk; backward scales them.

    Inputs: hidden [N, H], weight [V, H], bias [V] or None, labels [N], lora_A [r, H] or
    None, lora_B [V, r] or None, ``LossOptions``. Output: the summed loss, a 0-d tensor in
    fp32 (fp64 for fp64 inputs).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, lora_A, lora_B, options: LossOptions):
        scaling, ignore_index, chunk_size = options
        need_hidden, need_weight, need_bias, _, need_A, need_B = ctx.needs_input_grad[:6]
        lora = None if lora_A is None else (lora_A, lora_B, scaling)
        acc_dtype = torch.promote_types(hidden.dtype, torch.float32)
        N, V = hidden.shape[0], weight.shape[0]
        valid = _check_label_range(labels, ignore_index, V)
        target = torch.where(valid, labels, torch.zeros_like(labels)).long()

        loss = torch.zeros((), dtype=acc_dtype, device=hidden.device)
        # Every row of grad_hidden is written by its chunk (ignored rows with zeros).
        grad_hidden = (torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
                       if need_hidden else None)
        # Weight and adapter gradients accumulate over chunks, so in fp32 (or wider).
        grad_weight = (torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device)
                       if need_weight else None)
        grad_bias = torch.zeros((V,), dtype=acc_dtype, device=weight.device) if need_bias else None
        grad_A = grad_B = None
        if lora is not None:
            lora_acc = torch.promote_types(lora_A.dtype, acc_dtype)
            A_acc, B_acc = lora_A.to(lora_acc), lora_B.to(lora_acc)
            grad_A = (torch.zeros(lora_A.shape, dtype=lora_acc, device=lora_A.device)
                      if need_A else None)
            grad_B = (torch.zeros(lora_B.shape, dtype=lora_acc, device=lora_B.device)
                      if need_B else None)

        for start in range(0, N, chunk_size):
            rows = slice(start, start + chunk_size)
            h, chunk_valid, chunk_target = hidden[rows], valid[rows], target[rows]
            logits, low = _chunk_logits(h, weight, bias, lora, acc_dtype)
            chunk_loss, grad_logits = _chunk_loss_and_grad_logits(logits, chunk_target, chunk_valid)
            loss += chunk_loss
            # The base matmuls run in the inputs' dtype, as autograd would run the reference's.
            grad_logits_low = grad_logits.to(hidden.dtype) if need_hidden or need_weight else None

            grad_low = None
            if lora is not None and (need_hidden or need_A):
                grad_low = (grad_logits.to(lora_acc) @ B_acc).mul_(scaling)  # [c, r]
            if need_hidden:
                chunk_grad = linear(grad_logits_low, weight.t())
                if grad_low is not None:
                    chunk_grad = chunk_grad.to(lora_acc).addmm_(grad_low, A_acc)
                grad_hidden[rows] = chunk_grad
            if need_weight:
                grad_weight += grad_logits_low.t() @ h
            if need_bias:
                grad_bias += grad_logits.sum(dim=0)
            if need_A:
                grad_A.addmm_(grad_low.t(), h.to(lora_acc))
            if need_B:
                grad_B.addmm_(grad_logits.to(lora_acc).t(), low.to(lora_acc), alpha=scaling)
            del logits, grad_logits, grad_logits_low, grad_low  # free the chunk before the next one

        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias, grad_A, grad_B)
        ctx.dtypes = (hidden.dtype, weight.dtype, weight.dtype,
                      None if lora is None else lora_A.dtype,
                      None if lora is None else lora_B.dtype)
        ctx.chunk_size = chunk_size
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grads = [None if g is None else _scaled(g, grad_output, dtype, ctx.chunk_size)
                 for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        grad_hidden, grad_weight, grad_bias, grad_A, grad_B = grads
        return grad_hidden, grad_weight, grad_bias, None, grad_A, grad_B, None


def _scaled(grad: torch.Tensor, grad_output: torch.Tensor, dtype: torch.dtype,
            rows: int) -> torch.Tensor:
    """grad · grad_output in ``dtype``, multiplied in fp32 a block of rows at a time.

    Not ``grad * grad_output`` on a bf16 grad: on GPU that rounds the scale (e.g.
    1/tokens) to bf16 first, biasing every element the same way by up to 0.4%.
    The saved gradient is left as it is, so backward can run again (retain_graph).
    """
    scaled = torch.empty(grad.shape, dtype=dtype, device=grad.device)
    for start in range(0, grad.shape[0], rows):
        block = slice(start, start + rows)
        scaled[block] = grad[block].to(grad_output.dtype) * grad_output
    return scaled


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunk_size: Optional[int] = None,
    lora: Optional[LoRAAdapter] = None,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Summed cross entropy of ``hidden @ weight.T + bias`` (+ LoRA term) against ``labels``.

    hidden: [N, H] (fp32, bf16 or fp16), weight: [V, H] in hidden's dtype, labels: [N]
    integer ids, ``ignore_index`` rows carry no loss and get zero gradient. ``lora``:
    ``(lora_A [r, H], lora_B [V, r], scaling)`` adds ``s·(hidden·Aᵀ)·Bᵀ`` to the logits;
    ``bias`` [V] (the head's, in the weight's dtype) is added to them too.
    ``chunk_size``: rows per chunk, default ``default_chunk_size(V, device)`` (fp32
    logits of at most 256 MB on GPU, 32 MB on CPU). Returns a 0-d fp32 tensor
    (reduction="sum"); with all rows ignored it is 0 and every gradient is zero. Never builds
    the [N, V] logits.
    """
    if chunk_size is None:
        chunk_size = default_chunk_size(weight.shape[0] if weight.dim() == 2 else 1, hidden.device)
    _check_inputs(hidden, weight, labels, lora, chunk_size, bias)
    lora_A, lora_B, scaling = (None, None, 0.0) if lora is None else lora
    tensors = [t for t in (hidden, weight, bias, lora_A, lora_B) if t is not None]
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return linear_cross_entropy_loss_only(hidden, weight, labels, ignore_index, chunk_size,
                                              lora, bias)
    return LinearCrossEntropyFunction.apply(
        hidden, weight, bias, labels, lora_A, lora_B,
        LossOptions(float(scaling), ignore_index, chunk_size))
