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

Methods: ``lora`` (reference: rank-32 adapters beside the frozen weight, implemented here),
``lrqat-<downcast>`` (fixed, bf16, fp16, fp32, int, int-packed), ``peqa``, ``full_qat``; suffix
``+ckpt`` for decoder-layer activation checkpointing, ``+compile`` (experiment, LR-QAT fixed only) for
a torch.compile-fused weight rebuild. Token ids are random (cost does not depend on them).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMOLLM2 = Path("~/.cache/lrqat_dist/models/smollm2-135m").expanduser()

CASES = {
    "smollm2": dict(model="smollm2", batch=4, seq=256, dtype="fp32",
                    methods=["lora", "lrqat-fixed", "lrqat-bf16", "lrqat-int-packed", "peqa", "full_qat",
                             "lrqat-fixed+compile", "lrqat-fixed+ckpt", "lora+ckpt", "lora"]),
    "llama7b-2l": dict(model={"preset": "llama2-7b", "layers": 2}, batch=1, seq=256, dtype="fp32",
                       methods=["lora", "lrqat-fixed", "lrqat-int-packed", "peqa", "full_qat", "lrqat-fixed+ckpt"]),
    "tinyllama-2l": dict(model={"hidden": 2048, "intermediate": 5632, "layers": 2, "heads": 32, "kv_heads": 4,
                                "vocab": 32000, "name": "tinyllama-shape-2l"}, batch=2, seq=256, dtype="fp32",
                         methods=["lora", "lrqat-fixed", "peqa", "full_qat"]),
    # the test suite's case: a vocabulary small enough that the loss is not the peak (seconds per method)
    "test": dict(model={"hidden": 512, "intermediate": 2048, "layers": 2, "heads": 8, "kv_heads": 2,
                        "vocab": 2048, "name": "test-2l"}, batch=2, seq=256, dtype="fp32",
                 methods=["lrqat-fixed"]),
    "small": dict(model={"hidden": 512, "intermediate": 1376, "layers": 2, "heads": 8, "kv_heads": 2,
                         "vocab": 8192, "name": "small-2l"}, batch=4, seq=256, dtype="fp32",
                  methods=["lrqat-fixed", "full_qat"]),
}


# ----------------------------------------------------------------------------------------------
# model construction (worker side)
# ----------------------------------------------------------------------------------------------
def shape_of(model_spec):
    from lrqat_dist.memory import ModelShape

    if model_spec == "smollm2":
        return ModelShape.from_hf_config(SMOLLM2, name="smollm2-135m")
    spec = dict(model_spec)
    if "preset" in spec:
        base = ModelShape.preset(spec.pop("preset"))
        from dataclasses import replace

        name = f"{base.name}-{spec['layers']}l" if "layers" in spec else base.name
        return replace(base, name=name, **spec)
    return ModelShape(**spec)


def parse_method(name: str) -> dict:
    base, *flags = name.split("+")
    unknown = set(flags) - {"ckpt", "compile"}
    if unknown:
        raise ValueError(f"method {name!r}: unknown suffix {sorted(unknown)} (known: +ckpt, +compile)")
    out = {"name": name, "ckpt": "ckpt" in flags, "compile": "compile" in flags}
    if base.startswith("lrqat-"):
        out.update(method="lrqat", downcast=base[len("lrqat-"):])
    elif base in ("lora", "peqa", "full_qat", "rtn"):
        out.update(method=base, downcast="fixed")
    else:
        raise ValueError(f"method: unknown {name!r}")
    return out


def make_lora_class():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class _LoRALinear(nn.Module):
        """y = x W^T + (alpha/r) (x A^T) B^T with W frozen (compute dtype), A, B fp32 masters (B = 0)."""

        def __init__(self, linear: nn.Linear, rank: int, alpha: float = 1.0):
            super().__init__()
            self.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)
            self.lora_A = nn.Parameter(torch.empty(rank, linear.in_features, dtype=torch.float32))
            self.lora_B = nn.Parameter(torch.zeros(linear.out_features, rank, dtype=torch.float32))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.scaling = alpha / rank

        def forward(self, x):
            low = F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
            return F.linear(x, self.weight) + low * self.scaling

    return _LoRALinear


_COMPILED = None


def compile_rebuild(model) -> int:
    """Experiment (not a library feature): replace each LR-QAT layer's ``weight_hat`` by one
    ``torch.compile``-d function of its tensors, so the elementwise chain (decode, + B@A, round,
    clamp, * s) runs fused. Fixed-point Phi0 only; checked bit-equal to the eager weight."""
    import torch

    from lrqat_dist.methods import LRQATLinear
    from lrqat_dist.quant.affine import round_ste
    from lrqat_dist.quant.downcast import FixedPointDowncast

    global _COMPILED
    if _COMPILED is None:
        def rebuild(phi0, lora_a, lora_b, scale, scaling: float, frac: int, shift: int, qmin: int, qmax: int):
            phi = phi0.float() / 2.0**frac + shift
            q = torch.clamp(round_ste(phi + scaling * (lora_b @ lora_a)), qmin, qmax)
            out, inp = q.shape
            return (q.reshape(out, scale.shape[1], -1) * scale.unsqueeze(-1)).reshape(out, inp)

        _COMPILED = torch.compile(rebuild, dynamic=False)
    n = 0
    for layer in model.modules():
        if isinstance(layer, LRQATLinear):
            dc = layer.downcast
            if not isinstance(dc, FixedPointDowncast) or layer.zero_point is not None:
                raise ValueError("+compile: fixed-point, symmetric LR-QAT only")
            eager = layer.weight_hat()

            def fused(layer=layer, dc=dc):
                return _COMPILED(layer.phi0, layer.lora_A, layer.lora_B, layer.scale, layer.scaling,
                                 dc.frac_bits, dc.shift, layer.spec.qmin, layer.spec.qmax)

            layer.weight_hat = fused
            with torch.no_grad():
                if not torch.equal(fused(), eager):
                    raise AssertionError("compiled rebuild differs from the eager weight")
            n += 1
    return n


def build(spec: dict):
    import torch
    from torch import nn

    import lrqat_dist
    from lrqat_dist import QATConfig
    from lrqat_dist.model import load_causal_lm

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    m = parse_method(spec["method"])
    if spec["model"] == "smollm2":
        model = load_causal_lm(path=SMOLLM2, dtype=torch.float32)
    else:
        model = load_causal_lm(config=shape_of(spec["model"]).hf_config(), dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if m["method"] == "lora":
            for p in model.parameters():
                p.requires_grad_(False)
            lora_cls = make_lora_class()
            targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
            for name, mod in [(n, x) for n, x in model.named_modules() if type(x) is nn.Linear]:
                if name.rpartition(".")[2] in targets:
                    parent, _, attr = name.rpartition(".")
                    setattr(model.get_submodule(parent), attr, lora_cls(mod, spec.get("rank", 32)))
        else:
            lrqat_dist.prepare(model, QATConfig(method=m["method"], downcast=m["downcast"], rank=spec.get("rank", 32),
                                                bits=spec.get("bits", 4), range_init="minmax"))
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point():
            p.data = p.data.to(dtype)
    model.config.use_cache = False
    return model


def tensor_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def worker_train(spec: dict) -> dict:
    from lrqat_dist.memory import measure as M

    M.exact_malloc()
    import torch
    from types import SimpleNamespace

    from lrqat_dist.engines.env import DistEnv
    from lrqat_dist.engines.single import SingleEngine
    from lrqat_dist.train.build import enable_activation_checkpointing
    from lrqat_dist.train.config import TrainConfig

    torch.manual_seed(0)
    rss0 = M.reset_peak()
    t0 = time.perf_counter()
    model = build(spec)
    build_s = time.perf_counter() - t0
    static = tensor_bytes(model)
    m = parse_method(spec["method"])
    if m["ckpt"]:
        enable_activation_checkpointing(model)
    if m["compile"]:
        compile_rebuild(model)
    train = TrainConfig(output_dir="/tmp/bench_memory_unused", max_steps=1000, grad_clip=1.0)
    from lrqat_dist import QATConfig

    quant = getattr(model, "qat_config", None) or QATConfig()  # the LoRA reference has none: plain schedule
    engine = SingleEngine(model, SimpleNamespace(train=train, quant=quant), DistEnv(0, 1, 0, torch.device("cpu")))
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
    """Host peak while building a prepared SmolLM2: the eager path (whole model loaded, then prepared)
    vs :func:`lean_build` (what ``build_model`` now does), or a lean random init of a named shape."""
    from lrqat_dist.memory import measure as M

    M.exact_malloc()
    import torch

    import lrqat_dist
    from lrqat_dist import QATConfig
    from lrqat_dist.memory.lean_load import lean_build
    from lrqat_dist.model import load_causal_lm

    import transformers.models.llama.modeling_llama  # noqa: F401  (its import is not the build's memory)

    quant = QATConfig(method="lrqat", downcast=spec.get("downcast", "fixed"), range_init="minmax")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    with M.measure() as region:
        t0 = time.perf_counter()
        if spec["path"] == "eager":
            model = load_causal_lm(path=SMOLLM2, dtype="auto")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                lrqat_dist.prepare(model, quant)
            for p in model.parameters():
                if not p.requires_grad and p.is_floating_point():
                    p.data = p.data.to(dtype)
        elif spec["path"] == "lean":
            model = lean_build(quant, path=SMOLLM2, dtype=dtype)
        else:  # lean random init of a named shape
            model = lean_build(quant, config=shape_of(spec["model"]).hf_config(), dtype=dtype)
        secs = time.perf_counter() - t0
    final = tensor_bytes(model)
    return {"peak_delta": region.delta, "final_bytes": final, "end_delta": region.end - region.baseline, "build_s": secs}


def worker_temporaries(spec: dict) -> dict:
    from lrqat_dist.memory import measure as M

    M.exact_malloc()
    import torch
    from torch import nn

    from lrqat_dist import QATConfig
    from lrqat_dist.methods import METHODS

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
# driver
# ----------------------------------------------------------------------------------------------
def run_worker(kind: str, spec: dict, threads: int | None) -> dict:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, json.dumps(spec)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"worker {spec} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")


def predict(shape, spec: dict):
    from lrqat_dist.memory import PlanConfig, plan

    m = parse_method(spec["method"])
    cfg = PlanConfig(method=m["method"], downcast=m["downcast"], rank=spec.get("rank", 32), bits=spec.get("bits", 4),
                     seq_len=spec["seq"], micro_batch=spec["batch"], dtype=spec["dtype"],
                     activation_checkpointing=m["ckpt"])
    return plan(shape, cfg)


def add_prediction(row: dict) -> dict:
    """(Re)compute the planner's columns of a measured row with the current planner."""
    spec = dict(method=row["method"], batch=row["batch"], seq=row["seq"], dtype=row["dtype"], rank=row.get("rank", 32))
    p = predict(shape_of(row["model"]), spec)
    pred_dyn = p.peak - p.frozen - p.trainable
    row.update(static_pred=p.frozen + p.trainable, dynamic_pred=pred_dyn, peak_pred=p.peak, peak_moment=p.peak_moment,
               err_total=p.peak / row["peak_measured"] - 1, err_dynamic=pred_dyn / row["dynamic_measured"] - 1)
    return row


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def bench_case(case: dict, mem_steps: int, time_steps: int, threads: int | None, log=print) -> list[dict]:
    """Measure every method of ``case``, each in a fresh subprocess (measuring several methods in one
    process reads up to 10 MiB high on the later ones: the heap keeps what the earlier ones left)."""
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
        log(f"{name:20s} peak {measured / 2**20:8.0f} MiB (pred {p_peak / 2**20:8.0f}, {row['err_total']:+.1%}; "
            f"dynamic {res['delta'] / 2**20:7.0f} vs {pred_dyn / 2**20:7.0f}, {row['err_dynamic']:+.1%})  "
            + (f"step {row['wall_s']:.2f} s wall / {row['cpu_s']:.2f} s cpu" if row["wall_s"] else ""), flush=True)
    return rows


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
    ap.add_argument("--replan", default=None, metavar="JSON",
                    help="re-predict the rows of an earlier --json output with the current planner (no measuring)")
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        kind, spec = args.worker[0], json.loads(args.worker[1])
        fn = {"train": worker_train, "load": worker_load, "temporaries": worker_temporaries}[kind]
        print("RESULT " + json.dumps(fn(spec)), flush=True)
        return 0
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
