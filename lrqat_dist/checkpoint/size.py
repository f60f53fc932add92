"""How big a checkpoint is: bytes on disk (every file under its directory) and a readable form."""
from __future__ import annotations

import os
from pathlib import Path


def checkpoint_bytes(path: str | Path) -> int:
    """Total size in bytes of the files under ``path`` (apparent sizes, as ``du -b``)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            total += os.path.getsize(os.path.join(dirpath, name))
    return total


def format_bytes(n: int) -> str:
    """``123456789`` -> ``"117.7 MiB (123456789 B)"``."""
    value, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{value:.1f} {unit} ({n} B)" if unit != "B" else f"{n} B"
