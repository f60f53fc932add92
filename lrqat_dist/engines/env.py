"""The process's place in the job: rank, world size, device and compute dtype, and the few collectives
the loop needs.

Launchers (``torchrun``, the ``deepspeed`` launcher, SLURM wrappers) describe the job in the
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); nothing
node-specific is hard-coded here.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..dtypes import DTYPES
from .config import TrainConfig


def launched_world_size() -> int:
    """``WORLD_SIZE`` set by the launcher (1 when started as a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(train: TrainConfig, local_rank: int = 0) -> torch.device:
    """``train.device``: ``auto`` = this process's CUDA device when CUDA is available, else CPU."""
    kind = train.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.device: 'cuda' requested but CUDA is not available")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def resolve_dtype(train: TrainConfig, device: torch.device) -> torch.dtype:
    """``train.dtype`` = compute dtype of the frozen model and activations; ``auto``: bf16 on GPU, fp32 on CPU.

    The trainable tensors (A, B, s) stay fp32 Parameters whatever this is: they are their own masters.
    """
    if train.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[train.dtype]


def claim_device(train: TrainConfig) -> torch.device:
    """This process's device from ``train.device`` and LOCAL_RANK, made current when it is a GPU."""
    device = resolve_device(train, local_rank())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def default_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def standalone_env() -> dict[str, str]:
    """For a process started without a launcher (plain ``python``): the variables a launcher would
    set for a one-process job (rank 0 of 1, a free local port). Empty when a launcher (torchrun,
    deepspeed, mpirun) described the job. The engines put these in ``os.environ`` before joining."""
    if "RANK" in os.environ or "OMPI_COMM_WORLD_SIZE" in os.environ or "PMI_SIZE" in os.environ:
        return {}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


@dataclass(frozen=True)
class DistEnv:
    """Where this process runs. ``world_size == 1`` needs no process group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """Sum (or ``max``) a few numbers across ranks, in float64."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank."""
        return self.all_reduce([1.0 if flag else 0.0], "max")[0] > 0

    def all_gather(self, value: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's copy of an equally shaped small tensor (on the CPU)."""
        t = value.detach().to(self.device)
        if not self.distributed:
            return [t.cpu()]
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t)
        return [o.cpu() for o in out]

    def broadcast_object(self, obj, src: int = 0):
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
