"""Extractors, pure functions from source text to prose paragraphs: HTML, reST, plain text, KJV verses."""
from __future__ import annotations

import html.parser
import json
import re
from typing import Iterable, Optional

from .prose import CorpusDocument, is_prose, normalize_ws


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


def kjv_chapters(jsonl_lines: Iterable[str], max_chars: int = 800) -> list[CorpusDocument]:
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
        docs.append(CorpusDocument("kjv_bible", f"{book} {chapter}", paras))
    return docs


