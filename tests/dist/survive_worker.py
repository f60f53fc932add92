"""Run under ``torchrun --nproc_per_node 2``: the multi-process scenarios of tests/test_survive_dist.py.

    torchrun --nproc_per_node 2 tests/dist/survive_worker.py OUT_ROOT --jobs sigterm:first [--tokenizer DIR]

Each job ``NAME[:PHASE]`` runs in ``OUT_ROOT/NAME`` (phases of one job share the directory) and rank 0
writes ``OUT_ROOT/NAME/result[_PHASE].json``; jobs that end in an expected error write one file per rank.

- ``sigterm:first|resume``, ``sigterm_ref``: real tokenizer and streaming data with ``data.num_workers: 2``,
  FSDP2. ``first`` trains slowly (0.4 s pause per step) until the test sends SIGTERM to every process
  group; ``resume`` continues to ``max_steps``; ``sigterm_ref`` is the uninterrupted run.
- ``kill9:first|resume``, ``kill9_ref``: DeepSpeed ZeRO-2, synthetic data, a checkpoint every 2 steps;
  in ``first`` rank 1 stops inside the save of step 4 (after writing its files, before they are
  fsynced and checked) and writes ``OUT_ROOT/kill9/KILL_ME`` with its pid for the test to ``kill -9``.
- ``nan_ds0|nan_ds2|nan_ds3|nan_ds2off|nan_ds3off|nan_fsdp2`` (``off``: optimizer state offloaded): NaN
  logits at step 3 on rank 1 only (the test hook), a checkpoint every step; ``nanrun``: NaN at steps
  2-9 on rank 1 with ``max_nonfinite: 3`` (expects the error).
- ``timed``: ``train.save_every_minutes`` with only rank 1's save clock running out after step 2 (FSDP2):
  both ranks save step 2 (a save is collective: a rank left out would hang the other).
- ``sharedfs``: every rank gets its own ``train.output_dir`` (what ranks on nodes without a shared
  filesystem see); expects the shared-directory error. Also the checkpoint-completion check on
  per-rank directories (expects its error after a 1 s timeout).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from train_common import job_dict, synthetic_builders

REPO = Path(__file__).resolve().parents[2]
NAN_ENGINES = {"nan_ds0": {"engine": "deepspeed", "zero_stage": 0},
               "nan_ds2": {"engine": "deepspeed", "zero_stage": 2},
               "nan_ds3": {"engine": "deepspeed", "zero_stage": 3},
               "nan_ds2off": {"engine": "deepspeed", "zero_stage": 2, "offload_optimizer": True},
               "nan_ds3off": {"engine": "deepspeed", "zero_stage": 3, "offload_optimizer": True},
               "nan_fsdp2": {"engine": "fsdp2"}}


def real_data_cfg(out: Path, tokenizer: str):
    from lrqat_dist.train import load_config

    overrides = [f"train.output_dir={out}", f"model.tokenizer={tokenizer}", "data.seq_len=64", "data.num_workers=2",
                 "data.prefetch_factor=2", "train.micro_batch_size=1", "train.grad_accum=1", "train.max_steps=12",
                 "train.save_every=0", "train.val_every=0", "dist.engine=fsdp2", "log.progress_bar=false",
                 "log.tensorboard=false"]
    return load_config(REPO / "configs/tiny-cpu.yaml", overrides)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out_root")
    p.add_argument("--jobs", required=True)
    p.add_argument("--tokenizer")
    args = p.parse_args()
    from lrqat_dist.checkpoint import checkpointer as ckpt_mod
    from lrqat_dist.checkpoint import integrity
    from lrqat_dist.engines import DistEnv
    from lrqat_dist.train import train
    from lrqat_dist.train.config import config_from_dict
    from lrqat_dist.train.nonfinite import TEST_NAN_RANKS_ENV, TEST_NAN_STEPS_ENV, NonfiniteError

    rank = int(os.environ["RANK"])
    root = Path(args.out_root)

    def report(out: Path, name: str, data: dict, every_rank: bool = False) -> None:
        if every_rank:
            name = f"{name}_rank{rank}"
        if every_rank or rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{name}.json").write_text(json.dumps(data))

    def summary(r) -> dict:
        return {"step": r.step, "preempted": r.preempted, "checkpoint": str(r.checkpoint)}

    for job in args.jobs.split(","):
        name, _, phase = job.partition(":")
        out = root / name
        result = f"result_{phase}" if phase else "result"
        t0 = time.perf_counter()
        if name in ("sigterm", "sigterm_ref"):
            cfg = real_data_cfg(out, args.tokenizer)
            slow = (lambda step: time.sleep(0.4)) if phase == "first" else None
            r = train(cfg, resume="none" if phase != "resume" else "auto", on_step=slow)
            report(out, result, {**summary(r), "seconds": time.perf_counter() - t0})
        elif name in ("kill9", "kill9_ref"):
            cfg = config_from_dict(job_dict(out, dist={"engine": "deepspeed", "zero_stage": 2},
                                            train={"save_every": 2, "max_steps": 6, "keep_last": 3, "val_every": 0}))
            if phase == "first" and rank == 1:
                real_seal = ckpt_mod.seal_files

                def stall_in_save_of_step_4(env, tmp, *args, **kwargs):
                    if tmp.name.endswith("step_00000004"):  # this rank's files are written
                        (out / "KILL_ME").write_text(str(os.getpid()))
                        time.sleep(600)  # killed here by the test
                    return real_seal(env, tmp, *args, **kwargs)

                ckpt_mod.seal_files = stall_in_save_of_step_4
            r = train(cfg, resume="auto" if phase == "resume" else "none", builders=synthetic_builders())
            report(out, result, {**summary(r), "seconds": time.perf_counter() - t0})
        elif name in NAN_ENGINES or name == "nanrun":
            engine = NAN_ENGINES.get(name, {"engine": "fsdp2"})
            steps = "3" if name != "nanrun" else "2-9"
            os.environ[TEST_NAN_STEPS_ENV], os.environ[TEST_NAN_RANKS_ENV] = steps, "1"
            cfg = config_from_dict(job_dict(out, dist=engine, train={"save_every": 1, "keep_last": 10, "max_steps": 5,
                                                                     "val_every": 0, "max_nonfinite": 3}))
            try:
                r = train(cfg, resume="none", builders=synthetic_builders())
                report(out, result, {**summary(r), "seconds": time.perf_counter() - t0})
            except NonfiniteError as e:
                report(out, result, {"error": str(e)}, every_rank=True)
            finally:
                del os.environ[TEST_NAN_STEPS_ENV], os.environ[TEST_NAN_RANKS_ENV]
        elif name == "timed":
            from lrqat_dist.train.loop import Trainer

            real_due, calls = Trainer._save_time_due, []
            if rank == 1:  # only rank 1's save clock runs out, after step 2: both ranks must save step 2
                Trainer._save_time_due = lambda self: calls.append(1) or len(calls) == 2
            cfg = config_from_dict(job_dict(out, dist={"engine": "fsdp2"},
                                            train={"save_every": 0, "save_final": False, "max_steps": 3,
                                                   "val_every": 0, "save_every_minutes": 60}))
            r = train(cfg, resume="none", builders=synthetic_builders())
            Trainer._save_time_due = real_due
            report(out, result, {**summary(r), "seconds": time.perf_counter() - t0})
        elif name == "sharedfs":
            from lrqat_dist.checkpoint import shared_fs

            shared_fs.VISIBLE_TIMEOUT_S = 1.0  # (10 s by default) a missing file is missing
            cfg = config_from_dict(job_dict(out / f"rank{rank}", dist={"engine": "fsdp2"}, train={"max_steps": 1}))
            try:
                train(cfg, resume="none", builders=synthetic_builders())
                report(out, result, {"error": None}, every_rank=True)
            except RuntimeError as e:
                report(out, result, {"error": str(e)}, every_rank=True)
            import torch
            import torch.distributed as dist

            env = DistEnv(rank, dist.get_world_size(), rank, torch.device("cpu"))
            mine = out / "visible" / f"rank{rank}"
            mine.mkdir(parents=True, exist_ok=True)
            (mine / f"payload_{rank}.bin").write_bytes(b"x" * (10 + rank))
            try:
                integrity.seal_files(env, mine, timeout_s=1.0)
                report(out, "visible", {"error": None}, every_rank=True)
            except RuntimeError as e:
                report(out, "visible", {"error": str(e)}, every_rank=True)
        else:
            raise SystemExit(f"unknown job {job}")


if __name__ == "__main__":
    main()
