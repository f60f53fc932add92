#!/usr/bin/env python
"""Turn text / JSONL files into SlimPajama-format ``.jsonl.zst`` chunk files.

Writes ``OUT/train/chunk1/example_train_0.jsonl.zst``, ... and, with a holdout fraction,
``OUT/validation/chunk1/example_holdout_0.jsonl.zst``, ... . Each line is
``{"text": ..., "meta": {"redpajama_set_name": ...}}``. See docs/data.md.

Example::

    python tools/make_shards.py OUT book1.txt book2.txt corpus.jsonl \\
        --set-name RedPajamaBook --docs-per-file 1000 --holdout-fraction 0.01
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from typing import Iterator, Optional

import zstandard

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lrqat_dist.data.records import Document, SkipCounter, parse_json_line, parse_text  # noqa: E402
from lrqat_dist.data.sources import CorruptFile, file_format, iter_units, resolve_files  # noqa: E402


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=(
            "Convert .txt / .jsonl / .jsonl.zst files (or directories / globs of them) into "
            "SlimPajama-layout shards: OUT/train/chunkN/example_train_K.jsonl.zst and, with "
            "--holdout-fraction, OUT/<holdout-split>/chunkN/example_holdout_K.jsonl.zst. "
            "Bad input (invalid JSON or UTF-8, missing or empty text, damaged zstd) is skipped "
            "and counted."
        )
    )
    p.add_argument("out", help="output directory (created; existing shard files are an error)")
    p.add_argument("inputs", nargs="+", help="input files, directories or globs")
    p.add_argument(
        "--set-name",
        default="Local",
        help="meta.redpajama_set_name for documents that have none (default: %(default)s)",
    )
    p.add_argument(
        "--force-set-name",
        action="store_true",
        help="use --set-name for every document, replacing the name a JSONL record carries",
    )
    p.add_argument(
        "--text-unit",
        choices=("file", "paragraph"),
        default="file",
        help="a .txt file is one document, or one per blank-line separated paragraph "
        "(default: %(default)s)",
    )
    p.add_argument("--docs-per-file", type=int, default=10000, help="records per output file")
    p.add_argument("--files-per-chunk", type=int, default=1000, help="output files per chunkN folder")
    p.add_argument(
        "--holdout-fraction",
        type=float,
        default=0.0,
        help="fraction of documents (seeded draw) written to the holdout split (default: 0)",
    )
    p.add_argument(
        "--holdout-split",
        choices=("validation", "test"),
        default="validation",
        help="holdout folder name (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the holdout draw")
    p.add_argument("--level", type=int, default=3, help="zstd compression level")
    args = p.parse_args(argv)
    if args.docs_per_file < 1 or args.files_per_chunk < 1:
        p.error("--docs-per-file and --files-per-chunk must be >= 1")
    if not 0.0 <= args.holdout_fraction < 1.0:
        p.error("--holdout-fraction must be in [0, 1)")
    return args


class ShardWriter:
    """Writes one split as ``chunkN/example_<kind>_K.jsonl.zst`` files."""

    def __init__(self, root: str, kind: str, docs_per_file: int, files_per_chunk: int, level: int):
        self._root, self._kind = root, kind
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


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    files = resolve_files(args.inputs, "inputs")
    out = os.path.abspath(args.out)
    if any(f.startswith(out + os.sep) for f in files):
        raise SystemExit(f"error: an input lies inside the output directory {out}")
    train = ShardWriter(os.path.join(out, "train"), "train", args.docs_per_file, args.files_per_chunk, args.level)
    holdout = ShardWriter(
        os.path.join(out, args.holdout_split), "holdout", args.docs_per_file, args.files_per_chunk, args.level
    )
    rng = random.Random(args.seed)
    skips = SkipCounter(where="make_shards")
    for _, doc in iter_documents(files, args.text_unit, skips):
        name = args.set_name if args.force_set_name or doc.set_name is None else doc.set_name
        is_holdout = args.holdout_fraction > 0 and rng.random() < args.holdout_fraction
        (holdout if is_holdout else train).write(doc.text, name)
    train.close()
    holdout.close()
    bad = {k: v for k, v in skips.counts().items() if v}
    print(f"read {len(files)} input file(s); skipped bad input: {bad or 'none'}")
    print(f"train: {train.docs} documents in {len(train.paths)} file(s) under {os.path.join(out, 'train')}")
    if args.holdout_fraction > 0:
        print(
            f"{args.holdout_split}: {holdout.docs} documents in {len(holdout.paths)} file(s) "
            f"under {os.path.join(out, args.holdout_split)}"
        )
    if train.docs == 0:
        print("error: no document was written to the train split", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
