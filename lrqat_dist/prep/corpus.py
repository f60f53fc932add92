"""Building the demo corpus: fetch every obtainable text source, dedupe, split, verify, write.

Documents become SlimPajama-style records ``{"text", "meta": {"redpajama_set_name": <source>}}``.
Entry point: :func:`build_corpus` (used by ``tools/prepare_text.py``); :func:`write_corpus_shards`
adds the ``.jsonl.zst`` shards the streaming pipeline reads.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..data.slimpajama_writer import SlimPajamaWriter, write_records
from .cache import SourceUnavailableError, atomic_file, cache_root
from .prose import CorpusDocument
from .split import DEFAULT_SALT, check_disjoint, dedupe_documents, dedupe_paragraphs, split_documents
from .text_sources import text_sources

logger = logging.getLogger(__name__)

#: Records per shard file: several small files, so that multi-rank loaders can split the data by file.
SHARD_DOCS_PER_FILE = 100


def write_jsonl(docs: Iterable[CorpusDocument], path: Path) -> None:
    """One SlimPajama record per line (written atomically)."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d.record(), ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[CorpusDocument]:
    """Read records written by :func:`write_jsonl` back as documents (paragraphs split on blank lines)."""
    docs = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            r = json.loads(line)
            docs.append(CorpusDocument(r["meta"]["redpajama_set_name"], str(i), r["text"].split("\n\n")))
    return docs


def count_tokens(docs: Sequence[CorpusDocument], tokenizer, batch: int = 256) -> int:
    n = 0
    for i in range(0, len(docs), batch):
        enc = tokenizer([d.text for d in docs[i:i + batch]], add_special_tokens=False)["input_ids"]
        n += sum(len(e) for e in enc)
    return n


def size_table(splits: dict[str, Sequence[CorpusDocument]], tokenizer=None) -> list[dict[str, Any]]:
    """Per source and split: documents, paragraphs, characters, tokens (if a tokenizer is given)."""
    rows = []
    for split, docs in splits.items():
        for source in dict.fromkeys(d.source for d in docs):
            mine = [d for d in docs if d.source == source]
            row = {"split": split, "source": source, "docs": len(mine),
                   "paragraphs": sum(len(d.paragraphs) for d in mine),
                   "chars": sum(len(d.text) for d in mine)}
            if tokenizer is not None:
                row["tokens"] = count_tokens(mine, tokenizer)
            rows.append(row)
    return rows


def build_corpus(out_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                 sources: Sequence[str] | None = None, heldout_fraction: float = 0.05,
                 salt: str = DEFAULT_SALT, tokenizer=None) -> dict[str, Any]:
    """Fetch/extract every obtainable source, dedupe, split, verify and write the corpus.

    Writes ``train.jsonl``, ``heldout.jsonl``, ``heldout.txt`` (held-out texts joined by blank lines,
    for WikiText-style perplexity) and ``stats.json`` to ``out_dir``; downloads and extracted sources are
    cached under ``<cache root>/text``. Returns the stats. Raises if no source at all is obtainable or
    the disjointness check fails.
    """
    cache = cache_root(cache_dir) / "text"
    out = Path(out_dir).expanduser()
    registry = text_sources()
    names = list(sources) if sources else list(registry)
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise ValueError(f"unknown text sources {unknown}; known: {list(registry)}")
    cache.mkdir(parents=True, exist_ok=True)

    docs: list[CorpusDocument] = []
    unavailable: dict[str, str] = {}
    for name in names:
        try:
            got = registry[name].load(cache)
        except SourceUnavailableError as e:
            unavailable[name] = str(e)
            logger.warning("SKIPPED %s: %s", name, e)
            continue
        logger.info("%s: %d documents, %s characters", name, len(got), f"{sum(len(d.text) for d in got):,}")
        docs.extend(got)
    if not docs:
        raise SourceUnavailableError(f"no text source could be obtained: {unavailable}")

    docs, dup_docs = dedupe_documents(docs)
    train, heldout = split_documents(docs, heldout_fraction, salt)
    train, heldout, dup_stats = dedupe_paragraphs(train, heldout)
    logger.info("dropped %d duplicate documents; paragraph dedupe: %s", dup_docs, dup_stats)
    check = check_disjoint(train, heldout)
    logger.info("disjointness check: %s", json.dumps({k: v for k, v in check.items() if k != "examples"}))
    if not check["ok"]:
        raise RuntimeError(f"held-out text leaks into training: {check}")

    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(train, out / "train.jsonl")
    write_jsonl(heldout, out / "heldout.jsonl")
    (out / "heldout.txt").write_text("\n\n".join(d.text for d in heldout) + "\n", encoding="utf-8")
    if tokenizer is not None:
        logger.info("counting tokens ...")
    stats = {
        "sources": {n: registry[n].description for n in names if n not in unavailable},
        "unavailable": unavailable,
        "heldout_fraction": heldout_fraction,
        "salt": salt,
        "duplicate_documents_dropped": dup_docs,
        "paragraph_dedupe": dup_stats,
        "check": check,
        "sizes": size_table({"train": train, "heldout": heldout}, tokenizer),
        "files": {f: (out / f).stat().st_size for f in ("train.jsonl", "heldout.jsonl", "heldout.txt")},
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
    return stats


def write_corpus_shards(corpus_dir: str | os.PathLike, docs_per_file: int = SHARD_DOCS_PER_FILE,
                        level: int = 3) -> Path:
    """SlimPajama-layout ``.jsonl.zst`` shards of a built corpus, in ``<corpus_dir>/shards``.

    ``train.jsonl`` -> ``shards/train/chunk1/example_train_K.jsonl.zst`` and ``heldout.jsonl`` ->
    ``shards/validation/chunk1/example_holdout_K.jsonl.zst``, ``docs_per_file`` records per file
    (what ``tools/make_shards.py IN --docs-per-file N`` writes). An existing ``shards`` folder is replaced.
    """
    corpus = Path(corpus_dir).expanduser()
    shards = corpus / "shards"
    if shards.exists():
        shutil.rmtree(shards)
    for name, split, kind in (("train.jsonl", "train", "train"), ("heldout.jsonl", "validation", "holdout")):
        writer = SlimPajamaWriter(shards / split, kind, docs_per_file=docs_per_file, level=level)
        skips = write_records([str(corpus / name)], writer, where="write_corpus_shards")
        bad = {k: v for k, v in skips.items() if v}
        if writer.docs == 0:
            raise RuntimeError(f"{corpus / name}: no documents written (skipped records: {bad})")
        if bad:  # counted and carried on, as tools/make_shards.py does
            logger.warning("%s: skipped records %s", corpus / name, bad)
        logger.info("%s: %d documents in %d file(s) under %s", split, writer.docs, len(writer.paths),
                    shards / split)
    return shards
