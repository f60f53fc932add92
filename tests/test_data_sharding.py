"""Sharding across ranks and workers: disjoint, complete, equal batch counts, never dry."""

import collections
import itertools

import numpy as np
import pytest
from _data_testlib import EOS, make_docs, record, tokenizer, write_jsonl  # noqa: F401

from lrqat_dist.data import DataConfig, build_train_loader, build_val_loader
from lrqat_dist.data.sharding import make_shards, reader_shards

SEQ, MBS = 32, 2


@pytest.mark.parametrize("files, readers", [(5, 4), (1, 4), (3, 8), (10, 3), (4, 4)])
def test_every_epoch_partitions_the_shards(files, readers):
    shards = make_shards(files, readers)
    assert len(shards) >= readers
    orders = []
    for epoch in range(3):
        plans = [reader_shards(shards, r, readers, seed=7, epoch=epoch) for r in range(readers)]
        assert all(plans)  # every reader has something to read
        flat = list(itertools.chain(*plans))
        assert sorted(flat) == sorted(shards)  # each shard exactly once per epoch
        orders.append(flat)
    if len(shards) > 2:
        assert orders[0] != orders[1] or orders[1] != orders[2]  # order drawn per epoch
    # Units of a split file are covered exactly once by its parts.
    parts = shards[0].parts
    assert sorted(u for s in shards if s.file == 0 for u in range(40) if u % s.parts == s.part) == (
        list(range(40)) if parts >= 1 else []
    )


def _corpus(tmp_path, sizes):
    """Files with the given document counts; returns {file path: [docs]}."""
    out, start = {}, 0
    for f, n in enumerate(sizes):
        docs = make_docs(n, start=start)
        start += n
        path = write_jsonl(
            str(tmp_path / "train" / f"chunk1/example_train_{f}.jsonl.zst"), [record(d) for d in docs]
        )
        out[path] = docs
    return out


def _encode_docs(tok, docs):
    ids = tok(docs, add_special_tokens=False)["input_ids"]
    return [t for d in ids for t in d + [EOS]]


def _expected_epoch0(tok, corpus, reader, readers, seed):
    """The tokens reader `reader` must produce in epoch 0, built from the shard plan."""
    files = sorted(corpus)
    plan = reader_shards(make_shards(len(files), readers), reader, readers, seed, epoch=0)
    docs = [d for s in plan for i, d in enumerate(corpus[files[s.file]]) if i % s.parts == s.part]
    return docs, _encode_docs(tok, docs)


@pytest.mark.parametrize("sizes", [[12, 30, 7, 25, 18], [70]], ids=["5files", "1file"])
def test_full_epoch_no_token_lost_or_duplicated(tmp_path, tokenizer, sizes):
    corpus = _corpus(tmp_path, sizes)
    all_docs = [d for docs in corpus.values() for d in docs]
    seed, world, workers = 11, 2, 2
    readers = world * workers
    expected = {r: _expected_epoch0(tokenizer, corpus, r, readers, seed) for r in range(readers)}
    # The plan deals every document to exactly one reader.
    dealt = collections.Counter(d for docs, _ in expected.values() for d in docs)
    assert dealt == collections.Counter(all_docs)

    # Real loaders, 2 ranks x 2 worker processes; batch i of a rank comes from its worker i % 2.
    got = collections.defaultdict(list)
    for rank in range(world):
        cfg = DataConfig(train_files=str(tmp_path / "train"), seq_len=SEQ, num_workers=workers)
        loader = build_train_loader(cfg, tokenizer, MBS, rank=rank, world_size=world, seed=seed)
        need = max(len(expected[rank * workers + w][1]) for w in range(workers)) // (SEQ * MBS) + 1
        it = iter(loader)
        for i in range(need * workers):
            got[rank * workers + i % workers].append(next(it)["input_ids"].reshape(-1).numpy())
    epoch_tokens = []
    for r in range(readers):
        stream = np.concatenate(got[r]).tolist()
        want = expected[r][1]
        assert stream[: len(want)] == want, f"reader {r} differs from its share of epoch 0"
        epoch_tokens.extend(stream[: len(want)])

    # Single-reader reference: same multiset of tokens in its epoch 0, nothing more, nothing less.
    ref_loader = build_train_loader(
        DataConfig(train_files=str(tmp_path / "train"), seq_len=SEQ), tokenizer, MBS, seed=seed
    )
    it = iter(ref_loader)
    ref = np.concatenate(
        [next(it)["input_ids"].reshape(-1).numpy() for _ in range(len(epoch_tokens) // (SEQ * MBS) + 1)]
    ).tolist()[: len(epoch_tokens)]
    assert collections.Counter(ref) == collections.Counter(epoch_tokens)
    assert ref == _expected_epoch0(tokenizer, corpus, 0, 1, seed)[1]


def test_uneven_ranks_never_run_dry(tmp_path, tokenizer):
    # Rank shares differ a lot (one big file); both ranks still give any number of batches.
    _corpus(tmp_path, [150, 3])
    counts = []
    for rank in range(2):
        cfg = DataConfig(train_files=str(tmp_path / "train"), seq_len=SEQ)
        it = iter(build_train_loader(cfg, tokenizer, MBS, rank=rank, world_size=2, seed=0))
        batches = [next(it) for _ in range(120)]  # several epochs of the small rank's share
        assert all(b["input_ids"].shape == (MBS, SEQ) for b in batches)
        counts.append(len(batches))
    assert counts[0] == counts[1]


@pytest.mark.parametrize("world, val_blocks", [(1, 10), (2, 10), (3, 10), (4, 7)])
def test_validation_equal_batches_per_rank(tmp_path, tokenizer, world, val_blocks):
    write_jsonl(
        str(tmp_path / "val" / "chunk1" / "example_holdout_0.jsonl.zst"), [record(d) for d in make_docs(40)]
    )
    cfg = DataConfig(val_files=str(tmp_path / "val"), seq_len=SEQ, val_blocks=val_blocks)
    loaders = [
        build_val_loader(cfg, tokenizer, micro_batch_size=3, rank=r, world_size=world) for r in range(world)
    ]
    lengths = {len(v) for v in loaders}
    per_rank = val_blocks // world
    assert lengths == {-(-per_rank // 3)}
    rank_blocks = []
    for v in loaders:
        first = [b["input_ids"] for b in v]
        second = [b["input_ids"] for b in v]  # re-iterable, identical
        assert len(first) == len(v) and all((a == b).all() for a, b in zip(first, second))
        rank_blocks.append(np.concatenate([b.numpy() for b in first]))
        assert len(rank_blocks[-1]) == per_rank
    # Ranks hold disjoint blocks of the one holdout stream, and it is deterministic.
    single = build_val_loader(cfg, tokenizer, micro_batch_size=100)
    all_blocks = np.concatenate([b["input_ids"].numpy() for b in single])
    for r, blocks in enumerate(rank_blocks):
        assert (blocks == all_blocks[r::world][:per_rank]).all()
