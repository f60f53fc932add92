"""Writing checkpoints atomically during training and restoring them on resume (collective).

The layout is :mod:`lrqat_dist.checkpoint.layout`'s; each engine writes and restores its own payload
(:meth:`lrqat_dist.engines.Engine.save` / ``load``); this module writes what is common to every
engine (trainable tensors, trained buffers, per-rank data and RNG state, config, meta.json last).
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..engines import DistEnv, Engine
from ..model import load_trained_buffers_, trained_buffer_state
from .integrity import fsync_dir, nan_equal, seal_files, tensors_finite
from .elastic import is_elastic, resharded_rank_state
from .layout import (CHECKPOINTS, CONFIG_FILE, FORMAT, META_FILE, TMP_PREFIX, TRAINABLE_FILE, TRAINED_BUFFERS_FILE,
                     checkpoint_path, list_checkpoints, rank_file, read_meta, require_meta, tmp_checkpoint_path)
from .size import checkpoint_bytes, format_bytes

logger = logging.getLogger(__name__)


# --- per-rank state ---------------------------------------------------------------------------

def capture_rng(device: torch.device) -> dict[str, Any]:
    """RNG states as tensors and plain types (``rank_*.pt`` loads with ``torch.load(weights_only=True)``)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    py, npy = state["python"], state["numpy"]
    if isinstance(py, dict):
        random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    else:  # checkpoints written before the states were plain types
        random.setstate(py)
    if isinstance(npy, dict):
        np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                             npy["cached_gaussian"]))
    else:
        np.random.set_state(npy)
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def load_rank_state(path: Path) -> dict[str, Any]:
    """A ``rank_*.pt`` file: tensors and plain types, loaded with ``weights_only=True``. Files written
    before that (numpy arrays pickled) are read with the full unpickler after a warning."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        logger.warning("%s: written by an older version (pickled numpy RNG state); loading it with "
                       "weights_only=False", path)
        return torch.load(path, map_location="cpu", weights_only=False)


def checkpoint_is_finite(path: Path) -> bool:
    """Whether a complete checkpoint's trainable tensors are all finite (meta.json's ``finite``; read from
    the tensors for checkpoints written before it was recorded)."""
    meta = read_meta(path) or {}
    if "finite" in meta:
        return bool(meta["finite"])
    try:
        return tensors_finite(load_file(str(path / TRAINABLE_FILE)))
    except (OSError, ValueError):
        return False


class Checkpointer:
    """Saves and restores checkpoints of one run (all ranks call every method: they are collective)."""

    def __init__(self, output_dir: str | Path, env: DistEnv, keep_last: int, config_text: str):
        self.output_dir, self.env = Path(output_dir), env
        self.root = self.output_dir / CHECKPOINTS
        self.keep_last, self.config_text = keep_last, config_text

    def save(self, step: int, engine: Engine, rank_state: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Write checkpoint ``step`` atomically; returns its directory. A complete one is kept as is."""
        final = checkpoint_path(self.output_dir, step)
        if self.env.broadcast_object(read_meta(final) is not None if self.env.is_main else None):
            return final
        tmp = tmp_checkpoint_path(self.output_dir, step)
        t0 = time.perf_counter()
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.env.barrier()
        payload = engine.save(tmp)
        torch.save(rank_state, tmp / rank_file(self.env.rank))
        trainable = engine.trainable_state()
        trainable_bytes = sum(t.numel() * t.element_size() for t in trainable.values())
        if self.env.is_main:
            save_file(trainable, str(tmp / TRAINABLE_FILE))
            buffers = trained_buffer_state(engine.module)
            if buffers:
                save_file(buffers, str(tmp / TRAINED_BUFFERS_FILE))
        if self.env.is_main:
            (tmp / CONFIG_FILE).write_text(self.config_text)
            finite = tensors_finite(trainable)
            if not finite:
                logger.warning("checkpoint of step %d holds non-finite trainable tensors; pruning keeps the newest "
                               "finite checkpoint besides the last train.keep_last", step)
        self.env.barrier()  # every rank's files are written
        seal_files(self.env, tmp)  # fsynced on every host; rank 0 sees every rank's files (else: error)
        if self.env.is_main:
            meta = {"format": FORMAT, "step": step, "engine": engine.name, "world_size": self.env.world_size,
                    "zero_stage": getattr(engine, "zero_stage", None), "trainable": list(engine.trainable_names),
                    **payload, **meta, "finite": finite,
                    "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "complete": True}
            with open(tmp / META_FILE, "w") as f:  # the completion marker: last file written
                json.dump(meta, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            if final.exists():  # an incomplete leftover under the final name
                shutil.rmtree(final)
            os.rename(tmp, final)
            fsync_dir(self.root)
            self._prune()
            logger.info("saved checkpoint %s in %.1f s: %s on disk (trainable tensors %s)", final,
                        time.perf_counter() - t0, format_bytes(checkpoint_bytes(final)), format_bytes(trainable_bytes))
        self.env.barrier()
        return final

    def _prune(self) -> None:
        """Keep the last ``keep_last`` complete checkpoints, and also the newest one whose trainable
        tensors are all finite when none of those is (a run that went NaN keeps a place to resume from)."""
        complete = list_checkpoints(self.output_dir, warn=False)
        kept = complete[max(0, len(complete) - self.keep_last):]
        keep_finite = None
        if not any(checkpoint_is_finite(path) for _, path in kept):
            keep_finite = next((path for _, path in reversed(complete[:len(complete) - len(kept)])
                                if checkpoint_is_finite(path)), None)
            if keep_finite is not None:
                logger.warning("keeping %s: the newest checkpoint with finite trainable tensors", keep_finite)
        for _, path in complete[: max(0, len(complete) - self.keep_last)]:
            if path != keep_finite:
                shutil.rmtree(path, ignore_errors=True)
        latest = complete[-1][0] if complete else -1
        for tmp in self.root.glob(f"{TMP_PREFIX}*"):
            if int(tmp.name[len(TMP_PREFIX):]) < latest:
                logger.warning("removing %s, left by an interrupted save", tmp)
                shutil.rmtree(tmp, ignore_errors=True)

    def load(self, path: Path, engine: Engine) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restore ``engine`` from checkpoint ``path``; returns (meta, this rank's state). On a world size
        other than the saving one (elastic resume) the state holds every old rank's data state under
        :data:`~lrqat_dist.checkpoint.elastic.RESHARDED_DATA` instead of ``data``."""
        meta = require_meta(path)
        if meta["engine"] != engine.name:
            raise ValueError(f"{path}: saved by engine {meta['engine']!r}, this run uses {engine.name!r} "
                             f"(set dist.engine={meta['engine']} to resume it)")
        elastic = is_elastic(meta, self.env)  # a different world size: see checkpoint/elastic.py
        if meta.get("zero_stage") != getattr(engine, "zero_stage", None):
            raise ValueError(f"{path}: saved with zero_stage={meta.get('zero_stage')}, this run uses "
                             f"{getattr(engine, 'zero_stage', None)}")
        if list(meta["trainable"]) != list(engine.trainable_names):
            raise ValueError(f"{path}: its trainable parameters differ from this model's (model/quant changed?)")
        if elastic or not engine.payload_holds_trainable:  # the full copy every engine writes
            saved = load_file(str(path / TRAINABLE_FILE))
            missing = sorted(set(engine.trainable_names) - set(saved))
            if missing:
                raise ValueError(f"{path / TRAINABLE_FILE}: missing trainable tensors, e.g. {missing[:3]}")
            saved = {n: saved[n] for n in engine.trainable_names}
        if elastic:
            engine.load_resharded(path, meta, saved)
        else:
            if not engine.payload_holds_trainable:  # the payload is optimizer state only
                engine.assign_params(saved)
            engine.load(path)
        if trained_buffer_state(engine.module):
            load_trained_buffers_(engine.module, load_file(str(path / TRAINED_BUFFERS_FILE)), str(path))
        if elastic:
            rank_state = resharded_rank_state(path, meta, self.env, load_rank_state)
        else:
            rank_state = load_rank_state(path / rank_file(self.env.rank))
        self._verify(path, engine)
        if not checkpoint_is_finite(path):
            logger.warning("%s holds non-finite trainable tensors: every step from it will be skipped as "
                           "non-finite; resume an earlier checkpoint (--resume <dir>) instead", path)
        logger.info("resumed from %s (step %d)", path, meta["step"])
        return meta, rank_state

    def _verify(self, path: Path, engine: Engine) -> None:
        """The engine's trainable tensors after loading must equal trainable.safetensors bit for bit."""
        live = engine.trainable_state()
        bad = None
        if self.env.is_main:
            saved = load_file(str(path / TRAINABLE_FILE))
            bad = [n for n in engine.trainable_names if not nan_equal(live[n], saved[n])]
        bad = self.env.broadcast_object(bad)  # every rank raises, none is left waiting
        if bad:
            raise RuntimeError(f"{path}: after loading, {len(bad)} trainable tensors differ from "
                               f"{TRAINABLE_FILE} (e.g. {bad[0]}); the {engine.name} payload is inconsistent")
