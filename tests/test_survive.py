"""One process: the non-finite guard, pruning that keeps a finite checkpoint, NaN-aware resume, time-based
saves, the preemption guard's signal rules and DataLoader workers that ignore SIGTERM (issue 13).

The multi-process side (SIGTERM to the process groups under torchrun with data workers, kill -9 of a
rank during a save, NaN on one rank of DeepSpeed/FSDP2, the shared output_dir check) is in
tests/test_survive_dist.py.
"""
import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from _data_testlib import make_slimpajama, tokenizer  # noqa: F401  (the fixture)
from train_common import job_dict, series, synthetic_builders

from lrqat_dist.checkpoint import Checkpointer, list_checkpoints, read_meta
from lrqat_dist.checkpoint.integrity import nan_equal
from lrqat_dist.engines import DistEnv
from lrqat_dist.train import train
from lrqat_dist.train.config import config_from_dict
from lrqat_dist.train.nonfinite import TEST_NAN_STEPS_ENV, NonfiniteError, _parse_steps
from lrqat_dist.train.preemption import PreemptionGuard


def _trainable(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / f"checkpoints/step_{step:08d}/trainable.safetensors")


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nan_step_is_skipped_counted_and_training_continues(tmp_path, monkeypatch):
    """NaN logits at step 3 (test hook): step 3 changes nothing (parameters, Adam state, LR schedule) and
    is counted; steps 4.. train on. Steps 1-2 equal a run without the NaN, bit for bit."""
    updates = {"save_every": 1, "keep_last": 10, "max_steps": 5, "val_every": 0}
    train(config_from_dict(job_dict(tmp_path / "ref", train=updates)), resume="none", builders=synthetic_builders())
    monkeypatch.setenv(TEST_NAN_STEPS_ENV, "3")
    result = train(config_from_dict(job_dict(tmp_path / "nan", train=updates)), resume="none",
                   builders=synthetic_builders())
    assert result.step == 5 and not result.preempted

    run, ref = tmp_path / "nan", tmp_path / "ref"
    assert series(run, "nonfinite_skipped") == {1: 0, 2: 0, 3: 1, 4: 1, 5: 1}
    loss = series(run)
    assert loss[3] is None  # the window of step 3 holds no applied step
    assert all(loss[s] == series(ref)[s] for s in (1, 2))
    assert all(torch.isfinite(torch.tensor(loss[s])) for s in (4, 5))
    assert _same(_trainable(run, 2), _trainable(run, 3))  # nothing moved at step 3
    assert not _same(_trainable(run, 3), _trainable(run, 4))  # step 4 trained
    # Adam state of step 3 = step 2's (no optimizer step), and the LR schedule did not advance.
    s2 = torch.load(run / "checkpoints/step_00000002/train_state.pt", weights_only=True)
    s3 = torch.load(run / "checkpoints/step_00000003/train_state.pt", weights_only=True)
    assert s2["scheduler"] == s3["scheduler"]
    st2, st3 = s2["optimizer"]["state"], s3["optimizer"]["state"]
    assert st2.keys() == st3.keys() and all(torch.equal(st2[k]["exp_avg"], st3[k]["exp_avg"]) for k in st2)
    lr = series(run, "lr")
    assert lr[4] == lr[3] != lr[2]  # warmup: step 4 used the LR that step 3 never applied
    meta = read_meta(run / "checkpoints/step_00000005")
    assert meta["nonfinite_skipped"] == 1 and meta["finite"] is True

    # The count survives a resume: continue the NaN run from step 4 to 6.
    monkeypatch.delenv(TEST_NAN_STEPS_ENV)
    cfg = config_from_dict(job_dict(run, train={**updates, "max_steps": 6}))
    shutil.rmtree(run / "checkpoints/step_00000005")  # resume from step 4
    train(cfg, resume="auto", builders=synthetic_builders())
    assert series(run, "nonfinite_skipped")[6] == 1


def test_a_run_of_nans_stops_with_the_named_error(tmp_path, monkeypatch):
    monkeypatch.setenv(TEST_NAN_STEPS_ENV, "2-9")
    cfg = config_from_dict(job_dict(tmp_path, train={"max_steps": 10, "max_nonfinite": 3, "val_every": 0,
                                                     "save_every": 1, "keep_last": 10}))
    with pytest.raises(NonfiniteError, match=r"step 4: 3 consecutive steps \(steps 2-4\).*train.max_nonfinite=3"):
        train(cfg, resume="none", builders=synthetic_builders())
    assert series(tmp_path, "nonfinite_skipped") == {1: 0, 2: 1, 3: 2}  # step 4 raised before logging
    assert _same(_trainable(tmp_path, 1), _trainable(tmp_path, 3))


def test_parse_nan_steps():
    assert _parse_steps("3") == {3} and _parse_steps("5-7, 9") == {5, 6, 7, 9}
    with pytest.raises(ValueError, match=TEST_NAN_STEPS_ENV):
        _parse_steps("x")


def _fake_checkpoint(root: Path, step: int, finite: bool, record: bool = True) -> Path:
    path = root / "checkpoints" / f"step_{step:08d}"
    path.mkdir(parents=True)
    value = 1.0 if finite else float("nan")
    save_file({"w": torch.full((3,), value)}, str(path / "trainable.safetensors"))
    meta = {"step": step, "complete": True, **({"finite": finite} if record else {})}
    (path / "meta.json").write_text(json.dumps(meta))
    return path


@pytest.mark.parametrize("record", [True, False])  # False: meta.json without "finite" (read the tensors)
def test_pruning_never_removes_the_newest_finite_checkpoint(tmp_path, record):
    for step, finite in [(1, True), (2, True), (3, False), (4, False)]:
        _fake_checkpoint(tmp_path, step, finite, record)
    ckpt = Checkpointer(tmp_path, DistEnv(0, 1, 0, torch.device("cpu")), keep_last=2, config_text="")
    ckpt._prune()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3, 4]  # 2 kept: the newest finite one
    _fake_checkpoint(tmp_path, 5, False, record)
    ckpt._prune()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4, 5]
    _fake_checkpoint(tmp_path, 6, True, record)
    ckpt._prune()  # a finite checkpoint among the last keep_last again: plain pruning
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5, 6]


def test_nan_equal():
    nan = float("nan")
    a = torch.tensor([1.0, nan, 2.0])
    assert not torch.equal(a, a.clone()) and nan_equal(a, a.clone())
    assert not nan_equal(a, torch.tensor([1.0, nan, 3.0])) and not nan_equal(a, torch.tensor([1.0, 0.0, 2.0]))
    assert not nan_equal(a, a.double()) and nan_equal(torch.arange(3), torch.arange(3))


def test_resuming_a_nan_checkpoint_is_not_called_inconsistent(tmp_path, caplog):
    """A checkpoint whose scale went NaN (written before the guard, or by a bad merge): resume loads it
    (NaN-aware check, a warning naming the problem), then every step is skipped and the run stops with
    the non-finite error, not the old misleading "payload is inconsistent"."""
    updates = {"save_every": 2, "max_steps": 2, "val_every": 0, "max_nonfinite": 2}
    train(config_from_dict(job_dict(tmp_path, train=updates)), resume="none", builders=synthetic_builders())
    path = tmp_path / "checkpoints/step_00000002"
    tensors = load_file(path / "trainable.safetensors")
    scale = next(k for k in tensors if k.endswith(".s") or "scale" in k)
    tensors[scale][0] = float("nan")
    save_file(tensors, str(path / "trainable.safetensors"))
    meta = read_meta(path)
    meta["finite"] = False
    (path / "meta.json").write_text(json.dumps(meta))
    cfg = config_from_dict(job_dict(tmp_path, train={**updates, "max_steps": 6}))
    with caplog.at_level(logging.WARNING), pytest.raises(NonfiniteError, match="step 4: 2 consecutive"):
        train(cfg, resume="auto", builders=synthetic_builders())
    assert "holds non-finite trainable tensors" in caplog.text


def test_time_based_saves(tmp_path):
    cfg = config_from_dict(job_dict(tmp_path, train={"save_every": 0, "save_final": False, "max_steps": 3,
                                                     "val_every": 0, "keep_last": 5,
                                                     "save_every_minutes": 1e-6}))
    train(cfg, resume="none", builders=synthetic_builders())
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 2, 3]
    with pytest.raises(ValueError, match="train.save_every_minutes: must be > 0"):
        config_from_dict(job_dict(tmp_path, train={"save_every_minutes": 0}))
    with pytest.raises(ValueError, match="train.max_nonfinite: must be >= 1"):
        config_from_dict(job_dict(tmp_path, train={"max_nonfinite": 0}))


def test_repeated_sigterm_keeps_the_save_and_sigint_twice_quits():
    with PreemptionGuard() as guard:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # e.g. SLURM and torchrun both signal the process
        time.sleep(0.05)
        assert guard.requested == signal.SIGTERM  # still saving, not killed
    # The guard restores whatever SIGINT handler was there: make it Python's own, whatever ran before.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _sigint_twice_quits()
    finally:
        signal.signal(signal.SIGINT, previous)


def _sigint_twice_quits():
    with pytest.raises(KeyboardInterrupt):
        with PreemptionGuard() as guard:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert guard.requested == signal.SIGINT
            os.kill(os.getpid(), signal.SIGINT)  # the previous handler (KeyboardInterrupt) again
            time.sleep(0.05)


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def test_data_workers_ignore_sigterm_and_sigint(tmp_path, tokenizer):  # noqa: F811
    """The DataLoader workers of the train loader survive SIGTERM and SIGINT (a launcher signalling the
    whole process group) and keep producing the exact same batches."""
    from lrqat_dist.data import DataConfig, build_train_loader

    make_slimpajama(str(tmp_path), n_files=2, docs_per_file=20)
    tok = tokenizer
    cfg = DataConfig.from_dict({"train_files": str(tmp_path / "train"), "seq_len": 32, "num_workers": 2})
    ref = build_train_loader(cfg, tok, micro_batch_size=1)
    want = [b["input_ids"] for _, b in zip(range(6), ref)]
    loader = build_train_loader(cfg, tok, micro_batch_size=1)
    it = iter(loader)
    got = [next(it)["input_ids"]]
    workers = _children(os.getpid())
    assert len(workers) >= 2
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGINT)
    time.sleep(0.5)
    got += [next(it)["input_ids"] for _ in range(5)]
    assert all(Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] in "RS" for pid in workers)  # alive
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_every_checkpoint_file_is_fsynced_before_it_is_marked_complete(tmp_path, monkeypatch):
    real_fsync, synced, order = os.fsync, set(), []

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        synced.add(path)
        order.append(path)
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    train(config_from_dict(job_dict(tmp_path, train={"max_steps": 1, "val_every": 0})), resume="none",
          builders=synthetic_builders())
    ckpt = tmp_path / "checkpoints/step_00000001"
    files = sorted(p.name for p in ckpt.iterdir())
    tmp = tmp_path / "checkpoints/.tmp_step_00000001"
    assert {"meta.json", "trainable.safetensors", "train_state.pt", "rank_00000.pt", "config.yaml"} <= set(files)
    assert all(str(tmp / name) in synced for name in files)
    # meta.json, the completion marker, is synced after every other file
    assert order.index(str(tmp / "meta.json")) > max(order.index(str(tmp / n)) for n in files if n != "meta.json")


def test_sigterm_during_a_save_stops_right_after_it(tmp_path, monkeypatch):
    """SIGTERM while the checkpoint of step 2 is being written: the save completes, the run stops at
    step 2 (not one step later), and the resumed run ends bit-identical to an uninterrupted one."""
    from lrqat_dist.checkpoint import checkpointer as ckpt_mod

    updates = {"save_every": 2, "max_steps": 4, "val_every": 0}
    train(config_from_dict(job_dict(tmp_path / "ref", train=updates)), resume="none", builders=synthetic_builders())
    real_seal = ckpt_mod.seal_files

    def signal_mid_save(env, tmp, *args, **kwargs):
        if tmp.name.endswith("step_00000002"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
        return real_seal(env, tmp, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod, "seal_files", signal_mid_save)
    cfg = config_from_dict(job_dict(tmp_path / "cut", train=updates))
    first = train(cfg, resume="none", builders=synthetic_builders())
    assert first.preempted and first.step == 2 and first.checkpoint.name == "step_00000002"
    assert read_meta(first.checkpoint)["complete"]
    monkeypatch.setattr(ckpt_mod, "seal_files", real_seal)
    second = train(cfg, resume="auto", builders=synthetic_builders())
    assert second.step == 4 and series(tmp_path / "cut") == series(tmp_path / "ref")
    assert _same(_trainable(tmp_path / "cut", 4), _trainable(tmp_path / "ref", 4))
