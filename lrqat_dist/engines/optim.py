"""AdamW parameter groups and the learning-rate schedule of the LR-QAT recipe.

Two groups: everything trainable at ``train.lr`` (LR-QAT's A and B; full QAT's weight; DL-QAT's
magnitude m; LoQT's B) and the quantization ranges (parameters named ``*.scale``, and DL-QAT's float
``*.offset``) at ``train.scale_lr``. A method may switch a group off for a window of steps (DL-QAT's
phases, :func:`lrqat_dist.methods.hooks.group_windows`): the group's factor is then 0. The schedule is a factor
of each group's own lr: linear warmup over ``warmup_ratio * max_steps`` steps, then linear or cosine
decay to ``min_lr_ratio`` at ``max_steps`` (or constant).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from .config import TrainConfig

SCALE_SUFFIXES = (".scale", ".offset")


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """``[{"name": "adapters", ...}, {"name": "scales", ...}]`` (empty groups left out), in model order."""
    main, scales = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (scales if name.endswith(SCALE_SUFFIXES) or name in ("scale", "offset") else main).append(p)
    if not main and not scales:
        raise ValueError("quant.method: the prepared model has no trainable parameters (rtn trains nothing)")
    groups = [
        {"name": "adapters", "params": main, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"name": "scales", "params": scales, "lr": cfg.scale_lr, "weight_decay": cfg.weight_decay},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: TrainConfig, optimizer_cls: type[torch.optim.Optimizer] | None = None,
                    **kwargs: Any) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups` with ``train.lr/betas/eps/weight_decay``.

    Default: ``torch.optim.AdamW(foreach=False)``, the same per-tensor kernels on every engine, so
    single-process and sharded runs agree as closely as fp32 allows (the trainable set is small, so
    the speed cost is negligible). ``optimizer_cls`` / ``kwargs``: an AdamW-compatible class instead
    (DeepSpeed's ``FusedAdam`` / ``DeepSpeedCPUAdam`` with ``adamw_mode=True``).
    """
    if optimizer_cls is None:
        optimizer_cls, kwargs = torch.optim.AdamW, {"foreach": False, **kwargs}
    return optimizer_cls(param_groups(model, cfg), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                         weight_decay=cfg.weight_decay, **kwargs)


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


SCHEDULE_KEYS = ("max_steps", "warmup_ratio", "schedule", "min_lr_ratio")


def schedule_change(saved: TrainConfig, now: TrainConfig, step: int) -> str | None:
    """Why the LR schedule of a run resumed after ``step`` optimizer steps is not the one it was saved
    with (the scheduler state holds only the step count; the shape comes from the current ``train:``
    keys), or None when the keys that shape it are unchanged."""
    changed = [k for k in SCHEDULE_KEYS if getattr(saved, k) != getattr(now, k)]
    if not changed:
        return None
    what = ", ".join(f"train.{k} {getattr(saved, k)!r} -> {getattr(now, k)!r}" for k in changed)
    return (f"resuming after step {step} with a changed LR schedule ({what}): warmup "
            f"{warmup_steps(saved)} -> {warmup_steps(now)} steps, decay to train.min_lr_ratio at step "
            f"{saved.max_steps} -> {now.max_steps}; the schedule is recomputed for the new values: step "
            f"{step + 1} runs at the restored lr factor {lr_factor(saved)(step):.6g}, step {step + 2} at "
            f"{lr_factor(now)(step + 1):.6g} (the saved schedule: {lr_factor(saved)(step + 1):.6g})")


def windowed(factor: Callable[[int], float], window: tuple[int, int | None] | None) -> Callable[[int], float]:
    """``factor`` inside ``[start, end)`` (0-based optimizer steps), 0 outside; ``window=None``: always on."""
    if window is None:
        return factor
    start, end = window
    return lambda step: factor(step) if start <= step and (end is None or step < end) else 0.0


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    windows: dict[str, tuple[int, int | None]] | None = None) -> LambdaLR:
    """LambdaLR applying :func:`lr_factor` to every group (stepped once per optimizer step), gated per
    group name by ``windows`` (see :func:`lrqat_dist.methods.hooks.group_windows`)."""
    base, windows = lr_factor(cfg), windows or {}
    return LambdaLR(optimizer, [windowed(base, windows.get(g.get("name"))) for g in optimizer.param_groups])
