"""Exact resume: a restored loader yields exactly the batches the uninterrupted one would."""

import io

import pytest
import torch
from _data_testlib import make_slimpajama, tokenizer  # noqa: F401

from lrqat_dist.data import DataConfig, build_train_loader

SEQ, MBS = 32, 2


@pytest.fixture
def corpus(tmp_path):
    make_slimpajama(str(tmp_path), n_files=4, docs_per_file=25)
    return str(tmp_path / "train")


def _roundtrip(sd):
    """Through torch.save / torch.load(weights_only=True), as a checkpoint would."""
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _check_resume(cfg, tok, world, stop_at, more, seed=3):
    for rank in range(world):
        loader = build_train_loader(cfg, tok, MBS, rank=rank, world_size=world, seed=seed)
        it = iter(loader)
        for _ in range(stop_at):
            next(it)
        sd = _roundtrip(loader.state_dict())
        expect = [next(it)["input_ids"] for _ in range(more)]
        resumed = build_train_loader(cfg, tok, MBS, rank=rank, world_size=world, seed=seed)
        resumed.load_state_dict(sd)
        got = [b["input_ids"] for b, _ in zip(resumed, range(more))]
        assert len(got) == more
        for i, (a, b) in enumerate(zip(expect, got)):
            assert torch.equal(a, b), f"rank {rank}: batch {stop_at + i} differs after resume"
        yield rank, sd


@pytest.mark.parametrize(
    "world, workers",
    [(1, 0), (1, 2), (2, 0), (2, 2)],
    ids=["w1", "w1-workers2", "w2", "w2-workers2"],
)
def test_exact_resume_mid_shard(corpus, tokenizer, world, workers):
    cfg = DataConfig(
        train_files=corpus,
        seq_len=SEQ,
        num_workers=workers,
        shuffle_buffer=6,
        add_bos=True,
        max_doc_tokens=48,
        set_weights={"RedPajamaC4": 1.5, "RedPajamaBook": 0.7},
        tokenize_batch=3,
    )
    for _, sd in _check_resume(cfg, tokenizer, world, stop_at=7, more=25):
        readers = [w["state"] for w in sd["workers"] if w["state"] is not None]
        assert readers, "no worker had produced a batch"
        # Mid-shard: inside a file, with tokens and shuffled documents carried over.
        assert any(r["documents"]["unit"] > 0 for r in readers)
        assert any(len(r["shuffle"]["docs"]) > 0 for r in readers)


def test_resume_across_epochs_with_workers(corpus, tokenizer):
    cfg = DataConfig(train_files=corpus, seq_len=SEQ, num_workers=2, shuffle_buffer=4)
    for _, sd in _check_resume(cfg, tokenizer, world=2, stop_at=60, more=20):
        assert max(w["state"]["documents"]["epoch"] for w in sd["workers"]) >= 1


def test_resume_with_sparse_worker_snapshots(corpus, tokenizer):
    # Workers send their state only every 4th batch; a resume replays the rest.
    cfg = DataConfig(train_files=corpus, seq_len=SEQ, num_workers=2, state_every=4, shuffle_buffer=3)
    for _, sd in _check_resume(cfg, tokenizer, world=1, stop_at=11, more=12):
        assert any(w["replay"] > 0 for w in sd["workers"])


def test_resume_twice_and_reiterate(corpus, tokenizer):
    cfg = DataConfig(train_files=corpus, seq_len=SEQ, num_workers=2)
    ref = build_train_loader(cfg, tokenizer, MBS, seed=1)
    expect = [b["input_ids"] for _, b in zip(range(30), ref)]
    loader = build_train_loader(cfg, tokenizer, MBS, seed=1)
    got = [b["input_ids"] for _, b in zip(range(9), loader)]  # stops, workers shut down
    got += [b["input_ids"] for _, b in zip(range(8), loader)]  # a new iter() continues
    sd = loader.state_dict()
    again = build_train_loader(cfg, tokenizer, MBS, seed=1)
    again.load_state_dict(sd)
    got += [b["input_ids"] for _, b in zip(range(13), again)]
    assert all(torch.equal(a, b) for a, b in zip(expect, got)) and len(got) == 30


def test_old_iterator_is_invalidated(corpus, tokenizer):
    loader = build_train_loader(DataConfig(train_files=corpus, seq_len=SEQ), tokenizer, MBS)
    old = iter(loader)
    next(old)
    new = iter(loader)
    next(new)
    with pytest.raises(RuntimeError, match="superseded"):
        next(old)


def test_mismatched_state_is_refused(corpus, tokenizer):
    cfg = DataConfig(train_files=corpus, seq_len=SEQ, num_workers=2)
    loader = build_train_loader(cfg, tokenizer, MBS, rank=0, world_size=2, seed=0)
    next(iter(loader))
    sd = loader.state_dict()
    with pytest.raises(ValueError, match="world_size: saved 2, now 1"):
        build_train_loader(cfg, tokenizer, MBS, rank=0, world_size=1, seed=0).load_state_dict(sd)
    with pytest.raises(ValueError, match="workers_per_rank: saved 2, now 4"):
        build_train_loader(
            DataConfig(train_files=corpus, seq_len=SEQ, num_workers=4), tokenizer, MBS, world_size=2
        ).load_state_dict(sd)
    with pytest.raises(ValueError, match="seed: saved 0, now 9"):
        build_train_loader(cfg, tokenizer, MBS, rank=0, world_size=2, seed=9).load_state_dict(sd)
