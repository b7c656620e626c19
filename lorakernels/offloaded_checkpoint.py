"""Gradient checkpoints in host memory: each checkpointed layer's input waits in pinned host
memory instead of on the GPU, and comes back one layer ahead of the backward that needs it.

Checkpointing keeps one tensor per layer, its input (32 layers × 131,072 tokens × 3072 × 2 B
= 25.8 GB for Phi-3.5-mini at 128k). Offloaded, a layer's input is copied to pinned host
memory on a side CUDA stream while the layer's forward runs on the main stream; in backward,
layer i's input is fetched and the copy of layer i - 1's starts on the side stream, so it
arrives while layer i recomputes and backpropagates (Unsloth's offloaded gradient
checkpointing; torchtune's ``OffloadActivations``). The layer runs in forward under no_grad
and, in backward, again with grad from its fetched input, as reentrant checkpointing does;
the RNG state is restored for the recompute, so dropout draws the same masks.

Off CUDA there is nothing to overlap: a CPU tensor's "host copy" is a clone, and a fake
tensor's (a memory plan on fake tensors) is made on the meta device, which the plan counts
as host memory (``memory_count.LiveBytes(host_device="meta")``).
"""
from typing import Callable, Dict, List, Optional

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.utils.checkpoint import get_device_states, set_device_states

from . import settings

_side_streams: Dict[torch.device, "torch.cuda.Stream"] = {}


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device)
    return _side_streams[device]


def offloads_on(device: torch.device) -> bool:
    """Whether checkpoints offload on ``device``'s code path: the CUDA path only (a CPU's host
    memory is its memory: there ``offload`` is on-device checkpointing)."""
    return settings.current().on_cuda_path(device)


class OffloadedInputs:
    """One forward's layer inputs in host memory, in layer order, and their way back."""

    def __init__(self):
        self._host: List[Optional[torch.Tensor]] = []
        self._back: Dict[int, tuple] = {}  # index -> (device tensor, copy-done event or None)
        self._device: Optional[torch.device] = None

    def offload(self, x: torch.Tensor) -> int:
        """Start ``x``'s copy to host memory; its index for ``fetch``."""
        self._device = x.device
        if x.is_cuda:
            stream = _side_stream(x.device)
            stream.wait_stream(torch.cuda.current_stream(x.device))  # x is written
            host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            with torch.cuda.stream(stream):
                host.copy_(x, non_blocking=True)
            x.record_stream(stream)  # x's memory is not reused before the copy reads it
        elif is_fake(x):
            host = torch.empty_like(x, device="meta")
        else:
            host = x.detach().clone()
        self._host.append(host)
        return len(self._host) - 1

    def prefetch(self, index: int) -> None:
        """Start bringing input ``index`` back to the device (nothing if none or already)."""
        if index < 0 or index in self._back or self._host[index] is None:
            return
        host, self._host[index] = self._host[index], None
        if self._device.type == "cuda":
            stream = _side_stream(self._device)
            with torch.cuda.stream(stream):
                x = host.to(self._device, non_blocking=True)
            self._back[index] = (x, stream.record_event())
        else:
            self._back[index] = (torch.empty_like(host, device=self._device)
                                 if host.device.type == "meta" else host, None)

    def fetch(self, index: int) -> torch.Tensor:
        """Input ``index`` on the device, ready for the main stream."""
        self.prefetch(index)
        x, done = self._back.pop(index)
        if done is not None:
            main = torch.cuda.current_stream(self._device)
            main.wait_event(done)
            x.record_stream(main)
        return x


class OffloadedCheckpoint(torch.autograd.Function):
    """``run(x)`` with ``x`` kept in host memory until backward, which recomputes ``run``."""

    @staticmethod
    def forward(ctx, run: Callable, inputs: OffloadedInputs, x: torch.Tensor,
                _anchor: Optional[torch.Tensor]):
        ctx.run, ctx.inputs = run, inputs
        ctx.index = inputs.offload(x)
        ctx.cpu_rng = torch.get_rng_state()
        ctx.device_rng = get_device_states(x)
        with torch.no_grad():
            return run(x)

    @staticmethod
    def backward(ctx, grad_out):
        x = ctx.inputs.fetch(ctx.index).detach().requires_grad_(ctx.needs_input_grad[2])
        ctx.inputs.prefetch(ctx.index - 1)  # arrives while this layer recomputes
        with torch.random.fork_rng(devices=ctx.device_rng[0]):
            torch.set_rng_state(ctx.cpu_rng)
            set_device_states(*ctx.device_rng)
            with torch.enable_grad():
                out = ctx.run(x)
        torch.autograd.backward(out, grad_out)
        return None, None, x.grad, None


def offloaded_checkpoint(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                         inputs: OffloadedInputs) -> torch.Tensor:
    """``run(x)`` (a decoder layer) with its input in host memory until backward; ``inputs``
    is shared by the layers of one forward, in order, so each backward prefetches the last."""
    # The first layer's input (frozen embeddings) needs no gradient, but the LoRA weights
    # inside need this backward to run: an empty tensor that requires grad sees to it, without
    # autograd holding on to the input, as a leaf that requires grad would.
    anchor = None if x.requires_grad else torch.empty(0, device=x.device, requires_grad=True)
    return OffloadedCheckpoint.apply(run, inputs, x, anchor)
