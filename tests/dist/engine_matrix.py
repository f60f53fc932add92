"""Run under ``torchrun --nproc_per_node 2``: for each engine, train to a preemption then resume.

    torchrun --nproc_per_node 2 tests/dist/engine_matrix.py OUT_ROOT [--engines ds2,ds3,fsdp2] [--kill-at 3]

Per engine ``E`` the run lives in ``OUT_ROOT/E``. Phase 1 trains from scratch and, right after the
optimizer step ``--kill-at``, rank 0 alone sends itself SIGTERM (a real signal: all ranks must agree
to stop at that step, save and return). Phase 2 resumes with ``resume=auto`` and trains to ``train.max_steps``. One launch covers
all engines because each launch costs 10-20 s of start-up here. Results: ``OUT_ROOT/E/result.json``.
``--reference``: also train ``E`` uninterrupted into ``OUT_ROOT/E-ref`` (same world size), to compare
the resumed run with bit for bit. Every rank writes where the launcher placed it (``RANK``,
``LOCAL_RANK``, ``GROUP_RANK`` = node) to ``OUT_ROOT/rank_<RANK>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

from train_common import job_dict, synthetic_builders

# name -> (dist section, train section updates). FSDP2 also recomputes its decoder layers in backward
# (activation checkpointing changes no number, so it is compared with the same reference).
ENGINES = {
    "ds0": ({"engine": "deepspeed", "zero_stage": 0}, {}),
    "ds1": ({"engine": "deepspeed", "zero_stage": 1}, {}),
    "ds2": ({"engine": "deepspeed", "zero_stage": 2}, {}),
    "ds3": ({"engine": "deepspeed", "zero_stage": 3}, {}),
    "ds2off": ({"engine": "deepspeed", "zero_stage": 2, "offload_optimizer": True}, {}),
    "ds3off": ({"engine": "deepspeed", "zero_stage": 3, "offload_optimizer": True}, {}),
    "fsdp2": ({"engine": "fsdp2"}, {"activation_checkpointing": True}),
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out_root")
    p.add_argument("--engines", default="ds2,ds3,fsdp2")
    p.add_argument("--kill-at", type=int, default=3)
    p.add_argument("--train", default="{}", help="JSON updates of the train section")
    p.add_argument("--reference", action="store_true", help="also train each engine uninterrupted (E-ref)")
    args = p.parse_args()
    from lrqat_dist.train import train
    from lrqat_dist.train.config import config_from_dict

    rank = int(os.environ["RANK"])
    Path(args.out_root).mkdir(parents=True, exist_ok=True)
    (Path(args.out_root) / f"rank_{rank}.json").write_text(json.dumps(
        {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}))
    for name in args.engines.split(","):
        out = Path(args.out_root) / name
        dist_section, train_section = ENGINES[name]
        cfg = config_from_dict(job_dict(out, dist=dist_section, train={**train_section, **json.loads(args.train)}))

        def kill(step):
            if step == args.kill_at and rank == 0:
                os.kill(os.getpid(), signal.SIGTERM)

        t0 = time.perf_counter()
        first = train(cfg, resume="none", builders=synthetic_builders(), on_step=kill)
        t1 = time.perf_counter()
        second = train(cfg, resume="auto", builders=synthetic_builders())
        t2 = time.perf_counter()
        if args.reference:
            ref_cfg = config_from_dict(job_dict(Path(args.out_root) / f"{name}-ref", dist=dist_section,
                                                train={**train_section, **json.loads(args.train)}))
            train(ref_cfg, resume="none", builders=synthetic_builders())
        if rank == 0:
            (out / "result.json").write_text(json.dumps({
                "seconds": [t1 - t0, t2 - t1],
                "first": {"step": first.step, "preempted": first.preempted, "checkpoint": str(first.checkpoint)},
                "second": {"step": second.step, "preempted": second.preempted, "checkpoint": str(second.checkpoint)},
            }))


if __name__ == "__main__":
    main()
