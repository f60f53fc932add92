"""tools/make_shards.py: text / JSONL -> SlimPajama-layout .jsonl.zst shards."""

import json
import os
import subprocess
import sys

import pytest
import zstandard
from _data_testlib import make_docs, record, tokenizer, write_jsonl  # noqa: F401

from lrqat_dist.data import DataConfig, build_train_loader, build_val_loader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "make_shards.py")


@pytest.fixture(scope="module")
def make_shards():
    from tools import make_shards

    return make_shards


def _read(path):
    data = zstandard.ZstdDecompressor().stream_reader(open(path, "rb")).read()
    return [json.loads(line) for line in data.splitlines()]


def test_help():
    out = subprocess.run([sys.executable, TOOL, "--help"], capture_output=True, text=True, check=True)
    assert "--holdout-fraction" in out.stdout and "SlimPajama" in out.stdout


def test_layout_records_and_holdout(tmp_path, make_shards, tokenizer, capsys):
    docs = make_docs(50)
    src = tmp_path / "src"
    src.mkdir()
    (src / "book.txt").write_text("\n\n".join(docs[:20]))
    write_jsonl(str(src / "web.jsonl"), [record(d, "RedPajamaC4") for d in docs[20:45]] + [b"{broken"])
    write_jsonl(str(src / "more.jsonl.zst"), [record(d) for d in docs[45:]])
    out = tmp_path / "out"
    rc = make_shards.main(
        [
            str(out),
            str(src),
            "--set-name",
            "RedPajamaBook",
            "--text-unit",
            "paragraph",
            "--docs-per-file",
            "7",
            "--files-per-chunk",
            "3",
            "--holdout-fraction",
            "0.2",
            "--seed",
            "1",
        ]
    )
    assert rc == 0
    assert "invalid_json" in capsys.readouterr().out
    train = sorted(str(p.relative_to(out)) for p in (out / "train").rglob("*.jsonl.zst"))
    hold = sorted(str(p.relative_to(out)) for p in (out / "validation").rglob("*.jsonl.zst"))
    assert train[:4] == [
        "train/chunk1/example_train_0.jsonl.zst",
        "train/chunk1/example_train_1.jsonl.zst",
        "train/chunk1/example_train_2.jsonl.zst",
        "train/chunk2/example_train_0.jsonl.zst",
    ]
    assert hold and all(h.startswith("validation/chunk1/example_holdout_") for h in hold)
    recs = [r for f in train + hold for r in _read(out / f)]
    assert sorted(r["text"] for r in recs) == sorted(docs)  # every document exactly once
    assert all(len(_read(out / f)) <= 7 for f in train)
    n_hold = sum(len(_read(out / f)) for f in hold)
    assert 2 <= n_hold <= 20
    sets = {r["text"]: r["meta"]["redpajama_set_name"] for r in recs}
    assert (
        sets[docs[0]] == "RedPajamaBook"
        and sets[docs[30]] == "RedPajamaC4"
        and sets[docs[49]] == "RedPajamaBook"
    )
    assert not list(out.rglob("*.tmp"))

    # The loaders read the result directly.
    cfg = DataConfig(
        train_files=str(out / "train"), val_files=str(out / "validation"), seq_len=32, val_blocks=4
    )
    assert next(iter(build_train_loader(cfg, tokenizer, 2)))["input_ids"].shape == (2, 32)
    assert len(build_val_loader(cfg, tokenizer, 2)) == 2


def test_refuses_to_overwrite(tmp_path, make_shards):
    write_jsonl(str(tmp_path / "in.jsonl"), [record("some text here")])
    assert make_shards.main([str(tmp_path / "out"), str(tmp_path / "in.jsonl")]) == 0
    with pytest.raises(FileExistsError, match="example_train_0.jsonl.zst exists"):
        make_shards.main([str(tmp_path / "out"), str(tmp_path / "in.jsonl")])


def test_missing_input_is_named(tmp_path, make_shards):
    with pytest.raises(FileNotFoundError, match="nothing.txt"):
        make_shards.main([str(tmp_path / "out"), str(tmp_path / "nothing.txt")])
