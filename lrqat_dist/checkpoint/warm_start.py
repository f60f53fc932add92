"""``--resume weights:CKPT``: start a new run from the trained tensors of a checkpoint, nothing else.

Only the trainable tensors (A, B, s; whatever the method trains) and, for methods that rewrite buffers
(LoQT: merged codes, scales, P), the trained buffers are loaded; the optimizer, LR schedule, data
stream, RNG and step counter start fresh (step 0). ``CKPT`` is a checkpoint directory or a run
directory (its newest complete checkpoint), written by any engine on any number of ranks: it reads
``trainable.safetensors`` (the full tensors every engine writes) and ``trained_buffers.safetensors``.
The model and quantization config must give the same trainable tensors (names and shapes).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..engines import DistEnv, Engine
from ..model import load_trained_buffers_, trained_buffer_state
from .layout import TRAINABLE_FILE, TRAINED_BUFFERS_FILE, require_meta, resolve_checkpoint

logger = logging.getLogger(__name__)

PREFIX = "weights:"


def weights_only_checkpoint(resume: str | None) -> Path | None:
    """The checkpoint directory of a ``weights:CKPT`` resume value, else None (errors if CKPT is not one)."""
    if resume is None or not str(resume).startswith(PREFIX):
        return None
    target = str(resume)[len(PREFIX):]
    if not target:
        raise FileNotFoundError(f"--resume {resume}: name a checkpoint or run directory after '{PREFIX}'")
    try:
        path = resolve_checkpoint(target)
    except (FileNotFoundError, ValueError) as e:
        raise FileNotFoundError(f"--resume {resume}: {e}") from e
    require_meta(path, f"--resume {resume}")
    return path


def load_weights_only(path: Path, engine: Engine, env: DistEnv) -> None:
    """Set ``engine``'s trainable tensors (and trained buffers) from checkpoint ``path`` (collective;
    the optimizer state is left as built, i.e. fresh)."""
    saved = load_file(str(path / TRAINABLE_FILE))
    names = list(engine.trainable_names)
    missing = [n for n in names if n not in saved]
    extra = sorted(set(saved) - set(names))
    if missing or extra:
        what = f"lacks {missing[:3]}" if missing else f"has tensors this model does not train, e.g. {extra[:3]}"
        raise ValueError(f"--resume weights:{path}: {TRAINABLE_FILE} {what} (different model or quant config?)")
    live = engine.full_params(names)
    bad = [n for n in names if tuple(saved[n].shape) != tuple(live[n].shape)]
    if bad:
        raise ValueError(f"--resume weights:{path}: {bad[0]} has shape {tuple(saved[bad[0]].shape)} there, "
                         f"{tuple(live[bad[0]].shape)} in this model (different rank or group size?)")
    engine.assign_params({n: saved[n] for n in names})
    if trained_buffer_state(engine.module):
        load_trained_buffers_(engine.module, load_file(str(path / TRAINED_BUFFERS_FILE)), str(path))
    meta = require_meta(path)
    now = engine.full_params(names)
    differ = [n for n in names if not torch.equal(now[n].float().cpu(), saved[n].float())]
    if differ:
        raise RuntimeError(f"--resume weights:{path}: after loading, {differ[0]} differs from {TRAINABLE_FILE}")
    logger.info("weights-only start from %s (step %s, %s on %s ranks): %d trainable tensors; fresh optimizer, "
                "schedule and data, step 0", path, meta["step"], meta["engine"], meta["world_size"], len(names))
