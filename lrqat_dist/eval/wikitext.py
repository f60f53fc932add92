"""WikiText-2 (raw, test split) from a local copy, prepared exactly as GPTQ / LR-QAT evaluate it.

GPTQ's ``get_wikitext2`` (which LR-QAT's evaluation follows)::

    testdata = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
    testenc = tokenizer("\\n\\n".join(testdata["text"]), return_tensors="pt")
    nsamples = testenc.input_ids.numel() // seqlen          # seqlen = 2048, non-overlapping blocks
    ppl = exp(sum(nll_i * seqlen) / (nsamples * seqlen))    # = exp(mean of the per-block mean NLL)

So: the HF rows joined with ``"\\n\\n"``, tokenized once (with the tokenizer's special tokens, i.e. a
BOS at the start for LLaMA), cut into ``numel // 2048`` blocks, the tail dropped. Every block
predicts ``seqlen - 1`` tokens, so the mean of the per-block means equals
:func:`lrqat_dist.eval.perplexity.perplexity_from_ids`' token mean: the same number.

No hub access: :func:`wikitext2_rows` reads a local copy of the test split, as

- the HF parquet file (``wikitext-2-raw-v1/test-00000-of-00001.parquet``, column ``text``);
- JSON lines with a ``text`` field (one row per line, e.g. ``datasets``' ``to_json``);
- the raw file ``wiki.test.raw``: its lines with the newline kept and blank lines as empty rows,
  which is how the HF builder produced the rows from that file;
- a directory holding one of those.
"""
from __future__ import annotations

import json
from pathlib import Path

WIKITEXT2_TEST_ROWS = 4358  # rows of the HF wikitext-2-raw-v1 test split
JOINER = "\n\n"
_DIR_CANDIDATES = ("wikitext-2-raw-v1/test-00000-of-00001.parquet", "test-00000-of-00001.parquet",
                   "wikitext-2-raw-v1/test.jsonl", "test.jsonl", "wikitext-2-raw/wiki.test.raw", "wiki.test.raw")


def _resolve(path: Path) -> Path:
    if path.is_dir():
        for c in _DIR_CANDIDATES:
            if (path / c).is_file():
                return path / c
        raise FileNotFoundError(f"wikitext2: {path} holds none of {', '.join(_DIR_CANDIDATES)}")
    if not path.is_file():
        raise FileNotFoundError(f"wikitext2: {path} does not exist (a local copy of the test split is needed: "
                                f"the HF parquet, a jsonl with 'text', or wiki.test.raw)")
    return path


def wikitext2_rows(path: str | Path) -> list[str]:
    """The test split's rows (the HF ``text`` column) from a local parquet / jsonl / raw file or directory."""
    p = _resolve(Path(path))
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(str(p))
        if "text" not in table.column_names:
            raise ValueError(f"wikitext2: {p} has no 'text' column (columns: {table.column_names})")
        return [r if r is not None else "" for r in table.column("text").to_pylist()]
    if p.suffix in (".jsonl", ".json"):
        rows = []
        with p.open(encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                rec = json.loads(line)
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise ValueError(f"wikitext2: {p}:{i}: expected an object with a string 'text'")
                rows.append(rec["text"])
        return rows
    with p.open(encoding="utf-8") as f:  # raw: one row per line, as the HF builder read it (universal newlines)
        return [line if line.strip() else "" for line in f]


def wikitext2_text(path: str | Path) -> tuple[str, int]:
    """(the rows joined with ``"\\n\\n"``, number of rows)."""
    rows = wikitext2_rows(path)
    return JOINER.join(rows), len(rows)
