#!/usr/bin/env python
"""Step time of LR-QAT, PEQA and full QAT as ratios to a LoRA reference measured in the same run.

Every case builds all its variants first, then times one training step (forward, backward, AdamW
step) of each variant in turn, ``--repeats`` rounds, rotating the order every round (so load on a
shared machine falls on all variants alike), and reports the median. Default allocator (glibc's
mmap threshold is left alone: lowering it, as the memory benchmark does, makes every large
temporary page-fault). One untimed warm-up step per variant.

    python tools/bench_speed.py                       # the full table (docs/RESULTS.md)
    python tools/bench_speed.py --quick               # tiny shapes, 1 round: checks the tool works
    python tools/bench_speed.py --cases linear-11008x4096-256 --repeats 5
    python tools/bench_speed.py --profile linear-11008x4096-256 lrqat-q4.4   # where the time goes
    python tools/bench_speed.py --clipping ~/.cache/lrqat_dist/models/smollm2-135m  # real clipped fractions

Variants: ``lora`` (frozen fp32 W plus rank-32 adapters, B = 0), ``lrqat-q4.4`` / ``lrqat-int4p`` /
``lrqat-bf16`` (downcast of Phi0), ``peqa``, ``full_qat``; ``-autograd`` = the same method on the
plain reference backward (``QATConfig.backward: autograd``, the pre-issue-14 path);
``lrqat-q4.4-compiled`` (``QATConfig.compile_rebuild``, only when named in ``--variants``: its
compile happens in the untimed warm-up step, reported as ``warmup_s``); ``dlqat`` / ``dlqat-autograd``
(DL-QAT in phase 2, fast or plain backward; single linears, only when named in ``--variants``). W4 per channel,
rank 32; range: Lp-4 on a 20-point grid for single linears, min-max for whole models (the shared
builder of lrqat_dist.memory.benchmark); LR-QAT adapters are then perturbed so that ``c B@A`` has a standard deviation
of ``--code-std`` grid steps (some codes clip, as after training; the clipped fraction is reported).
Whole models are random-init at the real shape (lrqat_dist.memory.benchmark.build), fp32, token ids random.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

logger = logging.getLogger("bench_speed")

VARIANTS = {
    "lora": dict(method="lora"),
    "lrqat-q4.4": dict(method="lrqat", downcast="q4.4"),
    "lrqat-int4p": dict(method="lrqat", downcast="int-packed"),
    "lrqat-bf16": dict(method="lrqat", downcast="bf16"),
    "peqa": dict(method="peqa"),
    "full_qat": dict(method="full_qat"),
    "lrqat-q4.4-autograd": dict(method="lrqat", downcast="q4.4", backward="autograd"),
    "peqa-autograd": dict(method="peqa", backward="autograd"),
    "full_qat-autograd": dict(method="full_qat", backward="autograd"),
    # QATConfig.compile_rebuild; only on request (--variants): its compile warm-up (untimed, reported
    # as warmup_s) is seconds to a minute per shape
    "lrqat-q4.4-compiled": dict(method="lrqat", downcast="q4.4", compile_rebuild=True),
    # DL-QAT in phase 2 (m, A, B trained; s, b frozen), single linears only, on request
    "dlqat": dict(method="dlqat", phase=2),
    "dlqat-autograd": dict(method="dlqat", phase=2, backward="autograd"),
}
ON_REQUEST = {"lrqat-q4.4-compiled", "dlqat", "dlqat-autograd"}
LINEAR_ONLY = {"dlqat", "dlqat-autograd"}  # the whole-model builder (memory benchmark) has no DL-QAT
ALL = [v for v in VARIANTS if v not in ON_REQUEST]
NO_AUTOGRAD_FULL = [v for v in ALL if v != "full_qat-autograd"]

LLAMA7B_2L = {"hidden": 4096, "intermediate": 11008, "layers": 2, "heads": 32, "kv_heads": 32, "vocab": 32000,
              "name": "llama2-7b-2l"}
SMOLLM2 = {"hidden": 576, "intermediate": 1536, "layers": 30, "heads": 9, "kv_heads": 3, "vocab": 49152,
           "tied_embeddings": True, "name": "smollm2-135m"}


def _cases(quick: bool) -> dict[str, dict]:
    if quick:
        return {
            "linear-256x128-64": dict(kind="linear", out=256, inp=128, tokens=64, variants=ALL),
            "model-tiny-2x32": dict(kind="model", model={"hidden": 128, "intermediate": 352, "layers": 2, "heads": 4,
                                                         "kv_heads": 2, "vocab": 512, "name": "tiny"},
                                    batch=2, seq=32, variants=ALL),
        }
    cases = {}
    for out, inp in [(1536, 576), (4096, 4096), (11008, 4096), (4096, 11008)]:
        for tokens in (256, 2048):
            cases[f"linear-{out}x{inp}-{tokens}"] = dict(kind="linear", out=out, inp=inp, tokens=tokens, variants=ALL)
    cases["smollm2-4x256"] = dict(kind="model", model=SMOLLM2, batch=4, seq=256, variants=NO_AUTOGRAD_FULL)
    cases["llama7b-2l-1x256"] = dict(kind="model", model=LLAMA7B_2L, batch=1, seq=256, variants=NO_AUTOGRAD_FULL)
    cases["llama7b-2l-1x2048"] = dict(kind="model", model=LLAMA7B_2L, batch=1, seq=2048,
                                      variants=["lora", "lrqat-q4.4", "lrqat-int4p", "lrqat-bf16", "peqa", "full_qat",
                                                "lrqat-q4.4-autograd"])
    return cases


def _bench_memory():
    """Model construction is the memory benchmark's (lrqat_dist.memory.benchmark.build: one builder)."""
    from lrqat_dist.memory import benchmark

    return benchmark


def _qat_config(v: dict, rank: int):
    """Single linears: the Lp range (coarse grid), which clips some weights as on real checkpoints."""
    from lrqat_dist import QATConfig

    return QATConfig(method=v["method"], downcast=v.get("downcast", "fixed"), rank=rank, range_init="lp", lp_grid=20,
                     backward=v.get("backward", "fast"), compile_rebuild=v.get("compile_rebuild", False))


def dlqat_clipped_fraction(layer) -> float:
    """Fraction of a DL-QAT layer's codes outside the grid (at its Lp start, B = 0)."""
    import torch

    with torch.no_grad():
        r = torch.round(layer.codes_domain())
    return float(((r < layer.spec.qmin) | (r > layer.spec.qmax)).float().mean())


def perturb_adapters(model, code_std: float, seed: int = 0) -> float:
    """Set every LR-QAT layer's B so that ``c B@A`` has ``code_std`` grid steps of spread; returns the
    clipped fraction over all of them."""
    import torch

    from lrqat_dist.methods import LRQATLinear

    g = torch.Generator().manual_seed(seed)
    clipped = total = 0
    for layer in model.modules():
        if isinstance(layer, LRQATLinear):
            with torch.no_grad():
                a_norm = layer.lora_A.norm(dim=1).pow(2).mean().sqrt().item()
                std = code_std / (layer.scaling * a_norm)
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * std)
                _, mask = layer.fused_rebuild(with_mask=True)
                clipped += int(mask.sum())
                total += mask.numel()
    return clipped / total if total else float("nan")


class _Runner:
    """One variant of one case: ``step()`` = forward, backward, optimizer step."""

    def __init__(self, case: dict, name: str, rank: int, code_std: float, bm, shared: dict):
        import torch
        from torch import nn

        v = VARIANTS[name]
        self.clipped = float("nan")
        torch.manual_seed(0)
        if case["kind"] == "linear":
            lin = nn.Linear(case["inp"], case["out"], bias=False)
            if v["method"] == "lora":
                from lrqat_dist.methods.lora_reference import LoRALinear

                self.module = LoRALinear(lin, rank)
            else:
                from lrqat_dist.methods import METHODS

                self.module = METHODS[v["method"]].from_linear(lin, _qat_config(v, rank), name)
                if "phase" in v:  # DL-QAT
                    self.module.set_phase(v["phase"])
                    self.clipped = dlqat_clipped_fraction(self.module)
            g = torch.Generator().manual_seed(1)
            self.x = torch.randn(case["tokens"], case["inp"], generator=g).requires_grad_(True)
            self.grad = torch.randn(case["tokens"], case["out"], generator=g)
        else:
            spec = {"model": case["model"], "method": "lora" if v["method"] == "lora" else
                    (f"lrqat-{v['downcast']}" if v["method"] == "lrqat" else v["method"]), "dtype": "fp32",
                    "rank": rank}
            self.module = _build_model(bm, spec, v)
            # frozen embeddings / lm_head are identical across variants: share one copy (memory)
            for attr in ("embed_tokens",):
                emb = getattr(self.module.model, attr)
                setattr(self.module.model, attr, shared.setdefault(attr, emb))
            if not self.module.config.tie_word_embeddings:
                self.module.lm_head = shared.setdefault("lm_head", self.module.lm_head)
            else:
                self.module.lm_head.weight = self.module.model.embed_tokens.weight
            g = torch.Generator().manual_seed(1)
            self.ids = torch.randint(0, self.module.config.vocab_size, (case["batch"], case["seq"]), generator=g)
        if v["method"] == "lrqat":
            self.clipped = perturb_adapters(self.module, code_std)
        params = [p for p in self.module.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-6)
        self.kind = case["kind"]

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        if self.kind == "linear":
            self.x.grad = None
            self.module(self.x).backward(self.grad)
        else:
            from lrqat_dist.engines.base import next_token_loss

            next_token_loss(self.module(input_ids=self.ids).logits, self.ids).backward()
        self.opt.step()


def _build_model(bm, spec: dict, v: dict):
    """bench_memory's builder, with this variant's backward switch applied to every quantized layer."""
    from lrqat_dist.methods import QuantLinear

    model = bm.build(spec)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.backward = v.get("backward", "fast")
            if v.get("compile_rebuild"):
                m.compile_rebuild = True
    return model


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def run_case(name: str, case: dict, repeats: int, rank: int, code_std: float, variants: list[str] | None) -> dict:
    import gc

    bm = _bench_memory()
    # an explicit --variants list may name the on-request variants too
    names = [v for v in case["variants"] if variants is None or v in variants]
    names += [v for v in variants or [] if v in ON_REQUEST and v not in names]
    if case["kind"] != "linear" and set(names) & LINEAR_ONLY:
        raise ValueError(f"{name}: variants {sorted(set(names) & LINEAR_ONLY)} run on single linears only")
    if "lora" not in names:
        names.insert(0, "lora")
    shared: dict = {}
    runners = {}
    t0 = time.perf_counter()
    warmup = {}
    for v in names:
        runners[v] = _Runner(case, v, rank, code_std, bm, shared)
        t = time.perf_counter()
        runners[v].step()  # warm-up (untimed; includes torch.compile for -compiled)
        warmup[v] = time.perf_counter() - t
    build_s = time.perf_counter() - t0
    times: dict[str, list[float]] = {v: [] for v in names}
    load_before = _load()
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for v in order:
            gc.collect()
            t = time.perf_counter()
            runners[v].step()
            times[v].append(time.perf_counter() - t)
    med = {v: statistics.median(ts) for v, ts in times.items()}
    rows = [{"variant": v, "median_s": med[v], "ratio_to_lora": med[v] / med["lora"], "times_s": times[v],
             "warmup_s": warmup[v], "clipped_fraction": runners[v].clipped} for v in names]
    logger.info("%s: built + warmed up in %.1f s", name, build_s)
    return {"case": name, "rows": rows, "load_before": load_before, "load_after": _load(), "repeats": repeats}


def markdown(results: list[dict], meta: dict) -> str:
    lines = [f"torch {meta['torch']}, {meta['threads']} thread(s), {meta['repeats']} rounds, median; "
             f"load average (1/5/15 min) per case shown before -> after.", "",
             "| case | variant | median s | x LoRA | clipped | warm-up s | load |", "|---|---|---|---|---|---|---|"]
    for res in results:
        for i, row in enumerate(res["rows"]):
            clip = "" if row["clipped_fraction"] != row["clipped_fraction"] else f"{100 * row['clipped_fraction']:.2f}%"
            load = f"{res['load_before']} -> {res['load_after']}" if i == 0 else ""
            lines.append(f"| {res['case'] if i == 0 else ''} | {row['variant']} | {row['median_s']:.3f} | "
                         f"{row['ratio_to_lora']:.2f} | {clip} | {row['warmup_s']:.1f} | {load} |")
    return "\n".join(lines) + "\n"


def profile(case: dict, variant: str, rank: int, code_std: float, top: int = 15) -> str:
    import torch

    runner = _Runner(case, variant, rank, code_std, _bench_memory(), {})
    runner.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        runner.step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def clipping_report(model_dir: Path, tokens: int = 1024, bits_list=(4, 3)) -> str:
    """Clipped fraction per decoder linear of a real checkpoint (Lp-4 range, 100-point grid, per
    channel: the weights whose code ``round(W/s0)`` falls outside the grid, i.e. where the LR-QAT
    correction works), and the cost of the gathered correction against one ``G`` matmul."""
    import torch
    from safetensors.torch import load_file

    from lrqat_dist.methods.fast_backward import _subtract_clipped
    from lrqat_dist.quant.affine import QuantSpec, to_codes_domain
    from lrqat_dist.quant.range_init import init_range

    weights = {k: v.float() for k, v in load_file(str(model_dir / "model.safetensors")).items()
               if k.endswith("proj.weight") and ".layers." in k}
    lines = [f"Clipped fraction per decoder linear of {model_dir.name} ({len(weights)} linears), Lp-4 range "
             f"(100-point grid), per channel:", "", "| grid | min | median | max | all weights |",
             "|---|---|---|---|---|"]
    cost_fraction = {}
    for bits in bits_list:
        spec = QuantSpec(bits, True, None)
        fr, n_clip, n_all = [], 0, 0
        for name, w in weights.items():
            s0, z0 = init_range(w, spec, "lp", 4.0, 100, name)
            r = torch.round(to_codes_domain(w, s0, z0))
            c = int(((r < spec.qmin) | (r > spec.qmax)).sum())
            fr.append(c / w.numel())
            n_clip, n_all = n_clip + c, n_all + w.numel()
        fr.sort()
        lines.append(f"| W{bits} per channel | {100 * fr[0]:.3f}% | {100 * statistics.median(fr):.3f}% | "
                     f"{100 * fr[-1]:.3f}% | {100 * n_clip / n_all:.3f}% |")
        cost_fraction[bits] = fr[-1]
    # cost of the correction at the largest layer shape and the largest fraction seen, vs one G matmul
    out_f, in_f = max((w.shape for w in weights.values()), key=lambda s: s[0] * s[1])
    g = torch.Generator().manual_seed(0)
    gf, xf = torch.randn(tokens, out_f, generator=g), torch.randn(tokens, in_f, generator=g)
    a, b, s = torch.randn(32, in_f, generator=g), torch.randn(out_f, 32, generator=g), torch.rand(out_f, 1) + 0.5
    lines.append("")
    for bits, frac in cost_fraction.items():
        mask = torch.rand(out_f, in_f, generator=g) < frac
        da, db = torch.zeros(32, in_f), torch.zeros(out_f, 32)
        t_corr = statistics.median(_timed(lambda: _subtract_clipped(gf, xf, s, a, b, 0.03, mask, da, db)) for _ in range(5))
        t_mm = statistics.median(_timed(lambda: gf.t() @ xf) for _ in range(5))
        lines.append(f"Correction at W{bits} (largest layer {out_f}x{in_f}, {tokens} tokens, the largest fraction "
                     f"{100 * frac:.3f}%): {1e3 * t_corr:.2f} ms = {100 * t_corr / t_mm:.1f}% of the G matmul it "
                     f"replaces ({1e3 * t_mm:.1f} ms).")
    return "\n".join(lines) + "\n"


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 1 round (a smoke run of the tool)")
    ap.add_argument("--cases", help="comma-separated case names (default: all)")
    ap.add_argument("--variants", help="comma-separated variants (default: each case's list; lora always)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3; 1 with --quick)")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--code-std", type=float, default=0.3, help="spread of c B@A in grid steps (LR-QAT)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--markdown", help="write the markdown table here")
    ap.add_argument("--profile", nargs=2, metavar=("CASE", "VARIANT"), help="profile one step and exit")
    ap.add_argument("--clipping", metavar="HF_DIR", help="clipped fractions of a real checkpoint's linears and exit")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    if args.clipping:
        print(clipping_report(Path(args.clipping)))
        return 0
    cases = _cases(args.quick)
    if args.profile:
        print(profile(cases[args.profile[0]], args.profile[1], args.rank, args.code_std))
        return 0
    chosen = list(cases) if not args.cases else args.cases.split(",")
    unknown = [c for c in chosen if c not in cases]
    if unknown:
        ap.error(f"--cases: unknown {unknown}; known: {', '.join(cases)}")
    variants = None if not args.variants else args.variants.split(",")
    if variants and set(variants) - set(VARIANTS):
        ap.error(f"--variants: unknown {sorted(set(variants) - set(VARIANTS))}; known: {', '.join(VARIANTS)}")
    repeats = args.repeats or (1 if args.quick else 3)
    results = []
    for c in chosen:
        results.append(run_case(c, cases[c], repeats, args.rank, args.code_std, variants))
        print(markdown(results[-1:], {"torch": torch.__version__, "threads": torch.get_num_threads(),
                                      "repeats": repeats}), flush=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": repeats,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    table = markdown(results, meta)
    if args.markdown:
        Path(args.markdown).write_text(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
