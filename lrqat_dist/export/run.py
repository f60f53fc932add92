"""A training run's model back in memory: base model + prepare (frozen buffers rebuilt) + trainable state.

``RUN_OR_CHECKPOINT`` is either a run's ``output_dir`` (its newest complete checkpoint is taken, or
``step``) or one ``checkpoints/step_<N>`` directory. The trainable tensors come from the checkpoint's
``trainable.safetensors`` (written for every engine) or, failing that, from the engine's sharded
payload (:mod:`lrqat_dist.export.consolidate`), or from a consolidated file given explicitly.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file
from torch import nn

from ..train.build import build_model, build_tokenizer
from ..model import load_trained_buffers_, trained_buffer_state
from ..train.checkpoint import (CHECKPOINTS, CONFIG_FILE, META_FILE, TRAINABLE_FILE, TRAINED_BUFFERS_FILE,
                                list_checkpoints, read_meta)
from ..train.config import load_config
from .verify import stderr_log


@dataclass
class LoadedRun:
    model: nn.Module  # prepared (quantized linears), eval mode, fp32
    tokenizer: Any
    checkpoint: Path
    meta: dict
    config: Any  # lrqat_dist.train.JobConfig
    source: str  # where the trainable tensors came from

    def describe(self) -> str:
        return (f"run checkpoint {self.checkpoint} (step {self.meta['step']}, engine {self.meta['engine']}, "
                f"trainable tensors from {self.source})")


def is_run_or_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return (p / META_FILE).is_file() or (p / CHECKPOINTS).is_dir()


def resolve_checkpoint(path: str | Path, step: int | None = None) -> Path:
    """The checkpoint directory meant by a run dir (newest complete, or ``step``) or a checkpoint dir."""
    p = Path(path)
    if (p / META_FILE).is_file():
        meta = read_meta(p)
        if meta is None:
            raise FileNotFoundError(f"{p}: incomplete checkpoint (meta.json lacks complete: true)")
        if step is not None and int(meta["step"]) != step:
            raise ValueError(f"{p} is the checkpoint of step {meta['step']}, not {step}")
        return p
    ckpts = list_checkpoints(p)
    if not ckpts:
        raise FileNotFoundError(f"{p}: neither a checkpoint directory nor a run with complete checkpoints "
                                f"(looked for {META_FILE} and checkpoints/step_*/)")
    if step is None:
        return ckpts[-1][1]
    found = [c for s, c in ckpts if s == step]
    if not found:
        raise FileNotFoundError(f"{p}: no complete checkpoint for step {step} (have {[s for s, _ in ckpts]})")
    return found[0]


def checkpoint_config(ckpt: Path) -> Any:
    """The resolved config a checkpoint was trained with (its own copy, else the run's)."""
    for candidate in (ckpt / CONFIG_FILE, ckpt.parent.parent / CONFIG_FILE):
        if candidate.is_file():
            return load_config(candidate)
    raise FileNotFoundError(f"{ckpt}: no {CONFIG_FILE} in the checkpoint or its run directory")


@torch.no_grad()
def load_trainable_(model: nn.Module, state: dict[str, torch.Tensor], names: list[str], origin: str) -> None:
    """Put ``state`` (trainable tensors, optionally zero-point buffers) into a freshly built model.

    Every trainable name must be present; zero-points in ``state`` must equal the rebuilt ones (a
    mismatch means the base model or the quant config differ from the training run's)."""
    missing = [n for n in names if n not in state]
    if missing:
        raise KeyError(f"{origin}: missing trainable tensors {missing[:5]}")
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    for k, v in state.items():
        if k in params:
            if params[k].shape != v.shape:
                raise ValueError(f"{origin}: {k} has shape {tuple(v.shape)}, model expects {tuple(params[k].shape)}")
            params[k].copy_(v)
        elif k in buffers:
            if not torch.equal(buffers[k].double(), v.double()):
                raise ValueError(f"{origin}: buffer {k} differs from the one rebuilt from the base model; the base "
                                 f"model or quant config is not the training run's")
        else:
            raise KeyError(f"{origin}: {k} is not a parameter or buffer of the model built from the config")


def load_run(path: str | Path, step: int | None = None, trainable_file: str | Path | None = None,
             log: Callable[[str], None] | None = stderr_log) -> LoadedRun:
    """Rebuild a run's prepared model on CPU in fp32 with its trained tensors (see the module docstring)."""
    from .consolidate import payload_trainable  # imports this module: not at the top

    log = log or (lambda msg: None)
    ckpt = resolve_checkpoint(path, step)
    meta = read_meta(ckpt)
    cfg = checkpoint_config(ckpt)
    log(f"[load] {ckpt}: step {meta['step']}, engine {meta['engine']}; building the base model "
        f"({cfg.model.path or 'random init'}) and preparing it")
    model = build_model(cfg, device="cpu", dtype=torch.float32)
    if trainable_file is not None:
        state, source = load_file(str(trainable_file)), str(trainable_file)
    elif (ckpt / TRAINABLE_FILE).is_file():
        state, source = load_file(str(ckpt / TRAINABLE_FILE)), TRAINABLE_FILE
    else:
        state, source = payload_trainable(ckpt, meta), f"the {meta['engine']} payload"
    if trained_buffer_state(model):  # LoQT: merged codes, scales and P live in the checkpoint, not the base model
        load_trained_buffers_(model, load_file(str(ckpt / TRAINED_BUFFERS_FILE)), str(ckpt / TRAINED_BUFFERS_FILE))
    load_trainable_(model, state, list(meta["trainable"]), source)
    model.eval()
    tok_cache = ckpt.parent.parent / "tokenizer"
    tokenizer = build_tokenizer(cfg, tok_cache if tok_cache.is_dir() else None)
    return LoadedRun(model, tokenizer, ckpt, meta, cfg, source)
