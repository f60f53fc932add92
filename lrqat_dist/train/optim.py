"""AdamW parameter groups and the learning-rate schedule of the LR-QAT recipe.

Two groups: everything trainable at ``train.lr`` (LR-QAT's A and B; full QAT's weight too) and the
quantization scales (parameters named ``*.scale``) at ``train.scale_lr``. The schedule is a factor
of each group's own lr: linear warmup over ``warmup_ratio * max_steps`` steps, then linear or cosine
decay to ``min_lr_ratio`` at ``max_steps`` (or constant).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from .config import TrainConfig

SCALE_SUFFIX = ".scale"


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """``[{"name": "adapters", ...}, {"name": "scales", ...}]`` (empty groups left out), in model order."""
    main, scales = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (scales if name.endswith(SCALE_SUFFIX) or name == "scale" else main).append(p)
    if not main and not scales:
        raise ValueError("quant.method: the prepared model has no trainable parameters (rtn trains nothing)")
    groups = [
        {"name": "adapters", "params": main, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"name": "scales", "params": scales, "lr": cfg.scale_lr, "weight_decay": cfg.weight_decay},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    # foreach=False: the same per-tensor kernels on every engine, so single-process and sharded runs
    # agree as closely as fp32 allows; the trainable set is small, so the speed cost is negligible.
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, foreach=False)


def warmup_steps(cfg: TrainConfig) -> int:
    return math.ceil(cfg.warmup_ratio * cfg.max_steps)


def lr_factor(cfg: TrainConfig) -> Callable[[int], float]:
    """``step -> lr factor`` where ``step`` counts optimizer steps already taken (0 for the first)."""
    warm, total, floor, kind = warmup_steps(cfg), cfg.max_steps, cfg.min_lr_ratio, cfg.schedule

    def factor(step: int) -> float:
        if step < warm:
            # (step + 1) / (warm + 1): no wasted zero-lr first step.
            return (step + 1) / (warm + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        if kind == "linear":
            return 1.0 - (1.0 - floor) * progress
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> LambdaLR:
    """LambdaLR applying :func:`lr_factor` to every group (stepped once per optimizer step)."""
    return LambdaLR(optimizer, lr_factor(cfg))
