#!/usr/bin/env python
"""Will it fit? Predict the per-device peak memory of a training step (see docs/will-it-fit.md).

    python tools/memory_plan.py --model llama2-7b --micro-batch 2                  # LR-QAT Q4.4, bf16, seq 1024
    python tools/memory_plan.py --model llama2-13b --phi fixed,int-packed --ckpt off,on --budget-gb 24
    python tools/memory_plan.py --model /models/Llama-2-7b-hf --method full_qat,peqa,lrqat
    python tools/memory_plan.py --recipe configs/llama2-70b-w4pc-zero3.yaml --model llama2-70b --budget-gb 80

``--model`` is a preset (llama2-7b, llama2-13b, llama2-70b, llama3-8b, mistral-7b, smollm2-135m), a
config.json or an HF model directory. ``--recipe`` takes method, storage, batch, dtype and engine from a
training YAML (command-line flags override it). Comma-separated values of --method, --phi, --ckpt and
--micro-batch print one summary row per combination; a single combination prints its breakdown.
With ``--budget-gb`` the largest micro-batch that fits is printed (after ``--reserve-gb`` for the CUDA
context and allocator slack). Sizes are GiB (2^30 bytes), as in the LR-QAT paper's table.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import replace
from pathlib import Path

from lrqat_dist.memory.planner import (METHODS, GiB, PRESETS, ModelShape, PlanConfig, max_micro_batch,
                                       plan)
from lrqat_dist.methods.config import BACKWARDS


def load_shape(spec: str) -> ModelShape:
    """A preset name, a config.json or an HF model directory."""
    if spec.lower() in PRESETS:
        return ModelShape.preset(spec)
    if not Path(spec).expanduser().exists():
        raise SystemExit(f"--model: {spec!r} is neither a preset ({', '.join(PRESETS)}) nor an existing "
                         "config.json / model directory")
    return ModelShape.from_hf_config(spec)


def recipe_defaults(path: str) -> tuple[dict, str | None, dict | None]:
    """PlanConfig fields from a training YAML, and its model (path or config dict)."""
    import yaml

    raw = yaml.safe_load(Path(path).read_text()) or {}
    q, t, d, data, m = (raw.get(k) or {} for k in ("quant", "train", "dist", "data", "model"))
    dtype = t.get("dtype", "auto")
    fields = {
        "method": q.get("method", "lrqat"), "downcast": q.get("downcast", "fixed"), "rank": q.get("rank", 32),
        "bits": q.get("bits", 4), "group_size": q.get("group_size"), "symmetric": q.get("symmetric", True),
        "train_scale": q.get("train_scale", True), "backward": q.get("backward", "fast"), "seq_len": data.get("seq_len", 1024),
        "micro_batch": t.get("micro_batch_size", 1),
        "dtype": {"auto": "bf16", "bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(dtype, dtype),
        "engine": d.get("engine", "none"), "zero_stage": d.get("zero_stage", 2),
        "activation_checkpointing": t.get("activation_checkpointing", False),
        "offload_optimizer": d.get("offload_optimizer", False),
    }
    kd = (t.get("distill") or {})
    if kd.get("teacher"):
        fields["distill"] = "phi0" if kd["teacher"] == "phi0" else "external"
        fields["distill_chunk"] = kd.get("chunk_tokens", 1024)
    return fields, m.get("path"), m.get("config")


def parse_list(value: str | None, cast=str) -> list | None:
    return None if value is None else [cast(v.strip()) for v in str(value).split(",") if v.strip()]


def on_off(v: str) -> bool:
    if v.lower() in ("on", "true", "1", "yes"):
        return True
    if v.lower() in ("off", "false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected on/off, got {v!r}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", default=None, help="preset name, config.json or HF model directory")
    ap.add_argument("--recipe", default=None, help="training YAML to take the settings from")
    ap.add_argument("--method", default=None, help=f"{', '.join(METHODS)} (comma list)")
    ap.add_argument("--phi", "--downcast", dest="phi", default=None,
                    help="Phi0 storage: fixed (Q4.4), bf16, fp16, fp32, int, int-packed (comma list)")
    ap.add_argument("--rank", type=int, default=None)
    ap.add_argument("--bits", type=int, default=None)
    ap.add_argument("--group-size", type=int, default=None, help="0 = per channel")
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--backward", default=None, choices=list(BACKWARDS),
                    help="quant.backward: fast (default) or the plain autograd path (more rebuild temporaries)")
    ap.add_argument("--micro-batch", default=None, help="sequences per device per micro-step (comma list)")
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="compute dtype of the frozen model")
    ap.add_argument("--engine", default=None, choices=["none", "deepspeed", "fsdp2"])
    ap.add_argument("--zero-stage", type=int, default=None)
    ap.add_argument("--world-size", type=int, default=None)
    ap.add_argument("--ckpt", default=None, help="decoder-layer activation checkpointing: on/off (comma list)")
    ap.add_argument("--offload-optimizer", type=on_off, default=None)
    ap.add_argument("--reduce-bucket", type=float, default=None, help="DeepSpeed reduce_bucket_size (elements)")
    ap.add_argument("--distill", default=None, choices=["phi0", "external"],
                    help="train.distill teacher: phi0 (the model's own W0) or external (a separate HF model)")
    ap.add_argument("--budget-gb", type=float, default=None, help="device memory (GiB) to fit")
    ap.add_argument("--reserve-gb", type=float, default=1.0, help="kept free for CUDA context / fragmentation")
    ap.add_argument("--json", action="store_true", help="print the plans as JSON")
    args = ap.parse_args(argv)

    fields: dict = {}
    model_spec = args.model
    if args.recipe:
        fields, rpath, rconfig = recipe_defaults(args.recipe)
        if model_spec is None:
            if rconfig:
                shape = ModelShape.from_hf_config(rconfig, name=Path(args.recipe).stem)
            elif rpath and Path(rpath).expanduser().exists():
                model_spec = rpath
            else:
                ap.error(f"{args.recipe}: its model.path {rpath!r} is not here; name the shape with --model")
    if model_spec is not None:
        shape = load_shape(model_spec)
    elif not args.recipe:
        ap.error("give --model (a preset, config.json or model directory) or --recipe")

    for key, value in (("rank", args.rank), ("bits", args.bits), ("seq_len", args.seq_len), ("dtype", args.dtype),
                       ("engine", args.engine), ("zero_stage", args.zero_stage), ("world_size", args.world_size),
                       ("offload_optimizer", args.offload_optimizer), ("backward", args.backward),
                       ("distill", args.distill)):
        if value is not None:
            fields[key] = value
    if args.group_size is not None:
        fields["group_size"] = args.group_size or None
    if args.reduce_bucket is not None:
        fields["reduce_bucket"] = int(args.reduce_bucket)
    if fields.get("engine", "none") != "none" and "world_size" not in fields:
        fields["world_size"] = 8
    if fields.get("engine", "none") == "none":
        fields["world_size"] = 1
    methods = parse_list(args.method) or [fields.pop("method", "lrqat")]
    fields.pop("method", None)
    phis = parse_list(args.phi) or [fields.pop("downcast", "fixed")]
    fields.pop("downcast", None)
    ckpts = [on_off(v) for v in parse_list(args.ckpt)] if args.ckpt else [fields.pop("activation_checkpointing", False)]
    fields.pop("activation_checkpointing", None)
    batches = parse_list(args.micro_batch, int) or [fields.pop("micro_batch", 1)]
    fields.pop("micro_batch", None)

    combos = []
    for method, phi, ck, mb in itertools.product(methods, phis, ckpts, batches):
        if method != "lrqat" and phi != phis[0]:
            continue  # phi only matters to LR-QAT
        try:
            cfg = PlanConfig(method=method, downcast=phi, activation_checkpointing=ck, micro_batch=mb, **fields)
        except (ValueError, TypeError) as e:
            ap.error(str(e))
        combos.append((cfg, plan(shape, cfg)))
    budget = None if args.budget_gb is None else args.budget_gb * GiB
    reserve = args.reserve_gb * GiB

    if args.json:
        out = []
        for cfg, p in combos:
            d = p.as_dict()
            if budget is not None:
                d["max_micro_batch"] = max_micro_batch(shape, cfg, budget, reserve)
            out.append(d)
        print(json.dumps(out, indent=1))
        return 0
    if len(combos) == 1:
        cfg, p = combos[0]
        print(p.table())
        if p.host_optimizer:
            print(f"  (host memory for the offloaded optimizer: {p.host_optimizer / GiB:.2f} GiB per rank)")
        if budget is not None:
            fits = p.peak + reserve <= budget
            print(f"budget {args.budget_gb:g} GiB (reserve {args.reserve_gb:g}): micro-batch {cfg.micro_batch} "
                  f"{'fits' if fits else 'does NOT fit'}; largest that fits: {max_micro_batch(shape, cfg, budget, reserve)}")
            other = replace(cfg, activation_checkpointing=not cfg.activation_checkpointing)
            print(f"  with activation checkpointing {'on' if other.activation_checkpointing else 'off'}: "
                  f"largest micro-batch {max_micro_batch(shape, other, budget, reserve)}")
        return 0
    head = f"{shape.name}, seq {combos[0][0].seq_len}, {combos[0][0].dtype}, engine {combos[0][0].engine}"
    print(head)
    cols = "| method | phi | ckpt | micro-batch | frozen | trainable+grad+opt | activations | loss | temporaries | peak GiB | at |"
    if budget is not None:
        cols += f" max micro-batch in {args.budget_gb:g} GiB |"
    print(cols)
    print("|" + "---|" * (cols.count("|") - 1))
    for cfg, p in combos:
        row = (f"| {cfg.method} | {cfg.downcast if cfg.method == 'lrqat' else '-'} | {'on' if cfg.activation_checkpointing else 'off'} "
               f"| {cfg.micro_batch} | {p.frozen / GiB:.2f} | {(p.trainable + p.gradients + p.optimizer + p.engine_buffers) / GiB:.2f} "
               f"| {p.activations / GiB:.2f} | {p.loss / GiB:.2f} | {p.temporaries / GiB:.2f} | {p.peak / GiB:.2f} | {p.peak_moment} |")
        if budget is not None:
            row += f" {max_micro_batch(shape, cfg, budget, reserve)} |"
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
