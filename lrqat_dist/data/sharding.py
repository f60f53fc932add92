"""Which reader reads what: the per-epoch assignment of shards to (rank, worker) readers.

A shard is one file, or -- when there are fewer files than readers -- one of ``parts`` disjoint
slices of a file (units ``i`` with ``i % parts == part``). Every epoch the shard list is
permuted with a seed shared by all readers, and reader ``r`` of ``R`` takes shards
``r, r + R, ...`` of that order, so within one epoch every unit belongs to exactly one reader.
"""

from __future__ import annotations

import math
import random
from typing import NamedTuple


class Shard(NamedTuple):
    file: int  # index into the resolved (sorted) file list
    part: int
    parts: int


def make_shards(num_files: int, num_readers: int) -> list[Shard]:
    """All shards: files split into just enough parts that every reader gets at least one."""
    if num_files < 1 or num_readers < 1:
        raise ValueError(f"need at least one file and one reader, got {num_files} / {num_readers}")
    parts = max(1, math.ceil(num_readers / num_files))
    return [Shard(f, p, parts) for f in range(num_files) for p in range(parts)]


def reader_shards(
    shards: list[Shard], reader: int, num_readers: int, seed: int, epoch: int, shuffle: bool = True
) -> list[Shard]:
    """The shards reader ``reader`` of ``num_readers`` reads in ``epoch``, in reading order."""
    order = list(shards)
    if shuffle:
        # Seeded by (seed, epoch) only: all readers must agree on the permutation.
        random.Random(f"lrqat_dist.shards:{seed}:{epoch}").shuffle(order)
    return order[reader::num_readers]
