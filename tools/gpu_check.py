#!/usr/bin/env python
"""One-shot validation on a GPU (issue 14): numerics, fused path, device exactness, engines, memory.

    python tools/gpu_check.py --out gpu_check/           # on one CUDA device (H200: under 8 minutes)
    python tools/gpu_check.py --cpu-smoke --out /tmp/gc  # the same checks, reduced, on CPU (< 1 minute)

No internet needed: every model is random-init at the real shape (LLaMA-2 7B / 13B / 70B layer
shapes), data is synthetic. Needs only torch, transformers (and deepspeed for the ZeRO rows; the
row says so when it is missing). Writes ``report.json`` and ``report.md`` to ``--out``; each check
is independent (an exception is recorded as that check's error, the others still run). Checks, in
order of risk:

1. ``bf16_numerics``: the LR-QAT linear at 7B shapes with bf16 inputs against fp32 (TF32 off):
   relative error of the output and of dA, dB, ds.
2. ``fast_path``: the exact fast backward against the plain autograd path (fp32, relative error),
   step time of LoRA / LR-QAT (fast, autograd) / full QAT as ratios, and ``QATConfig.compile_rebuild``
   (the library's torch.compile path): rebuild and mask bit-equal to eager, gradients through it
   equal, compile warm-up, rebuild and step time compiled vs eager.
3. ``device_exactness``: frozen buffers (``lp`` range init: s0, zero-point, Phi0) and ``fold()``
   codes built on the device against the same built on CPU, bit for bit.
4. ``engines``: single-device, FSDP2, DeepSpeed ZeRO-2/3 (world size 1, NCCL, activation
   checkpointing on): 8 steps uninterrupted, and preempted at step 3 then resumed to 8; the final
   trainable tensors must be bit-identical; dtypes right after the engine's set-up (trainable fp32,
   frozen parameters the training dtype).
5. ``memory``: peak allocated / reserved of full-depth 7B-shaped LR-QAT at seq 1024 with and without
   checkpointing, 13B-shaped with checkpointing, against the planner (target within 10%); 70B
   feasibility of two 70B-shaped layers plus a placeholder for the replicated Phi0 of the others.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

logger = logging.getLogger("gpu_check")

SHAPES_7B = [(4096, 4096), (11008, 4096), (4096, 11008)]


def _rel(a, b) -> float:
    import torch

    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _lrqat_layer(out_f: int, in_f: int, device, rank: int = 32, range_init: str = "lp", spread: float = 1.5,
                 seed: int = 0, downcast: str = "fixed", method: str = "lrqat", backward: str = "fast"):
    """A quantized linear built on ``device`` from a seeded CPU weight; LR-QAT adapters perturbed so
    that ``c B@A`` has ``spread`` grid steps of spread (some codes clip)."""
    import torch
    from torch import nn

    from lrqat_dist import QATConfig
    from lrqat_dist.methods import METHODS

    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) * 0.02)
    lin = lin.to(device)
    layer = METHODS[method].from_linear(lin, QATConfig(method=method, rank=rank, range_init=range_init, lp_grid=20,
                                                       downcast=downcast, backward=backward), "check")
    if method == "lrqat" and spread:
        with torch.no_grad():
            a_norm = layer.lora_A.norm(dim=1).pow(2).mean().sqrt().item()
            b = torch.randn(layer.lora_B.shape, generator=g) * (spread / (layer.scaling * a_norm))
            layer.lora_B.copy_(b.to(device))
    return layer


def _grads(layer, x, grad, backward: str):
    layer.backward = backward
    for p in layer.parameters():
        p.grad = None
    y = layer(x)
    y.backward(grad)
    return y.detach(), {n: p.grad.detach().clone() for n, p in layer.named_parameters() if p.grad is not None}


# --- 1. bf16 numerics ---------------------------------------------------------------------------
def check_bf16_numerics(device, smoke: bool) -> dict:
    import torch

    shapes = [(256, 512)] if smoke else SHAPES_7B
    tokens = 64 if smoke else 2048
    rows = []
    for out_f, in_f in shapes:
        layer = _lrqat_layer(out_f, in_f, device)
        g = torch.Generator(device="cpu").manual_seed(1)
        x = torch.randn(tokens, in_f, generator=g).to(device)
        go = torch.randn(tokens, out_f, generator=g).to(device)
        y32, g32 = _grads(layer, x, go, "fast")
        y16, g16 = _grads(layer, x.bfloat16(), go.bfloat16(), "fast")
        rows.append({"shape": [out_f, in_f], "tokens": tokens, "y_rel": _rel(y16, y32),
                     **{f"d{n}_rel": _rel(g16[n], g32[n]) for n in g32},
                     "grad_dtypes": sorted({str(t.dtype) for t in g16.values()})})
        del layer
    worst = max(max(v for k, v in r.items() if k.endswith("_rel")) for r in rows)
    return {"rows": rows, "worst_rel": worst, "ok": worst < 2e-2 and all(r["grad_dtypes"] == ["torch.float32"]
                                                                         for r in rows)}


# --- 2. fast path: exactness vs autograd, speed, torch.compile ------------------------------------
def _time(fn, device, repeats: int) -> float:
    fn()
    _sync(device)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _compiled_vs_eager(layer, x, go, device, repeats: int) -> dict:
    """``QATConfig.compile_rebuild`` (the library's path, lrqat_dist.methods.compiled_rebuild) on this
    device: the compiled rebuild and mask bit-equal to eager, gradients through it equal (not
    close), compile warm-up and steady-state time of one rebuild."""
    import torch

    from lrqat_dist.methods import compiled_rebuild

    comp = {}
    try:
        t0 = time.perf_counter()
        wc, mc = layer.fused_rebuild(with_mask=True, compiled=True)  # compiles and checks against eager
        _sync(device)
        comp["warmup_s"] = time.perf_counter() - t0
        comp["still_enabled"] = compiled_rebuild.enabled()  # False: it failed or differed (warning logged)
        we, me = layer.fused_rebuild(with_mask=True)
        comp["bit_equal"] = bool(torch.equal(wc, we) and torch.equal(mc, me)) and comp["still_enabled"]
        layer.compile_rebuild = False
        _, ref = _grads(layer, x, go, "fast")
        layer.compile_rebuild = True
        _, got = _grads(layer, x, go, "fast")
        layer.compile_rebuild = False
        comp["grads_equal"] = all(torch.equal(got[n], ref[n]) for n in ref) and compiled_rebuild.enabled()
        comp["compiled_s"] = _time(lambda: layer.fused_rebuild(compiled=True), device, repeats)
        comp["eager_s"] = _time(lambda: layer.fused_rebuild(), device, repeats)
    except Exception as e:  # recorded: the check's row says why
        comp["error"] = f"{type(e).__name__}: {e}"
    return comp


def check_fast_path(device, smoke: bool, with_compile: bool) -> dict:
    import torch
    import torch.nn.functional as F

    shapes = [(256, 512)] if smoke else [(4096, 4096), (11008, 4096)]
    tokens_list = [64] if smoke else [256, 2048]
    repeats = 2 if smoke else 5
    rows = []
    for out_f, in_f in shapes:
        lr = _lrqat_layer(out_f, in_f, device)
        fq = _lrqat_layer(out_f, in_f, device, method="full_qat")
        w0 = torch.randn(out_f, in_f, device=device) * 0.02
        a = torch.nn.Parameter(torch.randn(32, in_f, device=device) * 0.01)
        b = torch.nn.Parameter(torch.zeros(out_f, 32, device=device))
        _, clipped = lr.fused_rebuild(with_mask=True)
        for tokens in tokens_list:
            g = torch.Generator(device="cpu").manual_seed(2)
            x = torch.randn(tokens, in_f, generator=g).to(device).requires_grad_(True)
            go = torch.randn(tokens, out_f, generator=g).to(device)
            _, ref = _grads(lr, x, go, "autograd")
            _, fast = _grads(lr, x, go, "fast")
            errs = {f"d{n}_rel": _rel(fast[n], ref[n]) for n in ref}

            def lora():
                x.grad = a.grad = b.grad = None
                (F.linear(x, w0) + F.linear(F.linear(x, a), b) / 32).backward(go)

            def run(layer, mode):
                def f():
                    layer.backward = mode
                    x.grad = None
                    for p in layer.parameters():
                        p.grad = None
                    layer(x).backward(go)
                return f

            t = {"lora": _time(lora, device, repeats), "lrqat_fast": _time(run(lr, "fast"), device, repeats),
                 "lrqat_autograd": _time(run(lr, "autograd"), device, repeats),
                 "full_qat": _time(run(fq, "fast"), device, repeats)}
            rows.append({"shape": [out_f, in_f], "tokens": tokens, **errs,
                         "clipped_fraction": float(clipped.float().mean()),
                         "seconds": t, "x_lora": {k: v / t["lora"] for k, v in t.items()},
                         "lrqat_over_full_qat": t["lrqat_fast"] / t["full_qat"]})
        # QATConfig.compile_rebuild (Q4.4 Phi0, symmetric, per channel) at the last token count
        if not with_compile:
            comp = {"skipped": "--cpu-smoke without --with-compile (inductor's warm-up is 10-70 s on a loaded 2-core CPU)"}
        else:
            comp = _compiled_vs_eager(lr, x, go, device, repeats)
            if "error" not in comp:
                lr.compile_rebuild = True
                comp["step_compiled_s"] = _time(run(lr, "fast"), device, repeats)
                lr.compile_rebuild = False
                comp["step_compiled_x_lora"] = comp["step_compiled_s"] / t["lora"]
                comp["step_eager_x_lora"] = t["lrqat_fast"] / t["lora"]
        rows[-1]["compile_rebuild"] = comp
        del lr, fq
    worst = max(max(v for k, v in r.items() if k.endswith("_rel")) for r in rows)
    clipped = min(r["clipped_fraction"] for r in rows)
    comps = [r.get("compile_rebuild", {}) for r in rows]
    bits = all(c.get("bit_equal", True) and c.get("grads_equal", True) and "error" not in c for c in comps)
    return {"rows": rows, "worst_grad_rel": worst, "min_clipped_fraction": clipped,
            "ok": worst <= 1e-5 and clipped > 0 and bits}


# --- 3. CPU vs device exactness -------------------------------------------------------------------
def check_device_exactness(device, smoke: bool) -> dict:
    import torch

    out_f, in_f = (128, 256) if smoke else (4096, 4096)
    rows = []
    for downcast, sym, group in [("fixed", True, None), ("int-packed", False, 128), ("bf16", True, 128)]:
        from lrqat_dist import QATConfig
        from lrqat_dist.methods import LRQATLinear
        from torch import nn

        g = torch.Generator().manual_seed(3)
        w = torch.randn(out_f, in_f, generator=g) * 0.02
        built = {}
        for dev in (torch.device("cpu"), device):
            lin = nn.Linear(in_f, out_f, bias=False)
            with torch.no_grad():
                lin.weight.copy_(w)
            cfg = QATConfig(rank=16, downcast=downcast, symmetric=sym, group_size=group, range_init="lp")
            layer = LRQATLinear.from_linear(lin.to(dev), cfg, "x")
            with torch.no_grad():
                layer.lora_B.copy_((torch.randn(out_f, 16, generator=torch.Generator().manual_seed(4)) * 2.0).to(dev))
                layer.lora_A.copy_((torch.randn(16, in_f, generator=torch.Generator().manual_seed(5)) * 0.1).to(dev))
            built[dev.type] = layer
        c, d = built["cpu"], built[device.type]
        same = lambda t1, t2: t1 is None and t2 is None or bool(torch.equal(t1.cpu(), t2.cpu()))  # noqa: E731
        fc, fd = c.fold(), d.fold()
        rows.append({"downcast": downcast, "symmetric": sym, "group_size": group,
                     "s0_equal": same(c.s0, d.s0), "zero_point_equal": same(c.zero_point, d.zero_point),
                     "phi0_equal": same(c.phi0, d.phi0), "fold_codes_equal": same(fc.codes, fd.codes),
                     "fold_codes_mismatch": int((fc.codes != fd.codes.cpu()).sum())})
    ok = all(all(v for k, v in r.items() if k.endswith("_equal")) for r in rows)
    return {"rows": rows, "ok": ok, "note": "on a CPU run both sides are the CPU: this only exercises the code"}


# --- 4. engines -------------------------------------------------------------------------------------
# A tiny LLaMA job trained on seeded random tokens (no tokenizer, no files): the engines are under test,
# not the data. Each engine trains 8 steps uninterrupted, then again preempted at step 3 and resumed;
# the two final checkpoints' trainable tensors must be equal bit for bit.
ENGINE_DIST = {"single": {"engine": "none"}, "fsdp2": {"engine": "fsdp2"},
               "ds2": {"engine": "deepspeed", "zero_stage": 2}, "ds3": {"engine": "deepspeed", "zero_stage": 3}}
_VOCAB = 512


def _engine_job(out: Path, engine: str, device: str, dtype: str, ckpt: bool) -> dict:
    return {
        "model": {"config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                             "vocab_size": _VOCAB, "max_position_embeddings": 128, "tie_word_embeddings": True},
                  "init_seed": 0, "tokenizer": "unused-by-synthetic-data"},
        "quant": {"method": "lrqat", "bits": 4, "rank": 8, "downcast": "fixed", "range_init": "minmax"},
        "data": {"seq_len": 64},
        "train": {"output_dir": str(out), "max_steps": 8, "micro_batch_size": 2, "grad_accum": 1, "lr": 1e-2,
                  "scale_lr": 1e-4, "warmup_ratio": 0.25, "save_every": 0, "keep_last": 2, "log_every": 1,
                  "val_every": 0, "dtype": dtype, "device": device, "activation_checkpointing": ckpt},
        "dist": dict(ENGINE_DIST[engine]),
        "log": {"tensorboard": False, "progress_bar": False},
    }


class _RandomTokens:
    """Resumable loader: micro-batch ``k`` of rank ``r`` is drawn from a generator seeded by (k, r)."""

    def __init__(self, seq_len: int, mbs: int, rank: int):
        self.seq_len, self.mbs, self.rank, self.consumed = seq_len, mbs, rank, 0

    def __iter__(self):
        import torch

        while True:
            g = torch.Generator().manual_seed(1_000_003 * self.consumed + self.rank)
            self.consumed += 1
            yield {"input_ids": torch.randint(0, _VOCAB, (self.mbs, self.seq_len), generator=g)}

    def state_dict(self) -> dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, sd: dict) -> None:
        self.consumed = sd["consumed"]

    def skip_counts(self) -> dict:
        return {}


def _builders():
    import dataclasses

    from lrqat_dist.train import Builders

    return dataclasses.replace(
        Builders(), tokenizer=lambda cfg, cache: None, val_loader=lambda cfg, tok, env: None,
        train_loader=lambda cfg, tok, env: _RandomTokens(cfg.data.seq_len, cfg.train.micro_batch_size, env.rank))


def _setup_dtypes(module, dtype: str) -> dict:
    """Dtypes right after the engine's set-up: trainable tensors must be fp32 (A, B, s: the optimizer
    updates them), frozen floating-point parameters the training dtype."""
    import torch

    want = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    trainable = sorted({str(p.dtype) for p in module.parameters() if p.requires_grad})
    frozen = sorted({str(p.dtype) for p in module.parameters() if not p.requires_grad and p.is_floating_point()})
    buffers = {n.rsplit(".", 1)[-1]: str(b.dtype) for n, b in module.named_buffers() if b is not None}
    return {"trainable": trainable, "frozen_params": frozen, "buffers": buffers,
            "ok": trainable == ["torch.float32"] and frozen == [str(want)]}


def _cpu_rebuild_check(ckpt: Path) -> str:
    """Export's check on a checkpoint this device trained: the frozen state rebuilt on the CPU in fp32
    against the fingerprint the run saved; ``"match"`` or the refusal's message."""
    import torch

    from lrqat_dist.checkpoint import read_meta
    from lrqat_dist.export.run import checkpoint_config, verify_frozen_state
    from lrqat_dist.model.frozen_state import FrozenStateMismatch
    from lrqat_dist.train.build import build_model

    try:
        verify_frozen_state(build_model(checkpoint_config(ckpt), "cpu", torch.float32), ckpt, read_meta(ckpt))
    except FrozenStateMismatch as e:
        return str(e)
    return "match"


def engine_worker(engine: str, out: Path, device: str, dtype: str, ckpt: bool) -> dict:
    """Both runs of one engine in this process (under torchrun for the distributed engines)."""
    import signal

    import torch

    from lrqat_dist.checkpoint import list_checkpoints, read_meta
    from lrqat_dist.checkpoint.reader import read_trainable
    from lrqat_dist.train import read_metrics
    from lrqat_dist.train.config import config_from_dict
    from lrqat_dist.train.loop import Trainer

    def run(sub: str, kill_at: int | None) -> tuple[dict, dict]:
        cfg = config_from_dict(_engine_job(out / sub, engine, device, dtype, ckpt))
        t = time.perf_counter()
        trainer = Trainer(cfg, _builders())
        dtypes = _setup_dtypes(trainer.engine.module, dtype)

        def kill(step):
            if step == kill_at and int(os.environ.get("RANK", "0")) == 0:
                os.kill(os.getpid(), signal.SIGTERM)

        first = trainer.run(resume="none", on_step=kill if kill_at else None)
        steps = [first.step]
        if kill_at:
            steps.append(Trainer(cfg, _builders()).run(resume="auto").step)
        final = list_checkpoints(out / sub)[-1][1]
        state, _ = read_trainable(final, read_meta(final))
        losses = [r["loss"] for r in read_metrics(out / sub) if "loss" in r]
        return {"steps": steps, "final_loss": losses[-1] if losses else None, "dtypes": dtypes,
                "seconds": time.perf_counter() - t}, state

    plain, ref = run("uninterrupted", None)
    resumed, got = run("resumed", 3)
    same = ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    moved = any(not torch.equal(v, torch.zeros_like(v)) for k, v in got.items() if k.endswith("lora_B"))
    cpu_rebuild = _cpu_rebuild_check(list_checkpoints(out / "resumed")[-1][1])
    return {"uninterrupted": plain, "resumed": resumed, "resume_bit_identical": same, "n_trainable": len(got),
            "cpu_rebuild_fingerprint": cpu_rebuild,
            "ok": same and moved and resumed["steps"] == [3, 8] and plain["dtypes"]["ok"] and resumed["dtypes"]["ok"]
            and cpu_rebuild == "match"}


def check_engines(device, smoke: bool, out: Path) -> dict:
    import shutil

    dtype = "float32" if device.type == "cpu" else "bfloat16"
    root = out / "engines"
    shutil.rmtree(root, ignore_errors=True)  # this tool's own output of an earlier run
    rows = {"single": engine_worker("single", root / "single", device.type, dtype, ckpt=False)}
    if smoke:
        return {"rows": rows, "ok": rows["single"]["ok"],
                "note": "CPU smoke: single-device engine only (torchrun start-up of the others costs ~20 s each)"}
    engines = ["fsdp2", "ds2", "ds3"]
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        engines = ["fsdp2"]
        rows["deepspeed"] = {"error": "deepspeed not installed: ZeRO rows not measured"}
    for name in engines:  # world size 1, NCCL, activation checkpointing on (ZeRO-3 with it, as the issue asks)
        res = root / name / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", str(Path(__file__).resolve()),
               "--engine-worker", name, "--out", str(root / name), "--dtype", dtype]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        rows[name] = (json.loads(res.read_text()) if res.is_file()
                      else {"ok": False, "error": f"no result (rc {proc.returncode}): {proc.stderr[-800:]}"})
    ok = all(r.get("ok") for k, r in rows.items() if k != "deepspeed")
    return {"rows": rows, "ok": ok}


# --- 5. memory --------------------------------------------------------------------------------------
def _memory_case(name: str, shape, device, seq: int, ckpt: bool) -> dict:
    import torch

    import lrqat_dist
    from lrqat_dist import QATConfig
    from lrqat_dist.engines.base import next_token_loss
    from lrqat_dist.memory import PlanConfig, plan
    from lrqat_dist.model import load_causal_lm
    from lrqat_dist.train.build import enable_activation_checkpointing

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with torch.device(device):
        model = load_causal_lm(config=shape.hf_config(), dtype=torch.bfloat16)
    lrqat_dist.prepare(model, QATConfig(range_init="minmax"))
    model.config.use_cache = False
    if ckpt:
        enable_activation_checkpointing(model)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    ids = torch.randint(0, shape.vocab, (1, seq), device=device)
    for _ in range(2):
        next_token_loss(model(input_ids=ids).logits, ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync(device)
    p = plan(shape, PlanConfig(method="lrqat", downcast="fixed", seq_len=seq, dtype="bf16",
                               activation_checkpointing=ckpt))
    row = {"case": name, "seq": seq, "ckpt": ckpt, "planned_gib": p.peak / 2**30}
    if device.type == "cuda":
        row["allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        row["reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
        row["err_allocated"] = p.peak / (row["allocated_gib"] * 2**30) - 1
    del model, opt
    return row


def check_memory(device, smoke: bool) -> dict:
    from dataclasses import replace

    import torch

    from lrqat_dist.memory import ModelShape

    rows = []
    if smoke:
        # No device allocator to read on a CPU: the planner against the kernel's peak RSS of two LR-QAT
        # steps in a fresh process (lrqat_dist.memory.benchmark, the test suite's case), same 10% bound.
        from lrqat_dist.memory import benchmark

        case = dict(benchmark.CASES["test"], methods=["lrqat-fixed"])
        for r in benchmark.bench_case(case, mem_steps=2, time_steps=0, threads=1):
            rows.append({"case": r["case"], "seq": r["seq"], "batch": r["batch"], "planned_gib": r["peak_pred"] / 2**30,
                         "measured_rss_gib": r["peak_measured"] / 2**30, "err_measured": r["err_total"]})
        return {"rows": rows, "ok": all(abs(r["err_measured"]) <= 0.10 for r in rows),
                "note": "CPU smoke: planner vs the peak RSS of two CPU steps (no device allocator)"}
    s7, s13 = ModelShape.preset("llama2-7b"), ModelShape.preset("llama2-13b")
    rows.append(_memory_case("llama2-7b", s7, device, 1024, False))
    rows.append(_memory_case("llama2-7b", s7, device, 1024, True))
    rows.append(_memory_case("llama2-13b", s13, device, 1024, True))
    # 70B: two real-shaped layers, plus the int8 Phi0 the other 78 layers would keep replicated
    s70 = ModelShape.preset("llama2-70b")
    per_layer_phi = sum(o * i for _, o, i in s70.linears())
    placeholder = torch.empty(per_layer_phi * (s70.layers - 2), dtype=torch.int8, device=device)
    rows.append(_memory_case("llama2-70b-2l+phi0", replace(s70, layers=2, name="llama2-70b-2l"), device, 1024, True))
    rows[-1]["phi0_placeholder_gib"] = placeholder.numel() / 2**30
    del placeholder
    ok = all(abs(r["err_allocated"]) <= 0.10 for r in rows[:3])
    return {"rows": rows, "ok": ok}


# --- driver ---------------------------------------------------------------------------------------
CHECKS = ["bf16_numerics", "fast_path", "device_exactness", "engines", "memory"]


def markdown(report: dict) -> str:
    lines = [f"# gpu_check report ({'CPU smoke' if report['cpu_smoke'] else report['device']})", "",
             f"device: {report['device']}; torch {report['torch']}; total {report['seconds']:.1f} s", "",
             "| check | ok | seconds | summary |", "|---|---|---|---|"]
    for name in CHECKS:
        r = report["checks"].get(name, {})
        summary = r.get("error") or json.dumps({k: v for k, v in r.items() if k not in ("rows", "ok", "seconds")})
        lines.append(f"| {name} | {r.get('ok')} | {r.get('seconds', 0):.1f} | {summary[:300]} |")
    lines += ["", "Rows per check: report.json."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for report.json and report.md")
    ap.add_argument("--cpu-smoke", action="store_true", help="reduced checks on CPU (under a minute)")
    ap.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated subset of {CHECKS}")
    ap.add_argument("--with-compile", action="store_true", help="with --cpu-smoke: also torch.compile the rebuild")
    ap.add_argument("--engine-worker", choices=list(ENGINE_DIST), help=argparse.SUPPRESS)  # under torchrun
    ap.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: to try a worker by hand (gloo)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    if args.engine_worker:
        out = Path(args.out)
        res = engine_worker(args.engine_worker, out, args.device, args.dtype, ckpt=True)
        if int(os.environ.get("RANK", "0")) == 0:
            (out / "result.json").write_text(json.dumps(res, indent=1))
        return 0

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 references must be fp32
    torch.backends.cudnn.allow_tf32 = False
    if args.cpu_smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda", 0)
    else:
        ap.error("no CUDA device: run with --cpu-smoke for the reduced CPU version")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fns = {"bf16_numerics": lambda: check_bf16_numerics(device, args.cpu_smoke),
           "fast_path": lambda: check_fast_path(device, args.cpu_smoke, args.with_compile or not args.cpu_smoke),
           "device_exactness": lambda: check_device_exactness(device, args.cpu_smoke),
           "engines": lambda: check_engines(device, args.cpu_smoke, out),
           "memory": lambda: check_memory(device, args.cpu_smoke)}
    chosen = args.checks.split(",")
    unknown = [c for c in chosen if c not in fns]
    if unknown:
        ap.error(f"--checks: unknown {unknown}; known: {', '.join(CHECKS)}")
    t_all = time.perf_counter()
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "cpu_smoke": args.cpu_smoke, "torch": torch.__version__, "checks": {}}
    for name in chosen:
        t = time.perf_counter()
        logger.info("gpu_check: %s ...", name)
        try:
            res = fns[name]()
        except Exception as e:  # one failing check must not hide the others
            res = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
        res["seconds"] = time.perf_counter() - t
        report["checks"][name] = res
        logger.info("gpu_check: %s ok=%s (%.1f s)", name, res.get("ok"), res["seconds"])
    report["seconds"] = time.perf_counter() - t_all
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "report.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if all(r.get("ok") for r in report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
