#!/usr/bin/env python
"""Train with LR-QAT from a YAML config: one process, DeepSpeed ZeRO or FSDP2.

    python launch/train.py --config configs/tiny-cpu.yaml
    python launch/train.py --config configs/tiny-cpu.yaml --set train.max_steps=10 --set dist.engine=none
    torchrun --nproc_per_node 8 launch/train.py --config configs/llama2-7b-w4pc.yaml --set dist.engine=fsdp2
    deepspeed --hostfile hosts launch/train.py --config configs/llama2-7b-w4pc-multinode.yaml

Resumes from the newest complete checkpoint in train.output_dir by default (--resume auto).
SIGTERM / SIGINT save a checkpoint at the end of the current step and exit 0 (Ctrl-C twice: quit now).
See docs/launch-*.md and docs/config.md.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--config", required=True, help="training YAML (sections model, quant, data, train, dist, log)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key, e.g. --set train.max_steps=10 (VALUE is parsed as YAML); repeatable")
    p.add_argument("--resume", default="auto",
                   help="'auto' (newest complete checkpoint in train.output_dir, else fresh), 'none', a "
                        "checkpoint directory (any number of ranks may resume it), or 'weights:CKPT' (a "
                        "checkpoint or run directory: its trained A, B, s only; fresh optimizer, schedule, "
                        "data, step 0) (default: %(default)s)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment is what we use.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
    from lrqat_dist.train import load_config, train
    from lrqat_dist.train.config import dump_config

    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    try:
        result = train(cfg, resume=args.resume)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        how = "preempted" if result.preempted else "finished"
        print(f"{how} at step {result.step}; last checkpoint: {result.checkpoint}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
