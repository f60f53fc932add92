"""Where a run's checkpoints are and what makes one complete: the on-disk layout that training writes
and export, eval and resume read.

    <output_dir>/config.yaml                       resolved config of the run (written at start)
    <output_dir>/tokenizer/                        the run's tokenizer cache (a .gguf source, saved once)
    <output_dir>/.shared_fs_check                  rank 0's nonce: every rank must read it (shared_fs.py)
    <output_dir>/checkpoints/step_<N:08d>/
        meta.json               step, engine, zero_stage, world_size, trainable names, the frozen state's
                                per-module fingerprint (lrqat_dist.model.frozen_state), "finite" (all
                                trainable tensors finite: pruning keeps the newest such checkpoint),
                                "nonfinite_skipped" (steps skipped so far), "complete": true (written
                                last, after every other file is fsynced and visible to rank 0)
        config.yaml             resolved config the checkpoint was trained with
        trainable.safetensors   full fp32 trainable tensors (A, B, s ...) keyed by model parameter names,
                                for every engine: the one file export needs besides the base model
        trained_buffers.safetensors  only for methods that rewrite buffers (LoQT's merged codes, scales,
                                P): identical on every rank, written by rank 0, read by resume and export
        rank_<r:05d>.pt         per rank: data-stream state, RNG states (tensors and plain types: loads
                                with torch.load(weights_only=True))
        <engine payload>        none: train_state.pt (optimizer, scheduler); deepspeed: deepspeed/
                                (DeepSpeed save_checkpoint layout); fsdp2: dcp/ (torch.distributed.checkpoint)

No file holds frozen state (Phi0, s0, zero-points, frozen embeddings/norms): resume and export rebuild
it from the base model and compare it with meta.json's fingerprint.

A checkpoint is written into ``checkpoints/.tmp_step_<N>`` and renamed into place once complete
(:class:`lrqat_dist.checkpoint.Checkpointer`), so a crash mid-save leaves the previous checkpoints
untouched; ``resume: auto`` takes the newest directory whose meta.json says ``complete`` and warns
about any other.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
META_FILE = "meta.json"
CONFIG_FILE = "config.yaml"
TOKENIZER_DIR = "tokenizer"
TRAINABLE_FILE = "trainable.safetensors"
TRAINED_BUFFERS_FILE = "trained_buffers.safetensors"
FORMAT = 1
PREFIX, TMP_PREFIX = "step_", ".tmp_step_"


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"{PREFIX}{step:08d}"


def tmp_checkpoint_path(output_dir: str | Path, step: int) -> Path:
    """Where checkpoint ``step`` is written before it is renamed into place."""
    return Path(output_dir) / CHECKPOINTS / f"{TMP_PREFIX}{step:08d}"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def read_meta(path: str | Path) -> dict[str, Any] | None:
    """meta.json of a checkpoint directory if it is complete, else None."""
    meta_path = Path(path) / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    return meta if meta.get("complete") is True else None


def require_meta(path: str | Path, label: str | None = None) -> dict[str, Any]:
    """meta.json of a complete checkpoint; ``FileNotFoundError`` naming ``label`` (default: the path) else."""
    meta = read_meta(path)
    if meta is None:
        raise FileNotFoundError(f"{label or path}: not a complete checkpoint directory (no {META_FILE} with "
                                f"\"complete\": true)")
    return meta


def list_checkpoints(output_dir: str | Path, warn: bool = True) -> list[tuple[int, Path]]:
    """Complete checkpoints ``[(step, path)]`` by step; incomplete ones are skipped with a warning."""
    root = Path(output_dir) / CHECKPOINTS
    found = []
    for path in sorted(root.glob(f"{PREFIX}*")) if root.is_dir() else []:
        meta = read_meta(path)
        if meta is None:
            if warn:
                logger.warning("skipping incomplete checkpoint %s (no complete meta.json)", path)
            continue
        found.append((int(meta["step"]), path))
    if warn and root.is_dir():
        for tmp in root.glob(f"{TMP_PREFIX}*"):
            logger.warning("ignoring %s: a checkpoint save that never finished", tmp)
    return sorted(found)


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """``auto``: newest complete checkpoint of ``output_dir`` (None if there is none); ``none``/None:
    start fresh; anything else: that checkpoint directory, which must be complete."""
    if resume in (None, "none", "never"):
        return None
    if resume == "auto":
        ckpts = list_checkpoints(output_dir)
        return ckpts[-1][1] if ckpts else None
    require_meta(resume, f"--resume {resume}")
    return Path(resume)


def is_run_or_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return (p / META_FILE).is_file() or (p / CHECKPOINTS).is_dir()


def resolve_checkpoint(path: str | Path, step: int | None = None) -> Path:
    """The checkpoint directory meant by a run dir (newest complete, or ``step``) or a checkpoint dir."""
    p = Path(path)
    if (p / META_FILE).is_file():
        meta = require_meta(p)
        if step is not None and int(meta["step"]) != step:
            raise ValueError(f"{p} is the checkpoint of step {meta['step']}, not {step}")
        return p
    ckpts = list_checkpoints(p)
    if not ckpts:
        raise FileNotFoundError(f"{p}: neither a checkpoint directory nor a run with complete checkpoints "
                                f"(looked for {META_FILE} and {CHECKPOINTS}/{PREFIX}*/)")
    if step is None:
        return ckpts[-1][1]
    found = [c for s, c in ckpts if s == step]
    if not found:
        raise FileNotFoundError(f"{p}: no complete checkpoint for step {step} (have {[s for s, _ in ckpts]})")
    return found[0]


def run_dir(ckpt: Path) -> Path:
    """The run's ``output_dir`` of checkpoint directory ``ckpt``."""
    return ckpt.parent.parent


def config_file(ckpt: Path) -> Path:
    """The resolved config a checkpoint was trained with: its own copy, else the run's."""
    for candidate in (ckpt / CONFIG_FILE, run_dir(ckpt) / CONFIG_FILE):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{ckpt}: no {CONFIG_FILE} in the checkpoint or its run directory")
