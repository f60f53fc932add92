#!/usr/bin/env python
"""Measure peak memory and step time of training steps on this machine's CPU, next to the planner.

Each (model, method) runs in a fresh subprocess: build the model, one warm-up forward/backward at
the measured shape (shape-keyed kernel caches, thread pools; no optimizer step), then trim the heap
and reset the kernel's peak-RSS counter; run ``--mem-steps`` optimizer steps with glibc serving
every allocation >= 64 KiB by its own mmap (so RSS = live memory; ``lrqat_dist.memory.measure``)
and read the high-water mark; then switch glibc back to
reusing freed memory and time ``--time-steps`` steps (after one untimed step). Reported:

    measured  = static tensor bytes of the built model (exact) + peak RSS increase over the steps
    predicted = lrqat_dist.memory.plan(...).peak;  the "dynamic" error compares only what the
                steps add (optimizer state, gradients, activations, loss, temporaries)

Step time: wall seconds and process CPU seconds per step (the box is shared: CPU seconds are less
sensitive to other jobs); compare methods as ratios within one invocation.

    python tools/bench_memory.py --case smollm2            # SmolLM2-135M real, 4 x 256 fp32, all methods
    python tools/bench_memory.py --case llama7b-2l         # LLaMA-2-7B layer shapes, 2 layers, random init
    python tools/bench_memory.py --case load               # host peak of building SmolLM2: eager vs lean
    python tools/bench_memory.py --temporaries             # weight-rebuild temporaries of one 11008x4096 layer
    python tools/bench_memory.py --case smollm2 --methods lora,lrqat-fixed --json out.json
    python tools/bench_memory.py --case test --dist 2,4 --shard-frozen on   # per-rank peak, torchrun + gloo

``--dist WORLD`` (comma list) runs the case's methods as one torchrun launch of WORLD gloo processes
with FSDP2 (``dist.shard_frozen`` from ``--shard-frozen``): every rank measures its own peak (tensors
at rest + peak RSS increase over the steps) against the planner's per-rank plan
(``lrqat_dist.memory.benchmark.bench_dist``); no step timing.

The measuring (workers, one fresh process per method; the model built by the library's one builder)
is ``lrqat_dist.memory.benchmark``; this file is its command line and table.

Methods: ``lora`` (reference: rank-32 adapters beside the frozen weight, ``lrqat_dist.methods.lora_reference``),
``lrqat-<downcast>`` (fixed, bf16, fp16, fp32, int, int-packed), ``peqa``, ``full_qat``; suffix
``+ckpt`` for decoder-layer activation checkpointing, ``+compile`` (LR-QAT) for the library's
torch.compile-fused rebuild (``quant.compile_rebuild``), ``+autograd`` for the plain reference backward. Token ids are random (cost does not depend on them).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from lrqat_dist.memory.benchmark import CASES, add_prediction, bench_case, bench_dist, run_worker


def _f(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def markdown(rows: list[dict], reference: str = "lora") -> str:
    refs = [r for r in rows if r["method"] == reference]
    ref = refs[0] if refs else None
    fq = next((r for r in rows if r["method"] == "full_qat"), None)
    lines = ["| model | method | tokens | static MiB (meas / pred) | peak MiB measured | peak MiB planner | err | "
             "dynamic err | step s (wall) | step CPU-s | time vs LoRA (CPU-s) | peak vs LoRA | peak vs full QAT |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    seen_ref = False
    for r in rows:
        label = r["method"]
        if r["method"] == reference:
            label += " (again)" if seen_ref else ""
            seen_ref = True
        ratio_t = f"{r['cpu_s'] / ref['cpu_s']:.2f}x" if ref and r["cpu_s"] and ref["cpu_s"] else "-"
        ratio_m = f"{r['peak_measured'] / ref['peak_measured']:.2f}x" if ref else "-"
        ratio_f = f"{r['peak_measured'] / fq['peak_measured']:.2f}x" if fq else "-"
        lines.append(f"| {r['case']} | {label} | {r['batch']}x{r['seq']} {r['dtype']} | "
                     f"{r['static_measured'] / 2**20:.0f} / {r['static_pred'] / 2**20:.0f} | "
                     f"{r['peak_measured'] / 2**20:.0f} | {r['peak_pred'] / 2**20:.0f} | {r['err_total']:+.1%} | "
                     f"{r['err_dynamic']:+.1%} | {_f(r['wall_s'])} | {_f(r['cpu_s'])} | {ratio_t} | {ratio_m} | {ratio_f} |")
    return "\n".join(lines)


def markdown_dist(rows: list[dict]) -> str:
    lines = ["| model | method | world | shard_frozen | rank | tensors at rest MiB (meas / pred) | peak MiB measured | "
             "peak MiB planner | err | dynamic err | peak RSS MiB | frozen peak / at rest MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        frozen = (f"{r['frozen_peak'] / 2**20:.1f} / {r['static_frozen_shards'] / 2**20:.1f}"
                  if r["frozen_full"] else "-")
        lines.append(f"| {r['case']} | {r['method']} | {r['world_size']} | {'on' if r['shard_frozen'] else 'off'} | "
                     f"{r['rank']} | {r['static_walk'] / 2**20:.1f} / {r['static_pred'] / 2**20:.1f} | "
                     f"{r['peak_measured'] / 2**20:.1f} | {r['peak_pred'] / 2**20:.1f} | {r['err_total']:+.1%} | "
                     f"{r['err_dynamic']:+.1%} | {r['peak_rss'] / 2**20:.1f} | {frozen} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", choices=sorted(CASES) + ["load"], default=None)
    ap.add_argument("--methods", default=None, help="comma-separated subset/override of the case's methods")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--mem-steps", type=int, default=2)
    ap.add_argument("--time-steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the workers (default: torch's)")
    ap.add_argument("--temporaries", action="store_true", help="calibrate the weight-rebuild temporaries")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--dist", default=None, metavar="WORLD",
                    help="multi-process: torchrun this many gloo ranks (comma list), FSDP2, per-rank peaks")
    ap.add_argument("--shard-frozen", default="off", choices=["on", "off"], help="dist.shard_frozen with --dist")
    ap.add_argument("--replan", default=None, metavar="JSON",
                    help="re-predict the rows of an earlier --json output with the current planner (no measuring)")
    args = ap.parse_args(argv)
    # one line per measured method (lrqat_dist.memory.benchmark's logger) on stdout, before the table
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout)
    logging.getLogger("lrqat_dist").setLevel(logging.INFO)

    if args.replan:
        data = json.loads(Path(args.replan).read_text())
        rows = [add_prediction(r) for r in data["rows"]]
        print(markdown(rows))
        for r in rows:
            print(f"{r['case']:22s} {r['method']:20s} predicted peak at {r['peak_moment']}")
        return 0
    out: dict = {"machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg()}}
    if args.temporaries:
        res = run_worker("temporaries", {"out": 11008, "in": 4096}, args.threads)
        out["temporaries"] = res
        print("weight-rebuild temporaries of one 11008 x 4096 layer, in units of 4*out*in bytes (fp32 compute):")
        for k, v in res.items():
            print(f"  {k:18s} forward {v['forward']:.2f}  backward {v['backward']:.2f}")
    if args.case == "load":
        rows = []
        for path, dtype in [("eager", "fp32"), ("eager", "bf16"), ("lean", "fp32"), ("lean", "bf16")]:
            res = run_worker("load", {"path": path, "dtype": dtype}, args.threads)
            res.update(path=path, dtype=dtype)
            rows.append(res)
            print(f"SmolLM2-135M prepare (lrqat Q4.4) via {path:6s} {dtype}: host peak +{res['peak_delta'] / 2**20:.0f} MiB, "
                  f"prepared model {res['final_bytes'] / 2**20:.0f} MiB, held after {res['end_delta'] / 2**20:.0f} MiB, "
                  f"{res['build_s']:.1f} s", flush=True)
        out["load"] = rows
    elif args.case and args.dist:
        import tempfile

        case = CASES[args.case]
        rows = []
        for world in (int(w) for w in args.dist.split(",")):
            for method in (args.methods.split(",") if args.methods else case["methods"]):
                with tempfile.TemporaryDirectory(prefix="bench_memory_dist_") as tmp:
                    spec = dict(model=case["model"], method=method, batch=args.batch or case["batch"],
                                seq=args.seq or case["seq"], dtype=case["dtype"], rank=case.get("rank", 32),
                                engine="fsdp2", world=world, shard_frozen=args.shard_frozen == "on",
                                mem_steps=args.mem_steps, out=tmp)
                    for r in bench_dist(spec, threads=args.threads or 1):
                        r["case"] = args.case
                        rows.append(r)
        print(markdown_dist(rows))
        out["dist_rows"] = rows
    elif args.case:
        case = dict(CASES[args.case])
        if args.methods:
            case["methods"] = args.methods.split(",")
        if args.batch:
            case["batch"] = args.batch
        if args.seq:
            case["seq"] = args.seq
        rows = bench_case(case, args.mem_steps, args.time_steps, args.threads)
        out["rows"] = rows
        out["machine"]["load_avg_end"] = os.getloadavg()
        print(markdown(rows))
        print(f"load average start {out['machine']['load_avg']}, end {out['machine']['load_avg_end']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
