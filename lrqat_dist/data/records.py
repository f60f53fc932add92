"""Records: parsing raw units into documents, counting bad input, selecting by set name."""

from __future__ import annotations

import json
import logging
import math
import random
from typing import Any, NamedTuple, Optional, Union

logger = logging.getLogger(__name__)

#: Every kind of bad input that is skipped and counted (the keys of ``skip_counts()``).
SKIP_KINDS = (
    "corrupt_zstd",  # damaged compressed stream: the rest of the file is skipped
    "truncated_zstd",  # compressed stream cut short: the rest of the file is skipped
    "invalid_utf8",  # bytes that are not UTF-8, or a JSON string with lone surrogates
    "invalid_json",  # a line that is not JSON (also a line cut short)
    "not_an_object",  # valid JSON that is not an object
    "missing_text",  # object without "text"
    "non_string_text",  # "text" is not a string
    "empty_text",  # "text" (or a .txt document) is empty or whitespace only
)


class Document(NamedTuple):
    text: str
    set_name: Optional[str]


def parse_json_line(raw: bytes) -> Union[Document, str, None]:
    """A JSON line -> ``Document``, a skip kind, or ``None`` for a blank line (no record)."""
    if not raw or raw.isspace():
        return None
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "invalid_utf8"
    try:
        obj = json.loads(line)
    except ValueError:
        return "invalid_json"
    return parse_record(obj)


def parse_record(obj: Any) -> Union[Document, str]:
    """A decoded record (JSON object or HF row) -> ``Document`` or a skip kind."""
    if not isinstance(obj, dict):
        return "not_an_object"
    if "text" not in obj:
        return "missing_text"
    text = obj["text"]
    if not isinstance(text, str):
        return "non_string_text"
    if not text or text.isspace():
        return "empty_text"
    if not text.isascii():
        # JSON "\ud800" escapes decode to lone surrogates, which tokenizers reject.
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return "invalid_utf8"
    meta = obj.get("meta")
    set_name = meta.get("redpajama_set_name") if isinstance(meta, dict) else None
    return Document(text, set_name if isinstance(set_name, str) else None)


def parse_text(raw: bytes) -> Union[Document, str]:
    """A ``.txt`` document (file or paragraph) -> ``Document`` (no set name) or a skip kind."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "invalid_utf8"
    if not text or text.isspace():
        return "empty_text"
    return Document(text, None)


class SkipCounter:
    """Counts skipped input by kind; logs one warning per kind, naming the file."""

    def __init__(self, where: str = ""):
        self._where = where
        self._counts = dict.fromkeys(SKIP_KINDS, 0)
        self._warned: set[str] = set()

    def add(self, kind: str, path: str, detail: str = "") -> None:
        self._counts[kind] += 1
        if kind not in self._warned:
            self._warned.add(kind)
            logger.warning(
                "%sskipping bad input (%s) in %s%s; further cases are only counted "
                "(see skip_counts())",
                f"{self._where}: " if self._where else "",
                kind,
                path,
                f": {detail}" if detail else "",
            )

    def counts(self) -> dict[str, int]:
        return dict(self._counts)

    def load(self, counts: dict[str, int]) -> None:
        self._counts = dict.fromkeys(SKIP_KINDS, 0) | {k: int(v) for k, v in counts.items()}


class SetSelector:
    """Include / exclude / weight documents by ``meta.redpajama_set_name``.

    A document without a set name is treated as set ``None``: dropped when ``include_sets``
    is given, weight 1 otherwise.
    """

    def __init__(
        self,
        include: Optional[list[str]] = None,
        exclude: Optional[list[str]] = None,
        weights: Optional[dict[str, float]] = None,
    ):
        self._include = set(include) if include is not None else None
        self._exclude = set(exclude or ())
        self._weights = dict(weights or {})

    @property
    def is_identity(self) -> bool:
        return self._include is None and not self._exclude and not self._weights

    def accepts(self, set_name: Optional[str]) -> bool:
        """Deterministic part: include / exclude lists and zero weights."""
        if self._include is not None and set_name not in self._include:
            return False
        if set_name in self._exclude:
            return False
        return self._weights.get(set_name, 1.0) > 0  # type: ignore[arg-type]

    def copies(self, set_name: Optional[str], rng: random.Random) -> int:
        """How many times to emit an accepted document: floor(w), plus one with prob frac(w)."""
        w = self._weights.get(set_name, 1.0)  # type: ignore[arg-type]
        if w == 1.0:
            return 1  # no RNG draw, so unweighted streams do not depend on the RNG
        whole = math.floor(w)
        return whole + (1 if rng.random() < w - whole else 0)
