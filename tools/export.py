#!/usr/bin/env python
"""Export a trained LR-QAT run (or one of its checkpoints) to an integer checkpoint.

    python tools/export.py runs/tiny-cpu --format compressed-tensors --out exports/tiny-ct
    python tools/export.py runs/tiny-cpu/checkpoints/step_00000020 --format native --out exports/tiny-native
    python tools/export.py runs/llama2-7b --format compressed-tensors --dtype bfloat16 --round-scales --out exports/7b
    python tools/export.py runs/x --format dequantized --dtype bfloat16 --allow-rounding --out exports/x-bf16
    python tools/export.py runs/x --format gguf --out exports/x.gguf                 # llama.cpp / Ollama
    python tools/export.py runs/x --format compressed-tensors --dtype float16 --round-scales --allow-rounding \
        --target vllm --out exports/x-vllm                                           # refuses what vLLM cannot serve

The model is rebuilt on CPU from the run's config (base model + prepare) and its trained tensors
(trainable.safetensors, the engine payload, or --trainable FILE from tools/consolidate.py). Every
export is read back and compared bit for bit with fold() before it is put in place; the checks
passed are printed and saved as <out>/lrqat_export.json (GGUF: <out>.lrqat_export.json). Before
writing, the model is checked against what transformers, vLLM and llama.cpp serve (printed; with
--target, refused if that runtime cannot serve it). Exit status: 0 done, 2 refused or bad input
(nothing written), 1 verification failed. See docs/export.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

FORMATS = ("compressed-tensors", "native", "dequantized", "gguf")
TARGETS = ("transformers", "vllm", "llama.cpp")
# Held-out probe for the fp16-scale drift and the llama.cpp comparison (written for this purpose; in no corpus).
PROBE_TEXT = ("On the morning of the third day the ferry finally left the harbour. The passengers, most of them "
              "farmers returning from the autumn market, watched the grey cliffs shrink behind them while the "
              "captain argued with the engineer about the price of coal, the weather, and whether the old boat "
              "would survive another winter on the northern route.")


def _size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    for u, mult in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(u):
            return int(float(t[: -len(u)]) * mult)
    return int(t)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from lrqat_dist.dtypes import DTYPE_NAMES  # the one dtype table

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT_DIR",
                   help="a run's output_dir (newest complete checkpoint) or a checkpoints/step_N directory")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty, unless --overwrite); "
                                                "for gguf the output file")
    p.add_argument("--target", choices=TARGETS, default=None,
                   help="refuse the export unless this runtime serves it (default: print what serves where)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step of a run directory (default: newest)")
    p.add_argument("--trainable", default=None,
                   help="consolidated trainable tensors (tools/consolidate.py output) instead of the checkpoint's")
    p.add_argument("--dtype", default="float32", choices=DTYPE_NAMES,
                   help="dtype of the dense tensors and (compressed-tensors) scales (default: %(default)s)")
    p.add_argument("--round-scales", action="store_true",
                   help="round the trained scales to --dtype first (changes the model by < 1/2 ulp per scale, "
                        "reported) so that a half-precision compressed-tensors export is exact")
    p.add_argument("--allow-rounding", action="store_true",
                   help="accept that casting dense tensors to --dtype rounds them (counted in the report)")
    p.add_argument("--verify-load", action="store_true",
                   help="also load the whole export the way its consumer does (transformers / load_native) and "
                        "compare every weight (needs memory for the full model)")
    p.add_argument("--drop-activation-quant", action="store_true",
                   help="export even if the format cannot express the run's activation quantization (the loss "
                        "is logged and recorded in lrqat_activations.json; see docs/activation-quant.md)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    p.add_argument("--accept-changed-base-model", action="store_true",
                   help="export even if the frozen state rebuilt from the base model (Phi0, s0, zero-points, frozen "
                        "weights) differs from the fingerprint in the checkpoint's meta.json (default: refuse)")
    g = p.add_argument_group("gguf")
    g.add_argument("--gguf-embeddings", default="f16", choices=("f32", "f16", "q8_0"),
                   help="type of token_embd / output (default: %(default)s)")
    g.add_argument("--gguf-asym", default="compact", choices=("compact", "exact"),
                   help="asymmetric 4/5-bit grids: Q4_1/Q5_1 (compact, m rounded to fp16) or Q5_0/Q8_0 (exact)")
    g.add_argument("--gguf-pre", default=None,
                   help="tokenizer.ggml.pre (default: detected from tokenizer.json: gpt-2, smollm, else default)")
    p.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default: %(default)s)")
    args = p.parse_args(argv)
    if args.format == "gguf" and (args.dtype != "float32" or args.round_scales or args.allow_rounding):
        p.error("--format gguf: scales are fp16 by the format (rounded and reported automatically) and the "
                "embeddings' type is --gguf-embeddings; --dtype / --round-scales / --allow-rounding do not apply")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from lrqat_dist.export import ExportRefused, ExportVerificationError, export_model, round_scales_
    from lrqat_dist.export.run import load_run
    from lrqat_dist.export.serving import format_verdicts, require_target, serving_verdicts

    logging.basicConfig(format="%(message)s", stream=sys.stderr)  # warnings from everyone, as without handlers
    logging.getLogger("lrqat_dist").setLevel(logging.INFO)  # and the library's progress lines

    t0 = time.time()
    try:
        run = load_run(args.source, step=args.step, trainable_file=args.trainable,
                       accept_changed_base_model=args.accept_changed_base_model)
        print(f"[export] {run.describe()}", file=sys.stderr)
        notes = []
        print("[export] what serves where:\n" + format_verdicts(serving_verdicts(run.model, args.drop_activation_quant)), file=sys.stderr)
        if args.target:
            verdict = require_target(run.model, args.target, args.format, args.drop_activation_quant)
            if args.target == "vllm" and args.dtype == "float32":
                raise ExportRefused("--target vllm: vLLM computes in fp16/bf16 and would round fp32 scales (or "
                                    "dense weights) when it loads them, so the served model would not be the "
                                    "verified one; export with --dtype float16|bfloat16 --round-scales (and "
                                    "--allow-rounding for dense tensors)")
            notes.append(f"--target {args.target}: served via {verdict.how}")
        if args.format == "gguf":
            return _export_gguf(args, run, notes, t0)
        if args.round_scales:
            notes.append(round_scales_(run.model, args.dtype))
            print(f"[export] {notes[-1]}", file=sys.stderr)
        report = export_model(run.model, args.out, args.format, run.tokenizer, dtype=args.dtype,
                              allow_rounding=args.allow_rounding, verify_load=args.verify_load,
                              overwrite=args.overwrite, max_shard_bytes=_size(args.max_shard_size),
                              drop_activation_quant=args.drop_activation_quant)
    except ExportRefused as e:
        print(f"refused: {e}", file=sys.stderr)
        return 2
    except ExportVerificationError as e:
        print(f"verification failed (nothing written): {e}", file=sys.stderr)
        return 1
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report.notes = notes + report.notes
    record = {**report.to_dict(), "source": str(run.checkpoint), "step": run.meta["step"],
              "engine": run.meta["engine"], "trainable_from": run.source, "quant": run.config.to_dict()["quant"],
              "total_seconds": round(time.time() - t0, 3)}
    (Path(args.out) / "lrqat_export.json").write_text(json.dumps(record, indent=2) + "\n")
    print(report.summary())
    if args.format == "compressed-tensors":
        if args.dtype in ("float16", "bfloat16"):
            print(f"serve with vLLM: vllm serve {args.out} --dtype {args.dtype}")
        else:
            print("vLLM computes in fp16/bf16 and would round these fp32 scales: for vLLM, export with "
                  "--dtype float16|bfloat16 --round-scales --allow-rounding --target vllm")
    return 0


def _export_gguf(args, run, notes: list[str], t0: float) -> int:
    from lrqat_dist.export import ExportRefused, ExportVerificationError, export_gguf
    from lrqat_dist.export.gguf_runtime import check_gguf_runtimes

    probe = run.tokenizer(PROBE_TEXT, return_tensors="pt").input_ids
    try:
        report = export_gguf(run.model, args.out, run.tokenizer, embeddings=args.gguf_embeddings, asym=args.gguf_asym,
                             probe_ids=probe, overwrite=args.overwrite,
                             drop_activation_quant=args.drop_activation_quant,
                             tokenizer_pre=args.gguf_pre)
        if args.verify_load:
            checks, stats = check_gguf_runtimes(args.out, run.model, run.tokenizer, probe)
            report.checks += checks
            report.stats.update(stats)
    except ExportRefused as e:
        print(f"refused: {e}", file=sys.stderr)
        return 2
    except ExportVerificationError as e:
        Path(args.out).unlink(missing_ok=True)
        print(f"verification failed (file removed): {e}", file=sys.stderr)
        return 1
    report.notes = notes + report.notes
    record = {**report.to_dict(), "source": str(run.checkpoint), "step": run.meta["step"],
              "engine": run.meta["engine"], "trainable_from": run.source, "quant": run.config.to_dict()["quant"],
              "total_seconds": round(time.time() - t0, 3)}
    Path(f"{args.out}.lrqat_export.json").write_text(json.dumps(record, indent=2) + "\n")
    print(report.summary())
    print(f"run with llama.cpp: llama-cli -m {args.out} -p 'Hello'   |   Ollama: see docs/export.md (ollama create)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
