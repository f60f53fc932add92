"""What the engines that own a plain torch optimizer share (``none`` and ``fsdp2``; DeepSpeed owns its own)."""
from __future__ import annotations

import math

from torch import nn

from .base import Engine, clip_and_norm
from .config import EngineConfig
from .env import DistEnv
from .optim import build_optimizer, build_scheduler


class TorchOptimizerEngine(Engine):
    """AdamW + the LR-QAT schedule over ``model``'s trainable parameters, stepped with clipping.

    Subclasses place (and maybe shard) the model first, then call :meth:`_init_optimizer`.
    """

    def __init__(self, model: nn.Module, cfg: EngineConfig, env: DistEnv):
        super().__init__(model, cfg, env)
        self.model = model

    def _init_optimizer(self) -> None:
        self.optimizer = build_optimizer(self.model, self.cfg.train)
        self.scheduler = build_scheduler(self.optimizer, self.cfg.train, self.cfg.lr_windows)
        self._params = [p for p in self.model.parameters() if p.requires_grad]

    @property
    def module(self) -> nn.Module:
        return self.model

    def step(self) -> float | None:
        norm = float(clip_and_norm(self._params, self.cfg.train.grad_clip))
        # The norm is global (reduced) already; the all-reduce makes the skip decision provably common.
        self.last_step_skipped = self.env.any(not math.isfinite(norm))
        if not self.last_step_skipped:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def lrs(self) -> dict[str, float]:
        return {g["name"]: g["lr"] for g in self.optimizer.param_groups}
