"""A training run's model back in memory: base model + prepare (frozen buffers rebuilt) + trainable state.

``RUN_OR_CHECKPOINT`` is either a run's ``output_dir`` (its newest complete checkpoint is taken, or
``step``) or one ``checkpoints/step_<N>`` directory. The trainable tensors come from the checkpoint's
``trainable.safetensors`` (written for every engine) or, failing that, from the engine's sharded
payload, or from a consolidated file given explicitly (all read by :mod:`lrqat_dist.checkpoint`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import (TOKENIZER_DIR, config_file, load_trainable_, load_trained_buffers_from, read_trainable,
                          require_meta, resolve_checkpoint, run_dir)
from ..model.frozen_state import OVERRIDE_FLAG, check_frozen_fingerprint, fingerprint_param_dtype, frozen_fingerprint
from ..train.build import build_model, build_tokenizer
from ..train.config import JobConfig, load_config, parse_yaml

logger = logging.getLogger(__name__)


@dataclass
class LoadedRun:
    model: nn.Module  # prepared (quantized linears), eval mode, fp32
    tokenizer: Any
    checkpoint: Path
    meta: dict
    config: JobConfig
    source: str  # where the trainable tensors came from

    def describe(self) -> str:
        return (f"run checkpoint {self.checkpoint} (step {self.meta['step']}, engine {self.meta['engine']}, "
                f"trainable tensors from {self.source})")


def checkpoint_config(ckpt: Path) -> JobConfig:
    """The resolved config a checkpoint was trained with (its own copy, else the run's).

    A run trained with ``train.dtype: float16`` before that was refused (it has no loss scaling) still
    exports: its ``train.dtype`` is read as float32, the dtype every export rebuilds the model in."""
    raw = parse_yaml(config_file(ckpt).read_text()) or {}
    train = raw.get("train") if isinstance(raw, dict) else None
    if isinstance(train, dict) and train.get("dtype") == "float16":
        logger.info("%s: trained with train.dtype=float16 (refused for training now); read as float32", ckpt)
        train["dtype"] = "float32"
    return load_config(base=raw)


def verify_frozen_state(model: nn.Module, ckpt: Path, meta: dict, accept_changed_base_model: bool = False,
                        override: str = OVERRIDE_FLAG) -> None:
    """Compare the frozen state of ``model`` (just rebuilt from the base model) with the fingerprint in
    the checkpoint's meta.json; refuse a mismatch unless ``accept_changed_base_model`` (see
    :func:`lrqat_dist.model.frozen_state.check_frozen_fingerprint`)."""
    saved = meta.get("frozen_fingerprint")
    check_frozen_fingerprint(saved, lambda: frozen_fingerprint(model, fingerprint_param_dtype(saved)),
                             f"{ckpt}", accept_changed_base_model, override)


def load_run(path: str | Path, step: int | None = None, trainable_file: str | Path | None = None,
             accept_changed_base_model: bool = False) -> LoadedRun:
    """Rebuild a run's prepared model on CPU in fp32 with its trained tensors (see the module docstring).

    The rebuilt frozen state must match the checkpoint's fingerprint (else
    :class:`~lrqat_dist.model.frozen_state.FrozenStateMismatch`), unless ``accept_changed_base_model``."""
    ckpt = resolve_checkpoint(path, step)
    meta = require_meta(ckpt)
    cfg = checkpoint_config(ckpt)
    logger.info("[load] %s: step %s, engine %s; building the base model (%s) and preparing it",
                ckpt, meta["step"], meta["engine"], cfg.model.path or "random init")
    model = build_model(cfg, device="cpu", dtype=torch.float32)
    verify_frozen_state(model, ckpt, meta, accept_changed_base_model)
    state, source = read_trainable(ckpt, meta, trainable_file)
    load_trained_buffers_from(model, ckpt)  # LoQT: merged codes, scales and P live in the checkpoint
    load_trainable_(model, state, list(meta["trainable"]), source)
    model.eval()
    tok_cache = run_dir(ckpt) / TOKENIZER_DIR
    tokenizer = build_tokenizer(cfg, tok_cache if tok_cache.is_dir() else None)
    return LoadedRun(model, tokenizer, ckpt, meta, cfg, source)
