"""The ``data:`` section of the training YAML, as a checked dataclass."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Optional, Union

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
        for f in dataclasses.fields(self):
            _check_type(f"data.{f.name}", getattr(self, f.name), _HINTS[f.name])
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
        """Build from a YAML mapping; unknown keys and wrong types raise ``ValueError``."""
        if d is None:
            d = {}
        if not isinstance(d, dict):
            raise ValueError(f"data: expected a mapping, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in known:
                raise ValueError(f"data.{key}: unknown key (known: {', '.join(sorted(known))})")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict copy, e.g. to log the resolved config."""
        return dataclasses.asdict(self)


_HINTS = typing.get_type_hints(DataConfig)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return "null" if tp is type(None) else tp.__name__


def _matches(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        k_tp, v_tp = typing.get_args(tp)
        return isinstance(value, dict) and all(
            _matches(k, k_tp) and _matches(v, v_tp) for k, v in value.items()
        )
    # bool is an int subclass: `seq_len: true` must not pass as 1.
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp)


def _check_type(key: str, value: Any, tp: Any) -> None:
    if not _matches(value, tp):
        raise ValueError(f"{key}: expected {_type_name(tp)}, got {_describe(value)}")


def _describe(value: Any) -> str:
    if isinstance(value, list):
        inner = sorted({type(v).__name__ for v in value})
        return f"list[{' | '.join(inner)}]" if inner else "list"
    if value is None:
        return "null"
    return type(value).__name__
