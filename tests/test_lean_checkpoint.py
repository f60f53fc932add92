"""Lean DeepSpeed ZeRO-3 checkpoints (2 processes, torchrun, gloo, fp32, tiny LLaMA read from a local
HF directory): no frozen buffer in any file, the size bound, consolidation and export still bit-exact,
and a changed base-model file refused on resume (every rank), consolidation and export, with the override.

Size: the model-proportional part of a checkpoint is trainable.safetensors (1x the trainable bytes,
the full copy export reads) plus DeepSpeed's optimizer partitions (fp32 master + Adam's two moments:
3x), so 4x plus about 1 KiB of pickle/header per tensor and rank; the fixed part (DeepSpeed's copied
zero_to_fp32.py/zero_to_torch.py, rank files, config, meta) does not grow with the model. Before,
each rank's model-states file also held every Phi0/s0/zero-point (here 92,160 B per rank, 1.2x the
trainable bytes; 70B Q4.4: ~64 GiB per rank).

The worker is ``tests/dist/lean_worker.py``.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lean_worker import STEPS  # tests/dist is on sys.path: pyproject's pythonpath
from safetensors.torch import load_file

import lrqat_dist
from lrqat_dist.checkpoint import TRAINABLE_FILE, checkpoint_path, read_meta
from lrqat_dist.checkpoint.size import checkpoint_bytes
from lrqat_dist.model.frozen_state import FrozenStateMismatch, frozen_bytes
from test_frozen_state import CHANGED, perturb_layer, save_tiny_base_model
from train_common import series

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "dist" / "lean_worker.py"
PER_TENSOR_OVERHEAD = 1024  # bytes of pickle / safetensors header per tensor and file (measured: ~500)

pytestmark = pytest.mark.slow


def _torchrun(mode: str, root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           mode, str(root)]
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return r


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pytest.importorskip("deepspeed")
    root = tmp_path_factory.mktemp("lean")
    save_tiny_base_model(root / "base")
    shutil.copytree(root / "base", root / "base-changed")
    r = _torchrun("train", root)
    (root / "train.log").write_text(r.stdout + r.stderr)
    return root


def _model(ckpt: Path):
    from lrqat_dist.export.run import checkpoint_config
    from lrqat_dist.train.build import build_model

    return build_model(checkpoint_config(ckpt), "cpu", torch.float32)


def test_zero3_checkpoint_holds_no_frozen_buffer_and_is_small(runs):
    ckpt = checkpoint_path(runs / "ds3", STEPS)
    meta = read_meta(ckpt)
    assert meta["world_size"] == 2 and meta["zero_stage"] == 3 and meta["payload_buffers"] is False
    model = _model(ckpt)
    buffers = {n for n, _ in model.named_buffers()}
    assert sum(n.endswith((".phi0", ".s0", ".zero_point")) for n in buffers) == 3 * 14
    states = sorted((ckpt / "deepspeed" / meta["deepspeed_tag"]).glob("*_model_states.pt"))
    assert [f.name for f in states] == [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in (0, 1)]
    for f in states + sorted(states[0].parent.glob("*_optim_states.pt")):
        sd = torch.load(f, map_location="cpu", weights_only=False)
        keys = set(sd.get("module") or {})
        assert not keys & buffers and not [k for k in keys if k.endswith(("phi0", "s0", "zero_point"))], f
        if "module" in sd:  # model states: the trainable tensors' ZeRO-3 placeholders only
            assert sd["buffer_names"] == [] and keys == set(meta["trainable"])
            assert sum(v.numel() for v in sd["module"].values()) == 0

    trainable = load_file(str(ckpt / TRAINABLE_FILE))
    trainable_bytes = sum(t.numel() * t.element_size() for t in trainable.values())
    total = checkpoint_bytes(ckpt)
    fixed = sum(f.stat().st_size for f in [*ckpt.glob("rank_*.pt"), ckpt / "meta.json", ckpt / "config.yaml",
                                           *(ckpt / "deepspeed").glob("*.py")])
    bound = 4 * trainable_bytes + PER_TENSOR_OVERHEAD * len(trainable) * (1 + 2 * 2)  # safetensors + 2 files/rank
    assert total - fixed <= bound, (total, fixed, trainable_bytes)
    # The old layout (every rank's model states holding every frozen buffer) would not pass.
    old_extra = 2 * sum(t.numel() * t.element_size() for n, t in model.named_buffers() if n in buffers)
    assert total - fixed + old_extra > bound and frozen_bytes(model) > 0

    # The save log line reports both sizes, in bytes.
    line = next(li for li in (runs / "train.log").read_text().splitlines()
                if "saved checkpoint" in li and str(ckpt) in li)
    on_disk, of_trainable = (int(x) for x in re.findall(r"\((\d+) B\)", line))
    assert on_disk == total and of_trainable == trainable_bytes, line


def test_loqt_trained_buffers_saved_once(runs):
    """LoQT rewrites its codes, scales and P: they are in trained_buffers.safetensors (rank 0, once),
    not in any DeepSpeed file, and not part of the frozen-state fingerprint."""
    from lrqat_dist.checkpoint import TRAINED_BUFFERS_FILE

    ckpt = checkpoint_path(runs / "loqt-ds3", STEPS)
    meta = read_meta(ckpt)
    saved = load_file(str(ckpt / TRAINED_BUFFERS_FILE))
    assert sorted({k.rsplit(".", 1)[1] for k in saved}) == ["proj", "qscale", "qweight"] and len(saved) == 3 * 14
    for f in sorted((ckpt / "deepspeed" / meta["deepspeed_tag"]).glob("*_states.pt")):
        sd = torch.load(f, map_location="cpu", weights_only=False)
        assert not set(sd.get("module") or {}) & set(saved), f
        if "module" in sd:
            assert set(sd["module"]) == set(meta["trainable"])
    fingerprinted = set(meta["frozen_fingerprint"]["modules"])
    assert not {k.rsplit(".", 1)[0] for k in saved} & fingerprinted  # LoQT layers own no frozen state
    assert "model.embed_tokens" in fingerprinted


def test_zero3_consolidation_and_export_bit_exact(runs, tmp_path):
    from lrqat_dist.export import read_native
    from lrqat_dist.export.consolidate import consolidate
    from tools import export as export_tool

    ckpt = checkpoint_path(runs / "ds3", STEPS)
    report = consolidate(ckpt, tmp_path / "t.safetensors")  # zero-points rebuilt and fingerprint-checked
    assert report.zero_points == "14 from the base model"
    live, state = load_file(str(ckpt / TRAINABLE_FILE)), load_file(str(tmp_path / "t.safetensors"))
    assert all(torch.equal(state[k], v) for k, v in live.items())
    reference = lrqat_dist.fold(_model_with(ckpt, live))
    assert export_tool.main([str(runs / "ds3"), "--trainable", str(tmp_path / "t.safetensors"),
                             "--format", "native", "--out", str(tmp_path / "native")]) == 0
    back = read_native(tmp_path / "native")
    for name, fw in reference.items():
        assert torch.equal(back[name].codes, fw.codes) and torch.equal(back[name].scale, fw.scale), name
        assert torch.equal(back[name].zero_point, fw.zero_point), name


def _model_with(ckpt: Path, state: dict):
    from lrqat_dist.checkpoint import load_trainable_

    model = _model(ckpt)
    load_trainable_(model, state, [n for n, p in model.named_parameters() if p.requires_grad], str(ckpt))
    return model


def test_zero3_changed_base_model_refused_on_resume_consolidation_and_export(runs, tmp_path):
    from lrqat_dist.export.consolidate import consolidate
    from lrqat_dist.export.run import load_run
    from tools import consolidate as consolidate_tool

    perturb_layer(runs / "base-changed")
    ckpt = checkpoint_path(runs / "ds3-changed", STEPS)
    named = rf"first at layer '{re.escape(CHANGED)}'"
    with pytest.raises(FrozenStateMismatch, match=named + r".*--accept-changed-base-model"):
        load_run(ckpt)
    with pytest.raises(FrozenStateMismatch, match=named):
        consolidate(ckpt, tmp_path / "c.safetensors")
    assert consolidate_tool.main([str(ckpt), "--out", str(tmp_path / "c.safetensors")]) == 2
    assert consolidate_tool.main([str(ckpt), "--out", str(tmp_path / "c.safetensors"),
                                  "--accept-changed-base-model"]) == 0

    _torchrun("resume", runs)  # ds3-changed: refused on both ranks, then resumed with the override
    for rank in (0, 1):
        text = (runs / f"refused_rank{rank}.txt").read_text()
        assert re.search(named + r".*train\.accept_changed_base_model", text), text
    assert json.loads((runs / "overridden.json").read_text())["step"] == STEPS + 1

    # The same launch resumed ds3 (unchanged base model, lean step-2 checkpoint): bit-identical to the
    # uninterrupted run.
    resumed = load_file(str(checkpoint_path(runs / "ds3", STEPS + 1) / TRAINABLE_FILE))
    reference = load_file(str(checkpoint_path(runs / "ds3-ref", STEPS + 1) / TRAINABLE_FILE))
    assert resumed.keys() == reference.keys() and all(torch.equal(resumed[k], reference[k]) for k in reference)
    assert series(runs / "ds3") == series(runs / "ds3-ref") and len(series(runs / "ds3")) == STEPS + 1
