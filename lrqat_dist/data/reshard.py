"""Re-deal the train stream's reader states to a different number of readers (elastic resume).

A checkpoint holds one state per reader (``world_size * max(1, num_workers)`` readers). When a job
resumes on a different world size (or worker count) the old states are turned into new ones so that
**no document of an epoch that any old reader had started is skipped**:

- *File position.* An old reader's documents come from its shard list in order, so what it has read
  from the files is a known prefix: shards ``plan[:pos]`` of its current epoch, plus units
  ``< unit`` of shard ``plan[pos]``. What it has *not* read is the remainder: ``plan[pos]`` from
  ``unit`` on, then ``plan[pos+1:]`` (and, for a reader an epoch behind the most advanced one, every
  shard of the epochs up to that one; and any segments left from an earlier elastic resume). The
  remainders of all old readers are pooled as segments ``(file, part, parts, start_unit)`` and dealt
  to the new readers: whole segments round-robin when there are at least as many as new readers,
  else every segment is split into one sub-part per new reader (units ``i`` with
  ``i % (parts * M) == part + parts * j``: a disjoint cover of the segment). Each new reader reads its
  segments first, then continues with the new sharding at the next epoch.
- *In flight.* Documents an old reader had read but not yet emitted (its shuffle buffer and the
  pending copies of an up-weighted document) are carried over as they are, dealt one by one to the
  new readers' shuffle buffers; its leftover tokens (tokenized, not yet in a block) open new reader
  ``i % M``'s next block. Nothing is dropped, and for local files nothing is read twice.
- *HF streams* (``data.hf_dataset``) deal rows ``idx % readers``; the new readers restart at the
  lowest row any old reader had reached (in the lowest epoch), so rows that some old reader had
  already read are read again: their number is counted and logged (exact when all old readers are in
  the same epoch, a lower bound otherwise).

Set weights (up- or down-sampling) draw from a per-reader RNG: after a re-deal the draws differ from an
uninterrupted run's, as does the shuffle order (new RNG seeds, derived from the seed and the epoch).
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, replace
from typing import Any

import torch

from .sharding import make_shards, reader_shards
from .shuffle import rng_state
from .stream import ReaderStream, StreamSpec

logger = logging.getLogger(__name__)


@dataclass
class ReshardReport:
    """What a re-deal carried over and re-reads (the same on every rank)."""

    old_readers: int
    new_readers: int
    segments: int = 0  # unread parts of the old readers' epochs, re-dealt
    carried_docs: int = 0  # documents in old shuffle buffers / pending copies, carried over
    carried_tokens: int = 0  # old leftover tokens, carried over
    reread_rows: int = 0  # HF source: rows read again
    next_epoch: int = 0  # the epoch the new readers start after the re-dealt remainder

    def describe(self) -> str:
        return (f"data stream re-dealt from {self.old_readers} to {self.new_readers} readers: "
                f"{self.segments} unread segment(s) of the current epoch re-dealt, {self.carried_docs} in-flight "
                f"document(s) and {self.carried_tokens} leftover token(s) carried over (not re-read), "
                f"{self.reread_rows} HF row(s) re-read; new sharding from epoch {self.next_epoch}")


def _file_remainder(doc_state: dict[str, Any], reader: int, old: StreamSpec, upto: int) -> list[list[int]]:
    """The unread segments of one old reader through epoch ``upto`` (see the module docstring)."""
    assert old.files is not None
    out: list[list[int]] = []
    segs = doc_state.get("segments") or []
    if segs:  # still inside the remainder of an earlier re-deal: its epoch has not started
        out.append([*segs[0][:3], int(doc_state["unit"])])
        out.extend(list(s) for s in segs[1:])
        first, pos, unit = int(doc_state["epoch"]), 0, 0
    else:
        first, pos, unit = int(doc_state["epoch"]), int(doc_state["pos"]), int(doc_state["unit"])
    shards = make_shards(len(old.files), old.num_readers)
    for epoch in range(first, upto + 1):
        plan = reader_shards(shards, reader, old.num_readers, old.seed, epoch, True)
        for i, sh in enumerate(plan):
            if epoch == first and i < pos:
                continue
            start = unit if (epoch == first and i == pos) else 0
            out.append([sh.file, sh.part, sh.parts, start])
    return out


def _started_epoch(doc_state: dict[str, Any]) -> int:
    """The newest epoch a reader has read from (a reader still in re-dealt segments has not started its own)."""
    return int(doc_state["epoch"]) - (1 if doc_state.get("segments") else 0)


def _rows_below(x: int, r: int, n: int) -> int:
    """How many of the rows ``0 .. x-1`` belong to reader ``r`` of ``n`` (row ``i`` to reader ``i % n``)."""
    return max(0, (x - r + n - 1) // n)


def _deal_segments(segments: list[list[int]], m: int) -> list[list[list[int]]]:
    if len(segments) >= m:
        return [segments[j::m] for j in range(m)]
    return [[[f, part + parts * j, parts * m, start] for f, part, parts, start in segments] for j in range(m)]


def reshard_reader_states(old_states: list[dict[str, Any]], old: StreamSpec, new: StreamSpec,
                          tokenizer: Any) -> tuple[list[dict[str, Any]], ReshardReport]:
    """New states for all ``new.num_readers`` readers from the exact states of all ``old.num_readers``
    old readers (index = reader). Deterministic: every rank computes the same list."""
    if len(old_states) != old.num_readers:
        raise ValueError(f"need {old.num_readers} old reader states, got {len(old_states)}")
    m = new.num_readers
    report = ReshardReport(old.num_readers, m)
    doc_states = [s["documents"] for s in old_states]
    if old.files is not None:
        upto = max(_started_epoch(d) for d in doc_states)
        pooled: list[list[int]] = []
        for r, d in enumerate(doc_states):
            pooled.extend(_file_remainder(d, r, old, upto))
        report.segments, report.next_epoch = len(pooled), upto + 1
        dealt = _deal_segments(pooled, m)
        documents = [{"epoch": upto + 1, "pos": 0, "unit": seg[0][3] if seg else 0, "barren": [],
                      **({"segments": seg} if seg else {})} for seg in dealt]
    else:
        low = min(int(d["epoch"]) for d in doc_states)
        row = min(int(d["row"]) for d in doc_states if int(d["epoch"]) == low)
        for r, d in enumerate(doc_states):  # old reader r had read its rows (idx % R == r) below d["row"]
            read = _rows_below(int(d["row"]), r, old.num_readers)
            report.reread_rows += read - _rows_below(row, r, old.num_readers) if int(d["epoch"]) == low else read
        report.next_epoch = low
        documents = [{"epoch": low, "row": row} for _ in range(m)]
    carried = []
    for s in old_states:
        carried.extend(s["shuffle"]["docs"])
        carried.extend(s["pending"])
    report.carried_docs = len(carried)
    tokens: list[list[torch.Tensor]] = [[] for _ in range(m)]
    for i, s in enumerate(old_states):
        tokens[i % m].append(s["packer"]["tokens"])
        report.carried_tokens += int(s["packer"]["tokens"].numel())
    skips: dict[str, int] = {}
    for s in old_states:
        for k, v in s["skips"].items():
            skips[k] = skips.get(k, 0) + int(v)
    out = []
    tag = f"resharded:{old.num_readers}:{report.next_epoch}"
    for j in range(m):
        sd = ReaderStream(new, tokenizer, j).state_dict()
        sd["documents"] = documents[j]
        mine = [list(d) for d in carried[j::m]]
        # A shuffle buffer of size 0 passes documents through: carry them as pending copies instead.
        sd["pending"] = [] if new.cfg.shuffle_buffer else mine[::-1]
        sd["shuffle"] = {"docs": mine if new.cfg.shuffle_buffer else [],
                         "rng": rng_state(random.Random(f"lrqat_dist.shuffle:{new.seed}:{j}:{tag}"))}
        sd["weights_rng"] = rng_state(random.Random(f"lrqat_dist.weights:{new.seed}:{j}:{tag}"))
        sd["packer"] = {"tokens": torch.cat(tokens[j]) if tokens[j] else torch.zeros(0, dtype=torch.int32)}
        sd["skips"] = dict(skips) if j == 0 else {k: 0 for k in skips}  # the totals stay the same
        out.append(sd)
    return out, report


def exact_reader_state(spec: StreamSpec, tokenizer: Any, reader: int, state: dict[str, Any] | None,
                       replay_blocks: int) -> dict[str, Any]:
    """An old reader's state after the last batch its rank consumed: ``state`` advanced by
    ``replay_blocks`` blocks (loader snapshots are taken every ``data.state_every`` batches)."""
    if state is not None and replay_blocks == 0:
        return state
    stream = ReaderStream(spec, tokenizer, reader)
    if state is not None:
        stream.load_state_dict(state)
    for _ in range(replay_blocks):
        stream.next_block()
    return stream.state_dict()


def with_readers(spec: StreamSpec, num_readers: int) -> StreamSpec:
    return replace(spec, num_readers=num_readers)
