"""Resumable document iterators of one reader: over sharded local files, or an HF stream.

Both expose ``next_document()`` (a ``Document``, or ``None`` once a finite pass is over),
``state_dict()`` and ``load_state_dict()``. The state is the position *after* the last returned
document, so a restored iterator returns exactly the documents the original would have.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

from .records import Document, SetSelector, SkipCounter, parse_json_line, parse_record, parse_text
from .sharding import make_shards, reader_shards
from .units import CorruptFile, describe_files, file_format, hf_rows, iter_units, open_hf_stream


class EmptyStreamError(RuntimeError):
    """Every shard of a source was read and none produced a usable document."""


class FileDocuments:
    """Documents of reader ``reader`` of ``num_readers`` over ``files``.

    ``cycle=True`` repeats epochs forever (each with a fresh seeded shard order);
    ``cycle=False`` makes one pass in file order (``shuffle`` is then ignored).
    """

    def __init__(
        self,
        files: list[str],
        *,
        reader: int,
        num_readers: int,
        seed: int,
        text_unit: str,
        selector: SetSelector,
        skips: SkipCounter,
        cycle: bool = True,
        shuffle: bool = True,
        what: str = "data.train_files",
    ):
        self._files = files
        self._fmt = [file_format(f) for f in files]
        self._shards = make_shards(len(files), num_readers)
        self._shard_id = {s: i for i, s in enumerate(self._shards)}
        self._reader, self._num_readers, self._seed = reader, num_readers, seed
        self._text_unit, self._selector, self._skips = text_unit, selector, skips
        self._cycle, self._shuffle, self._what = cycle, shuffle and cycle, what
        self._epoch = 0
        self._pos = 0  # index into this epoch's shard list of this reader
        self._unit = 0  # next unit index to read in the current shard's file
        # Shards read whole without a usable document since the last document: once this holds
        # every shard, the source is empty for this filter and cycling would spin forever.
        self._barren: set[int] = set()
        # After an elastic resume (a different number of readers, see ``reshard``): what was left of
        # the old readers' epochs, ``[file, part, parts, start_unit]`` each, read before epoch ``_epoch``.
        self._segments: list[list[int]] = []
        self._seg = 0  # index of the segment being read; == len(_segments) once they are done
        self._gen: Optional[Iterator[Document]] = None

    def next_document(self) -> Optional[Document]:
        if self._gen is None:
            self._gen = self._run()
        return next(self._gen, None)

    def state_dict(self) -> dict[str, Any]:
        sd = {
            "epoch": self._epoch,
            "pos": self._pos,
            "unit": self._unit,
            "barren": sorted(self._barren),
        }
        if self._seg < len(self._segments):
            sd["segments"] = [list(s) for s in self._segments[self._seg:]]
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self._epoch, self._pos, self._unit = int(sd["epoch"]), int(sd["pos"]), int(sd["unit"])
        self._barren = {int(i) for i in sd["barren"]}
        self._segments = [[int(v) for v in s] for s in sd.get("segments", [])]
        self._seg = 0
        self._gen = None

    def _run(self) -> Iterator[Document]:
        while self._seg < len(self._segments):  # the rest of an epoch re-dealt by an elastic resume
            file, part, parts, _ = self._segments[self._seg]
            yield from self._read(file, part, parts)
            self._seg += 1
            self._unit = self._segments[self._seg][3] if self._seg < len(self._segments) else 0
        while True:
            plan = reader_shards(
                self._shards, self._reader, self._num_readers, self._seed, self._epoch, self._shuffle
            )
            while self._pos < len(plan):
                shard = plan[self._pos]
                whole = self._unit == 0
                got = yield from self._read(shard.file, shard.part, shard.parts)
                if whole and not got:
                    self._barren.add(self._shard_id[shard])
                    if len(self._barren) == len(self._shards):
                        raise EmptyStreamError(self._empty_message())
                self._pos, self._unit = self._pos + 1, 0
            if not self._cycle:
                return
            self._epoch, self._pos = self._epoch + 1, 0

    def _read(self, file: int, part: int, parts: int) -> Iterator[Document]:
        path, got = self._files[file], False
        parse = parse_json_line if self._fmt[file] == "jsonl" else parse_text
        try:
            for idx, raw in iter_units(path, self._text_unit, start=self._unit):
                if parts > 1 and idx % parts != part:
                    continue
                self._unit = idx + 1
                doc = parse(raw)
                if doc is None:
                    continue
                if isinstance(doc, str):
                    self._skips.add(doc, path)
                    continue
                if not self._selector.accepts(doc.set_name):
                    continue
                got = True
                self._barren.clear()
                yield doc
        except CorruptFile as e:
            self._skips.add(e.kind, path, str(e))
        return got

    def _empty_message(self) -> str:
        counts = {k: v for k, v in self._skips.counts().items() if v}
        return (
            f"{self._what}: no usable document in {describe_files(self._files)} "
            f"(every file was read; skipped bad input: {counts or 'none'}; "
            f"set filters may exclude everything)"
        )


class HFDocuments:
    """Documents of reader ``reader`` of ``num_readers`` from an HF ``datasets`` stream.

    Rows are dealt round-robin (row ``i`` to reader ``i % num_readers``); resuming re-reads and
    skips the rows before the saved position, so it is exact but not instant.
    """

    def __init__(
        self,
        dataset: str,
        data_files: Any,
        split: str,
        *,
        reader: int,
        num_readers: int,
        selector: SetSelector,
        skips: SkipCounter,
        cycle: bool = True,
    ):
        self._dataset, self._data_files, self._split = dataset, data_files, split
        self._reader, self._num_readers = reader, num_readers
        self._selector, self._skips, self._cycle = selector, skips, cycle
        self._epoch, self._row = 0, 0
        self._gen: Optional[Iterator[Document]] = None
        self._stream: Any = None

    def next_document(self) -> Optional[Document]:
        if self._gen is None:
            self._gen = self._run()
        return next(self._gen, None)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "row": self._row}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self._epoch, self._row = int(sd["epoch"]), int(sd["row"])
        self._gen = None

    def _run(self) -> Iterator[Document]:
        if self._stream is None:
            self._stream = open_hf_stream(self._dataset, self._data_files, self._split)
        where = f"hf:{self._dataset}[{self._split}]"
        while True:
            got, whole = False, self._row == 0
            for idx, row in hf_rows(self._stream, self._row):
                if idx % self._num_readers != self._reader:
                    continue
                self._row = idx + 1
                doc = parse_record(row)
                if isinstance(doc, str):
                    self._skips.add(doc, where)
                    continue
                if self._selector.accepts(doc.set_name):
                    got = True
                    yield doc
            if whole and not got:
                raise EmptyStreamError(f"{where}: no usable document for reader {self._reader}")
            if not self._cycle:
                return
            self._epoch, self._row = self._epoch + 1, 0
