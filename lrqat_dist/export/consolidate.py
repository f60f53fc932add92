"""Consolidation: the trainable state of a checkpoint (A, B, s ...) from an engine's sharded payload,
in one CPU process, whatever the world size the run had, written as one safetensors file.

Each engine reads its own payload (:meth:`lrqat_dist.engines.Engine.read_payload_trainable`):
DeepSpeed ZeRO 1-3 merges the fp32 master partitions of its optimizer-state shards (ZeRO-0 keeps
full parameters in the model-states file); FSDP2 reads the ``model.*`` entries of its
torch.distributed.checkpoint with ``no_dist=True``.

Integer buffers never go through those converters. Zero-points (asymmetric grids) are rebuilt from
the base model (:func:`build_model`) and checked against the checkpoint's frozen-state fingerprint:
no payload holds buffers (DeepSpeed checkpoints written before that still have them in their
model-states file, read as saved).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import (TRAINABLE_FILE, TRAINED_BUFFERS_FILE, payload_buffers, payload_trainable,
                          require_meta)
from ..train.build import build_model
from .run import checkpoint_config, verify_frozen_state
from .verify import same_bits

logger = logging.getLogger(__name__)

ZERO_POINT_SUFFIX = ".zero_point"


@dataclass
class ConsolidationReport:
    checkpoint: Path
    engine: str
    step: int
    tensors: int
    zero_points: str
    checks: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"consolidated {self.checkpoint} (engine {self.engine}, step {self.step}): {self.tensors} "
                 f"trainable tensors; zero-points: {self.zero_points} ({self.seconds:.1f} s)"]
        return "\n".join(lines + [f"  check passed: {c}" for c in self.checks])


def rebuilt_zero_points(ckpt: Path, accept_changed_base_model: bool = False) -> dict[str, torch.Tensor]:
    """Zero-points rebuilt from the base model with the checkpoint's config (deterministic range init),
    after checking the rebuilt frozen state against the checkpoint's fingerprint."""
    cfg = checkpoint_config(ckpt)
    logger.info("[consolidate] rebuilding zero-points from the base model (%s)", cfg.model.path or "random init")
    model = build_model(cfg, device="cpu", dtype=torch.float32)
    verify_frozen_state(model, ckpt, require_meta(ckpt), accept_changed_base_model)
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(ZERO_POINT_SUFFIX)}


def consolidate(checkpoint: str | Path, out_file: str | Path, *, zero_points: str = "auto",
                accept_changed_base_model: bool = False) -> ConsolidationReport:
    """Write the trainable state of a DeepSpeed/FSDP2 checkpoint as one safetensors file.

    ``zero_points``: ``auto`` (asymmetric grids only: rebuilt from the base model; DeepSpeed
    checkpoints written before payloads left buffers out: their saved buffers), ``payload`` (such old
    DeepSpeed checkpoints only), ``rebuild``, or ``skip``. Rebuilding checks the rebuilt frozen state
    against the checkpoint's fingerprint (``accept_changed_base_model``: warn instead of refusing). When the checkpoint also
    has ``trainable.safetensors`` (gathered from the live model at save time), the consolidated
    tensors must equal it bit for bit.
    """
    t0 = time.time()
    ckpt = Path(checkpoint)
    meta = require_meta(ckpt)
    if zero_points not in ("auto", "payload", "rebuild", "skip"):
        raise ValueError(f"zero_points: expected auto, payload, rebuild or skip, got {zero_points!r}")
    logger.info("[consolidate] reading the %s payload of %s (saved by %s processes)", meta["engine"], ckpt,
                meta["world_size"])
    state = payload_trainable(ckpt, meta)
    report = ConsolidationReport(ckpt, meta["engine"], int(meta["step"]), len(state), "none")

    live_file = ckpt / TRAINABLE_FILE
    if live_file.is_file():
        live = load_file(str(live_file))
        bad = [n for n in state if n not in live or not same_bits(state[n], live[n].float())]
        if bad or set(live) != set(state):
            raise RuntimeError(f"{ckpt}: the {meta['engine']} payload disagrees with {live_file.name} "
                               f"(e.g. {(bad or sorted(set(live) ^ set(state)))[0]})")
        report.checks.append(f"{len(state)} tensors equal {live_file.name} (gathered from the live model) bit for bit")

    symmetric = checkpoint_config(ckpt).quant.symmetric
    mode = zero_points
    if mode == "auto":
        old_ds = meta["engine"] == "deepspeed" and meta.get("payload_buffers", True)
        mode = "skip" if symmetric else ("payload" if old_ds else "rebuild")
    if mode == "payload" and (meta["engine"] != "deepspeed" or not meta.get("payload_buffers", True)):
        raise ValueError(f"zero_points='payload': the {meta['engine']} payload of {ckpt} holds no buffers (they "
                         "are rebuilt from the base model); use 'rebuild'")
    if (ckpt / TRAINED_BUFFERS_FILE).is_file():  # LoQT: merges rewrote the zero-points; load_run reads that file
        if mode == "rebuild":
            raise ValueError(f"zero_points='rebuild': {ckpt} holds {TRAINED_BUFFERS_FILE} (buffers rewritten by "
                             "training, zero-points included); the base model cannot rebuild them, use 'auto'")
        if mode == "auto" or mode == "skip":
            mode, report.zero_points = "skip", f"in {TRAINED_BUFFERS_FILE} (read by load_run)"
    if mode != "skip":
        zps = (payload_buffers(ckpt, meta, ZERO_POINT_SUFFIX) if mode == "payload"
               else rebuilt_zero_points(ckpt, accept_changed_base_model))
        if not zps and not symmetric:
            raise RuntimeError(f"{ckpt}: asymmetric config but no zero-point buffers found ({mode})")
        state.update(zps)
        origin = "the DeepSpeed model states" if mode == "payload" else "the base model"
        report.zero_points = f"{len(zps)} from {origin}"

    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata={"format": "pt", "lrqat_step": str(meta["step"]),
                                         "lrqat_engine": meta["engine"], "lrqat_source": str(ckpt),
                                         "lrqat_world_size": str(meta["world_size"]),
                                         "lrqat_zero_stage": json.dumps(meta.get("zero_stage"))})
    reread = load_file(str(out))
    if set(reread) != set(state) or not all(same_bits(reread[k], state[k]) for k in state):
        raise RuntimeError(f"{out}: read-back differs from what was written")
    report.checks.append(f"{out} read back bit-identical")
    report.seconds = time.time() - t0
    return report
