"""Where documents come from: local files (resolved, read record by record) or HF streaming.

A *unit* is the raw bytes of one record: a JSON line of a ``.jsonl[.zst]`` file, or a
document of a ``.txt[.zst]`` file (the whole file, or one blank-line separated paragraph).
Units are numbered from 0 within their file; that number is the resume position.
"""

from __future__ import annotations

import glob
import os
from typing import Any, Iterable, Iterator, Optional, Union

import zstandard

#: File kinds read from local paths, by suffix.
SUFFIXES = (".jsonl.zst", ".jsonl", ".txt.zst", ".txt")

_READ_BYTES = 1 << 20


class CorruptFile(Exception):
    """A file whose compressed stream is damaged; ``kind`` is a skip-count key."""

    def __init__(self, kind: str, path: str, detail: str):
        super().__init__(f"{path}: {detail}")
        self.kind = kind
        self.path = path


def file_format(path: str) -> str:
    """``"jsonl"`` or ``"txt"``; raises ``ValueError`` for other suffixes."""
    for suffix in SUFFIXES:
        if path.endswith(suffix):
            return suffix.split(".")[1]
    raise ValueError(f"{path}: unsupported file type (expected one of {', '.join(SUFFIXES)})")


def resolve_files(spec: Union[str, list[str], None], key: str) -> list[str]:
    """Expand a directory, glob, file or list of those into a sorted, de-duplicated file list.

    ``key`` names the config entry in error messages. A missing path, a glob or directory that
    matches no supported file, and a SlimPajama root holding several splits are errors.
    """
    if spec is None:
        raise ValueError(f"{key}: not set")
    items = [spec] if isinstance(spec, str) else list(spec)
    if not items:
        raise ValueError(f"{key}: empty list")
    files: list[str] = []
    for item in items:
        item = os.path.expanduser(item)  # recipes name cache paths as ~/.cache/...
        if any(c in item for c in "*?["):
            matches = sorted(m for m in glob.glob(item, recursive=True) if os.path.isfile(m))
            matches = [m for m in matches if m.endswith(SUFFIXES)]
            if not matches:
                raise FileNotFoundError(
                    f"{key}: glob {item!r} matches no {'/'.join(SUFFIXES)} file"
                )
            files.extend(matches)
        elif os.path.isdir(item):
            files.extend(_scan_dir(item, key))
        elif os.path.isfile(item):
            file_format(item)
            files.append(item)
        else:
            raise FileNotFoundError(f"{key}: no such file or directory: {item!r}")
    # Sorted so every rank and worker sees the same list whatever the directory order.
    return sorted(dict.fromkeys(os.path.abspath(f) for f in files))


def _scan_dir(root: str, key: str) -> list[str]:
    splits = [s for s in ("train", "validation", "test") if os.path.isdir(os.path.join(root, s))]
    if len(splits) > 1:
        # Reading a SlimPajama root whole would mix the holdout files into training.
        raise ValueError(
            f"{key}: directory {root!r} holds several splits ({', '.join(splits)}); "
            f"point it at one of them, e.g. {os.path.join(root, splits[0])!r}"
        )
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        found.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(SUFFIXES))
    if not found:
        raise FileNotFoundError(f"{key}: directory {root!r} holds no {'/'.join(SUFFIXES)} file")
    return found


def describe_files(files: list[str], limit: int = 3) -> str:
    """Short human-readable naming of a file list for error messages."""
    shown = ", ".join(files[:limit])
    return shown if len(files) <= limit else f"{shown} and {len(files) - limit} more"


def iter_units(path: str, text_unit: str = "file", start: int = 0) -> Iterator[tuple[int, bytes]]:
    """Yield ``(index, raw_bytes)`` for every unit of ``path`` with ``index >= start``.

    Units before a damaged part of a ``.zst`` stream are yielded, then ``CorruptFile`` is
    raised. Blank JSON lines keep their index (and are yielded as empty bytes).
    """
    fmt = file_format(path)
    chunks = _zstd_chunks(path) if path.endswith(".zst") else _plain_chunks(path)
    if fmt == "jsonl":
        return _lines(chunks, start)
    if text_unit == "paragraph":
        return _paragraphs(_lines(chunks, 0), start)
    return _whole(chunks, start)


def _plain_chunks(path: str) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(_READ_BYTES):
            yield chunk


def _zstd_chunks(path: str) -> Iterator[bytes]:
    # A decompressobj per frame, so that a stream cut short is detected (its last frame never
    # reaches eof); zstandard's stream_reader ends such a stream silently.
    dctx = zstandard.ZstdDecompressor()
    obj = dctx.decompressobj()
    fed = False
    with open(path, "rb") as f:
        while data := f.read(_READ_BYTES):
            while data:
                fed = True
                try:
                    out = obj.decompress(data)
                except zstandard.ZstdError as e:
                    raise CorruptFile("corrupt_zstd", path, f"corrupt zstd data: {e}") from None
                if out:
                    yield out
                if obj.eof:
                    data = obj.unused_data
                    obj = dctx.decompressobj()
                    fed = False
                else:
                    data = b""
    if fed:
        raise CorruptFile("truncated_zstd", path, "zstd stream ends inside a frame")


def _lines(chunks: Iterable[bytes], start: int) -> Iterator[tuple[int, bytes]]:
    idx, rem = 0, b""
    for chunk in chunks:
        n = chunk.count(b"\n")
        if idx + n <= start:
            # Fast-forward on resume: no line of this chunk is wanted; count, don't split.
            rem = chunk[chunk.rfind(b"\n") + 1 :] if n else rem + chunk
            idx += n
            continue
        parts = (rem + chunk).split(b"\n")
        rem = parts.pop()
        for line in parts:
            if idx >= start:
                yield idx, line
            idx += 1
    if rem and idx >= start:
        yield idx, rem


def _paragraphs(lines: Iterable[tuple[int, bytes]], start: int) -> Iterator[tuple[int, bytes]]:
    idx, para = 0, []
    for _, line in lines:
        if line.strip():
            para.append(line)
            continue
        if para:
            if idx >= start:
                yield idx, b"\n".join(para)
            idx, para = idx + 1, []
    if para and idx >= start:
        yield idx, b"\n".join(para)


def _whole(chunks: Iterable[bytes], start: int) -> Iterator[tuple[int, bytes]]:
    if start == 0:
        yield 0, b"".join(chunks)


def open_hf_stream(dataset: str, data_files: Any, split: str) -> Iterable[dict]:
    """Open an HF ``datasets`` streaming split (imported lazily); errors name the dataset."""
    try:
        import datasets  # noqa: PLC0415 - optional dependency, only for this source
    except ImportError as e:
        raise RuntimeError(
            f"data.hf_dataset={dataset!r} needs the `datasets` package "
            f"(pip install 'lrqat_dist[hf]'), or set data.train_files to local files: {e}"
        ) from None
    try:
        return datasets.load_dataset(dataset, data_files=data_files, split=split, streaming=True)
    except Exception as e:  # noqa: BLE001 - any hub / builder failure gets the same advice
        raise RuntimeError(
            f"could not open HF dataset {dataset!r} (data_files={data_files!r}, split={split!r}): "
            f"{type(e).__name__}: {e}. If the hub is unreachable, download the "
            f".jsonl.zst files and set data.train_files / data.val_files instead"
        ) from e


def hf_rows(stream: Iterable[dict], start: int) -> Iterator[tuple[int, Optional[dict]]]:
    """Number the rows of an HF stream and skip the first ``start`` (resume)."""
    for idx, row in enumerate(stream):
        if idx >= start:
            yield idx, row
