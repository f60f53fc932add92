"""Run under ``torchrun --nproc_per_node {1,2}``: one phase of an elastic (world-size changing) resume.

    torchrun --nproc_per_node 2 tests/dist/elastic_matrix.py OUT_ROOT --engines ds2,fsdp2 --phase 2to1:first
    torchrun --nproc_per_node 1 tests/dist/elastic_matrix.py OUT_ROOT --engines ds2,fsdp2 --phase 2to1:second

Per engine ``E`` and case ``C`` (``2to1`` or ``1to2``) the run lives in ``OUT_ROOT/E/C``. ``first``
trains from scratch and stops after step ``--kill-at`` (rank 0 sends itself SIGTERM: a preemption that
saves); ``second`` resumes that checkpoint on this launch's world size and trains to ``train.max_steps``;
``weights`` starts a new run in ``OUT_ROOT/E/C-weights`` from that checkpoint's trained tensors only
(``--resume weights:CKPT``) on this launch's world size.
Several ``--phase`` values may be given; they run in order; ``CASE:weights:ds3+fsdp2`` limits a phase
to some engines. The global batch is the same on every world
size (4 rows of the synthetic stream per step: 2 ranks x 2 micro-batches of 1 row, or 1 process x 2
micro-batches of 2 rows), so the resumed losses are comparable with an uninterrupted run.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

from train_common import job_dict, synthetic_builders

ENGINES = {
    "ds1": {"engine": "deepspeed", "zero_stage": 1},
    "ds2": {"engine": "deepspeed", "zero_stage": 2},
    "ds3": {"engine": "deepspeed", "zero_stage": 3},
    "fsdp2": {"engine": "fsdp2"},
    "fsdp2data": {"engine": "fsdp2"},  # the real data stream (--data, --tokenizer) instead of the synthetic one
}
ROWS_PER_STEP = 4


def recording_builders(log: Path):
    """The real loaders, each train batch appended to ``log`` (one JSON list of token lists per line)."""
    import dataclasses

    from lrqat_dist.train import Builders
    from lrqat_dist.train.loop import default_train_loader

    class Recording:
        def __init__(self, inner):
            self.inner = inner

        def __iter__(self):
            for batch in self.inner:
                with open(log, "a") as f:
                    f.write(json.dumps(batch["input_ids"].tolist()) + "\n")
                yield batch

        def __getattr__(self, name):  # state_dict, load_state_dict, load_resharded_state, skip_counts
            return getattr(self.inner, name)

    return dataclasses.replace(Builders(), val_loader=lambda cfg, tok, env: None,
                               train_loader=lambda cfg, tok, env: Recording(default_train_loader(cfg, tok, env)))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out_root")
    p.add_argument("--engines", default="ds2,ds3,fsdp2")
    p.add_argument("--phase", action="append", required=True, help="CASE:first, CASE:second or CASE:weights")
    p.add_argument("--kill-at", type=int, default=3)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rows", type=int, default=ROWS_PER_STEP, help="rows of the global batch of a step")
    p.add_argument("--data", help="train files of the *data engines")
    p.add_argument("--tokenizer", help="tokenizer directory of the *data engines")
    args = p.parse_args()
    from lrqat_dist.train import train
    from lrqat_dist.train.config import config_from_dict

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    mbs = args.rows // (2 * world)
    assert mbs * 2 * world == args.rows, f"--rows {args.rows} is not a multiple of 2 x {world} ranks"
    for phase in args.phase:
        case, which, *only = phase.split(":")  # an optional third field: engines joined by '+'
        for name in only[0].split("+") if only else args.engines.split(","):
            out = Path(args.out_root) / name / case
            sections = {}
            builders = synthetic_builders
            if name.endswith("data"):
                sections = {"model": {"tokenizer": args.tokenizer},
                            "data": {"train_files": args.data, "shuffle_buffer": 3, "tokenize_batch": 2}}
                out.mkdir(parents=True, exist_ok=True)
                log = out / f"batches_{which}_rank{rank}.jsonl"
                builders = lambda: recording_builders(log)  # noqa: E731
            cfg = config_from_dict(job_dict(out, dist=ENGINES[name], train={
                "micro_batch_size": mbs, "grad_accum": 2, "max_steps": args.steps, "val_every": 0}, **sections))

            def kill(step):
                if step == args.kill_at and rank == 0:
                    os.kill(os.getpid(), signal.SIGTERM)

            if which == "first":
                res = train(cfg, resume="none", builders=builders(), on_step=kill)
            elif which == "second":
                res = train(cfg, resume="auto", builders=builders())
            else:  # weights: a new run from the trained tensors of CASE's first checkpoint
                ckpt = out / f"checkpoints/step_{args.kill_at:08d}"
                out = out.parent / f"{case}-weights"
                cfg = config_from_dict(job_dict(out, dist=ENGINES[name], train={
                    "micro_batch_size": mbs, "grad_accum": 2, "max_steps": args.steps, "val_every": 0}, **sections))
                res = train(cfg, resume=f"weights:{ckpt}", builders=builders())
            if rank == 0:
                (out / f"result_{which}.json").write_text(json.dumps(
                    {"world_size": world, "step": res.step, "preempted": res.preempted,
                     "checkpoint": str(res.checkpoint)}))


if __name__ == "__main__":
    main()
