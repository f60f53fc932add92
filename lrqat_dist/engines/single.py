"""``dist.engine: none``: one process, one device, plain torch.

Checkpoint payload: ``train_state.pt`` = ``{"optimizer": ..., "scheduler": ...}`` state dicts; the
trainable tensors are the full copy the checkpoint layer writes for every engine
(``payload_holds_trainable = False``: it restores them before :meth:`SingleEngine.load`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base import poison_nonfinite
from .config import EngineConfig
from .env import DistEnv, claim_device, launched_world_size
from .torch_optim import TorchOptimizerEngine

TRAIN_STATE_FILE = "train_state.pt"


class SingleEngine(TorchOptimizerEngine):
    name = "none"
    payload_holds_trainable = False

    @classmethod
    def setup(cls, cfg: EngineConfig) -> DistEnv:
        if launched_world_size() > 1:
            raise ValueError(f"dist.engine: 'none' runs one process, but WORLD_SIZE={launched_world_size()}; "
                             "use dist.engine=deepspeed or fsdp2 for several processes")
        device = claim_device(cfg.train)
        return DistEnv(rank=0, world_size=1, local_rank=0, device=device)

    def __init__(self, model: nn.Module, cfg: EngineConfig, env: DistEnv):
        super().__init__(model.to(env.device), cfg, env)
        self._init_optimizer()

    def forward_backward(self, input_ids: torch.Tensor, last_micro: bool) -> torch.Tensor:
        loss = self.training_loss(input_ids)
        (poison_nonfinite(loss) / self.cfg.train.grad_accum).backward()
        return loss.detach()

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().float().cpu().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def save(self, path: Path) -> dict[str, Any]:
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                   path / TRAIN_STATE_FILE)
        return {"payload": TRAIN_STATE_FILE}

    def load(self, path: Path) -> None:
        state = torch.load(path / TRAIN_STATE_FILE, map_location=self.env.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
