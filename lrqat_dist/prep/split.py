"""Deduplication, the held-out split and its disjointness check.

The held-out split is chosen per document by a salted hash of its id (deterministic, stable when
documents are added), then deduplicated against training so that no held-out paragraph appears
verbatim in training, nor any held-out paragraph whose word 13-grams are mostly seen in training
(the Python reference and pydoc topics share text; so do parallel Bible passages).
:func:`check_disjoint` verifies this on the written corpus.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Any, Callable, Sequence

from .prose import CorpusDocument

DEFAULT_SALT = "lrqat-heldout-v1"
NGRAM = 13

_NON_ALNUM = re.compile(r"[\W_]+")
_WORD = re.compile(r"\w+")


def paragraph_key(paragraph: str) -> str:
    """Dedup key: lowercase letters and digits only, so markup-only differences collide."""
    return _NON_ALNUM.sub("", paragraph.lower())


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _ngram_hashes(words: Sequence[str], n: int = NGRAM) -> list[int]:
    # zip of shifted views builds the n-gram tuples in C (this runs over millions of words).
    return list(map(hash, zip(*(words[k:] for k in range(n)))))


def _verbatim_hits(needles: Sequence[str], haystacks: Sequence[str]) -> list[str]:
    """The needles that occur as substrings of some haystack, exactly.

    Substring search of every needle through ~10 MB is slow, so candidates come from an inverted
    index: a needle's interior words (its first/last word may be cut mid-word) must all occur in the
    haystack that contains it.
    """
    index: dict[str, set[int]] = {}
    for i, h in enumerate(haystacks):
        for w in set(_words(h)):
            index.setdefault(w, set()).add(i)
    hits = []
    for needle in needles:
        interior = set(_words(needle)[1:-1])
        if interior:
            sets = sorted((index.get(w, set()) for w in interior), key=len)
            cand = set(sets[0])
            for other in sets[1:]:
                if not cand:
                    break
                cand &= other
        else:
            cand = range(len(haystacks))
        if any(needle in haystacks[i] for i in cand):
            hits.append(needle)
    return hits



def dedupe_documents(docs: Sequence[CorpusDocument]) -> tuple[list[CorpusDocument], int]:
    """Drop exact duplicate documents (same normalized text), keeping the first."""
    seen, out = set(), []
    for d in docs:
        k = hashlib.sha1(paragraph_key(d.text).encode()).digest()
        if k not in seen:
            seen.add(k)
            out.append(d)
    return out, len(docs) - len(out)


def heldout_score(doc: CorpusDocument, salt: str = DEFAULT_SALT) -> float:
    """Uniform in [0, 1), a function of (salt, source, doc id) only."""
    h = hashlib.sha256(f"{salt}\0{doc.source}\0{doc.doc_id}".encode()).hexdigest()
    return int(h[:16], 16) / 2 ** 64


def split_documents(docs: Sequence[CorpusDocument], heldout_fraction: float = 0.05,
                    salt: str = DEFAULT_SALT) -> tuple[list[CorpusDocument], list[CorpusDocument]]:
    """Document-level split by hash; every source with >= 2 documents gets at least one held out."""
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    held = {id(d) for d in docs if heldout_score(d, salt) < heldout_fraction}
    for source in dict.fromkeys(d.source for d in docs):
        mine = [d for d in docs if d.source == source]
        if len(mine) >= 2 and not any(id(d) in held for d in mine):
            held.add(id(min(mine, key=lambda d: heldout_score(d, salt))))
    return [d for d in docs if id(d) not in held], [d for d in docs if id(d) in held]


def dedupe_paragraphs(train: Sequence[CorpusDocument], heldout: Sequence[CorpusDocument], max_ngram_overlap: float = 0.5,
                      min_heldout_kept: float = 0.5) -> tuple[list[CorpusDocument], list[CorpusDocument], dict[str, int]]:
    """Drop repeated paragraphs (first occurrence kept; training first), then held-out paragraphs that
    are in training verbatim/after normalization or whose word 13-grams are >= ``max_ngram_overlap``
    seen in training. Documents left empty are dropped, and so are held-out documents that keep less
    than ``min_heldout_kept`` of their characters (a mostly duplicated page leaves only fragments)."""
    stats = {"train_dup_paragraphs": 0, "heldout_dup_paragraphs": 0, "heldout_ngram_paragraphs": 0,
             "heldout_docs_mostly_duplicate": 0}
    seen: set[str] = set()

    def keep_new(doc: CorpusDocument, counter: str, extra: Callable[[str], bool] = lambda p: False):
        kept = []
        for p in doc.paragraphs:
            k = paragraph_key(p)
            if k in seen:
                stats[counter] += 1
            elif not extra(p):
                seen.add(k)
                kept.append(p)
        return dataclasses.replace(doc, paragraphs=kept)

    new_train = [d for d in (keep_new(d, "train_dup_paragraphs") for d in train) if d.paragraphs]
    train_grams = {g for d in new_train for p in d.paragraphs for g in _ngram_hashes(_words(p))}

    def mostly_seen(p: str) -> bool:
        grams = _ngram_hashes(_words(p))
        if grams and sum(g in train_grams for g in grams) >= max_ngram_overlap * len(grams):
            stats["heldout_ngram_paragraphs"] += 1
            return True
        return False

    new_held = []
    for doc in heldout:
        kept = keep_new(doc, "heldout_dup_paragraphs", mostly_seen)
        if len(kept.text) < min_heldout_kept * len(doc.text):
            stats["heldout_docs_mostly_duplicate"] += bool(kept.paragraphs)
            continue
        new_held.append(kept)
    return new_train, new_held, stats


def check_disjoint(train: Sequence[CorpusDocument], heldout: Sequence[CorpusDocument]) -> dict[str, Any]:
    """Verify the split: no shared document, no held-out paragraph found verbatim (as a substring) in
    the training text, no normalized paragraph shared; also reports held-out 13-gram overlap."""
    train_ids = {(d.source, d.doc_id) for d in train}
    shared_ids = [f"{d.source}/{d.doc_id}" for d in heldout if (d.source, d.doc_id) in train_ids]
    train_texts = {hashlib.sha1(d.text.encode()).digest() for d in train}
    shared_docs = sum(hashlib.sha1(d.text.encode()).digest() in train_texts for d in heldout)
    train_keys = {paragraph_key(p) for d in train for p in d.paragraphs}
    shared_keys = sum(paragraph_key(p) in train_keys for d in heldout for p in d.paragraphs)
    verbatim = _verbatim_hits([p for d in heldout for p in d.paragraphs],
                              [p for d in train for p in d.paragraphs])
    train_grams = {g for d in train for p in d.paragraphs for g in _ngram_hashes(_words(p))}
    held_grams = [g for d in heldout for p in d.paragraphs for g in _ngram_hashes(_words(p))]
    overlap = sum(g in train_grams for g in held_grams) / max(1, len(held_grams))
    result = {
        "heldout_docs": len(heldout),
        "heldout_paragraphs": sum(len(d.paragraphs) for d in heldout),
        "shared_doc_ids": len(shared_ids),
        "shared_doc_texts": shared_docs,
        "shared_normalized_paragraphs": shared_keys,
        "heldout_paragraphs_verbatim_in_train": len(verbatim),
        f"heldout_{NGRAM}gram_overlap": round(overlap, 5),
        "examples": verbatim[:3],
    }
    result["ok"] = not (shared_ids or shared_docs or shared_keys or verbatim)
    return result

