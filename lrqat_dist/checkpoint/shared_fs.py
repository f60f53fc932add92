"""Proof that ``train.output_dir`` is one directory for all ranks (checkpoints assume it is).

Rank 0 writes a random nonce into ``<output_dir>/.shared_fs_check`` (fsynced), every rank reads it
after a barrier (retrying briefly: a shared filesystem may show a new file with some delay), and a
rank that sees no file or another nonce (e.g. a node-local directory left by an earlier run) stops the
run with an error naming it and its host. Called once at the start of every run with more than one rank.
"""
from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from pathlib import Path

from ..engines import DistEnv
from .integrity import gather_objects

logger = logging.getLogger(__name__)

NONCE_FILE = ".shared_fs_check"
VISIBLE_TIMEOUT_S = 10.0  # how long a rank retries before it reports the nonce file missing


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def check_shared_output_dir(output_dir: str | Path, env: DistEnv, timeout_s: float | None = None) -> None:
    """Collective: raise ``RuntimeError`` on every rank unless every rank sees rank 0's nonce file."""
    if env.world_size == 1:
        return
    timeout_s = VISIBLE_TIMEOUT_S if timeout_s is None else timeout_s
    path = Path(output_dir) / NONCE_FILE
    nonce = None
    if env.is_main:
        nonce = secrets.token_hex(16)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            f.write(nonce)
            f.flush()
            os.fsync(f.fileno())
    nonce = env.broadcast_object(nonce)
    env.barrier()
    deadline = time.monotonic() + timeout_s
    seen = _read(path)
    while seen != nonce and time.monotonic() < deadline:
        time.sleep(0.2)
        seen = _read(path)
    views = gather_objects(env, (socket.gethostname(), str(Path(output_dir).resolve()), seen == nonce,
                                 seen is not None))
    bad = [(r, v) for r, v in enumerate(views) if not v[2]]
    if bad:
        detail = "; ".join(f"rank {r} on {host} ({resolved}): "
                           f"{'another nonce (a different or stale directory)' if exists else 'no such file'}"
                           for r, (host, resolved, _, exists) in bad[:5])
        raise RuntimeError(f"train.output_dir={output_dir} is not shared by all ranks: rank 0 wrote {path.name} "
                           f"there, but {len(bad)} rank(s) do not see it after {timeout_s:.0f} s: {detail}. "
                           "Every rank must see the same directory (a shared filesystem such as NFS or Lustre "
                           "mounted at the same path on every node)")
    logger.info("train.output_dir %s is shared by all %d ranks", output_dir, env.world_size)
