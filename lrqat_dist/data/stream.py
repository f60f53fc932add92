"""One reader's resumable stream of packed blocks: documents -> set weights -> shuffle -> packing.

A *reader* is one (rank, dataloader worker) pair; reader ``rank * W + worker`` of
``world_size * W`` (``W = max(1, num_workers)``). Readers never share a unit within an epoch
(see ``sharding``), and each reader's stream depends only on the seed and its reader index.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch

from .config import DataConfig
from .documents import FileDocuments, HFDocuments
from .token_packing import TokenPacker
from .records import Document, SetSelector, SkipCounter
from .shuffle import ShuffleBuffer, rng_state, set_rng_state

STATE_FORMAT = 1


@dataclass(frozen=True)
class StreamSpec:
    """Everything that defines the streams of a split, independent of the reader index."""

    cfg: DataConfig
    files: Optional[tuple[str, ...]]  # resolved local files, or None for the HF source
    hf_split: Optional[str]
    seed: int
    num_readers: int
    train: bool  # train: cycle epochs, shuffled shard order, weights, shuffle buffer

    @property
    def source_id(self) -> str:
        """Identifies the data (file names relative to their common folder, or the HF id)."""
        if self.files is None:
            return f"hf:{self.cfg.hf_dataset}:{self.hf_split}:{self.cfg.hf_data_files!r}"
        root = os.path.dirname(self.files[0]) if len(self.files) == 1 else os.path.commonpath(self.files)
        rel = "\n".join(os.path.relpath(f, root) for f in self.files)
        return f"files:{len(self.files)}:{hashlib.sha1(rel.encode()).hexdigest()[:16]}"

    def describe(self) -> str:
        if self.files is None:
            return f"HF dataset {self.cfg.hf_dataset!r} split {self.hf_split!r}"
        return f"{len(self.files)} file(s) under {os.path.commonpath(self.files)}"


def special_ids(cfg: DataConfig, tokenizer: Any) -> tuple[int, Optional[int]]:
    """(eos, bos or None) from the config overrides or the tokenizer; errors if missing."""
    eos = cfg.eos_token_id if cfg.eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; set data.eos_token_id")
    bos = None
    if cfg.add_bos:
        bos = cfg.bos_token_id if cfg.bos_token_id is not None else getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            raise ValueError("data.add_bos is set but the tokenizer has no bos_token_id; set data.bos_token_id")
    return int(eos), (None if bos is None else int(bos))


class ReaderStream:
    """Packed ``seq_len`` blocks for reader ``reader`` of ``spec.num_readers``."""

    def __init__(self, spec: StreamSpec, tokenizer: Any, reader: int):
        cfg = spec.cfg
        self.spec, self.reader = spec, reader
        self._skips = SkipCounter(where=f"data reader {reader}/{spec.num_readers}")
        selector = SetSelector(cfg.include_sets, cfg.exclude_sets, cfg.set_weights if spec.train else None)
        self._selector = selector
        if spec.files is not None:
            self._docs: Union[FileDocuments, HFDocuments] = FileDocuments(
                list(spec.files),
                reader=reader,
                num_readers=spec.num_readers,
                seed=spec.seed,
                text_unit=cfg.text_unit,
                selector=selector,
                skips=self._skips,
                cycle=spec.train,
                shuffle=spec.train,
                what="data.train_files" if spec.train else "data.val_files",
            )
        else:
            assert cfg.hf_dataset is not None and spec.hf_split is not None
            self._docs = HFDocuments(
                cfg.hf_dataset,
                cfg.hf_data_files,
                spec.hf_split,
                reader=reader,
                num_readers=spec.num_readers,
                selector=selector,
                skips=self._skips,
                cycle=spec.train,
            )
        self._weights_rng = random.Random(f"lrqat_dist.weights:{spec.seed}:{reader}")
        self._pending: list[Document] = []  # further copies of an up-weighted document
        self._shuffle = ShuffleBuffer(
            cfg.shuffle_buffer if spec.train else 0, f"lrqat_dist.shuffle:{spec.seed}:{reader}"
        )
        eos, bos = special_ids(cfg, tokenizer)
        self._packer = TokenPacker(tokenizer, cfg.seq_len, eos, bos, cfg.max_doc_tokens, cfg.tokenize_batch)

    def next_block(self) -> Optional[np.ndarray]:
        """The next block of ``seq_len`` token ids, or ``None`` at the end of a finite stream."""
        return self._packer.next_block(self._next_document)

    def next_batch(self, micro_batch_size: int) -> Optional[torch.Tensor]:
        """``micro_batch_size`` blocks as a LongTensor ``[micro_batch_size, seq_len]``."""
        blocks = []
        for _ in range(micro_batch_size):
            block = self.next_block()
            if block is None:
                return None
            blocks.append(block)
        return torch.from_numpy(np.stack(blocks))

    def skip_counts(self) -> dict[str, int]:
        return self._skips.counts()

    def _next_document(self) -> Optional[Document]:
        return self._shuffle.next(self._weighted_document)

    def _weighted_document(self) -> Optional[Document]:
        if self._pending:
            return self._pending.pop()
        while True:
            doc = self._docs.next_document()
            if doc is None:
                return None
            n = self._selector.copies(doc.set_name, self._weights_rng)
            if n > 0:
                self._pending = [doc] * (n - 1)
                return doc

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly after the last block returned."""
        return {
            "format": STATE_FORMAT,
            "reader": self.reader,
            "num_readers": self.spec.num_readers,
            "seed": self.spec.seed,
            "source": self.spec.source_id,
            "documents": self._docs.state_dict(),
            "pending": [[d.text, d.set_name] for d in self._pending],
            "weights_rng": rng_state(self._weights_rng),
            "shuffle": self._shuffle.state_dict(),
            "packer": self._packer.state_dict(),
            "skips": self._skips.counts(),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd.get("format") != STATE_FORMAT:
            raise ValueError(f"data reader state: unknown format {sd.get('format')!r}")
        mine = (self.reader, self.spec.num_readers, self.spec.seed, self.spec.source_id)
        saved = (sd["reader"], sd["num_readers"], sd["seed"], sd["source"])
        if mine != saved:
            raise ValueError(
                "data reader state does not match this stream: saved (reader, readers, seed, "
                f"source) = {saved}, this stream has {mine}; resume with the same files, seed, "
                "world size and data.num_workers"
            )
        self._docs.load_state_dict(sd["documents"])
        self._pending = [Document(t, s) for t, s in sd["pending"]]
        set_rng_state(self._weights_rng, sd["weights_rng"])
        self._shuffle.load_state_dict(sd["shuffle"])
        self._packer.load_state_dict(sd["packer"])
        self._skips.load(sd["skips"])
