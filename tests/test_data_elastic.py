"""Elastic data resume: a train stream saved by N ranks continues on M ranks with no document lost.

Documents carry a numbered tag at both ends, so one that straddles the re-deal (its head in an old
rank's last block, its tail in the tokens carried over) is still recognised. Checked for 2 -> 1,
1 -> 2 and 2 -> 3 ranks (with a shuffle buffer, up-weighted sets and leftover tokens in flight):

- from the files, the old readers and the new ones (until the new ones have finished the re-dealt
  remainder of the epoch) read disjoint sets of documents whose union is the whole corpus: nothing is
  skipped, nothing is read twice;
- every document appears in the emitted blocks or is still in flight at the end (in a new reader's
  shuffle buffer / pending copies / leftover tokens), so in-flight documents were carried, not dropped;
- the report counts exactly the in-flight documents and tokens of the old readers.
"""
import io
import json
import re

import pytest
import torch
from _data_testlib import BYTE_TOKENIZER, make_docs, tokenizer  # noqa: F401

from lrqat_dist.data import DataConfig, build_train_loader
from lrqat_dist.data.documents import FileDocuments

SEQ, MBS, FILES, PER_FILE = 64, 2, 3, 20
TAG = re.compile(r"Doc(\d+) (?:begins|ends)\.")


@pytest.fixture
def corpus(tmp_path):
    bodies = make_docs(FILES * PER_FILE, words=40)
    for f in range(FILES):
        with open(tmp_path / f"part_{f}.jsonl", "w") as out:
            for i in range(f * PER_FILE, (f + 1) * PER_FILE):
                text = f"Doc{i} begins. {bodies[i].split('. ', 1)[1]} Doc{i} ends."
                out.write(json.dumps({"text": text, "meta": {"redpajama_set_name": "A" if i % 4 else "B"}}) + "\n")
    return str(tmp_path)


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _ids(text: str) -> set[int]:
    return {int(m) for m in TAG.findall(text)}


@pytest.fixture
def pulls(monkeypatch):
    """Every document read from a file: (reader object id, doc number, came from a re-dealt segment)."""
    log = []
    orig = FileDocuments.next_document

    def record(self):
        doc = orig(self)
        if doc is not None:
            log.append((id(self), int(re.match(r"Doc(\d+) ", doc.text).group(1)),
                        self._seg < len(self._segments)))
        return doc

    monkeypatch.setattr(FileDocuments, "next_document", record)
    return log


@pytest.mark.parametrize("old_world, new_world", [(2, 1), (1, 2), (2, 3)])
def test_reshard_loses_no_document(corpus, tokenizer, pulls, old_world, new_world):  # noqa: F811
    cfg = DataConfig(train_files=corpus, seq_len=SEQ, shuffle_buffer=5, tokenize_batch=3,
                     set_weights={"B": 2.0})  # B documents twice: pending copies are in flight too
    emitted = []  # decoded text of every block, old and new
    old_states = []
    for rank in range(old_world):
        loader = build_train_loader(cfg, tokenizer, MBS, rank=rank, world_size=old_world, seed=5)
        it = iter(loader)
        for _ in range(7 // old_world + 1):
            emitted.append(tokenizer.decode(next(it)["input_ids"].flatten().tolist()))
        old_states.append(_roundtrip(loader.state_dict()))
    old_pulled = [d for _, d, _ in pulls]
    assert len(old_pulled) < FILES * PER_FILE, "the old readers finished the epoch: nothing left to re-deal"
    in_flight = [r["state"] for s in old_states for r in s["workers"]]
    n_docs = sum(len(r["shuffle"]["docs"]) + len(r["pending"]) for r in in_flight)
    n_tokens = sum(r["packer"]["tokens"].numel() for r in in_flight)
    assert n_docs > 0 and n_tokens > 0  # the case under test: documents and tokens in flight

    del pulls[:]
    tail = []
    for rank in range(new_world):
        loader = build_train_loader(cfg, tokenizer, MBS, rank=rank, world_size=new_world, seed=5)
        report = loader.load_resharded_state(old_states)
        assert (report.carried_docs, report.carried_tokens, report.reread_rows) == (n_docs, n_tokens, 0)
        it = iter(loader)
        stream = []
        while True:  # until this reader has read past its re-dealt segments
            stream.append(next(it)["input_ids"].flatten().tolist())
            mine = [seg for obj, _, seg in pulls if obj == id(loader._inproc._docs)]
            if mine and not mine[-1]:
                break
        state = loader.state_dict()["workers"][0]["state"]
        flat = sum(stream, []) + state["packer"]["tokens"].tolist()
        emitted.append(tokenizer.decode(flat))
        tail += [t for t, _ in state["shuffle"]["docs"] + state["pending"]]
    new_pulled = [d for _, d, seg in pulls if seg]
    # From the files: disjoint, and together the whole epoch.
    assert not set(old_pulled) & set(new_pulled)
    assert sorted(set(old_pulled) | set(new_pulled)) == list(range(FILES * PER_FILE))
    assert len(new_pulled) == len(set(new_pulled))
    # Every document was emitted or is still in flight in a new reader.
    seen = set().union(*(_ids(t) for t in emitted + tail))
    assert seen >= set(range(FILES * PER_FILE)), sorted(set(range(FILES * PER_FILE)) - seen)


def test_hf_stream_restarts_at_the_lowest_row_and_counts_rereads(tokenizer):  # noqa: F811
    """HF rows are dealt ``idx % readers``: the new readers restart at the lowest row reached; every
    row an old reader had read at or after it is counted as read again."""
    from lrqat_dist.data.reshard import reshard_reader_states
    from lrqat_dist.data.stream import ReaderStream, StreamSpec

    cfg = DataConfig(hf_dataset="some/dataset", seq_len=SEQ, shuffle_buffer=4)
    old = StreamSpec(cfg, None, "train", 5, 2, train=True)
    new = StreamSpec(cfg, None, "train", 5, 3, train=True)
    states = []
    for reader, row in enumerate([10, 7]):  # reader 0 read rows 0,2,..,8; reader 1 rows 1,3,5
        sd = ReaderStream(old, tokenizer, reader).state_dict()  # the stream itself is opened lazily
        sd["documents"] = {"epoch": 0, "row": row}
        states.append(sd)
    out, report = reshard_reader_states(states, old, new, tokenizer)
    assert [s["documents"] for s in out] == [{"epoch": 0, "row": 7}] * 3
    assert report.reread_rows == 1  # row 8 (reader 0); reader 1 stopped at 7
    states[1]["documents"] = {"epoch": 1, "row": 4}  # one epoch ahead: rows 1, 3 of epoch 1 again
    out, report = reshard_reader_states(states, old, new, tokenizer)
    assert [s["documents"] for s in out] == [{"epoch": 0, "row": 10}] * 3
    assert report.reread_rows == 2


def test_num_workers_change_redeals_on_the_same_world_size(corpus, tokenizer, tmp_path):  # noqa: F811
    """1 rank, no workers -> 1 rank, 2 worker processes: the trainer's restore re-deals the stream (the
    readers per rank changed); the old leftover tokens open new reader 0's (worker 0's) stream."""
    from lrqat_dist.checkpoint.checkpointer import load_rank_state
    from lrqat_dist.checkpoint.elastic import restore_data
    from lrqat_dist.checkpoint.layout import rank_file
    from lrqat_dist.engines import DistEnv

    cfg = DataConfig(train_files=corpus, seq_len=SEQ, shuffle_buffer=5, tokenize_batch=3)
    old = build_train_loader(cfg, tokenizer, MBS, seed=5)
    it = iter(old)
    for _ in range(3):
        next(it)
    state = _roundtrip(old.state_dict())
    torch.save({"data": state, "rng": None}, tmp_path / rank_file(0))
    leftover = state["workers"][0]["state"]["packer"]["tokens"].tolist()
    assert len(leftover) > 0

    new = build_train_loader(DataConfig(**{**cfg.to_dict(), "num_workers": 2}), tokenizer, MBS, seed=5)
    restore_data(new, tmp_path, {"world_size": 1}, DistEnv(0, 1, 0, torch.device("cpu")),
                 {"data": state, "rng": None}, load_rank_state)
    slots = new.state_dict()["workers"]
    assert [s["state"]["packer"]["tokens"].tolist() for s in slots] == [leftover, []]
    it = iter(new)
    batches = [next(it)["input_ids"] for _ in range(2 * (len(leftover) // (MBS * SEQ) + 1))]
    worker0 = torch.cat(batches[0::2]).flatten().tolist()  # batches alternate between the two workers
    assert worker0[:len(leftover)] == leftover
