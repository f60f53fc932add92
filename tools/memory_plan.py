#!/usr/bin/env python
"""Will it fit? Predict the per-device peak memory of a training step (see docs/will-it-fit.md).

    python tools/memory_plan.py --model llama2-7b --micro-batch 2                  # LR-QAT Q4.4, bf16, seq 1024
    python tools/memory_plan.py --model llama2-13b --phi fixed,int-packed --ckpt off,on --budget-gb 24
    python tools/memory_plan.py --model /models/Llama-2-7b-hf --method full_qat,peqa,lrqat
    python tools/memory_plan.py --recipe configs/llama2-70b-w4pc-zero3.yaml --model llama2-70b --budget-gb 80
    python tools/memory_plan.py --model llama2-70b --world-size 8 --budget-gb 24 --fit --micro-batch 4
    python tools/memory_plan.py --model llama2-13b --world-size 2 --budget-gb 24 --fit --micro-batch 16

``--model`` is a preset (llama2-7b, llama2-13b, llama2-70b, llama3-8b, mistral-7b, smollm2-135m), a
config.json or an HF model directory. ``--recipe`` takes method, storage, batch, dtype and engine from a
training YAML (command-line flags override it). Comma-separated values of --method, --phi, --ckpt and
--micro-batch print one summary row per combination; a single combination prints its breakdown.
With ``--budget-gb`` the largest micro-batch that fits is printed (after ``--reserve-gb`` for the CUDA
context and allocator slack). Sizes are GiB (2^30 bytes), as in the LR-QAT paper's table.

``--fit`` (needs ``--budget-gb``) searches for a recipe that fits ``--world-size`` GPUs: engine (FSDP2,
DeepSpeed ZeRO-3), ``dist.shard_frozen``, Phi0 storage (Q4.4, packed INT4), activation checkpointing and
(DeepSpeed) optimizer offload; a flag that is given pins its dimension. A candidate fits when its largest
micro-batch reaches ``--micro-batch`` (default 1). Of those it recommends, in this order: Q4.4 storage
(packed INT4 loses the fractional bits that make LR-QAT work: docs/RESULTS.md), no optimizer offload,
no checkpointing (a second forward), no frozen sharding (two all-gathers per layer and micro-step,
hidden by prefetch when the link keeps up), FSDP2; then the larger micro-batch. It prints every
candidate, the recommended plan and its ``--set`` overrides for launch/train.py.
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
        "offload_optimizer": d.get("offload_optimizer", False), "shard_frozen": d.get("shard_frozen", False),
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


# --fit: the order in which a fitting candidate is preferred (first = most wanted); see the module docstring
FIT_PREFERENCE = ("Q4.4 storage", "no optimizer offload", "no checkpointing", "no frozen sharding", "FSDP2",
                  "larger micro-batch")


def _fit_key(cfg: PlanConfig, largest: int) -> tuple:
    return (cfg.downcast != "fixed", cfg.offload_optimizer, cfg.activation_checkpointing, cfg.shard_frozen,
            cfg.engine != "fsdp2", -largest)


def _engine_label(cfg: PlanConfig) -> str:
    return "fsdp2" if cfg.engine == "fsdp2" else f"deepspeed ZeRO-{cfg.zero_stage}"


def fit_candidates(shape: ModelShape, fields: dict, args) -> list[tuple[PlanConfig, int]]:
    """Every (engine, shard_frozen, Phi0 storage, checkpointing, offload) the flags leave open, with the
    largest micro-batch of each in the budget; sorted by :data:`FIT_PREFERENCE`."""
    fields = dict(fields)
    budget, reserve = args.budget_gb * GiB, args.reserve_gb * GiB
    for key in ("micro_batch", "engine", "zero_stage", "shard_frozen", "downcast", "activation_checkpointing",
                "offload_optimizer"):
        fields.pop(key, None)
    if args.engine == "fsdp2":
        engines = [("fsdp2", 2)]
    elif args.engine == "deepspeed":
        engines = [("deepspeed", args.zero_stage if args.zero_stage is not None else 3)]
    elif args.engine == "none":
        engines = [("none", 2)]
    else:
        engines = [("fsdp2", 2), ("deepspeed", 3)]
    method = (parse_list(args.method) or [fields.pop("method", "lrqat")])[0]
    fields.pop("method", None)
    phis = parse_list(args.phi) or (["fixed", "int-packed"] if method == "lrqat" else ["fixed"])
    ckpts = [on_off(v) for v in parse_list(args.ckpt)] if args.ckpt else [False, True]
    shards = [on_off(v) for v in parse_list(args.shard_frozen)] if args.shard_frozen else [False, True]
    fields.pop("world_size", None)
    world = 1 if engines == [("none", 2)] else (args.world_size or 8)
    out = []
    for (engine, stage), sh, phi, ck in itertools.product(engines, shards, phis, ckpts):
        offloads = [args.offload_optimizer] if args.offload_optimizer is not None else (
            [False, True] if engine == "deepspeed" and stage >= 1 else [False])
        for off in offloads:
            try:
                cfg = PlanConfig(method=method, engine=engine, zero_stage=stage, world_size=world, shard_frozen=sh,
                                 downcast=phi, activation_checkpointing=ck, offload_optimizer=off, **fields)
            except ValueError:
                continue  # e.g. shard_frozen on an engine that cannot shard
            out.append((cfg, max_micro_batch(shape, cfg, budget, reserve)))
    return sorted(out, key=lambda c: _fit_key(*c))


def recipe_overrides(cfg: PlanConfig) -> list[str]:
    """``--set`` overrides of launch/train.py that select ``cfg``."""
    sets = [f"quant.downcast={cfg.downcast}", f"train.micro_batch_size={cfg.micro_batch}",
            f"train.activation_checkpointing={str(cfg.activation_checkpointing).lower()}", f"dist.engine={cfg.engine}"]
    if cfg.engine == "deepspeed":
        sets += [f"dist.zero_stage={cfg.zero_stage}", f"dist.offload_optimizer={str(cfg.offload_optimizer).lower()}"]
    if cfg.engine != "none":
        sets.append(f"dist.shard_frozen={str(cfg.shard_frozen).lower()}")
    return sets


def fit(ap, args, shape: ModelShape, fields: dict) -> int:
    """``--fit``: the candidates table, the recommended recipe and its breakdown; 1 if nothing fits."""
    want = (parse_list(args.micro_batch, int) or [fields.get("micro_batch", 1)])[0]
    if want < 1:
        ap.error("--micro-batch: --fit needs a micro-batch >= 1")
    cands = fit_candidates(shape, fields, args)
    if not cands:
        ap.error("--fit: no candidate is valid for these flags")
    world = cands[0][0].world_size
    reserve = args.reserve_gb * GiB
    print(f"{shape.name} on {world} x {args.budget_gb:g} GiB (reserve {args.reserve_gb:g} GiB each), "
          f"seq {cands[0][0].seq_len}, {cands[0][0].dtype}, wanted micro-batch >= {want}; planner predictions")
    cols = ("| engine | shard_frozen | phi | ckpt | offload | peak GiB at micro-batch 1 | largest micro-batch "
            f"in {args.budget_gb:g} GiB | fits |")
    print(cols)
    print("|" + "---|" * (cols.count("|") - 1))
    best = None
    for cfg, largest in cands:
        ok = largest >= want
        if ok and best is None:
            best = (cfg, largest)
        peak1 = plan(shape, replace(cfg, micro_batch=1)).peak
        print(f"| {_engine_label(cfg)} | {'on' if cfg.shard_frozen else 'off'} | {cfg.downcast} | "
              f"{'on' if cfg.activation_checkpointing else 'off'} | {'on' if cfg.offload_optimizer else 'off'} | "
              f"{peak1 / GiB:.2f} | {largest} | {'yes' if ok else 'no'}{'  <- recommended' if best and best[0] is cfg else ''} |")
    print("preference among those that fit: " + " > ".join(FIT_PREFERENCE))
    if best is None:
        print(f"nothing fits micro-batch {want} on {world} x {args.budget_gb:g} GiB")
        return 1
    cfg = replace(best[0], micro_batch=want)
    p = plan(shape, cfg)
    print(f"\nrecommended: {_engine_label(cfg)}, shard_frozen {'on' if cfg.shard_frozen else 'off'}, phi {cfg.downcast}, "
          f"checkpointing {'on' if cfg.activation_checkpointing else 'off'}, offload "
          f"{'on' if cfg.offload_optimizer else 'off'}: micro-batch {want} peaks at {p.peak / GiB:.2f} GiB "
          f"(+ {args.reserve_gb:g} reserve of {args.budget_gb:g}); largest micro-batch {best[1]}")
    print(p.table())
    if p.host_optimizer:
        print(f"  (host memory for the offloaded optimizer: {p.host_optimizer / GiB:.2f} GiB per rank)")
    assert p.peak + reserve <= args.budget_gb * GiB
    print(f"\ntorchrun --nproc_per_node {world} launch/train.py --config RECIPE.yaml "
          + " ".join(f"--set {s}" for s in recipe_overrides(cfg)))
    return 0


def build_parser() -> argparse.ArgumentParser:
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
    ap.add_argument("--shard-frozen", default=None,
                    help="dist.shard_frozen: frozen per-layer tensors sharded, gathered per layer (on/off, comma list; "
                         "FSDP2 / ZeRO-3 only)")
    ap.add_argument("--no-prefetch", action="store_true",
                    help="shard_frozen without prefetching the next layer (one gathered layer instead of two)")
    ap.add_argument("--fit", action="store_true",
                    help="search engine, shard_frozen, Phi0 storage, checkpointing, offload for a recipe that fits "
                         "--budget-gb on --world-size GPUs")
    ap.add_argument("--reduce-bucket", type=float, default=None, help="DeepSpeed reduce_bucket_size (elements)")
    ap.add_argument("--distill", default=None, choices=["phi0", "external"],
                    help="train.distill teacher: phi0 (the model's own W0) or external (a separate HF model)")
    ap.add_argument("--budget-gb", type=float, default=None, help="device memory (GiB) to fit")
    ap.add_argument("--reserve-gb", type=float, default=1.0, help="kept free for CUDA context / fragmentation")
    ap.add_argument("--json", action="store_true", help="print the plans as JSON")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
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
    if args.no_prefetch:
        fields["frozen_prefetch"] = False
    if args.fit:
        if args.budget_gb is None:
            ap.error("--fit needs --budget-gb (the memory of one GPU, GiB)")
        return fit(ap, args, shape, fields)
    methods = parse_list(args.method) or [fields.pop("method", "lrqat")]
    fields.pop("method", None)
    phis = parse_list(args.phi) or [fields.pop("downcast", "fixed")]
    fields.pop("downcast", None)
    ckpts = [on_off(v) for v in parse_list(args.ckpt)] if args.ckpt else [fields.pop("activation_checkpointing", False)]
    fields.pop("activation_checkpointing", None)
    batches = parse_list(args.micro_batch, int) or [fields.pop("micro_batch", 1)]
    fields.pop("micro_batch", None)
    shards = [on_off(v) for v in parse_list(args.shard_frozen)] if args.shard_frozen else [fields.pop("shard_frozen", False)]
    fields.pop("shard_frozen", None)

    combos = []
    for method, phi, ck, mb, sh in itertools.product(methods, phis, ckpts, batches, shards):
        if method != "lrqat" and phi != phis[0]:
            continue  # phi only matters to LR-QAT
        try:
            cfg = PlanConfig(method=method, downcast=phi, activation_checkpointing=ck, micro_batch=mb,
                             shard_frozen=sh, **fields)
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
    cols = "| method | phi | ckpt | shard_frozen | micro-batch | frozen | trainable+grad+opt | activations | loss | temporaries | peak GiB | at |"
    if budget is not None:
        cols += f" max micro-batch in {args.budget_gb:g} GiB |"
    print(cols)
    print("|" + "---|" * (cols.count("|") - 1))
    for cfg, p in combos:
        row = (f"| {cfg.method} | {cfg.downcast if cfg.method == 'lrqat' else '-'} | {'on' if cfg.activation_checkpointing else 'off'} "
               f"| {'on' if cfg.shard_frozen else 'off'} | {cfg.micro_batch} | {p.frozen / GiB:.2f} | {(p.trainable + p.gradients + p.optimizer + p.engine_buffers) / GiB:.2f} "
               f"| {p.activations / GiB:.2f} | {p.loss / GiB:.2f} | {p.temporaries / GiB:.2f} | {p.peak / GiB:.2f} | {p.peak_moment} |")
        if budget is not None:
            row += f" {max_micro_batch(shape, cfg, budget, reserve)} |"
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
