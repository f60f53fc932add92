#!/usr/bin/env python
"""Evaluate a training run, a native or compressed-tensors export, or a plain HF model directory.

    python tools/eval.py exports/7b-ct --ppl wikitext2 --wikitext-path data/wikitext-2-raw-v1   # GPTQ protocol
    python tools/eval.py exports/7b.gguf --ppl wikitext2 --wikitext-path wiki.test.raw --runtime llama.cpp
    python tools/eval.py exports/tiny-ct --ppl-files notes.txt --seq-len 2048
    python tools/eval.py runs/tiny-cpu --ppl-files a.txt b.txt --seq-len 512 --out results/tiny.json
    python tools/eval.py exports/7b-ct --tasks paper --batch-size 16            # the paper's six 0-shot tasks
    python tools/eval.py exports/7b-ct --tasks my_task --include-path tasks/    # a local lm-eval task dir

Perplexity: --ppl wikitext2 reads a local copy of the WikiText-2 raw test split (HF parquet, jsonl or
wiki.test.raw) and follows GPTQ / LR-QAT exactly: the HF rows joined with "\\n\\n", tokenized once,
numel // 2048 non-overlapping blocks, ppl = exp(mean per-block NLL). --ppl-files joins raw text
files ("\\n\\n") the same way. lm-eval runs 0-shot
by default and offline (HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1 unless --online): built-in tasks
need their datasets in the local HF cache. Prints a table; --out writes the JSON. See docs/eval.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from lrqat_dist.dtypes import DTYPE_NAMES  # the one dtype table

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("model", metavar="MODEL_DIR",
                   help="run output_dir / checkpoint dir, native export, compressed-tensors export or HF model dir")
    g = p.add_argument_group("model")
    g.add_argument("--step", type=int, default=None, help="checkpoint step of a run (default: newest)")
    g.add_argument("--trainable", default=None, help="consolidated trainable tensors for a run (tools/consolidate.py)")
    g.add_argument("--accept-changed-base-model", action="store_true",
                   help="a run: evaluate even if its frozen state rebuilt from the base model differs from the "
                        "checkpoint's fingerprint (default: refuse)")
    g.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    g.add_argument("--dtype", default="float32", choices=DTYPE_NAMES,
                   help="compute dtype (default: %(default)s; bf16 is very slow on most CPUs)")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default: %(default)s)")
    g = p.add_argument_group("perplexity")
    g.add_argument("--ppl", choices=("wikitext2",), default=None,
                   help="a standard perplexity set, read from --wikitext-path (no hub access)")
    g.add_argument("--wikitext-path", default=None, metavar="PATH",
                   help="local WikiText-2 raw test split: HF parquet, jsonl with 'text', wiki.test.raw, or a directory")
    g.add_argument("--runtime", choices=("torch", "llama.cpp"), default="torch",
                   help="perplexity of a .gguf MODEL through llama.cpp (llama-cpp-python) instead of the "
                        "dequantized model in torch (default: %(default)s)")
    g.add_argument("--ppl-files", nargs="+", default=[], metavar="FILE", help="raw text files (UTF-8)")
    g.add_argument("--seq-len", type=int, default=2048, help="block length in tokens (default: %(default)s)")
    g.add_argument("--ppl-batch-size", type=int, default=1, help="blocks per forward (default: %(default)s)")
    g.add_argument("--max-blocks", type=int, default=None, help="evaluate only the first N blocks")
    g.add_argument("--no-special-tokens", action="store_true",
                   help="tokenize without the tokenizer's special tokens (no BOS at the start of the text)")
    g = p.add_argument_group("lm-eval")
    g.add_argument("--tasks", default=None,
                   help="comma-separated task names; 'paper' = boolq,piqa,winogrande,hellaswag,arc_easy,arc_challenge")
    g.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="a local lm-eval task directory (YAML + data); repeatable")
    g.add_argument("--batch-size", type=int, default=1, help="lm-eval batch size (default: %(default)s)")
    g.add_argument("--num-fewshot", type=int, default=0, help="default: %(default)s (the paper's 0-shot)")
    g.add_argument("--limit", type=float, default=None, help="examples per task (testing only; <1 = fraction)")
    g.add_argument("--online", action="store_true", help="allow the HF hub (default: offline)")
    p.add_argument("--out", default=None, help="write the results JSON here")
    args = p.parse_args(argv)
    if not args.ppl_files and not args.tasks and not args.ppl:
        p.error("nothing to evaluate: give --ppl wikitext2, --ppl-files and/or --tasks")
    if args.ppl and args.ppl_files:
        p.error("give either --ppl or --ppl-files")
    if args.ppl == "wikitext2" and not args.wikitext_path:
        p.error("--ppl wikitext2 needs --wikitext-path (a local copy of the test split; there is no hub access)")
    if args.runtime == "llama.cpp" and (not str(args.model).endswith(".gguf") or args.tasks):
        p.error("--runtime llama.cpp evaluates the perplexity of a .gguf file (no --tasks)")
    return args


def format_table(results: dict) -> str:
    lines = [f"model: {results['model']['description']}"]
    ppl = results.get("perplexity")
    if ppl:
        label = ppl.get("dataset") or " + ".join(Path(f).name for f in ppl["files"])
        lines += ["", f"{'perplexity':<40} {'ppl':>10} {'tokens':>10} {'blocks':>7} {'seq_len':>8}",
                  f"{label[:40]:<40} {ppl['ppl']:>10.4f} "
                  f"{ppl['predicted_tokens']:>10} {ppl['blocks']:>7} {ppl['seq_len']:>8}"]
    lm = results.get("lm_eval")
    if lm:
        lines += ["", f"{'task':<24} {'metric':<10} {'value':>8} {'stderr':>8} {'n':>6}"]
        for r in lm["table"]:
            stderr = "" if r["stderr"] is None else f"{r['stderr']:.4f}"
            lines.append(f"{r['task']:<24} {r['metric']:<10} {r['value']:>8.4f} {stderr:>8} {r['n'] or '':>6}")
        if lm.get("paper_average") is not None:
            lines.append(f"{'paper 0-shot average':<35} {lm['paper_average']:>8.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.online:  # before datasets / huggingface_hub are imported: they read these once
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            os.environ[var] = "1"
    import torch

    from lrqat_dist.eval import (load_for_eval, paper_average, perplexity_from_ids, read_text_files, run_lm_eval,
                                 summarize, tokenize_text)

    # the library's progress records (lrqat_dist.* loggers) on stderr; other libraries stay at WARNING
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("lrqat_dist").setLevel(logging.INFO)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.time()
    try:
        if args.runtime == "llama.cpp":  # no torch model: llama.cpp runs the file; the tokenizer is the file's
            from transformers import AutoTokenizer

            from lrqat_dist.eval import EvalModel

            gg = Path(args.model)
            tok = AutoTokenizer.from_pretrained(args.tokenizer or str(gg.parent), local_files_only=True,
                                                **({} if args.tokenizer else {"gguf_file": gg.name}))
            m = EvalModel(None, tok, "gguf", f"GGUF export {gg} in llama.cpp")
        else:
            m = load_for_eval(args.model, dtype=getattr(torch, args.dtype), device=args.device, step=args.step,
                              trainable_file=args.trainable, tokenizer=args.tokenizer,
                              accept_changed_base_model=args.accept_changed_base_model)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log(f"[eval] {m.description} ({m.kind}, {args.dtype}, {args.device})")
    results = {"model": {"path": str(args.model), "kind": m.kind, "description": m.description,
                         "dtype": args.dtype, "device": args.device}}
    if args.ppl_files or args.ppl:
        extra = {"files": [str(f) for f in args.ppl_files]}
        if args.ppl == "wikitext2":
            from lrqat_dist.eval.wikitext import wikitext2_text

            try:
                text, rows = wikitext2_text(args.wikitext_path)
            except (FileNotFoundError, ValueError) as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            extra = {"files": [str(args.wikitext_path)], "dataset": f"wikitext2 ({rows} rows)", "rows": rows,
                     "protocol": "GPTQ/LR-QAT: rows joined with \\n\\n, tokenized once, numel // seq_len blocks"}
            if args.seq_len != 2048:
                extra["deviation"] = f"seq_len {args.seq_len} instead of the protocol's 2048"
        else:
            text = read_text_files(args.ppl_files)
        ids = tokenize_text(m.tokenizer, text, add_special_tokens=not args.no_special_tokens)
        if args.runtime == "llama.cpp":
            from lrqat_dist.eval.perplexity import perplexity_of
            from lrqat_dist.export.gguf_runtime import LlamaCpp

            with LlamaCpp(args.model, n_ctx=args.seq_len) as lc:
                r = perplexity_of(lc.batch_logits, ids, seq_len=args.seq_len, max_blocks=args.max_blocks)
            extra["runtime"] = "llama.cpp (llama-cpp-python)"
        else:
            r = perplexity_from_ids(m.model, ids, seq_len=args.seq_len, batch_size=args.ppl_batch_size,
                                    max_blocks=args.max_blocks)
        results["perplexity"] = {**extra, "special_tokens": not args.no_special_tokens, **r.to_dict()}
    if args.tasks:
        limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
        try:
            out = run_lm_eval(m.model, m.tokenizer, [t.strip() for t in args.tasks.split(",") if t.strip()],
                              include_path=args.include_path or None, batch_size=args.batch_size,
                              num_fewshot=args.num_fewshot, limit=limit)
        except (ValueError, RuntimeError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        results["lm_eval"] = {"table": summarize(out), "paper_average": paper_average(out),
                              "results": out.get("results"), "n-samples": out.get("n-samples"),
                              "versions": out.get("versions"), "num_fewshot": args.num_fewshot, "limit": limit}
    results["seconds"] = round(time.time() - t0, 3)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2, default=str) + "\n")
        log(f"[eval] results written to {args.out}")
    print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
