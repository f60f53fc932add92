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
        assert any(w["replay_blocks"] > 0 for w in sd["workers"])


@pytest.mark.parametrize("new_mbs", [1, 3])
def test_resume_with_another_micro_batch_size_and_sparse_snapshots(corpus, tokenizer, new_mbs):
    """A changed train.micro_batch_size with data.state_every > 1: each worker replays the blocks it
    handed out after its last snapshot (not that many batches of the new size), so every worker's
    block stream continues exactly where it stopped."""
    cfg = DataConfig(train_files=corpus, seq_len=SEQ, num_workers=2, state_every=4, shuffle_buffer=3)
    # Each worker's own block stream: with 1-block batches the workers alternate block by block.
    ref = [b["input_ids"][0] for _, b in zip(range(80), build_train_loader(cfg, tokenizer, 1, seed=5))]
    stream = {w: ref[w::2] for w in (0, 1)}
    loader = build_train_loader(cfg, tokenizer, MBS, seed=5)
    it = iter(loader)
    for _ in range(11):  # worker 0 handed out 6 batches (12 blocks), worker 1 five (10 blocks)
        next(it)
    sd = _roundtrip(loader.state_dict())
    assert sd["micro_batch_size"] == MBS and [w["replay_blocks"] for w in sd["workers"]] == [MBS, 0]  # worker 0: 1 batch after its snapshot at its 5th
    resumed = build_train_loader(cfg, tokenizer, new_mbs, seed=5)
    resumed.load_state_dict(sd)
    used = {0: 6 * MBS, 1: 5 * MBS}
    for i, batch in zip(range(8), resumed):
        w = (11 + i) % 2  # the round-robin continues with worker 1
        want = torch.stack(stream[w][used[w]:used[w] + new_mbs])
        assert torch.equal(batch["input_ids"], want), f"batch {i} after the resume (worker {w})"
        used[w] += new_mbs


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
