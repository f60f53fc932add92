"""Training engines: one process (``none``), DeepSpeed ZeRO 0-3 (``deepspeed``), FSDP2 (``fsdp2``).

An engine is built from typed config sections (:class:`EngineConfig`: ``train:``, ``dist:``, the
method's LR windows), resolves its device (:mod:`.env`), owns its optimizer and LR schedule
(:mod:`.optim`) and writes, restores and reads offline its own checkpoint payload.
Engine modules are imported on demand, so a single-process run never imports DeepSpeed.
"""
from __future__ import annotations

import importlib

from .base import Engine, next_token_loss
from .config import ENGINE_CLASSES, DistConfig, EngineConfig, TrainConfig
from .env import DistEnv, claim_device, resolve_device, resolve_dtype


def get_engine(name: str) -> type[Engine]:
    """The engine class for ``dist.engine``."""
    if name not in ENGINE_CLASSES:
        raise ValueError(f"dist.engine: unknown {name!r}; expected one of {', '.join(ENGINE_CLASSES)}")
    module, cls = ENGINE_CLASSES[name]
    return getattr(importlib.import_module(module), cls)


__all__ = ["Engine", "EngineConfig", "TrainConfig", "DistConfig", "DistEnv", "get_engine", "next_token_loss",
           "claim_device", "resolve_device", "resolve_dtype"]
