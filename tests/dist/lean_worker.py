"""torchrun worker of tests/test_lean_checkpoint.py: DeepSpeed ZeRO-3, 2 processes, a base model read
from a local HF directory (so that the test can change the file between launches).

    torchrun --nproc_per_node 2 tests/dist/lean_worker.py train ROOT
    torchrun --nproc_per_node 2 tests/dist/lean_worker.py resume ROOT

``train``: ROOT/ds3 (max_steps 3, preempted by SIGTERM after step 2: checkpoint step 2),
ROOT/ds3-ref (the same 3 steps uninterrupted), ROOT/ds3-changed (2 steps) and ROOT/loqt-ds3 (LoQT, 2 steps,
a merge after each: its trained buffers must be saved once, not in the DeepSpeed payload).
``resume``: ROOT/ds3 resumes to step 3 (the test compares it with ds3-ref bit for bit); ROOT/ds3-changed,
whose base model the test has changed, must be refused on every rank (each writes
``ROOT/refused_rank<r>.txt`` with the error), then resumes with ``train.accept_changed_base_model: true``.
"""
import json
import logging
import os
import signal
import sys
from pathlib import Path

from train_common import job_dict, synthetic_builders  # this script's folder is on sys.path

REPO = Path(__file__).resolve().parents[2]
STEPS = 2
QUANT = {"bits": 3, "group_size": 32, "symmetric": False}  # asymmetric: zero-points exercised
TOKENIZER = REPO / "tests" / "fixtures" / "lm_eval_task" / "byte_tokenizer"
RUNS = {"ds3": "base", "ds3-ref": "base", "ds3-changed": "base-changed", "loqt-ds3": "base"}  # run -> base dir
LOQT = {"method": "loqt", "rank": 4, "range_init": "minmax", "loqt_tau": 1, "loqt_scale": 0.5, "loqt_error_comp": 1}


def job(root: Path, run: str, **train) -> dict:
    return job_dict(root / run, dist={"engine": "deepspeed", "zero_stage": 3}, quant=LOQT if "loqt" in run else QUANT,
                    model={"path": str(root / RUNS[run]), "config": None, "tokenizer": str(TOKENIZER)},
                    train={"max_steps": STEPS, "val_every": 0, **train})


def main(mode: str, root: Path) -> None:
    from lrqat_dist.model.frozen_state import FrozenStateMismatch
    from lrqat_dist.train import train
    from lrqat_dist.train.config import config_from_dict

    logging.basicConfig(format="%(message)s", stream=sys.stderr)
    logging.getLogger("lrqat_dist").setLevel(logging.INFO)  # the save lines (sizes) are checked
    rank = int(os.environ["RANK"])
    if mode == "train":
        def preempt(step):
            if step == STEPS and rank == 0:
                os.kill(os.getpid(), signal.SIGTERM)

        assert train(config_from_dict(job(root, "ds3", max_steps=STEPS + 1)), resume="none",
                     builders=synthetic_builders(), on_step=preempt).preempted
        train(config_from_dict(job(root, "ds3-ref", max_steps=STEPS + 1)), resume="none", builders=synthetic_builders())
        train(config_from_dict(job(root, "ds3-changed")), resume="none", builders=synthetic_builders())
        train(config_from_dict(job(root, "loqt-ds3")), resume="none", builders=synthetic_builders())
        return
    assert train(config_from_dict(job(root, "ds3", max_steps=STEPS + 1)), resume="auto",
                 builders=synthetic_builders()).step == STEPS + 1
    try:
        train(config_from_dict(job(root, "ds3-changed", max_steps=STEPS + 1)), resume="auto",
              builders=synthetic_builders())
        message = "not refused"
    except FrozenStateMismatch as e:
        message = str(e)
    (root / f"refused_rank{rank}.txt").write_text(message)
    result = train(config_from_dict(job(root, "ds3-changed", max_steps=STEPS + 1, accept_changed_base_model=True)),
                   resume="auto", builders=synthetic_builders())
    if rank == 0:
        (root / "overridden.json").write_text(json.dumps({"step": result.step, "checkpoint": str(result.checkpoint)}))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
    sys.exit(0)
