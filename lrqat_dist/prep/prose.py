"""Corpus documents and what counts as prose (normalization and the prose heuristic)."""
from __future__ import annotations

import dataclasses
import re
from typing import Any


@dataclasses.dataclass
class CorpusDocument:
    """One document of the prepared corpus (a page, topic or chapter of a source).

    ``paragraphs`` are whitespace-normalized; ``text`` joins them with blank lines. (The streaming
    pipeline's parsed record is :class:`lrqat_dist.data.records.Document`.)
    """

    source: str
    doc_id: str
    paragraphs: list[str]

    @property
    def text(self) -> str:
        return "\n\n".join(self.paragraphs)

    def record(self) -> dict[str, Any]:
        return {"text": self.text, "meta": {"redpajama_set_name": self.source}}


_WS = re.compile(r"\s+")
# A "plain word": letters (inner hyphen/apostrophe allowed), optionally quoted or bracketed, with
# trailing punctuation. Code tokens (foo_bar, f(x), a.b, ::=, 0x1F) are not plain words.
_PLAIN_WORD = re.compile(r"^[\"'“‘(\[]*[^\W\d_]+(?:[-'’][^\W\d_]+)*[\"'”’)\]]*[.,;:!?]*[\"'”’)\]]*[.,;:!?]*$")


def normalize_ws(text: str) -> str:
    return _WS.sub(" ", text).strip()


def is_prose(paragraph: str, min_words: int = 6, min_plain: float = 0.6) -> bool:
    """Heuristic: enough words, and most of them plain words, many lowercase (keeps sentences that
    mention a few identifiers; drops code, grammar rules, tables, shell lines and title lists)."""
    words = paragraph.split()
    if len(words) < min_words or paragraph.startswith(">>>") or "::=" in paragraph:  # doctest, grammar
        return False
    plain = [w for w in words if _PLAIN_WORD.match(w)]
    lower = sum(1 for w in plain if w.strip("\"'“”‘’()[].,;:!?").islower())
    return len(plain) >= min_plain * len(words) and lower >= 0.3 * len(words)

