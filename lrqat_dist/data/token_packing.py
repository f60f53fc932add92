"""Tokenize documents in batches and pack them into fixed-length blocks without padding.

Each document becomes ``[BOS] + ids[:max_doc_tokens] + [EOS]`` (BOS optional); the
concatenation of all documents is cut into consecutive ``seq_len`` blocks, so a block may start
or end mid-document and no token is padding. Tokens past the last full block stay in the
buffer (part of the resumable state) and open the next block.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import torch

from .records import Document

#: Characters kept per wanted token before tokenizing a document that will be truncated;
#: generous (English averages ~4) because a cut that yields too few tokens is re-done in full.
_CHARS_PER_TOKEN = 8


def batch_encoder(tokenizer: Any) -> Callable[[list[str]], list[list[int]]]:
    """``texts -> ids`` with no special tokens, using the Rust batch path of fast tokenizers.

    Special-token strings inside a document (a web page quoting ``<|endoftext|>``) are
    tokenized as plain text, so only the packer places EOS / BOS. The Rust tokenizer's
    ``encode_special_tokens`` switch is set for the duration of each call and restored after
    (a private copy would cost ~1 s per reader to build); do not tokenize with the same
    tokenizer object from another thread while a loader in this process is producing batches.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        # Slow (Python) tokenizers: no batch path and no way to disable special-token parsing.
        return lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]
    encode = getattr(backend, "encode_batch_fast", None) or backend.encode_batch

    def run(texts: list[str]) -> list[list[int]]:
        before = backend.encode_special_tokens
        backend.encode_special_tokens = True
        try:
            return [e.ids for e in encode(texts, add_special_tokens=False)]
        finally:
            backend.encode_special_tokens = before

    return run


def cut_for_tokens(text: str, max_tokens: int) -> Optional[str]:
    """A prefix of ``text`` whose tokenization starts like the full text's, or ``None``.

    The cut is at a space preceded by a letter or digit: tokenizers that never merge across
    such a boundary (byte-level BPE with a GPT-2 / LLaMA-3 style split, SentencePiece) give
    the prefix exactly the full text's leading tokens.
    """
    limit = max_tokens * _CHARS_PER_TOKEN
    if len(text) <= limit:
        return None
    lo, hi = limit // 2, limit
    for _ in range(64):
        j = text.rfind(" ", lo, hi)
        if j <= lo:
            return None
        if text[j - 1].isalnum():
            return text[:j]
        hi = j
    return None


class TokenPacker:
    """Turns documents into ``seq_len`` token blocks; see the module docstring."""

    def __init__(
        self,
        tokenizer: Any,
        seq_len: int,
        eos_id: int,
        bos_id: Optional[int] = None,
        max_doc_tokens: Optional[int] = None,
        batch_docs: int = 64,
    ):
        self.seq_len = seq_len
        self._tokenizer = tokenizer
        self._eos, self._bos = eos_id, bos_id
        self._max = max_doc_tokens
        self._batch_docs = batch_docs
        self._buf = np.empty(0, dtype=np.int64)
        self._encode: Optional[Callable[[list[str]], list[list[int]]]] = None

    def next_block(self, next_document: Callable[[], Optional[Document]]) -> Optional[np.ndarray]:
        """The next block (int64 array of ``seq_len``), or ``None`` once documents run out."""
        while len(self._buf) < self.seq_len:
            texts = []
            while len(texts) < self._batch_docs:
                doc = next_document()
                if doc is None:
                    break
                texts.append(doc.text)
            if not texts:
                return None
            self._buf = np.concatenate([self._buf, self.encode_documents(texts)])
        block, self._buf = self._buf[: self.seq_len], self._buf[self.seq_len :]
        return block

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        """The packed token sequence of ``texts`` (BOS / truncation / EOS applied)."""
        if self._encode is None:
            self._encode = batch_encoder(self._tokenizer)
        if self._max is None:
            ids = self._encode(texts)
        else:
            cuts = [cut_for_tokens(t, self._max) for t in texts]
            ids = self._encode([t if c is None else c for t, c in zip(texts, cuts)])
            for i, c in enumerate(cuts):
                if c is not None and len(ids[i]) < self._max:
                    ids[i] = self._encode([texts[i]])[0]  # the cut was too short: redo in full
        flat: list[int] = []
        for doc_ids in ids:
            if self._bos is not None:
                flat.append(self._bos)
            flat.extend(doc_ids if self._max is None else doc_ids[: self._max])
            flat.append(self._eos)
        return np.array(flat, dtype=np.int64)

    def state_dict(self) -> dict[str, Any]:
        # int32 halves the state; vocabularies stay far below 2**31.
        return {"tokens": torch.from_numpy(self._buf.astype(np.int32))}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self._buf = sd["tokens"].numpy().astype(np.int64)

    def __getstate__(self) -> dict[str, Any]:
        # The encoder closure holds the Rust tokenizer; rebuild it after pickling (spawn workers).
        return {**self.__dict__, "_encode": None}
