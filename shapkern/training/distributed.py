"""The process group of a run: one process, or several under ``torchrun`` (DDP)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DEVICES", "Distributed", "autocast"]

DEVICES = ("auto", "cuda", "cpu")


@dataclass
class Distributed:
    """Rank, world size and device of this process; gloo on the CPU, nccl on CUDA.

    Attributes:
        rank, world: this process and the number of processes.
        device: where this process trains.
    """

    rank: int
    world: int
    device: torch.device

    @classmethod
    def from_environment(cls, device: str = "auto") -> Distributed:
        """Join the process group that ``torchrun`` describes (WORLD_SIZE, LOCAL_RANK), if any."""
        if device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available")
        cuda = torch.cuda.is_available() and device in ("auto", "cuda")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        where = torch.device("cuda", local) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(where)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        if dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), where)
        return cls(0, 1, where)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` in DistributedDataParallel when there are several processes, as is otherwise."""
        if self.world == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over all processes (float64, one all-reduce)."""
        if self.world == 1:
            return list(values)
        # nccl reduces device tensors only; gloo takes CPU tensors.
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def autocast(device: torch.device):
    """bf16 autocast on CUDA, a no-op context elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
