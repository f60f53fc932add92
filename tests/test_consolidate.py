"""Consolidation of 2-process checkpoints (DeepSpeed ZeRO-2, ZeRO-3, FSDP2; gloo, CPU, fp32) in one
process, and export of the result.

The reference is ``trainable.safetensors``, which the trainer gathers from the live (sharded) model at
save time: the tensors consolidated from the engine payload must equal it bit for bit, and so must
the folded integer weights built from them. The grid is asymmetric so the zero-points are exercised.

The torchrun worker is ``tests/dist/consolidate_worker.py``.
"""
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from consolidate_worker import ENGINES, STEPS  # tests/dist is on sys.path: pyproject's pythonpath
from safetensors.torch import load_file

import lrqat_dist

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pytest.importorskip("deepspeed")
    root = tmp_path_factory.mktemp("consolidate")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = REPO / "tests" / "dist" / "consolidate_worker.py"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(worker), str(root)], env=env, cwd=REPO, capture_output=True, text=True, timeout=500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return root


def _model_with(ckpt: Path, state: dict):
    from lrqat_dist.checkpoint import load_trainable_
    from lrqat_dist.export.run import checkpoint_config
    from lrqat_dist.train.build import build_model

    model = build_model(checkpoint_config(ckpt), "cpu", torch.float32)
    load_trainable_(model, state, [n for n, p in model.named_parameters() if p.requires_grad], str(ckpt))
    return model


@pytest.mark.parametrize("engine", list(ENGINES))
def test_consolidated_payload_folds_like_the_live_model(runs, tmp_path, engine):
    from lrqat_dist.export.consolidate import consolidate
    from lrqat_dist.checkpoint import TRAINABLE_FILE, checkpoint_path

    ckpt = checkpoint_path(runs / engine, STEPS)
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["engine"] == ENGINES[engine]["engine"]
    report = consolidate(ckpt, tmp_path / "t.safetensors")  # one process, no process group
    assert any(TRAINABLE_FILE in c for c in report.checks)  # bit-equal to the live model's gathered tensors
    state = load_file(str(tmp_path / "t.safetensors"))
    zps = {k: v for k, v in state.items() if k.endswith(".zero_point")}
    assert len(zps) == 14 and all(v.dtype == torch.int32 for v in zps.values())
    assert set(state) - set(zps) == set(meta["trainable"])

    live = lrqat_dist.fold(_model_with(ckpt, load_file(str(ckpt / TRAINABLE_FILE))))
    ours = lrqat_dist.fold(_model_with(ckpt, state))  # zero-points checked against the rebuilt ones
    for name, fw in live.items():
        assert torch.equal(ours[name].codes, fw.codes) and torch.equal(ours[name].scale, fw.scale), name
        assert torch.equal(ours[name].zero_point, fw.zero_point), name
    assert report.zero_points == "14 from the base model"  # no payload holds buffers: rebuilt, fingerprint-checked
    if engine == "ds3":  # the lean DeepSpeed payload has no buffer to read
        with pytest.raises(ValueError, match="holds no buffers"):
            consolidate(ckpt, tmp_path / "r.safetensors", zero_points="payload")


def test_tools_without_trainable_file(runs, tmp_path):
    """A checkpoint that lost trainable.safetensors: consolidate with the tool, export with --trainable;
    tools/export.py on the bare checkpoint reads the FSDP2 payload itself."""
    from lrqat_dist.export import read_native
    from lrqat_dist.checkpoint import TRAINABLE_FILE, checkpoint_path

    def tool(name):
        return importlib.import_module(f"tools.{name}")

    reference = {}
    for engine in ("ds2", "fsdp2"):
        src = checkpoint_path(runs / engine, STEPS)
        reference[engine] = lrqat_dist.fold(_model_with(src, load_file(str(src / TRAINABLE_FILE))))
        run = tmp_path / engine
        shutil.copytree(runs / engine, run)
        (checkpoint_path(run, STEPS) / TRAINABLE_FILE).unlink()
    assert tool("consolidate").main([str(tmp_path / "ds2"), "--out", str(tmp_path / "ds2.safetensors")]) == 0
    assert tool("export").main([str(tmp_path / "ds2"), "--trainable", str(tmp_path / "ds2.safetensors"),
                                "--format", "native", "--out", str(tmp_path / "ds2-native")]) == 0
    assert tool("export").main([str(tmp_path / "fsdp2"), "--format", "native",
                                "--out", str(tmp_path / "fsdp2-native")]) == 0
    for engine in ("ds2", "fsdp2"):
        back = read_native(tmp_path / f"{engine}-native")
        for name, fw in reference[engine].items():
            assert torch.equal(back[name].codes, fw.codes) and torch.equal(back[name].scale, fw.scale), name
    record = json.loads((tmp_path / "fsdp2-native" / "lrqat_export.json").read_text())
    assert record["trainable_from"] == "the fsdp2 payload"
