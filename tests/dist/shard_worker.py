"""Run under ``torchrun --nproc_per_node N``: ``dist.shard_frozen`` true vs false, per engine and Phi0 format.

    torchrun --nproc_per_node 2 tests/dist/shard_worker.py OUT_ROOT [--cases fsdp2:fixed,ds3:int-packed]
             [--kill-at 2] [--steps 4]

Per case ``E:D`` (engine ``fsdp2`` or ``ds3``, ``quant.downcast`` D; ``E:D:kd`` adds ``train.distill``
with the phi0 teacher, whose no-grad forward goes through the same gather hooks): ``OUT_ROOT/E-D-rep`` trains with
replicated frozen buffers, uninterrupted; ``OUT_ROOT/E-D-shard`` trains with ``dist.shard_frozen: true``,
preempted (SIGTERM on rank 0) after step ``--kill-at``, then resumed to the end. FSDP2 also recomputes
its decoder layers in backward (activation checkpointing: the gather hooks fire again in backward).
Validation every 2 steps (no-grad forwards). Rank 0 writes ``OUT_ROOT/E-D-{rep,shard}/frozen.json``:
per step, the frozen per-layer bytes this rank held at rest after the step and the peak during it
(:func:`lrqat_dist.engines.frozen_shard.frozen_memory`), every rank's numbers, and step times.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

import torch.distributed as dist
from train_common import job_dict, synthetic_builders

ENGINES = {"fsdp2": ({"engine": "fsdp2"}, {"activation_checkpointing": True}),
           "ds3": ({"engine": "deepspeed", "zero_stage": 3}, {})}


def run(out: Path, engine: str, downcast: str, shard: bool, kill_at: int | None, steps: int, rank: int,
        model: dict | None = None, val_every: int = 2, distill: bool = False) -> None:
    from lrqat_dist.engines.frozen_shard import frozen_memory, reset_frozen_peak
    from lrqat_dist.train.config import config_from_dict
    from lrqat_dist.train.loop import Trainer

    dist_section, train_section = ENGINES[engine]
    job = job_dict(out, dist={**dist_section, "shard_frozen": shard}, quant={"downcast": downcast},
                   train={**train_section, "max_steps": steps, "val_every": val_every, "save_every": 0,
                          **({"distill": {"teacher": "phi0", "weight": 0.5}} if distill else {})})
    if model:  # a larger shape, for measuring
        job["model"]["config"].update(model)
    cfg = config_from_dict(job)
    record: dict = {"steps": {}, "seconds": []}
    for phase, resume in (("first", "none"), ("second", "auto")) if kill_at else (("only", "none"),):
        trainer = Trainer(cfg, synthetic_builders())
        model = trainer.engine.module
        if hasattr(model, "module") and not hasattr(model, "lm_head"):
            model = model.module
        record["built"] = frozen_memory(model)
        reset_frozen_peak(model)
        clock = [time.perf_counter()]

        def on_step(step, model=model, clock=clock):
            now = time.perf_counter()
            mem = frozen_memory(model)
            every = [None] * dist.get_world_size()
            dist.all_gather_object(every, mem)
            record["steps"][step] = {"rank0": mem, "ranks": every, "seconds": now - clock[0]}
            reset_frozen_peak(model)
            if phase == "first" and step == kill_at and rank == 0:
                os.kill(os.getpid(), signal.SIGTERM)
            clock[0] = time.perf_counter()

        t0 = time.perf_counter()
        result = trainer.run(resume, on_step)
        record["seconds"].append(time.perf_counter() - t0)
        record[phase] = {"step": result.step, "preempted": result.preempted}
    if rank == 0:
        (out / "frozen.json").write_text(json.dumps(record))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out_root")
    p.add_argument("--cases", default="fsdp2:fixed,ds3:fixed,fsdp2:int-packed,ds3:int-packed")
    p.add_argument("--kill-at", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--no-rep", action="store_true", help="skip the replicated reference runs")
    p.add_argument("--model", default="{}", help="JSON updates of the model config (measurement runs)")
    p.add_argument("--val-every", type=int, default=2)
    args = p.parse_args()
    rank = int(os.environ["RANK"])
    root = Path(args.out_root)
    for case in args.cases.split(","):
        engine, downcast, *kd = case.split(":")  # E:D or E:D:kd (train.distill with the phi0 teacher)
        name, distill = "-".join([engine, downcast, *kd]), kd == ["kd"]
        if not args.no_rep:
            run(root / f"{name}-rep", engine, downcast, False, None, args.steps, rank,
                json.loads(args.model), args.val_every, distill)
        run(root / f"{name}-shard", engine, downcast, True, args.kill_at or None, args.steps, rank,
            json.loads(args.model), args.val_every, distill)


if __name__ == "__main__":
    main()
