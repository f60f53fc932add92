"""DL-QAT, LoQT and activation quantization under two processes (torchrun, gloo, CPU): DeepSpeed
ZeRO-2, ZeRO-3 and FSDP2.

One launch runs every (engine, method) pair (tests/dist/method_matrix.py). LoQT: after every step the
merged buffers (codes, scales, P) and the full B are bit-identical on both ranks, ZeRO's fp32 master
of B equals the working copy after merges that write it (zero or error-compensated values), and the
merges happen after the scheduled steps. DL-QAT: steps 1-2 move only s and b, steps 3-4 only m, A, B.
LR-QAT + a8kv4: every engine trains with the activation quantizers in place and its losses match a
single-process run of the same global batch.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENGINES = ["ds2", "ds3", "fsdp2"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("methods") / "results.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests/dist/method_matrix.py"), str(out), "--engines", ",".join(ENGINES)]
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=500)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-8000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("engine", ENGINES)
def test_loqt_merges_and_svds_identical_on_every_rank(results, engine):
    res = results[f"{engine}/loqt"]
    assert all(res["same_buffers"]) and all(res["same_B"]) and all(res["master_ok"])
    n = res["merges"][2]
    assert n > 0 and res["merges"] == [0, 0, n, n, 2 * n]  # merges after steps 3 and 5 (final)
    # B: zero until P exists, trained, error-compensated (non-zero) after step 3, zero after the final merge
    assert res["B_nonzero"] == [False, True, True, True, False]


@pytest.mark.parametrize("engine", ENGINES)
def test_dlqat_phase_switch(results, engine):
    moved = results[f"{engine}/dlqat"]["moved"]
    for step in (0, 1):
        assert moved[step]["scale"] and moved[step]["offset"]
        assert not (moved[step]["magnitude"] or moved[step]["lora_A"] or moved[step]["lora_B"])
    for step in (2, 3):
        assert not (moved[step]["scale"] or moved[step]["offset"])
        assert moved[step]["magnitude"] and moved[step]["lora_B"]
    assert moved[3]["lora_A"]  # A's gradient is B^T(...): zero until B has moved once


@pytest.fixture(scope="module")
def single_process_actq_losses(tmp_path_factory):
    from method_matrix import METHODS, TRAIN
    from train_common import job_dict, synthetic_builders

    from lrqat_dist.train import train
    from lrqat_dist.train.config import config_from_dict
    from lrqat_dist.train.metrics import read_metrics

    quant, steps = METHODS["actq"]
    out = tmp_path_factory.mktemp("actq-single")
    # The same four sequences per step as 2 ranks x micro-batch 1 x grad_accum 2 (train_common's loader).
    train(config_from_dict(job_dict(out, quant=quant, train={**TRAIN, "max_steps": steps, "micro_batch_size": 2})),
          resume="none", builders=synthetic_builders())
    return [r["loss"] for r in read_metrics(out) if "loss" in r]


@pytest.mark.parametrize("engine", ENGINES)
def test_activation_quantized_training_matches_single_process(results, single_process_actq_losses, engine):
    res = results[f"{engine}/actq"]
    assert res["quantizers"] > 0
    assert len(res["losses"]) == len(single_process_actq_losses) == 3
    # fp32 everywhere; only the reduction order of the gradients differs between engines.
    assert res["losses"] == pytest.approx(single_process_actq_losses, abs=1e-5)
