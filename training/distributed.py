"""Training over several processes under torchrun: DDP or FSDP2, over NCCL or gloo.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them this is one process and
every method is a no-op. Each rank reads its own slice of every global batch; only
rank 0 logs and writes files.
"""
import contextlib
import os
from dataclasses import dataclass
from typing import Dict

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from model.build import resolve_device


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str) -> "Distributed":
        """Join the process group torchrun described (NCCL on CUDA, gloo on CPU), if any."""
        if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
            return cls()
        context = cls(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                      int(os.environ.get("LOCAL_RANK", 0)))
        on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        if on_cuda:
            torch.cuda.set_device(context.local_rank)
        dist.init_process_group("nccl" if on_cuda else "gloo")
        return context

    def device(self, name: str) -> torch.device:
        """This rank's device: cuda:LOCAL_RANK on GPUs."""
        device = resolve_device(name)
        if device.type == "cuda" and device.index is None and self.enabled:
            return torch.device("cuda", self.local_rank)
        return device

    def sum(self, value: float) -> float:
        """``value`` added up over all ranks."""
        if not self.enabled:
            return value
        total = torch.tensor([float(value)], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            total = total.cuda()
        dist.all_reduce(total)
        return total.item()

    def wrap(self, step_loss: torch.nn.Module, device: torch.device, strategy: str,
             planning: bool = False) -> torch.nn.Module:
        """``ddp``: each rank holds the model, only the LoRA gradients are averaged.
        ``fsdp``: FSDP2 ``fully_shard`` of every decoder layer and of the rest, so each rank
        holds 1/world_size of the base and LoRA weights and of the optimizer state.
        ``planning``: the weights are fake (a memory plan), so DDP compares and broadcasts no
        values at the start, and the mesh's table of ranks is made of real numbers."""
        if not self.enabled:
            return step_loss
        if strategy == "fsdp":
            with unset_fake_temporarily() if planning else contextlib.nullcontext():
                mesh = init_device_mesh(device.type, (self.world_size,))
            for layer in step_loss.model.model.layers:
                fully_shard(layer, mesh=mesh)
            return fully_shard(step_loss, mesh=mesh)
        ids = [device.index] if device.type == "cuda" else None
        # Buffers (RoPE tables, NF4 weights) are the same on every rank: broadcasting them
        # each step would only cost time (a 4-bit Phi-3-mini's are ~1.9 GB).
        return torch.nn.parallel.DistributedDataParallel(step_loss, device_ids=ids,
                                                         broadcast_buffers=False,
                                                         init_sync=not planning)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def full_tensors(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """FSDP shards gathered into whole tensors (a collective: every rank calls it)."""
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in tensors.items()}


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``like``: its shard of it when ``like`` is an FSDP DTensor."""
    full = full.to(like.device)
    if isinstance(like, DTensor):
        return distribute_tensor(full, like.device_mesh, like.placements)
    return full
