"""Streaming SlimPajama-style data: sharded, tokenized, packed, exactly resumable.

See ``docs/data.md``. The trainer uses::

    from lrqat_dist.data import DataConfig, build_train_loader, build_val_loader
"""

from .config import DataConfig
from .documents import EmptyStreamError
from .loader import TrainLoader, ValLoader, build_train_loader, build_val_loader
from .records import SKIP_KINDS

__all__ = [
    "DataConfig",
    "EmptyStreamError",
    "SKIP_KINDS",
    "TrainLoader",
    "ValLoader",
    "build_train_loader",
    "build_val_loader",
]
