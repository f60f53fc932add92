#!/usr/bin/env python
"""Consolidate a DeepSpeed ZeRO 0-3 or FSDP2 (DCP) checkpoint into one safetensors of trainable tensors.

    python tools/consolidate.py runs/7b-ds3 --out exports/7b-trainable.safetensors
    python tools/consolidate.py runs/7b-fsdp2/checkpoints/step_00010000 --out t.safetensors --zero-points rebuild

Runs in one CPU process, whatever the number of processes that trained. Output: the trainable
tensors (lora_A, lora_B, scale ... in fp32, keyed by model parameter names) plus, for asymmetric
grids, the integer zero-points (rebuilt from the base model, checked against the checkpoint's
frozen-state fingerprint; older DeepSpeed checkpoints: read from their model states).
Use it with tools/export.py --trainable FILE, or load_state_dict(strict=False) into the model that
lrqat_dist.train.build_model(cfg) builds. When the checkpoint also holds trainable.safetensors the
two must agree bit for bit. See docs/export.md.
"""
from __future__ import annotations

import argparse
import logging
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT_DIR",
                   help="a run's output_dir (newest complete checkpoint) or a checkpoints/step_N directory")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--step", type=int, default=None, help="checkpoint step of a run directory (default: newest)")
    p.add_argument("--zero-points", default="auto", choices=("auto", "payload", "rebuild", "skip"),
                   help="asymmetric grids: 'auto' = rebuilt from the base model (older DeepSpeed checkpoints: "
                        "their saved buffers) "
                        "(default: %(default)s)")
    p.add_argument("--accept-changed-base-model", action="store_true",
                   help="rebuilding zero-points: continue (with a warning) when the frozen state rebuilt from the "
                        "base model differs from the checkpoint's fingerprint (default: refuse)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.out.endswith(".safetensors"):
        print("error: --out must end with .safetensors", file=sys.stderr)
        return 2
    from lrqat_dist.checkpoint import resolve_checkpoint
    from lrqat_dist.export.consolidate import consolidate

    logging.basicConfig(format="%(message)s", stream=sys.stderr)  # warnings from everyone, as without handlers
    logging.getLogger("lrqat_dist").setLevel(logging.INFO)  # and the library's progress lines

    try:
        report = consolidate(resolve_checkpoint(args.source, args.step), args.out, zero_points=args.zero_points,
                             accept_changed_base_model=args.accept_changed_base_model)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # the payload disagrees with trainable.safetensors, or a failed read-back
        print(f"consolidation failed: {e}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
