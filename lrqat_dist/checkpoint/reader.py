"""Reading a checkpoint offline (one CPU process, no process group, whatever world size saved it):
its trainable tensors and trained buffers, put into a freshly built model.

The trainable tensors come from ``trainable.safetensors`` (written for every engine), or from the
engine's own payload, which the engine reads itself
(:meth:`lrqat_dist.engines.Engine.read_payload_trainable`, next to the code that writes it).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from ..engines import get_engine
from ..model import load_trained_buffers_, trained_buffer_state
from .layout import TRAINABLE_FILE, TRAINED_BUFFERS_FILE


def payload_trainable(ckpt: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The trainable tensors from the engine's own payload (not from trainable.safetensors)."""
    engine = get_engine(meta["engine"])
    if not engine.payload_holds_trainable:
        raise ValueError(f"{ckpt}: engine {meta['engine']!r} has no sharded payload; its {TRAINABLE_FILE} is the "
                         f"full trainable state already")
    return engine.read_payload_trainable(ckpt, meta)


def payload_buffers(ckpt: Path, meta: dict[str, Any], suffix: str) -> dict[str, torch.Tensor]:
    """The model buffers named ``*<suffix>`` as the engine's payload saved them (DeepSpeed keeps them)."""
    return get_engine(meta["engine"]).read_payload_buffers(ckpt, meta, lambda name: name.endswith(suffix))


def read_trainable(ckpt: Path, meta: dict[str, Any],
                   trainable_file: str | Path | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """``(tensors, where they came from)``: ``trainable_file`` when given (e.g. a consolidated file),
    else the checkpoint's ``trainable.safetensors``, else the engine's payload."""
    if trainable_file is not None:
        return load_file(str(trainable_file)), str(trainable_file)
    if (ckpt / TRAINABLE_FILE).is_file():
        return load_file(str(ckpt / TRAINABLE_FILE)), TRAINABLE_FILE
    return payload_trainable(ckpt, meta), f"the {meta['engine']} payload"


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


def load_trained_buffers_from(model: nn.Module, ckpt: Path) -> None:
    """For methods that rewrite buffers while training (LoQT: merged codes, scales and P), put the
    checkpoint's copy into ``model``; a no-op for the others (their buffers are rebuilt from the base model)."""
    if trained_buffer_state(model):
        path = ckpt / TRAINED_BUFFERS_FILE
        load_trained_buffers_(model, load_file(str(path)), str(path))
