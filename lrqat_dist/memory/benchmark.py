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
    # the multi-process case (tests/test_memory_plan_dist.py, bench_memory.py --dist): 4 layers, so that
    # dist.shard_frozen's 2 gathered layers are not the whole model
    "test-4l": dict(model={"hidden": 512, "intermediate": 2048, "layers": 4, "heads": 8, "kv_heads": 2,
                           "vocab": 512, "name": "test-4l"}, batch=2, seq=256, dtype="fp32",
                    methods=["lrqat-fixed", "lrqat-fixed+ckpt"]),
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


# ----------------------------------------------------------------------------------------------
# multi-process: one torchrun launch, every rank measures its own peak against the per-rank plan
# ----------------------------------------------------------------------------------------------
DIST_ENGINES = ("fsdp2",)  # DeepSpeed: its warm-up would need a step (see worker_dist_train); not yet


def local_tensor_bytes(model) -> dict[str, int]:
    """This rank's bytes of the model's tensors: parameters as held locally (an FSDP2 DTensor's shard),
    buffers by their current storage (a buffer whose storage is released at rest, as ``dist.shard_frozen``
    does between gathers, counts 0); distinct storages once."""
    seen: set[int] = set()
    out = {"params": 0, "buffers": 0}
    for kind, tensors in (("params", model.parameters()), ("buffers", model.buffers())):
        for t in tensors:
            t = getattr(t, "_local_tensor", t)  # DTensor -> its local shard
            st = t.untyped_storage()
            if st.nbytes() and st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                out[kind] += st.nbytes()
    return out


def _frozen_shard_bytes(model) -> dict[str, int]:
    """``dist.shard_frozen``'s own count (resident shards at rest, peak with gathered layers, full size)
    when the tree has the mechanism and the model was sharded; zeros otherwise (a replicated model's frozen
    buffers are module buffers, in :func:`local_tensor_bytes`)."""
    try:
        from ..engines.frozen_shard import frozen_memory, frozen_shards
    except ImportError:  # the tree predates issue 16's mechanism
        return {"resident": 0, "peak": 0, "full": 0}
    if frozen_shards(model) is None:
        return {"resident": 0, "peak": 0, "full": 0}
    return frozen_memory(model)


def _reset_frozen_peak(model) -> None:
    try:
        from ..engines.frozen_shard import reset_frozen_peak
    except ImportError:
        return
    reset_frozen_peak(model)


def dist_job(spec: dict) -> dict:
    """The training job (``lrqat_dist.train`` config sections) one rank of a multi-process case runs."""
    m = parse_method(spec["method"])
    if m["method"] == LORA:
        raise ValueError("method: the multi-process case measures the library's methods, not the LoRA reference")
    torch_dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[spec["dtype"]]
    return {
        "model": {"config": shape_of(spec["model"]).hf_config(), "init_seed": 0, "tokenizer": "unused"},
        "quant": {"method": m["method"], "bits": spec.get("bits", 4), "rank": spec.get("rank", 32),
                  "downcast": m["downcast"], "range_init": "minmax", "backward": m["backward"]},
        "data": {"seq_len": spec["seq"]},
        "train": {"output_dir": str(Path(spec["out"]) / "run"), "micro_batch_size": spec["batch"], "grad_accum": 1,
                  "activation_checkpointing": m["ckpt"], "dtype": torch_dtype, "device": "cpu", "save_every": 0,
                  "grad_clip": 1.0},
        "dist": {"engine": spec["engine"], "backend": "gloo", "shard_frozen": spec.get("shard_frozen", False)},
        "log": {"tensorboard": False, "progress_bar": False},
    }


def worker_dist_train(spec: dict) -> dict:
    """One rank of a multi-process case (started by torchrun): the trainer's own model builder and engine
    (``lrqat_dist.train``: ``Builders().model``, which shards the frozen tensors when the tree implements
    ``dist.shard_frozen``), one warm-up forward/backward without a step, then ``mem_steps`` measured optimizer
    steps as in :func:`worker_train`. Writes ``out/rank_<r>.json``."""
    from . import measure as M

    M.exact_malloc()
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401  (its import is not the model's memory)

    from ..engines import EngineConfig, get_engine
    from ..methods.hooks import group_windows
    from ..train.build import enable_activation_checkpointing
    from ..train.config import config_from_dict
    from ..train.loop import Builders

    if spec["engine"] not in DIST_ENGINES:
        raise ValueError(f"engine: the multi-process memory case runs {', '.join(DIST_ENGINES)}, not {spec['engine']!r}")
    cfg = config_from_dict(dist_job(spec))
    engine_cls = get_engine(cfg.dist.engine)
    ecfg = EngineConfig(cfg.train, cfg.dist, lr_windows=group_windows(cfg.quant))
    env = engine_cls.setup(ecfg)
    torch.manual_seed(0)
    rss0 = M.reset_peak()  # after imports and the process group: what the model and the steps add
    model = Builders().model(cfg, env.device)
    if cfg.train.activation_checkpointing:
        enable_activation_checkpointing(model)
    engine = engine_cls(model, ecfg, env)
    engine.train()
    g = torch.Generator().manual_seed(env.rank)
    ids = torch.randint(0, model.config.vocab_size, (spec["batch"], spec["seq"]), generator=g)
    engine.forward_backward(ids, True)  # warm-up (kernel caches, gloo buffers); gradients dropped
    engine.optimizer.zero_grad(set_to_none=True)
    local = local_tensor_bytes(model)
    frozen = _frozen_shard_bytes(model)  # the shards of dist.shard_frozen (not module buffers), at rest
    _reset_frozen_peak(model)
    env.barrier()
    with M.measure() as region:
        for _ in range(spec["mem_steps"]):
            engine.forward_backward(ids, True)
            engine.step()
    env.barrier()
    res = {"rank": env.rank, "world_size": env.world_size, "static_params": local["params"],
           "static_buffers": local["buffers"], "static_frozen_shards": frozen["resident"],
           "frozen_peak": _frozen_shard_bytes(model)["peak"], "frozen_full": frozen["full"],
           "model_rss": region.baseline - rss0, "delta": region.delta}
    Path(spec["out"]).mkdir(parents=True, exist_ok=True)
    (Path(spec["out"]) / f"rank_{env.rank}.json").write_text(json.dumps(res))
    engine.close()
    return res


WORKERS = {"train": worker_train, "load": worker_load, "temporaries": worker_temporaries,
           "dist_train": worker_dist_train}


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


def predict_dist(spec: dict) -> Plan:
    """The planner's per-rank prediction for a multi-process spec."""
    m = parse_method(spec["method"])
    cfg = PlanConfig(method=m["method"], downcast=m["downcast"], rank=spec.get("rank", 32), bits=spec.get("bits", 4),
                     seq_len=spec["seq"], micro_batch=spec["batch"], dtype=spec["dtype"],
                     activation_checkpointing=m["ckpt"], backward=m["backward"], engine=spec["engine"],
                     world_size=spec["world"], shard_frozen=spec.get("shard_frozen", False))
    return plan(shape_of(spec["model"]), cfg)


def bench_dist(spec: dict, threads: int = 1, timeout: float = 600) -> list[dict]:
    """One torchrun launch of ``spec["world"]`` gloo processes (:func:`worker_dist_train`); one row per rank:
    its measured peak next to the planner's per-rank peak. ``spec``: ``model``, ``method`` (as in
    :data:`CASES`), ``batch``, ``seq``, ``dtype``, ``engine``, ``world``, ``shard_frozen``, ``mem_steps``,
    ``out`` (a directory). A ``shard_frozen`` spec on a tree whose trainer does not shard (tensors at rest
    as large as the replicated ones) is refused, not measured.

    Measured per rank, as in :func:`bench_case`: the tensors it holds at rest (parameters' local shards,
    buffers, ``dist.shard_frozen``'s shards; exact) + the peak RSS increase over the steps; ``peak_rss``
    is the RSS-only figure (it also holds the process's non-tensor growth since the process group
    started, ~25 MiB here). ``frozen_peak``: the mechanism's own peak of frozen bytes (shards + gathered
    layers), to check :data:`~lrqat_dist.memory.planner.FROZEN_GATHERED_LAYERS`."""
    import lrqat_dist

    spec = dict(spec)
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rank_*.json"):
        old.unlink()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    root = str(Path(lrqat_dist.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(spec["world"]),
           "-m", __name__, "dist_train", json.dumps(spec)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    files = sorted(out.glob("rank_*.json"))
    if proc.returncode != 0 or len(files) != spec["world"]:
        raise RuntimeError(f"multi-process memory case {spec} failed (exit {proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    p = predict_dist(spec)
    pred_static = p.frozen + p.trainable
    pred_dyn = p.peak - pred_static
    rows = []
    for f in files:
        r = json.loads(f.read_text())
        static = r["static_params"] + r["static_buffers"] + r["static_frozen_shards"]
        measured = static + r["delta"]
        r.update(method=spec["method"], engine=spec["engine"], shard_frozen=bool(spec.get("shard_frozen")),
                 batch=spec["batch"], seq=spec["seq"], dtype=spec["dtype"], peak_measured=measured,
                 peak_rss=r["model_rss"] + r["delta"], static_walk=static, static_pred=pred_static,
                 dynamic_pred=pred_dyn, peak_pred=p.peak, peak_moment=p.peak_moment,
                 err_total=p.peak / measured - 1, err_dynamic=pred_dyn / r["delta"] - 1)
        rows.append(r)
    if spec.get("shard_frozen"):
        replicated = predict_dist({**spec, "shard_frozen": False})
        for r in rows:
            # sharded, a rank's frozen buffers at rest are ~1/world of the replicated ones; the replicated
            # tree keeps them whole
            if r["static_walk"] > 0.5 * (replicated.frozen + replicated.trainable + pred_static):
                raise RuntimeError(f"rank {r['rank']}: {r['static_walk']} tensor bytes at rest, as if replicated "
                                   f"({replicated.frozen + replicated.trainable:.0f} predicted replicated, "
                                   f"{pred_static:.0f} sharded): this tree's trainer does not shard "
                                   "(dist.shard_frozen, issue 16)")
    for r in rows:
        logger.info(f"rank {r['rank']}/{spec['world']} {spec['engine']} shard_frozen={r['shard_frozen']} "
                    f"{spec['method']}: peak {r['peak_measured'] / 2**20:.1f} MiB (pred {r['peak_pred'] / 2**20:.1f}, "
                    f"{r['err_total']:+.1%}; dynamic {r['delta'] / 2**20:.1f} vs {pred_dyn / 2**20:.1f}, "
                    f"{r['err_dynamic']:+.1%}; tensors at rest {r['static_walk'] / 2**20:.1f} vs {pred_static / 2**20:.1f})")
    return rows


def _worker_main(argv: list[str]) -> int:
    kind, spec = argv
    print("RESULT " + json.dumps(WORKERS[kind](json.loads(spec))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
