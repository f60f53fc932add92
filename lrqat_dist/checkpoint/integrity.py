"""What makes a checkpoint trustworthy beyond its layout: durable (fsynced on every host), complete
(every rank's files visible to the rank that marks it complete), finite (for pruning), compared NaN-aware.

All collective helpers take the run's :class:`lrqat_dist.engines.DistEnv`; every rank calls them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..engines import DistEnv

logger = logging.getLogger(__name__)

# How long rank 0 waits for files written by other ranks to become visible before refusing to mark a
# checkpoint complete (a shared filesystem may show another node's new files with some delay).
FILES_VISIBLE_TIMEOUT_S = 120.0
_POLL_S = 0.2


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root`` and every directory (so names and contents are durable)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tree_listing(root: Path) -> dict[str, int]:
    """``{relative path: size}`` of the files under ``root`` as this process sees them."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            full = Path(dirpath) / name
            try:
                out[str(full.relative_to(root))] = full.stat().st_size
            except FileNotFoundError:  # removed while listing
                continue
    return out


def gather_objects(env: DistEnv, obj):
    """Every rank's ``obj`` (a small picklable value), on every rank."""
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def _digest(listing: dict[str, int]) -> str:
    return hashlib.sha256(json.dumps(sorted(listing.items())).encode()).hexdigest()


def seal_files(env: DistEnv, root: Path, timeout_s: float | None = None) -> None:
    """Collective, after every rank wrote its part of the checkpoint under ``root`` (and a barrier):

    1. Durable: on every host, its lowest rank fsyncs every file and directory under ``root``. fsync
       flushes a file's writes cached on that host, whichever process made them, so every rank's
       files are on disk; one rank per host does it (not every rank: the files of a ZeRO-3
       checkpoint times the ranks would be that many opens on a shared filesystem).
    2. Complete: rank 0 waits until it sees every file that any rank sees, at the size that rank sees
       (ranks first compare a digest of their listings; the listings themselves are only sent when
       they differ). On timeout every rank raises an error naming the missing files and the ranks
       that see them; the checkpoint is then never marked complete.
    """
    timeout_s = FILES_VISIBLE_TIMEOUT_S if timeout_s is None else timeout_s
    host = socket.gethostname()
    listing = tree_listing(root)
    views = gather_objects(env, (host, _digest(listing)))
    if env.rank == min(r for r, (h, _) in enumerate(views) if h == host):
        fsync_tree(root)
    env.barrier()  # every host's files are durable before anyone goes on to mark the checkpoint complete
    differ = [r for r, (_, d) in enumerate(views) if d != views[0][1]]  # the same on every rank
    if not differ:
        return
    listings = gather_objects(env, listing if env.rank in differ else None)
    error = None
    if env.is_main:
        wanted: dict[str, tuple[int, int, str]] = {}  # path -> (size, rank, host)
        for rank in differ:
            for path, size in listings[rank].items():
                wanted.setdefault(path, (size, rank, views[rank][0]))
        deadline = time.monotonic() + timeout_s
        while True:
            mine = tree_listing(root)
            missing = {p: w for p, w in wanted.items() if mine.get(p) != w[0]}
            if not missing or time.monotonic() >= deadline:
                break
            time.sleep(_POLL_S)
        if missing:
            shown = ", ".join(f"{p} (rank {r} on {h}: {s} bytes; rank 0 sees "
                              f"{mine.get(p, 'nothing')})" for p, (s, r, h) in sorted(missing.items())[:5])
            error = (f"{root}: after {timeout_s:.0f} s rank 0 still does not see {len(missing)} file(s) that other "
                     f"ranks wrote: {shown}. Is train.output_dir on a filesystem shared by all nodes? The "
                     "checkpoint is not marked complete; the previous ones are untouched")
    error = env.broadcast_object(error)
    if error:
        raise RuntimeError(error)


def tensors_finite(tensors: dict[str, torch.Tensor]) -> bool:
    """True when no floating-point tensor holds a NaN or inf."""
    return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


def nan_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``torch.equal`` that counts NaN == NaN (same shape, dtype, values; NaNs at the same places)."""
    if torch.equal(a, b):
        return True
    if a.shape != b.shape or a.dtype != b.dtype or not a.is_floating_point():
        return False
    return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())
