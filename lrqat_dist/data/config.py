"""The ``data:`` section of the training YAML, as a checked dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Union

from ..typed_config import check_fields, from_dict

#: How a ``.txt`` file is split into documents.
TEXT_UNITS = ("file", "paragraph")


@dataclass
class DataConfig:
    """Streaming data settings (YAML ``data:`` section); see ``docs/data.md``.

    Paths (``train_files``, ``val_files``) are a directory (searched recursively for
    ``.jsonl.zst``, ``.jsonl``, ``.txt``, ``.txt.zst``), a glob, a file, or a list of those.
    """

    # --- sources -------------------------------------------------------------------------
    train_files: Optional[Union[str, list[str]]] = None
    val_files: Optional[Union[str, list[str]]] = None
    #: HF ``datasets`` streaming source, used where ``train_files`` / ``val_files`` is unset.
    hf_dataset: Optional[str] = None
    hf_data_files: Optional[Union[str, list[str], dict[str, Union[str, list[str]]]]] = None
    hf_split: str = "train"
    hf_val_split: str = "validation"
    #: ``file``: a ``.txt`` file is one document; ``paragraph``: blank-line separated paragraphs are.
    text_unit: str = "file"
    # --- records -------------------------------------------------------------------------
    include_sets: Optional[list[str]] = None
    exclude_sets: Optional[list[str]] = None
    #: Expected copies of each document of a set per epoch (0.5 = keep half, 2 = twice; default 1).
    set_weights: Optional[dict[str, float]] = None
    # --- tokenization and packing --------------------------------------------------------
    seq_len: int = 1024
    add_bos: bool = False
    #: Override the tokenizer's EOS / BOS ids (e.g. a base model's ``<|endoftext|>``).
    eos_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    #: Keep only the first N tokens of each document (the LR-QAT paper kept 1024).
    max_doc_tokens: Optional[int] = None
    #: Documents tokenized per fast-tokenizer batch call.
    tokenize_batch: int = 64
    # --- order, workers, resume ----------------------------------------------------------
    #: Documents held in the seeded shuffle buffer (0 = stream order).
    shuffle_buffer: int = 0
    num_workers: int = 0
    prefetch_factor: int = 2
    #: Workers send their full state with every N-th batch; a resume replays < N batches per worker.
    state_every: int = 1
    # --- validation ----------------------------------------------------------------------
    #: Total validation blocks of ``seq_len`` tokens, split evenly across ranks.
    val_blocks: int = 256

    def __post_init__(self) -> None:
        check_fields(self, "data")
        for name in ("seq_len", "tokenize_batch", "prefetch_factor", "state_every", "val_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("shuffle_buffer", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.{name}: must be >= 0, got {getattr(self, name)}")
        if self.max_doc_tokens is not None and self.max_doc_tokens < 1:
            raise ValueError(f"data.max_doc_tokens: must be >= 1 or null, got {self.max_doc_tokens}")
        if self.text_unit not in TEXT_UNITS:
            raise ValueError(f"data.text_unit: must be one of {TEXT_UNITS}, got {self.text_unit!r}")
        for name, w in (self.set_weights or {}).items():
            if w < 0:
                raise ValueError(f"data.set_weights.{name}: must be >= 0, got {w}")
        for name in ("eos_token_id", "bos_token_id"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ValueError(f"data.{name}: must be >= 0, got {v}")

    @classmethod
    def from_dict(cls, d: Optional[dict[str, Any]]) -> "DataConfig":
        """Build from a YAML mapping; unknown keys and wrong types raise ``ValueError`` naming the key."""
        return from_dict(cls, d, "data")

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict copy, e.g. to log the resolved config."""
        return dataclasses.asdict(self)
