"""Tokenizing and packing, truncation, set selection and weights, the shuffle buffer."""

import collections
import os

import numpy as np
import pytest
from _data_testlib import (BOS, EOS, SETS, make_docs, make_slimpajama, paragraphs, record,  # noqa: F401
                           smollm2_bpe_tokenizer, tokenizer, write_jsonl)

from lrqat_dist.data import DataConfig, build_train_loader, build_val_loader
from lrqat_dist.data.token_packing import TokenPacker, cut_for_tokens
from lrqat_dist.data.records import Document



def _encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _feed(docs):
    it = iter(docs)
    return lambda: next(it, None)


def test_packing_is_the_concatenation_without_padding(tokenizer):
    docs = make_docs(25)
    packer = TokenPacker(tokenizer, seq_len=37, eos_id=EOS, batch_docs=4)
    feed = _feed([Document(d, None) for d in docs])
    blocks = []
    while (b := packer.next_block(feed)) is not None:
        blocks.append(b)
    expected = [t for d in docs for t in _encode(tokenizer, d) + [EOS]]
    flat = np.concatenate(blocks).tolist()
    assert all(len(b) == 37 for b in blocks)
    assert len(flat) == len(expected) // 37 * 37  # only the last partial block is left
    assert flat == expected[: len(flat)]


def test_bos_and_truncation(tokenizer):
    docs = make_docs(6, words=300)
    packer = TokenPacker(tokenizer, seq_len=8, eos_id=EOS, bos_id=BOS, max_doc_tokens=20)
    got = packer.encode_documents(docs).tolist()
    expected = [t for d in docs for t in [BOS] + _encode(tokenizer, d)[:20] + [EOS]]
    assert got == expected


@pytest.mark.parametrize("max_tokens", [5, 16, 64, 100])
def test_cut_before_tokenizing_keeps_the_leading_tokens(smollm2_bpe_tokenizer, max_tokens):
    # A real BPE with merges: the claim is that no merge crosses the cut (trivial for a byte tokenizer).
    tokenizer = smollm2_bpe_tokenizer
    eos = tokenizer.eos_token_id
    paras = paragraphs()
    texts = [" ".join(paras[i : i + 15]) for i in range(0, 180, 15)]
    texts += ["Numbers 1234567 and 8.25e10 " * 200, "word    " * 900, "x" * 5000]
    packer = TokenPacker(tokenizer, seq_len=8, eos_id=eos, max_doc_tokens=max_tokens)
    cut_happened = 0
    for text in texts:
        cut = cut_for_tokens(text, max_tokens)
        cut_happened += cut is not None
        got = packer.encode_documents([text]).tolist()
        assert got == _encode(tokenizer, text)[:max_tokens] + [eos]
    assert cut_happened >= len(texts) // 2  # the fast path is really taken


def test_special_token_text_inside_a_document_is_plain_text(tokenizer):
    packer = TokenPacker(tokenizer, seq_len=8, eos_id=EOS)
    ids = packer.encode_documents(["a web page quoting </s> and <s> literally"]).tolist()
    assert ids[-1] == EOS and EOS not in ids[:-1] and BOS not in ids
    assert tokenizer.decode(ids[:-1]) == "a web page quoting </s> and <s> literally"
    # The caller's tokenizer is not modified.
    assert _encode(tokenizer, "x </s>")[-1] == EOS


def _documents_seen(tok, loader, n_batches):
    """Document numbers in the first n batches (each doc starts with 'Document <i>.')."""
    it = iter(loader)
    ids = np.concatenate([next(it)["input_ids"].reshape(-1).numpy() for _ in range(n_batches)])
    pieces = np.split(ids, np.nonzero(ids == EOS)[0] + 1)[:-1]  # complete documents only
    out = []
    for p in pieces:
        text = tok.decode(p[:-1])
        if text.startswith("Document "):
            out.append(int(text.split()[1].rstrip(".")))
    return out


def test_include_exclude_sets(tmp_path, tokenizer):
    make_slimpajama(str(tmp_path), n_files=2, docs_per_file=30)
    base = dict(train_files=str(tmp_path / "train"), seq_len=64)
    set_of = lambda i: SETS[i % len(SETS)]  # noqa: E731 - how make_slimpajama assigns sets
    seen = _documents_seen(
        tokenizer, build_train_loader(DataConfig(**base, include_sets=["RedPajamaBook"]), tokenizer, 2), 30
    )
    assert seen and {set_of(i) for i in seen} == {"RedPajamaBook"}
    seen = _documents_seen(
        tokenizer, build_train_loader(DataConfig(**base, exclude_sets=["RedPajamaBook"]), tokenizer, 2), 30
    )
    assert seen and {set_of(i) for i in seen} == {"RedPajamaC4", "RedPajamaGithub"}
    cfg = DataConfig(**base, set_weights={"RedPajamaC4": 0.0, "RedPajamaGithub": 1.0})
    seen = _documents_seen(tokenizer, build_train_loader(cfg, tokenizer, 2), 30)
    assert seen and "RedPajamaC4" not in {set_of(i) for i in seen}


def test_set_weights_up_and_down_sample(tmp_path, tokenizer):
    make_slimpajama(str(tmp_path), n_files=1, docs_per_file=60)
    cfg = DataConfig(
        train_files=str(tmp_path / "train"),
        seq_len=256,  # byte tokens: 2 x 256 x 120 tokens cover the first epoch (about 80 weighted documents)
        set_weights={"RedPajamaC4": 2.0, "RedPajamaBook": 0.5, "RedPajamaGithub": 1.0},
    )
    seen = _documents_seen(tokenizer, build_train_loader(cfg, tokenizer, 2, seed=5), 120)
    # One file: epoch 1 starts over at document 0.
    restart = next(i for i in range(1, len(seen)) if seen[i] < seen[i - 1])
    counts = collections.Counter(seen[:restart])
    assert max(counts) >= 58  # the whole first epoch was read
    for i in range(60):
        if SETS[i % 3] == "RedPajamaC4":
            assert counts[i] == 2, i  # up-weighted: twice
        elif SETS[i % 3] == "RedPajamaGithub":
            assert counts[i] == 1, i
        else:
            assert counts[i] in (0, 1), i
    book = [counts[i] for i in range(60) if SETS[i % 3] == "RedPajamaBook"]
    assert 0.2 < sum(book) / len(book) < 0.8  # about half of Book kept


def test_shuffle_buffer_is_seeded(tmp_path, tokenizer):
    make_slimpajama(str(tmp_path), n_files=1, docs_per_file=40)
    cfg = DataConfig(train_files=str(tmp_path / "train"), seq_len=64, shuffle_buffer=16)
    a = _documents_seen(tokenizer, build_train_loader(cfg, tokenizer, 2, seed=1), 12)
    b = _documents_seen(tokenizer, build_train_loader(cfg, tokenizer, 2, seed=1), 12)
    c = _documents_seen(tokenizer, build_train_loader(cfg, tokenizer, 2, seed=2), 12)
    plain = _documents_seen(
        tokenizer, build_train_loader(DataConfig(train_files=cfg.train_files, seq_len=64), tokenizer, 2), 12
    )
    assert a == b and a != c and a != plain
    assert plain == list(range(len(plain)))  # one file, no shuffle: file order


def test_txt_and_plain_jsonl_sources(tmp_path, tokenizer):
    docs = make_docs(6)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("\n\n".join(docs[:3]))
    write_jsonl(str(tmp_path / "d" / "b.jsonl"), [record(t) for t in docs[3:]])
    cfg = DataConfig(val_files=str(tmp_path / "d"), seq_len=8, val_blocks=10**6, text_unit="paragraph")
    val = build_val_loader(cfg, tokenizer, micro_batch_size=3)
    flat = np.concatenate([b["input_ids"].reshape(-1).numpy() for b in val]).tolist()
    expected = [t for d in docs for t in _encode(tokenizer, d) + [EOS]]
    assert flat == expected[: len(flat)] and len(expected) - len(flat) < 8
    assert os.path.exists(tmp_path / "d" / "a.txt")
