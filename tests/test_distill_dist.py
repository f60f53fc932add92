"""KD (train.distill, phi0 teacher) under two processes (torchrun, gloo, fp32) vs one process, same global batch.

The engines run the teacher as a no-grad forward of the same wrapped module (DeepSpeed's engine, FSDP2's
fully_shard'ed model with activation checkpointing), then the student's forward and the chunked KD loss.
Same data and tolerance as tests/test_train_dist.py (losses 1e-5, trained tensors 2e-6: fp32
summation order only), with a preemption at step 3 and a resume.
"""
import json

import pytest
from safetensors.torch import load_file

from train_common import job_dict, series, synthetic_builders

from lrqat_dist.train import train
from lrqat_dist.train.config import config_from_dict
from test_train_dist import KILL_AT, LOSS_TOL, PARAM_TOL, REPO, STEPS, _torchrun

ENGINES = ["ds2", "ds3", "fsdp2"]
KD = {"teacher": "phi0", "weight": 0.7, "temperature": 2.0, "chunk_tokens": 50}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("kd")
    r = _torchrun(str(REPO / "tests/dist/engine_matrix.py"), str(root), "--engines", ",".join(ENGINES),
                  "--kill-at", str(KILL_AT),
                  "--train", json.dumps({"micro_batch_size": 1, "grad_accum": 2, "distill": KD}))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-8000:]
    train(config_from_dict(job_dict(root / "single", train={"micro_batch_size": 2, "grad_accum": 2, "distill": KD})),
          resume="none", builders=synthetic_builders())
    train(config_from_dict(job_dict(root / "plain", train={"micro_batch_size": 2, "grad_accum": 2})),
          resume="none", builders=synthetic_builders())
    return root


@pytest.mark.parametrize("engine", ENGINES)
def test_kd_engine_matches_single_process(runs, engine):
    ref, got = series(runs / "single"), series(runs / engine)
    assert sorted(got) == list(range(1, STEPS + 1))
    diffs = [abs(got[s] - ref[s]) for s in ref]
    assert max(diffs) <= LOSS_TOL, diffs
    val_ref, val = series(runs / "single", "val_loss"), series(runs / engine, "val_loss")
    assert all(abs(val[s] - val_ref[s]) <= LOSS_TOL for s in val_ref), (val, val_ref)
    a = load_file(runs / "single" / f"checkpoints/step_{STEPS:08d}/trainable.safetensors")
    b = load_file(runs / engine / f"checkpoints/step_{STEPS:08d}/trainable.safetensors")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= PARAM_TOL, worst
    # KD really trained something else than CE: the same steps without it end elsewhere
    plain = load_file(runs / "plain" / f"checkpoints/step_{STEPS:08d}/trainable.safetensors")
    assert max((a[k] - plain[k]).abs().max().item() for k in a) > 100 * PARAM_TOL
