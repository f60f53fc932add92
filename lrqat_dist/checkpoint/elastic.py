"""Elastic resume: continue a checkpoint written by N ranks on M != N ranks.

What each part needs on a new world size:

- trainable tensors and optimizer state: the engine's :meth:`~lrqat_dist.engines.Engine.load_resharded`
  (FSDP2: DCP reshards on load; DeepSpeed ZeRO 1-3: :mod:`lrqat_dist.engines.deepspeed_elastic`), given
  the full tensors of ``trainable.safetensors``;
- the data stream: every new rank reads the data states of *all* old ranks (``rank_*.pt``) and the
  loader re-deals what was left of the epoch (:meth:`lrqat_dist.data.TrainLoader.load_resharded_state`);
  the same happens on the same world size when ``data.num_workers`` changed (:func:`restore_data`);
- RNG: new rank ``r`` takes old rank ``r % N``'s states (nothing in an LLaMA step draws random numbers;
  the states are restored for what might).

A resume on the same world size never comes here: it stays on the engine's own exact load.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from ..engines import DistEnv
from .layout import rank_file

logger = logging.getLogger(__name__)

#: Key of the rank state that holds every old rank's data state (instead of ``data``).
RESHARDED_DATA = "data_resharded"


def is_elastic(meta: dict[str, Any], env: DistEnv) -> bool:
    return int(meta["world_size"]) != env.world_size


def resharded_rank_state(path: Path, meta: dict[str, Any], env: DistEnv,
                         load: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """This rank's state on a new world size: ``rng`` of old rank ``rank % N`` and, under
    :data:`RESHARDED_DATA`, the data states of all ``N`` old ranks (in rank order); ``load`` reads one
    ``rank_*.pt`` file."""
    old = int(meta["world_size"])
    files = [path / rank_file(r) for r in range(old)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{path}: written by {old} ranks but {missing[0]} is missing")
    states = [load(f) for f in files]
    logger.info("elastic resume: %s was written by %d ranks, this job has %d", path, old, env.world_size)
    return {"rng": states[env.rank % old]["rng"], RESHARDED_DATA: [s["data"] for s in states]}


def restore_data(loader: Any, path: Path, meta: dict[str, Any], env: DistEnv, rank_state: dict[str, Any],
                 load: Callable[[Path], dict[str, Any]]) -> None:
    """Restore the train loader from a loaded rank state: exactly (same world size and readers per
    rank), else by re-dealing every old rank's state (another world size, or another
    ``data.num_workers``: the readers per rank changed); ``load`` reads one ``rank_*.pt`` file."""
    if RESHARDED_DATA not in rank_state:
        own = rank_state["data"]
        slots = getattr(loader, "readers_per_rank", None)
        if slots is None or own.get("workers_per_rank", slots) == slots:
            loader.load_state_dict(own)
            return
        logger.info("data.num_workers changed since %s (%s -> %s readers per rank): re-dealing the data stream",
                    path, own["workers_per_rank"], slots)
        rank_state = resharded_rank_state(path, meta, env, load)
    load_resharded_data(loader, rank_state[RESHARDED_DATA])


def load_resharded_data(loader: Any, states: list[dict[str, Any]]) -> None:
    """Give the train loader every old rank's data state; it keeps the part that is now its own."""
    reshard = getattr(loader, "load_resharded_state", None)
    if reshard is None:
        raise ValueError(f"the train loader {type(loader).__name__} has no load_resharded_state(): it cannot "
                         f"resume a checkpoint written by {len(states)} ranks on a different number of ranks")
    reshard(states)
