"""The process's place in the job: rank, world size, device and compute dtype, and the few collectives
the loop needs.

Launchers (``torchrun``, the ``deepspeed`` launcher, SLURM wrappers) describe the job in the
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); nothing
node-specific is hard-coded here. MPI-style launchers (``mpirun``, ``deepspeed --launcher openmpi``,
``srun`` without torchrun) set no ``LOCAL_RANK`` before the process group exists: the local rank is then
read from the MPI / SLURM variables (:data:`LOCAL_RANK_VARS`), so each process claims its own GPU.
``srun`` tasks without torchrun must also export ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` /
``MASTER_PORT`` (nothing here reads SLURM's rank and size); a multi-task step without them is refused
(:func:`standalone_env`) instead of starting every task as a one-process job.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping

import torch
import torch.distributed as dist

from ..dtypes import DTYPES
from .config import DistConfig, TrainConfig

logger = logging.getLogger(__name__)

# Where launchers put a process's rank on its node, first found wins: torchrun / the deepspeed launcher,
# Open MPI (mpirun, deepspeed --launcher openmpi), MVAPICH2, Intel MPI / MPICH (hydra), SLURM (srun).
LOCAL_RANK_VARS = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID",
                   "SLURM_LOCALID")


def launched_world_size() -> int:
    """``WORLD_SIZE`` set by the launcher (1 when started as a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank(environ: Mapping[str, str] | None = None) -> int:
    """This process's rank on its node: the first of :data:`LOCAL_RANK_VARS` that is set (0 if none).

    ``LOCAL_RANK`` (torchrun, the deepspeed launcher) wins; without it (MPI-style launchers set it only
    inside ``init_distributed``, after the device was claimed) the MPI / SLURM variable is used."""
    env = os.environ if environ is None else environ
    for key in LOCAL_RANK_VARS:
        value = env.get(key)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"{key}={value!r}: expected an integer local rank") from None
    return 0


def process_group_timeout(d: DistConfig) -> timedelta:
    """``dist.timeout_minutes`` as the timeout of every collective of the process group."""
    return timedelta(minutes=d.timeout_minutes)


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


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively (CUDA: compute capability 8.0+). Emulation does
    not count: ``torch.cuda.is_bf16_supported()`` says True on older GPUs too unless told
    ``including_emulation=False``. The CPU is not asked: ``auto`` picks fp32 there anyway."""
    if device.type != "cuda":
        return False
    return bool(torch.cuda.is_bf16_supported(including_emulation=False))


def resolve_dtype(train: TrainConfig, device: torch.device) -> torch.dtype:
    """``train.dtype`` = compute dtype of the frozen model and activations; ``auto``: bf16 on a GPU that
    supports it, else fp32 (CPU, and GPUs older than Ampere: fp16 is refused, it needs loss scaling).

    The trainable tensors (A, B, s) stay fp32 Parameters whatever this is: they are their own masters.
    """
    if train.dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        if bf16_supported(device):
            return torch.bfloat16
        logger.warning("train.dtype=auto: %s has no bfloat16 support; computing in float32 (float16 is "
                       "refused: it would need loss scaling)", device)
        return torch.float32
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
    # A multi-task job from a launcher we do not read rank and size from (srun without torchrun,
    # MVAPICH2): starting as "rank 0 of 1" would make every task train alone into the same output_dir.
    tasks = {v: os.environ[v] for v in ("SLURM_STEP_NUM_TASKS", "MV2_COMM_WORLD_SIZE") if v in os.environ}
    if any(n.strip().isdigit() and int(n) > 1 for n in tasks.values()):
        raise RuntimeError(f"this process is one of several tasks ({', '.join(f'{k}={v}' for k, v in tasks.items())}) "
                           "but RANK / WORLD_SIZE are not set: start each node with torchrun (or the deepspeed "
                           "launcher) inside the allocation, or export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR "
                           "and MASTER_PORT per task (docs/launch-deepspeed.md)")
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
