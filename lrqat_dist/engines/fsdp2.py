"""``dist.engine: fsdp2``: torch ``fully_shard`` on each decoder layer, then on the root.

Every parameter (frozen embeddings and norms too) is sharded over a 1-D device mesh; the frozen
quantized weights are buffers and stay replicated. No MixedPrecisionPolicy: the frozen model is
already in the compute dtype (``train.dtype``) and A, B, s are fp32 masters used as they are, so
their gradients are reduced in fp32 (they are ~1% of the model, so this costs little).

Checkpoint payload: ``dcp/``, a torch.distributed.checkpoint of
``{"model": trainable parameters only, "optimizer": ..., "scheduler": ...}`` keyed by model names
(reshardable). :meth:`FSDP2Engine.read_payload_trainable` reads its ``model.*`` entries offline with
``no_dist=True`` (no process group; the optimizer state is not read).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from .base import decoder_layers, poison_nonfinite
from .config import EngineConfig
from .env import DistEnv, claim_device, default_backend, local_rank, process_group_timeout, standalone_env
from .torch_optim import TorchOptimizerEngine

DCP_DIR = "dcp"


class FSDP2Engine(TorchOptimizerEngine):
    name = "fsdp2"

    @classmethod
    def setup(cls, cfg: EngineConfig) -> DistEnv:
        device = claim_device(cfg.train)
        if not dist.is_initialized():
            backend = default_backend(device) if cfg.dist.backend == "auto" else cfg.dist.backend
            os.environ.update(standalone_env())
            dist.init_process_group(backend=backend, timeout=process_group_timeout(cfg.dist))
        return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank(), device)

    def __init__(self, model: nn.Module, cfg: EngineConfig, env: DistEnv):
        super().__init__(model, cfg, env)
        model.to(env.device)
        self.mesh = init_device_mesh(env.device.type, (env.world_size,))
        reshard = cfg.dist.reshard_after_forward
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=self.mesh, reshard_after_forward=reshard)
        fully_shard(model, mesh=self.mesh, reshard_after_forward=reshard)
        self._init_optimizer()

    def forward_backward(self, input_ids: torch.Tensor, last_micro: bool) -> torch.Tensor:
        # Reduce-scatter gradients only on the last micro-batch; earlier ones accumulate locally.
        self.model.set_requires_gradient_sync(last_micro)
        loss = self.training_loss(input_ids)
        (poison_nonfinite(loss) / self.cfg.train.grad_accum).backward()
        return loss.detach()

    def full_params(self, names: list[str]) -> dict[str, torch.Tensor]:
        params = dict(self.model.named_parameters())
        return {n: (params[n].full_tensor() if hasattr(params[n], "full_tensor") else params[n]).detach().clone()
                for n in names}

    @torch.no_grad()
    def assign_params(self, values: dict[str, torch.Tensor]) -> None:
        from torch.distributed.tensor import distribute_tensor

        params = dict(self.model.named_parameters())
        for n, v in values.items():
            p = params[n]
            if hasattr(p, "device_mesh"):  # a sharded DTensor: each rank keeps its own shard of v
                v = distribute_tensor(v.to(device=p.device, dtype=p.dtype), p.device_mesh, p.placements)
            p.copy_(v)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                full = p.full_tensor() if hasattr(p, "full_tensor") else p  # all-gather, every rank
                if self.env.is_main:
                    out[name] = full.detach().float().cpu().clone()
        return out

    def _state(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        keep = set(self.trainable_names)
        return {"model": {k: v for k, v in model_sd.items() if k in keep},
                "optimizer": optim_sd, "scheduler": self.scheduler.state_dict()}

    def save(self, path: Path) -> dict[str, Any]:
        dcp.save(self._state(), checkpoint_id=str(path / DCP_DIR))
        return {"payload": DCP_DIR}

    def load(self, path: Path) -> None:
        state = self._state()
        dcp.load(state, checkpoint_id=str(path / DCP_DIR))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"], options=StateDictOptions(strict=False))
        self.scheduler.load_state_dict(state["scheduler"])

    def load_resharded(self, path: Path, meta: dict[str, Any], params: dict[str, torch.Tensor]) -> None:
        # DCP stores each tensor with its global shape and the saved shards' offsets; loading into this
        # job's DTensor state dict reads whatever slices the new mesh needs, so the same load reshards.
        self.load(path)

    @classmethod
    def read_payload_trainable(cls, path: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
        return dcp_trainable(path / meta.get("payload", DCP_DIR), list(meta["trainable"]))


def dcp_trainable(dcp_dir: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """fp32 trainable tensors (``model.<name>`` entries) of a DCP checkpoint, read without a process group."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(dcp_dir))
    meta = reader.read_metadata().state_dict_metadata
    state = {}
    for n in names:
        entry = meta.get(f"model.{n}")
        if not isinstance(entry, TensorStorageMetadata):
            raise KeyError(f"{dcp_dir}: no tensor 'model.{n}' in the DCP checkpoint")
        state[n] = torch.empty(entry.size, dtype=entry.properties.dtype)
    dcp.load({"model": state}, storage_reader=reader, no_dist=True)
    return {n: t.float().contiguous() for n, t in state.items()}
