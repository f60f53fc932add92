"""Local sources: path resolution, unit reading, and every kind of bad input."""

import logging
import os
import sys
import types

import pytest
import zstandard
from _data_testlib import make_docs, record, tokenizer, write_jsonl  # noqa: F401

from lrqat_dist.data import DataConfig, build_train_loader, build_val_loader
from lrqat_dist.data import units
from lrqat_dist.data.documents import EmptyStreamError
from lrqat_dist.data.units import iter_units, resolve_files

# --- resolution ------------------------------------------------------------------------


def test_resolve_dir_glob_list(tmp_path):
    a = write_jsonl(str(tmp_path / "d" / "chunk1" / "x_0.jsonl.zst"), [record("a")])
    b = write_jsonl(str(tmp_path / "d" / "chunk2" / "x_1.jsonl"), [record("b")])
    t = tmp_path / "t.txt"
    t.write_text("hello")
    (tmp_path / "d" / "notes.md").write_text("ignored")
    assert resolve_files(str(tmp_path / "d"), "k") == [a, b]
    assert resolve_files(str(tmp_path / "d" / "**" / "*.jsonl*"), "k") == [a, b]
    assert resolve_files([str(t), a, a], "k") == sorted([str(t), a])


def test_resolve_errors_name_the_path(tmp_path):
    missing = str(tmp_path / "nope" / "train")
    with pytest.raises(FileNotFoundError, match="data.train_files: no such file or directory: .*nope/train"):
        resolve_files(missing, "data.train_files")
    with pytest.raises(FileNotFoundError, match=r"glob '.*\*.jsonl.zst' matches no"):
        resolve_files(str(tmp_path / "*.jsonl.zst"), "data.train_files")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="directory .*empty' holds no"):
        resolve_files(str(tmp_path / "empty"), "data.train_files")
    (tmp_path / "f.parquet").write_text("x")
    with pytest.raises(ValueError, match="f.parquet: unsupported file type"):
        resolve_files(str(tmp_path / "f.parquet"), "data.train_files")


def test_slimpajama_root_with_several_splits_is_refused(tmp_path):
    write_jsonl(str(tmp_path / "train" / "chunk1" / "example_train_0.jsonl.zst"), [record("a")])
    write_jsonl(str(tmp_path / "validation" / "chunk1" / "example_holdout_0.jsonl.zst"), [record("b")])
    with pytest.raises(ValueError, match="holds several splits .*point it at one of them"):
        resolve_files(str(tmp_path), "data.train_files")


def test_missing_path_error_from_builders(tmp_path, tokenizer):
    cfg = DataConfig(train_files=str(tmp_path / "missing"), val_files=str(tmp_path / "gone"))
    with pytest.raises(FileNotFoundError, match="missing"):
        build_train_loader(cfg, tokenizer, micro_batch_size=1)
    with pytest.raises(FileNotFoundError, match="data.val_files: .*gone"):
        build_val_loader(cfg, tokenizer, micro_batch_size=1)
    with pytest.raises(ValueError, match="set data.train_files"):
        build_train_loader(DataConfig(), tokenizer, micro_batch_size=1)


# --- reading units ---------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [3, 17, 1 << 20])
def test_lines_with_resume_offset_and_small_chunks(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(units, "_READ_BYTES", chunk)
    recs = [record(f"doc {i} " + "x" * (i % 13)) for i in range(50)]
    # Two zstd frames back to back, as concatenated shards are.
    zc = zstandard.ZstdCompressor()
    raw = [(f'{{"text": "doc {i} ' + "x" * (i % 13) + '"}\n').encode() for i in range(50)]
    path = tmp_path / "two_frames.jsonl.zst"
    path.write_bytes(zc.compress(b"".join(raw[:20])) + zc.compress(b"".join(raw[20:])))
    for start in (0, 1, 19, 20, 37, 49, 50, 60):
        got = list(iter_units(str(path), start=start))
        assert [i for i, _ in got] == list(range(start, 50))
        assert [line for _, line in got] == [r.rstrip(b"\n") for r in raw[start:]]
    assert len(recs) == 50


def test_txt_units(tmp_path):
    p = tmp_path / "book.txt"
    p.write_text("First para\nline two.\n\n\n  \nSecond para.\n\nThird.")
    assert [u for _, u in iter_units(str(p), "file")] == [p.read_bytes()]
    assert list(iter_units(str(p), "paragraph")) == [
        (0, b"First para\nline two."),
        (1, b"Second para."),
        (2, b"Third."),
    ]
    assert list(iter_units(str(p), "paragraph", start=2)) == [(2, b"Third.")]


# --- bad input: skipped and counted ----------------------------------------------------


def _good(tmp_path, n=30):
    return write_jsonl(str(tmp_path / "data" / "a_good.jsonl.zst"), [record(t) for t in make_docs(n)])


def _val_counts(tmp_path, tokenizer, **kw):
    """Read every file once (validation pass) and return the skip counts."""
    cfg = DataConfig(val_files=str(tmp_path / "data"), seq_len=16, val_blocks=10**6, **kw)
    val = build_val_loader(cfg, tokenizer, micro_batch_size=4)
    assert len(val) > 0
    return val.skip_counts()


def test_bad_json_records_are_counted_by_kind(tmp_path, tokenizer, caplog):
    _good(tmp_path)
    bad = write_jsonl(
        str(tmp_path / "data" / "b_bad.jsonl"),
        [
            record("fine document one"),
            b'{"text": "cut short',  # invalid JSON
            b"not json at all",  # invalid JSON
            b"[1, 2, 3]",  # not an object
            b'{"meta": {"redpajama_set_name": "RedPajamaC4"}}',  # missing text
            b'{"text": 17}',  # non-string text
            b'{"text": null}',  # non-string text
            b'{"text": ""}',  # empty
            b'{"text": "   \\n\\t "}',  # whitespace only
            b'{"text": "caf\xe9 latin-1"}',  # invalid UTF-8 bytes
            b'{"text": "lone \\ud800 surrogate"}',  # invalid UTF-8 once encoded
            b"",  # blank line: not a record, not counted
            record("fine document two"),
        ],
    )
    with caplog.at_level(logging.WARNING, logger="lrqat_dist.data.records"):
        counts = _val_counts(tmp_path, tokenizer)
    assert counts == {
        "corrupt_zstd": 0,
        "truncated_zstd": 0,
        "invalid_utf8": 2,
        "invalid_json": 2,
        "not_an_object": 1,
        "missing_text": 1,
        "non_string_text": 2,
        "empty_text": 2,
    }
    warnings = [r.getMessage() for r in caplog.records]
    # One warning per kind, naming the file.
    for kind in ("invalid_utf8", "invalid_json", "not_an_object", "missing_text", "non_string_text", "empty_text"):
        hits = [w for w in warnings if f"({kind})" in w]
        assert len(hits) == 1 and bad in hits[0], (kind, warnings)


def test_corrupt_and_truncated_zstd(tmp_path, tokenizer, caplog):
    _good(tmp_path)
    full = zstandard.ZstdCompressor().compress(
        b"".join(b'{"text": "record %d of a long file with words"}\n' % i for i in range(2000))
    )
    trunc = tmp_path / "data" / "c_trunc.jsonl.zst"
    trunc.write_bytes(full[: len(full) // 2])
    garbage = tmp_path / "data" / "d_garbage.jsonl.zst"
    garbage.write_bytes(os.urandom(4096))
    tail = tmp_path / "data" / "e_tail.jsonl.zst"  # a good frame, then garbage
    tail.write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "kept"}\n') + b"\x00garbage" * 50)
    with caplog.at_level(logging.WARNING):
        counts = _val_counts(tmp_path, tokenizer)
    assert counts["truncated_zstd"] == 1
    assert counts["corrupt_zstd"] == 2
    assert sum(counts.values()) == 3
    text = caplog.text
    assert "truncated_zstd" in text and "c_trunc.jsonl.zst" in text
    assert "corrupt_zstd" in text and "d_garbage.jsonl.zst" in text


def test_txt_invalid_utf8_and_empty(tmp_path, tokenizer):
    _good(tmp_path)
    (tmp_path / "data" / "f.txt").write_bytes(b"para one is fine\n\n\xff\xfe broken\n\nok again")
    (tmp_path / "data" / "g.txt").write_bytes(b"  \n\n ")
    counts = _val_counts(tmp_path, tokenizer, text_unit="paragraph")
    assert counts["invalid_utf8"] == 1 and sum(counts.values()) == 1
    counts = _val_counts(tmp_path, tokenizer, text_unit="file")
    assert counts["invalid_utf8"] == 1 and counts["empty_text"] == 1


def test_train_loader_reports_skips_from_workers(tmp_path, tokenizer):
    _good(tmp_path)
    write_jsonl(str(tmp_path / "data" / "b_bad.jsonl"), [b"{oops", record("x" * 50), b'{"text": 1}'])
    cfg = DataConfig(train_files=str(tmp_path / "data"), seq_len=32, num_workers=2)
    loader = build_train_loader(cfg, tokenizer, micro_batch_size=2, seed=3)
    it = iter(loader)
    for _ in range(40):  # more than an epoch of every worker
        next(it)
    counts = loader.skip_counts()
    assert counts["invalid_json"] >= 1 and counts["non_string_text"] >= 1
    assert counts["invalid_json"] == counts["non_string_text"]  # both once per pass over the file


# --- nothing to read: a clear error, never a hang --------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_with_no_document_is_an_error(tmp_path, tokenizer, workers):
    write_jsonl(str(tmp_path / "data" / "only_bad.jsonl.zst"), [b"{bad", b'{"text": ""}'])
    write_jsonl(str(tmp_path / "data" / "empty.jsonl"), [])
    cfg = DataConfig(train_files=str(tmp_path / "data"), seq_len=8, num_workers=workers)
    loader = build_train_loader(cfg, tokenizer, micro_batch_size=1)
    with pytest.raises(EmptyStreamError, match=r"data.train_files: no usable document in .*only_bad.jsonl.zst"):
        next(iter(loader))


def test_filter_that_matches_nothing_is_an_error(tmp_path, tokenizer):
    _good(tmp_path)
    cfg = DataConfig(train_files=str(tmp_path / "data"), seq_len=8, include_sets=["RedPajamaArXiv"])
    with pytest.raises(EmptyStreamError, match="set filters may exclude everything"):
        next(iter(build_train_loader(cfg, tokenizer, micro_batch_size=1)))


def test_validation_with_too_little_data(tmp_path, tokenizer):
    write_jsonl(str(tmp_path / "data" / "v.jsonl"), [record("just a few words")])
    cfg = DataConfig(val_files=str(tmp_path / "data"), seq_len=512)
    with pytest.raises(ValueError, match=r"data.val_files: .*v.jsonl holds 0 full block\(s\) of 512 tokens"):
        len(build_val_loader(cfg, tokenizer, micro_batch_size=1))


# --- HF streaming source: lazy import, clear errors ------------------------------------


def test_hf_source_without_datasets_is_a_clear_error(tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    cfg = DataConfig(hf_dataset="cerebras/SlimPajama-627B", seq_len=8)
    loader = build_train_loader(cfg, tokenizer, micro_batch_size=1)
    with pytest.raises(RuntimeError, match=r"needs the `datasets` package .*set data.train_files"):
        next(iter(loader))


def test_hf_unreachable_names_dataset(tokenizer, monkeypatch):
    def load_dataset(*args, **kwargs):
        raise ConnectionError("hub unreachable")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    cfg = DataConfig(hf_dataset="cerebras/SlimPajama-627B", seq_len=8)
    with pytest.raises(RuntimeError, match=r"could not open HF dataset 'cerebras/SlimPajama-627B'.*hub unreachable"):
        next(iter(build_train_loader(cfg, tokenizer, micro_batch_size=1)))


def test_hf_rows_are_dealt_to_readers_and_resume(tokenizer, monkeypatch):
    docs = make_docs(40)
    rows = [{"text": d, "meta": {"redpajama_set_name": "RedPajamaC4"}} for d in docs] + [{"text": 5}]
    calls = []

    def load_dataset(name, data_files=None, split=None, streaming=False):
        calls.append((name, data_files, split, streaming))
        return rows

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    cfg = DataConfig(hf_dataset="local/fake", hf_data_files=["x.jsonl"], seq_len=16)
    loaders = [build_train_loader(cfg, tokenizer, micro_batch_size=2, rank=r, world_size=2) for r in (0, 1)]
    firsts = [next(iter(ld))["input_ids"] for ld in loaders]
    assert calls[0] == ("local/fake", ["x.jsonl"], "train", True)
    decoded = [tokenizer.decode(f[0]) for f in firsts]
    assert decoded[0].startswith("Document 0.") and decoded[1].startswith("Document 1.")
    # exact resume
    it = iter(loaders[0])
    for _ in range(5):
        next(it)
    sd = loaders[0].state_dict()
    expect = [next(it)["input_ids"] for _ in range(30)]
    again = build_train_loader(cfg, tokenizer, micro_batch_size=2, rank=0, world_size=2)
    again.load_state_dict(sd)
    it2 = iter(again)
    assert all((next(it2)["input_ids"] == e).all() for e in expect)
    assert again.skip_counts()["non_string_text"] >= 1


def test_hf_streaming_with_the_real_datasets_library(tokenizer, tmp_path):
    """The installed `datasets` streaming path (its `json` builder over local SlimPajama-layout .jsonl.zst
    files, no network) yields exactly the tokens of the local-file source over the same file."""
    pytest.importorskip("datasets")  # an optional extra ([hf]); the dev install always has it
    path = write_jsonl(str(tmp_path / "train" / "chunk1" / "example_train_0.jsonl.zst"),
                       [record(d) for d in make_docs(30)])
    hf = DataConfig(hf_dataset="json", hf_data_files=[path], seq_len=16)
    local = DataConfig(train_files=path, seq_len=16)
    got, want = (iter(build_train_loader(c, tokenizer, micro_batch_size=2, rank=0, world_size=1)) for c in (hf, local))
    for _ in range(40):  # past the end of the 30 documents: the second pass must agree too
        assert (next(got)["input_ids"] == next(want)["input_ids"]).all()
