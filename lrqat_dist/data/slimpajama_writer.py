"""Writing SlimPajama-layout ``.jsonl.zst`` shards, the files the streaming pipeline reads.

One split is ``<split dir>/chunkN/example_<kind>_K.jsonl.zst`` (``kind`` is ``train`` or ``holdout``);
each line is ``{"text": ..., "meta": {"redpajama_set_name": ...}}``. Inputs are read with the
pipeline's own readers (:mod:`.units`, :mod:`.records`), so bad input is skipped and counted the same
way. Used by ``tools/make_shards.py`` and :mod:`lrqat_dist.prep.corpus`; see ``docs/data.md``.
"""

from __future__ import annotations

import json
import os
import random
from typing import Iterator, Optional

import zstandard

from .records import Document, SkipCounter, parse_json_line, parse_text
from .units import CorruptFile, file_format, iter_units


class SlimPajamaWriter:
    """Writes one split as ``chunkN/example_<kind>_K.jsonl.zst`` files under ``root``.

    Each file is written under a temporary name and renamed when full (or on :meth:`close`), so a
    crash never leaves a truncated shard; an existing shard file is an error, never overwritten.
    """

    def __init__(self, root: str | os.PathLike, kind: str, docs_per_file: int = 10000,
                 files_per_chunk: int = 1000, level: int = 3):
        self._root, self._kind = os.fspath(root), kind
        self._docs_per_file, self._files_per_chunk = docs_per_file, files_per_chunk
        self._cctx = zstandard.ZstdCompressor(level=level, write_checksum=True)
        self._file_no, self._in_file = 0, 0
        self._fh = None
        self._writer = None
        self._tmp = self._final = ""
        self.docs = 0
        self.paths: list[str] = []

    def write(self, text: str, set_name: str) -> None:
        if self._writer is None:
            self._open()
        line = json.dumps({"text": text, "meta": {"redpajama_set_name": set_name}}, ensure_ascii=False)
        self._writer.write(line.encode("utf-8") + b"\n")
        self._in_file += 1
        self.docs += 1
        if self._in_file == self._docs_per_file:
            self.close()

    def _open(self) -> None:
        chunk = self._file_no // self._files_per_chunk + 1
        index = self._file_no % self._files_per_chunk
        folder = os.path.join(self._root, f"chunk{chunk}")
        os.makedirs(folder, exist_ok=True)
        self._final = os.path.join(folder, f"example_{self._kind}_{index}.jsonl.zst")
        if os.path.exists(self._final):
            raise FileExistsError(f"{self._final} exists; write to an empty output directory")
        self._tmp = self._final + ".tmp"
        self._fh = open(self._tmp, "wb")
        self._writer = self._cctx.stream_writer(self._fh, closefd=False)

    def close(self) -> None:
        """Finish the open file (if any); the writer may be written to again afterwards."""
        if self._writer is None:
            return
        self._writer.close()
        self._fh.close()
        os.replace(self._tmp, self._final)  # a crash never leaves a truncated shard behind
        self.paths.append(self._final)
        self._writer = self._fh = None
        self._file_no += 1
        self._in_file = 0


def iter_documents(files: list[str], text_unit: str, skips: SkipCounter) -> Iterator[tuple[str, Document]]:
    """``(path, document)`` of every readable record of ``files``; bad input is counted in ``skips``."""
    for path in files:
        parse = parse_json_line if file_format(path) == "jsonl" else parse_text
        try:
            for _, raw in iter_units(path, text_unit):
                doc = parse(raw)
                if doc is None:
                    continue
                if isinstance(doc, str):
                    skips.add(doc, path)
                    continue
                yield path, doc
        except CorruptFile as e:
            skips.add(e.kind, path, str(e))


def write_records(files: list[str], train: SlimPajamaWriter, holdout: Optional[SlimPajamaWriter] = None, *,
                  set_name: str = "Local", force_set_name: bool = False, text_unit: str = "file",
                  holdout_fraction: float = 0.0, seed: int = 0, where: str = "slimpajama_writer") -> dict[str, int]:
    """Copy every document of ``files`` into ``train``, or with probability ``holdout_fraction`` (a draw
    seeded by ``seed``) into ``holdout``; closes both. Returns the skip counts by kind.

    ``set_name`` is the set of documents that carry none (``force_set_name``: of every document).
    """
    if holdout_fraction > 0 and holdout is None:
        raise ValueError("holdout_fraction > 0 needs a holdout writer")
    rng = random.Random(seed)
    skips = SkipCounter(where=where)
    for _, doc in iter_documents(files, text_unit, skips):
        name = set_name if force_set_name or doc.set_name is None else doc.set_name
        is_holdout = holdout_fraction > 0 and rng.random() < holdout_fraction
        (holdout if is_holdout else train).write(doc.text, name)
    train.close()
    if holdout is not None:
        holdout.close()
    return skips.counts()
