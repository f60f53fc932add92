"""Measured training steps next to the planner: peak memory and step time of each method on this CPU.

Each (model, method) runs in a fresh subprocess (``python -m lrqat_dist.memory.benchmark KIND SPEC``):
build the model (:func:`build`, the library's one builder), one warm-up forward/backward at the
measured shape (shape-keyed kernel caches, thread pools; no optimizer step), then trim the heap and
reset the kernel's peak-RSS counter; run ``mem_steps`` optimizer steps with glibc serving every
allocation >= 64 KiB by its own mmap (so RSS = live memory; :mod:`lrqat_dist.memory.measure`) and
read the high-water mark; then switch glibc back to reusing freed memory and time ``time_steps``
steps (after one untimed step). A row holds

    measured  = static tensor bytes of the built model (exact) + peak RSS increase over the steps
    predicted = lrqat_dist.memory.plan(...).peak;  the "dynamic" error compares only what the
                steps add (optimizer state, gradients, activations, loss, temporaries)

and the step time in wall and process-CPU seconds (compare methods as ratios within one run).
``tools/bench_memory.py`` is the command line and the table; ``tests/test_memory_plan.py`` runs one case.

Method names: ``lora`` (the plain-LoRA reference, :mod:`lrqat_dist.methods.lora_reference`),
``lrqat-<downcast>`` (fixed, bf16, fp16, fp32, int, int-packed), ``peqa``, ``full_qat``, ``rtn``; suffix
``+ckpt`` for decoder-layer activation checkpointing, ``+compile`` (LR-QAT only) for the library's
torch.compile-fused weight rebuild (``QATConfig.compile_rebuild``), ``+autograd`` for the plain reference
backward (``QATConfig.backward: autograd``), ``+kd`` for distillation from the model's own Phi0
(``train.distill.teacher: phi0``, weight 1, T 1: a no-grad teacher forward, then the chunked KD loss). Token ids are random (cost does not depend on them).
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..dtypes import DTYPES
from ..methods.lora_reference import NAME as LORA
from .planner import ModelShape, Plan, PlanConfig, plan

logger = logging.getLogger(__name__)


CASES: dict[str, dict[str, Any]] = {
    "smollm2": dict(model="smollm2", batch=4, seq=256, dtype="fp32",
                    methods=["lora", "lrqat-fixed", "lrqat-bf16", "lrqat-int-packed", "peqa", "full_qat",
                             "lrqat-fixed+compile", "lrqat-fixed+ckpt", "lrqat-fixed+kd", "lora+ckpt", "lora"]),
    "llama7b-2l": dict(model={"preset": "llama2-7b", "layers": 2}, batch=1, seq=256, dtype="fp32",
                       methods=["lora", "lrqat-fixed", "lrqat-int-packed", "peqa", "full_qat", "lrqat-fixed+ckpt"]),
    "tinyllama-2l": dict(model={"hidden": 2048, "intermediate": 5632, "layers": 2, "heads": 32, "kv_heads": 4,
                                "vocab": 32000, "name": "tinyllama-shape-2l"}, batch=2, seq=256, dtype="fp32",
                         methods=["lora", "lrqat-fixed", "peqa", "full_qat"]),
    # the test suite's case: a vocabulary small enough that the loss is not the peak (seconds per method)
    "test": dict(model={"hidden": 512, "intermediate": 2048, "layers": 2, "heads": 8, "kv_heads": 2,
                        "vocab": 512, "name": "test-2l"}, batch=2, seq=256, dtype="fp32",
                 methods=["lrqat-fixed", "lrqat-fixed+autograd"]),
    "small": dict(model={"hidden": 512, "intermediate": 1376, "layers": 2, "heads": 8, "kv_heads": 2,
                         "vocab": 8192, "name": "small-2l"}, batch=4, seq=256, dtype="fp32",
                  methods=["lrqat-fixed", "full_qat"]),
}


# ----------------------------------------------------------------------------------------------
# model construction (worker side)
# ----------------------------------------------------------------------------------------------
def smollm2_dir() -> Path:
    """The prepared SmolLM2-135M (tools/prepare_model.py), in the one cache (``$LRQAT_CACHE``)."""
    from ..prep.gguf_model import model_dir

    return model_dir("smollm2-135m")


def shape_of(model_spec: str | dict) -> ModelShape:
    """``"smollm2"`` (the prepared SmolLM2-135M), ``{"preset": name, ...overrides}`` or ModelShape fields."""
    if model_spec == "smollm2":
        return ModelShape.from_hf_config(smollm2_dir(), name="smollm2-135m")
    spec = dict(model_spec)
    if "preset" in spec:
        base = ModelShape.preset(spec.pop("preset"))
        name = f"{base.name}-{spec['layers']}l" if "layers" in spec else base.name
        return replace(base, name=name, **spec)
    return ModelShape(**spec)


def parse_method(name: str) -> dict:
    """``lrqat-fixed+ckpt`` -> ``{"name", "method", "downcast", "ckpt", "compile", "backward", "kd"}``
    (``+autograd``: the plain reference backward, ``QATConfig.backward: autograd``; ``+kd``: distillation
    from the model's own Phi0)."""
    base, *flags = name.split("+")
    unknown = set(flags) - {"ckpt", "compile", "autograd", "kd"}
    if unknown:
        raise ValueError(f"method {name!r}: unknown suffix {sorted(unknown)} (known: +ckpt, +compile, +autograd, +kd)")
    out = {"name": name, "ckpt": "ckpt" in flags, "compile": "compile" in flags,
           "backward": "autograd" if "autograd" in flags else "fast", "kd": "kd" in flags}
    if base.startswith("lrqat-"):
        out.update(method="lrqat", downcast=base[len("lrqat-"):])
    elif base in (LORA, "peqa", "full_qat", "rtn"):
        out.update(method=base, downcast="fixed")
    else:
        raise ValueError(f"method: unknown {name!r}")
    return out


def build(spec: dict):
    """The model a spec measures (``model``, ``method``, ``dtype``, optional ``rank`` / ``bits``), through
    :func:`lrqat_dist.model.build_prepared_model`: whole base model loaded, then prepared under seed 0
    (lean loading gives the same tensors; the measured steps start from the heap the eager build leaves)."""
    from ..methods import QATConfig
    from ..methods.lora_reference import apply_lora
    from ..model import build_prepared_model

    dtype = DTYPES[spec["dtype"]]
    m = parse_method(spec["method"])
    rank = spec.get("rank", 32)
    source = {"path": smollm2_dir()} if spec["model"] == "smollm2" else {"config": shape_of(spec["model"]).hf_config()}
    if m["method"] == LORA:
        return build_prepared_model(QATConfig(), **source, dtype=dtype, lean=False,
                                    prepare_fn=lambda model: apply_lora(model, rank))
    quant = QATConfig(method=m["method"], downcast=m["downcast"], rank=rank, bits=spec.get("bits", 4),
                      range_init="minmax", backward=m["backward"], compile_rebuild=m["compile"])
    return build_prepared_model(quant, **source, dtype=dtype, lean=False)


def tensor_bytes(model) -> int:
    """Bytes of the distinct storages of the model's parameters and buffers (tied weights once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


# ----------------------------------------------------------------------------------------------
# workers (each in a fresh process)
# ----------------------------------------------------------------------------------------------
def worker_train(spec: dict) -> dict:
    """Build, warm up, then measure ``mem_steps`` and time ``time_steps`` optimizer steps of one method."""
    from . import measure as M

    M.exact_malloc()
    import torch

    from ..engines import EngineConfig, TrainConfig
    from ..engines.env import DistEnv
    from ..engines.single import SingleEngine
    from ..methods import QATConfig
    from ..methods.hooks import group_windows
    from ..train.build import enable_activation_checkpointing

    torch.manual_seed(0)
    rss0 = M.reset_peak()
    t0 = time.perf_counter()
    model = build(spec)
    build_s = time.perf_counter() - t0
    static = tensor_bytes(model)
    m = parse_method(spec["method"])
    if m["ckpt"]:
        enable_activation_checkpointing(model)
    train = TrainConfig(output_dir="/tmp/bench_memory_unused", max_steps=1000, grad_clip=1.0)
    quant = getattr(model, "qat_config", None) or QATConfig()  # the LoRA reference has none: plain schedule
    engine = SingleEngine(model, EngineConfig(train, lr_windows=group_windows(quant)),
                          DistEnv(0, 1, 0, torch.device("cpu")))
    if m["kd"]:
        from ..objective import DistillConfig, build_objective

        engine.objective = build_objective(DistillConfig("phi0"), model, m["method"], DTYPES[spec["dtype"]],
                                           torch.device("cpu"))
    engine.train()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (spec["batch"], spec["seq"]), generator=g)
    # Warm-up at the measured shape, without an optimizer step: the one-time, shape-keyed kernel
    # caches and thread pools (~20 MB here) land in the baseline; gradients are dropped again.
    engine.forward_backward(ids, True)
    engine.optimizer.zero_grad(set_to_none=True)
    with M.measure() as region:
        for _ in range(spec["mem_steps"]):
            engine.forward_backward(ids, True)
            engine.step()
    model_rss = region.baseline - rss0
    M.fast_malloc()
    walls, cpus = [], []
    for k in range(spec["time_steps"] + 1):
        w0, c0 = time.perf_counter(), time.process_time()
        loss = engine.forward_backward(ids, True)
        engine.step()
        if k:  # the first one is untimed (allocator warm-up after the switch)
            walls.append(time.perf_counter() - w0)
            cpus.append(time.process_time() - c0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"static_bytes": static, "model_rss": model_rss, "delta": region.delta, "build_s": build_s,
            "wall_s": walls, "cpu_s": cpus, "trainable": trainable, "loss": float(loss),
            "threads": torch.get_num_threads()}


def worker_load(spec: dict) -> dict:
    """Host peak while building a prepared SmolLM2 (``path``: ``eager`` = whole model loaded, then
    prepared; ``lean`` = one weight at a time, what the trainer does), or a lean random init of a shape."""
    from . import measure as M

    M.exact_malloc()
    import torch  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401  (its import is not the build's memory)

    from ..methods import QATConfig
    from ..model import build_prepared_model

    quant = QATConfig(method="lrqat", downcast=spec.get("downcast", "fixed"), range_init="minmax")
    dtype = DTYPES[spec["dtype"]]
    with M.measure() as region:
        t0 = time.perf_counter()
        if spec["path"] in ("eager", "lean"):
            model = build_prepared_model(quant, path=smollm2_dir(), dtype=dtype, lean=spec["path"] == "lean")
        else:  # lean random init of a named shape
            model = build_prepared_model(quant, config=shape_of(spec["model"]).hf_config(), dtype=dtype, lean=True)
        secs = time.perf_counter() - t0
    final = tensor_bytes(model)
    return {"peak_delta": region.delta, "final_bytes": final, "end_delta": region.end - region.baseline, "build_s": secs}


def worker_temporaries(spec: dict) -> dict:
    """Forward / backward temporaries of one ``out x in`` layer per method, in units of ``4*out*in`` bytes."""
    from . import measure as M

    M.exact_malloc()
    import torch
    from torch import nn

    from ..methods import METHODS, QATConfig

    o, i = spec["out"], spec["in"]
    rows = {}
    for method, dc in [("lrqat", "fixed"), ("lrqat", "fp32"), ("lrqat", "int-packed"), ("peqa", "fixed"),
                       ("full_qat", "fixed")]:
        lin = nn.Linear(i, o, bias=False)
        layer = METHODS[method].from_linear(lin, QATConfig(method=method, downcast=dc, range_init="minmax"), "x")
        del lin
        x = torch.randn(4, i, requires_grad=True)
        with M.measure() as fwd:
            y = layer(x)
        with M.measure() as bwd:
            y.sum().backward()
        unit = 4 * o * i
        grads = sum(p.numel() * 4 for p in layer.parameters() if p.requires_grad)
        rows[f"{method}-{dc}"] = {"forward": fwd.delta / unit, "backward": (bwd.delta - grads) / unit}
        del layer, x, y
    return rows


WORKERS = {"train": worker_train, "load": worker_load, "temporaries": worker_temporaries}


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------
def run_worker(kind: str, spec: dict, threads: int | None = None) -> dict:
    """Run one worker in a fresh process that imports this same ``lrqat_dist``; its result dict."""
    import lrqat_dist

    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    root = str(Path(lrqat_dist.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    cmd = [sys.executable, "-m", __name__, kind, json.dumps(spec)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"worker {spec} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")


def predict(shape: ModelShape, spec: dict) -> Plan:
    """The planner's prediction for one measured spec (method name with suffixes, batch, seq, dtype, rank)."""
    m = parse_method(spec["method"])
    cfg = PlanConfig(method=m["method"], downcast=m["downcast"], rank=spec.get("rank", 32), bits=spec.get("bits", 4),
                     seq_len=spec["seq"], micro_batch=spec["batch"], dtype=spec["dtype"],
                     activation_checkpointing=m["ckpt"], backward=m["backward"],
                     distill="phi0" if m["kd"] else None)
    return plan(shape, cfg)


def add_prediction(row: dict) -> dict:
    """(Re)compute the planner's columns of a measured row with the current planner."""
    spec = dict(method=row["method"], batch=row["batch"], seq=row["seq"], dtype=row["dtype"], rank=row.get("rank", 32))
    p = predict(shape_of(row["model"]), spec)
    pred_dyn = p.peak - p.frozen - p.trainable
    row.update(static_pred=p.frozen + p.trainable, dynamic_pred=pred_dyn, peak_pred=p.peak, peak_moment=p.peak_moment,
               err_total=p.peak / row["peak_measured"] - 1, err_dynamic=pred_dyn / row["dynamic_measured"] - 1)
    return row


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def bench_case(case: dict, mem_steps: int, time_steps: int, threads: int | None = None) -> list[dict]:
    """Measure every method of ``case`` (a :data:`CASES` entry), each in a fresh subprocess (measuring
    several methods in one process reads up to 10 MiB high on the later ones: the heap keeps what the
    earlier ones left); one row per method, logged as it completes."""
    shape = shape_of(case["model"])
    rows = []
    base = dict(model=case["model"], batch=case["batch"], seq=case["seq"], dtype=case["dtype"],
                mem_steps=mem_steps, time_steps=time_steps, rank=case.get("rank", 32))
    for name in case["methods"]:
        spec = {**base, "method": name}
        res = run_worker("train", spec, threads)
        row = dict(case=shape.name, model=case["model"], method=name, batch=case["batch"], seq=case["seq"],
                   dtype=case["dtype"], rank=spec["rank"], static_measured=res["static_bytes"],
                   model_rss=res["model_rss"], dynamic_measured=res["delta"],
                   peak_measured=res["static_bytes"] + res["delta"],
                   wall_s=median(res["wall_s"]) if res["wall_s"] else None,
                   cpu_s=median(res["cpu_s"]) if res["cpu_s"] else None, walls=res["wall_s"], cpus=res["cpu_s"],
                   trainable=res["trainable"], loss=res["loss"], build_s=res["build_s"])
        add_prediction(row)
        rows.append(row)
        measured, pred_dyn, p_peak = row["peak_measured"], row["dynamic_pred"], row["peak_pred"]
        logger.info(f"{name:20s} peak {measured / 2**20:8.0f} MiB (pred {p_peak / 2**20:8.0f}, {row['err_total']:+.1%}; "
                    f"dynamic {res['delta'] / 2**20:7.0f} vs {pred_dyn / 2**20:7.0f}, {row['err_dynamic']:+.1%})  "
                    + (f"step {row['wall_s']:.2f} s wall / {row['cpu_s']:.2f} s cpu" if row["wall_s"] else ""))
    return rows


def _worker_main(argv: list[str]) -> int:
    kind, spec = argv
    print("RESULT " + json.dumps(WORKERS[kind](json.loads(spec))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
