#!/usr/bin/env python
"""Turn text / JSONL files into SlimPajama-format ``.jsonl.zst`` chunk files.

Writes ``OUT/train/chunk1/example_train_0.jsonl.zst``, ... and, with a holdout fraction,
``OUT/validation/chunk1/example_holdout_0.jsonl.zst``, ... . Each line is
``{"text": ..., "meta": {"redpajama_set_name": ...}}``. See docs/data.md. The writer is library code,
:mod:`lrqat_dist.data.slimpajama_writer`; this file is its command line.

Example::

    python tools/make_shards.py OUT book1.txt book2.txt corpus.jsonl \\
        --set-name RedPajamaBook --docs-per-file 1000 --holdout-fraction 0.01
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional

from lrqat_dist.data.slimpajama_writer import SlimPajamaWriter, write_records
from lrqat_dist.data.units import resolve_files


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


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    files = resolve_files(args.inputs, "inputs")
    out = os.path.abspath(args.out)
    if any(f.startswith(out + os.sep) for f in files):
        raise SystemExit(f"error: an input lies inside the output directory {out}")
    train = SlimPajamaWriter(os.path.join(out, "train"), "train", args.docs_per_file, args.files_per_chunk,
                             args.level)
    holdout = SlimPajamaWriter(
        os.path.join(out, args.holdout_split), "holdout", args.docs_per_file, args.files_per_chunk, args.level
    )
    skips = write_records(files, train, holdout, set_name=args.set_name, force_set_name=args.force_set_name,
                          text_unit=args.text_unit, holdout_fraction=args.holdout_fraction, seed=args.seed,
                          where="make_shards")
    bad = {k: v for k, v in skips.items() if v}
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
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
