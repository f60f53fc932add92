"""Run under ``torchrun --nproc_per_node 2``: rank 1 fails right after optimizer step 1.

    torchrun --nproc_per_node 2 tests/dist/fail_worker.py OUT --engine fsdp2 [--mode raise|hang]
                                                              [--timeout-minutes 0.1]

``raise``: rank 1 raises; rank 0 goes on to its next collective, which rank 1 never joins. The launch
must end promptly with a non-zero exit and rank 1's error in the output.
``hang``: rank 1 stops answering (sleeps with SIGTERM/SIGINT at their default action, as a process
stuck in a kernel or a dead filesystem would not run Python signal handlers): rank 0's next
collective must fail after ``dist.timeout_minutes``, and torchrun then ends rank 1.
Rank 1 writes the wall-clock time of its failure to ``OUT/failed_at``.
"""
from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path

from train_common import job_dict, synthetic_builders

ENGINES = {"ds3": {"engine": "deepspeed", "zero_stage": 3}, "fsdp2": {"engine": "fsdp2"}}
MESSAGE = "injected failure on rank 1 at step 1"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--engine", choices=sorted(ENGINES), default="fsdp2")
    p.add_argument("--mode", choices=["raise", "hang"], default="raise")
    p.add_argument("--timeout-minutes", type=float, default=30.0)
    args = p.parse_args()
    from lrqat_dist.train import train
    from lrqat_dist.train.config import config_from_dict

    rank = int(os.environ["RANK"])
    dist_section = {**ENGINES[args.engine], "timeout_minutes": args.timeout_minutes}
    cfg = config_from_dict(job_dict(Path(args.out), dist=dist_section, train={"max_steps": 50, "val_every": 0}))

    def fail(step):
        if step == 1 and rank == 1:
            (Path(args.out) / "failed_at").write_text(repr(time.time()))  # when the job starts to fail
            if args.mode == "raise":
                raise RuntimeError(MESSAGE)
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            time.sleep(600)

    train(cfg, resume="none", builders=synthetic_builders(), on_step=fail)


if __name__ == "__main__":
    main()
