"""``dist.shard_frozen`` under torchrun (gloo, fp32, tiny LLaMA): FSDP2 and DeepSpeed ZeRO-3, Q4.4
(``downcast: fixed``) and packed INT4 (``int-packed``), 2 and 4 ranks (tests/dist/shard_worker.py).

Sharding only moves where the frozen bytes live; the arithmetic is the replicated run's, so we assert
bit-identity: every logged training and validation loss, the final trained tensors, and the frozen-state
fingerprint in meta.json. The sharded run is also preempted after step 2 and resumed (from a checkpoint
written with sharded buffers), and still ends on the uninterrupted replicated run's bits; its checkpoint
exports (one process, rebuilt unsharded from the base model) with the export's own bit-exact check.
Bytes: at rest each rank holds its shards only, 1/world of the replicated bytes plus alignment padding.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train_common import series

from lrqat_dist.checkpoint import list_checkpoints, read_meta

REPO = Path(__file__).resolve().parents[1]
CASES = ["fsdp2:fixed", "ds3:fixed", "fsdp2:int-packed", "ds3:int-packed", "fsdp2:fixed:kd"]
STEPS, KILL_AT = 4, 2
ALIGN = 16


def _torchrun(nproc: int, root: Path, *args: str, timeout: float = 600) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(REPO / "tests/dist/shard_worker.py"), str(root), "--steps", str(STEPS), "--kill-at", str(KILL_AT),
           *args]
    r = subprocess.run(cmd, env=env, cwd=REPO / "tests/dist", capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-8000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("shard")
    _torchrun(2, root, "--cases", ",".join(CASES))
    return root


def _assert_same_bits(rep: Path, shard: Path) -> None:
    for key in ("loss", "val_loss"):
        a, b = series(rep, key), series(shard, key)
        assert len(a) >= 3 and a == b, (key, a, b)  # floats from JSON: equal = bit-identical
    ca, cb = list_checkpoints(rep)[-1][1], list_checkpoints(shard)[-1][1]
    assert ca.name == cb.name == f"step_{STEPS:08d}"
    ta, tb = load_file(ca / "trainable.safetensors"), load_file(cb / "trainable.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[n], tb[n]) for n in ta)
    assert read_meta(ca)["frozen_fingerprint"] == read_meta(cb)["frozen_fingerprint"]


def _assert_bytes(run: Path, world: int) -> dict:
    rec = json.loads((run / "frozen.json").read_text())
    assert rec["first"] == {"step": KILL_AT, "preempted": True}
    assert rec["second"] == {"step": STEPS, "preempted": False}
    for step in map(str, range(1, STEPS + 1)):
        for mem in rec["steps"][step]["ranks"]:
            full, resident = mem["full"], mem["resident"]
            # at rest: the shards only, 1/world of the replicated bytes (+ per-entry and per-layer padding)
            assert full / world <= resident <= full / world + 2 * 28 * ALIGN, mem
            # during the step: the shards plus 2 gathered layers (the layer and its prefetch); this model
            # has 2 layers, so the peak is the shards plus all layers' padded bytes (world x the shards)
            assert mem["peak"] == (1 + world) * resident, mem
    return rec


@pytest.mark.parametrize("case", CASES)
def test_sharded_run_equals_the_replicated_run_and_resumes(runs, case):
    name = case.replace(":", "-")  # E:D:kd = the same with self-distillation from the phi0 teacher (issue 15)
    rep, shard = runs / f"{name}-rep", runs / f"{name}-shard"
    _assert_same_bits(rep, shard)
    _assert_bytes(shard, 2)
    if case.endswith(":kd"):  # the teacher's forward really took part: the run differs from plain CE
        assert series(rep, "loss") != series(runs / "fsdp2-fixed-rep", "loss")
    replicated = json.loads((rep / "frozen.json").read_text())["steps"][str(STEPS)]["ranks"]
    assert all(m["resident"] == m["peak"] == m["full"] for m in replicated)


def test_export_from_a_sharded_checkpoint_is_bit_exact(runs, tmp_path, monkeypatch):
    from lrqat_dist import fold
    from lrqat_dist.export import export_model, read_native
    from lrqat_dist.export.run import load_run

    monkeypatch.setattr("lrqat_dist.export.run.build_tokenizer", lambda cfg, cache=None: None)  # synthetic data

    shard = load_run(runs / "fsdp2-int-packed-shard")  # rebuilt unsharded; refuses a fingerprint mismatch
    rep = load_run(runs / "fsdp2-int-packed-rep")
    report = export_model(shard.model, tmp_path / "native", "native", tokenizer=None, verify_load=True)
    assert report is not None
    back = read_native(tmp_path / "native")
    want = fold(rep.model)
    assert back.keys() == want.keys()
    for name, fw in want.items():
        assert torch.equal(back[name].codes, fw.codes) and torch.equal(back[name].scale, fw.scale), name


def test_four_ranks(tmp_path):
    """4 ranks, FSDP2 and ZeRO-3 on packed INT4: bits of the replicated run, 1/4 of its bytes at rest."""
    cases = "fsdp2:int-packed,ds3:fixed"
    _torchrun(4, tmp_path, "--cases", cases)
    for case in cases.split(","):
        engine, downcast = case.split(":")
        _assert_same_bits(tmp_path / f"{engine}-{downcast}-rep", tmp_path / f"{engine}-{downcast}-shard")
        _assert_bytes(tmp_path / f"{engine}-{downcast}-shard", 4)
