#!/usr/bin/env python
"""Held-out perplexity of every method on the real SmolLM2-135M, one row per command.

    python tools/bench_quality.py --row w4pc/lrqat-fixed          # one row (trains if the method trains)
    python tools/bench_quality.py --setting w4pc                  # every method at one setting
    python tools/bench_quality.py --row w4pc/lrqat-fixed+kd --seed 1   # distilled from its own Phi0 (train.distill)
    python tools/bench_quality.py --table                         # markdown table of all results so far
    python tools/bench_quality.py --list                          # the rows and their overrides

Each trained row runs the real trainer (``lrqat_dist.train.train``, the recipe
``configs/smollm2-w4pc.yaml`` with the row's ``quant`` and ``train`` overrides) for the same budget,
data order and seed, then measures held-out perplexity on ``heldout.txt`` (text never seen in training,
``tools/prepare_text.py``) in non-overlapping blocks, on the model as trained (no reload). FP and RTN
rows build and evaluate only. Results go to ``runs/bench_quality/results/<setting>__<label>__s<seed>.json``
(``<label>`` = the method, plus ``@w<weight>-T<temperature>`` for a distilling row with non-default
``--kd-weight`` / ``--kd-temperature``); files of the old form ``<setting>__<method>.json`` are read
as seed 0. Every row also records the trainer's validation loss on ``data.val_files`` (the validation
stream) at the start and the end: tune ``--kd-weight`` / ``--kd-temperature`` on that, never on the
held-out text.

Settings avoid 4-bit groups of 32 (SmolLM2's GGUF weights sit on a Q4_1 g32 grid, which would make W4 g32
lossless) and use g64 for "W3 g128": SmolLM2's hidden size 576 is not a multiple of 128.
See docs/RESULTS.md for the table and docs/bench-quality.md for the protocol.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RECIPE = ROOT / "configs" / "smollm2-w4pc.yaml"

SETTINGS: dict[str, dict] = {
    "w4pc": {"bits": 4, "group_size": None, "symmetric": True},
    "w3pc": {"bits": 3, "group_size": None, "symmetric": True},
    "w3g64": {"bits": 3, "group_size": 64, "symmetric": True},
    "w2g64a": {"bits": 2, "group_size": 64, "symmetric": False},
    # weight-and-activation (issue 8): W4 per-channel weights plus the activation preset
    "w4a8pc": {"bits": 4, "group_size": None, "symmetric": True, "activations": "a8asym"},
    "w4a4kv4pc": {"bits": 4, "group_size": None, "symmetric": True, "activations": "a4kv4"},
}

# method -> (quant overrides, train overrides). None: no quantization (the float model).
# Learning rates: LR-QAT's adapters live in the integer domain (units of s), so they take a larger lr
# than a float-domain weight; full QAT trains float weights (|w| ~ 0.02) and takes a small one.
METHODS: dict[str, tuple[dict, dict] | None] = {
    "fp": None,
    "rtn": ({"method": "rtn"}, {}),
    "peqa": ({"method": "peqa"}, {"scale_lr": 1e-4}),
    "full_qat": ({"method": "full_qat"}, {"lr": 1e-5, "scale_lr": 1e-4}),
    "lrqat-fixed": ({"method": "lrqat", "downcast": "fixed", "rank": 32, "alpha": 32.0}, {}),
    "lrqat-bf16": ({"method": "lrqat", "downcast": "bf16", "rank": 32, "alpha": 32.0}, {}),
    "lrqat-int-packed": ({"method": "lrqat", "downcast": "int-packed", "rank": 32, "alpha": 32.0}, {}),
    "dlqat": ({"method": "dlqat", "rank": 16, "alpha": 3.2, "range_init": "minmax"}, {}),
    "loqt": ({"method": "loqt", "rank": 32, "range_init": "lp", "loqt_scale": 0.25, "loqt_psi": 1.2,
              "loqt_error_comp": 0, "loqt_final_merge": True}, {}),
    # Distillation (train.distill, docs/method.md): the same LR-QAT rows, taught by their own Phi0
    # (no extra weight memory) or by the base SmolLM2 loaded as a separate model ("kdext").
    "lrqat-fixed+kd": ({"method": "lrqat", "downcast": "fixed", "rank": 32, "alpha": 32.0}, {}),
    "lrqat-bf16+kd": ({"method": "lrqat", "downcast": "bf16", "rank": 32, "alpha": 32.0}, {}),
    "lrqat-fixed+kdext": ({"method": "lrqat", "downcast": "fixed", "rank": 32, "alpha": 32.0}, {}),
    # The phi0 teachers themselves (build only, evaluated in teacher mode: s0 * (decode(Phi0) - z0),
    # activations unquantized): what "+kd" distils from at this setting's s0 and Phi0 format.
    "teacher-fixed": ({"method": "lrqat", "downcast": "fixed", "rank": 32, "alpha": 32.0}, {}),
    "teacher-bf16": ({"method": "lrqat", "downcast": "bf16", "rank": 32, "alpha": 32.0}, {}),
}
BUILD_ONLY = ("rtn", "teacher-fixed", "teacher-bf16")
# Distilling methods -> their teacher: "phi0" or "base" (the prepared SmolLM2 HF directory).
KD_TEACHERS = {"lrqat-fixed+kd": "phi0", "lrqat-bf16+kd": "phi0", "lrqat-fixed+kdext": "base"}
# The default recipe: pure distillation (weight 1) at temperature 1. The goal of QAT is the full-precision
# model's behaviour and the teacher is that model, so its whole next-token distribution is a strictly
# richer target than the corpus's one-hot token (LLM-QAT found pure logit KD best for the same reason);
# T = 1 matches the distribution perplexity measures (T > 1 weights the tail, which ppl does not see).
# Sweep on the validation stream: --kd-weight 0.5 / --kd-temperature 2 are the usual alternatives.
KD_WEIGHT, KD_TEMPERATURE = 1.0, 1.0
# Methods run by --setting (activation settings run the three the issue names).
DEFAULT_METHODS = ["fp", "rtn", "peqa", "full_qat", "lrqat-fixed", "lrqat-bf16", "lrqat-int-packed"]
KD_METHODS = list(KD_TEACHERS)  # run with --methods
ACT_METHODS = ["rtn", "peqa", "lrqat-fixed"]

RESULTS = ROOT / "runs" / "bench_quality" / "results"


def _budget_overrides(args) -> list[str]:
    # val_every = steps: the trainer validates on data.val_files before the first and after the last step
    return [f"train.max_steps={args.steps}", f"train.micro_batch_size={args.batch}", "train.grad_accum=1",
            f"data.seq_len={args.seq_len}", f"train.seed={args.seed}", f"train.save_every={args.steps}",
            f"train.val_every={args.steps}", "train.keep_last=1", "log.tensorboard=false",
            "log.progress_bar=false", f"train.log_every={max(1, args.steps // 10)}"]


def kd_options(method: str, args) -> dict | None:
    """The ``train.distill`` mapping of a distilling row (None for the others)."""
    teacher = KD_TEACHERS.get(method)
    if teacher is None:
        return None
    return {"teacher": teacher, "weight": args.kd_weight, "temperature": args.kd_temperature}


def row_label(method: str, args) -> str:
    """What names a row's results: the method, plus its KD options where they are not the defaults."""
    if method in KD_TEACHERS and (args.kd_weight, args.kd_temperature) != (KD_WEIGHT, KD_TEMPERATURE):
        return f"{method}@w{args.kd_weight:g}-T{args.kd_temperature:g}"
    return method


def result_path(setting: str, method: str, args, results_dir: Path = RESULTS) -> Path:
    return results_dir / f"{setting}__{row_label(method, args)}__s{args.seed}.json"


def row_quant(setting: str, method: str, steps: int) -> dict:
    quant, _ = METHODS[method]
    q = {**SETTINGS[setting], **quant}
    if method == "dlqat":  # phase 1 (s, b only) for a fifth of the run, as in the paper (1000 of 5000)
        q["dlqat_phase1_steps"] = max(1, steps // 5)
        q["symmetric"] = True  # DL-QAT's float offset b is its asymmetry; it has no zero-point form

    if method == "loqt":  # a handful of merges within a short run (paper: tau 100 over thousands of steps)
        q["loqt_tau"] = max(1, steps // 10)
    return q


def row_overrides(setting: str, method: str, args, model_dir: Path, corpus: Path) -> list[str]:
    """The ``--set`` overrides of ``configs/smollm2-w4pc.yaml`` that make one row's training job."""
    out = ROOT / "runs" / "bench_quality" / setting / row_label(method, args) / f"s{args.seed}"
    overrides = [f"model.path={model_dir}", f"data.train_files={corpus / 'shards' / 'train'}",
                 f"data.val_files={corpus / 'shards' / 'validation'}", f"train.output_dir={out}",
                 *_budget_overrides(args)]
    spec = METHODS[method]
    if spec is not None:
        overrides += [f"quant.{k}={json.dumps(v)}" for k, v in row_quant(setting, method, args.steps).items()]
        overrides += [f"train.{k}={json.dumps(v)}" for k, v in spec[1].items()]
    kd = kd_options(method, args)
    if kd is not None:
        if kd["teacher"] == "base":
            kd["teacher"] = str(model_dir)
        overrides.append(f"train.distill={json.dumps(kd)}")
    return overrides


def stream_val_loss(model, cfg, tokenizer) -> float:
    """Mean next-token loss over the validation stream (``data.val_files``, ``data.val_blocks``), as the
    trainer's validation computes it: for the rows that do not train (FP, RTN)."""
    import torch

    from lrqat_dist.data import build_val_loader
    from lrqat_dist.objective import next_token_loss

    device = next(model.parameters()).device
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for batch in build_val_loader(cfg.data, tokenizer, micro_batch_size=cfg.train.micro_batch_size):
            ids = batch["input_ids"].to(device)
            total += float(next_token_loss(model(input_ids=ids).logits, ids, reduction="sum"))
            count += ids.shape[0] * (ids.shape[1] - 1)
    return total / count


def run_row(setting: str, method: str, args) -> dict:
    import torch

    from lrqat_dist import load_causal_lm
    from lrqat_dist.prep.cache import default_cache_dir
    from lrqat_dist.eval.perplexity import text_perplexity
    from lrqat_dist.objective.teacher import teacher_mode
    from lrqat_dist.prep.gguf_model import prepare_smollm2
    from lrqat_dist.train import Builders, build_model, build_tokenizer, load_config, train

    torch.manual_seed(args.seed)
    model_dir = prepare_smollm2()
    corpus = default_cache_dir() / "text" / "corpus"
    if not (corpus / "shards" / "train").is_dir():
        raise SystemExit(f"no corpus at {corpus}: run `python tools/prepare_text.py --shards` first")
    heldout = (corpus / "heldout.txt").read_text(encoding="utf-8")
    cfg = load_config(RECIPE, overrides=row_overrides(setting, method, args, model_dir, corpus))
    out = Path(cfg.train.output_dir)
    spec = METHODS[method]
    tokenizer = build_tokenizer(cfg)
    t0 = time.time()
    trained, train_info = False, {}
    if spec is None:
        model = load_causal_lm(path=model_dir)
    elif method in BUILD_ONLY:
        model = build_model(cfg, torch.device("cpu"))  # the trainer's own build, with nothing trained
    else:
        trained = True
        holder: dict = {}

        def keep_model(c, device):  # the trainer's own builder; we keep a handle to evaluate it after
            holder["model"] = build_model(c, device)
            return holder["model"]

        if out.exists():
            shutil.rmtree(out)  # every row starts from the pretrained model, never from an old run
        result = train(cfg, resume="none", builders=Builders(model=keep_model))
        model = holder["model"]
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses = [m["loss"] for m in metrics if m.get("loss") is not None]
        val = {m["step"]: m["val_loss"] for m in metrics if m.get("val_loss") is not None}
        train_info = {"steps": result.step, "first_loss": losses[0], "last_loss": losses[-1],
                      "tokens": result.step * args.batch * args.seq_len, "train_seconds": time.time() - t0,
                      "val_loss_start": val.get(0), "val_loss": val.get(result.step)}
    with (teacher_mode(model) if method.startswith("teacher-") else nullcontext()):
        if not trained:
            train_info["val_loss"] = stream_val_loss(model, cfg, tokenizer)
        ppl = text_perplexity(model, tokenizer, heldout, seq_len=args.eval_seq_len, max_blocks=args.eval_blocks)
    label = row_label(method, args)
    row = {"setting": setting, "method": label, "base_method": method, "seed": args.seed, "ppl": ppl.ppl, "eval_tokens": ppl.predicted_tokens,
           "eval_blocks": ppl.blocks, "eval_seq_len": ppl.seq_len, "trained": trained, **train_info,
           "quant": None if spec is None else row_quant(setting, method, args.steps),
           "train_overrides": None if spec is None else spec[1], "distill": kd_options(method, args),
           "budget": {"steps": args.steps, "micro_batch_size": args.batch, "seq_len": args.seq_len,
                      "seed": args.seed},
           "seconds": time.time() - t0, "torch_threads": torch.get_num_threads(),
           "command": f"python tools/bench_quality.py --row {setting}/{method} --steps {args.steps} "
                      f"--batch {args.batch} --seq-len {args.seq_len} --eval-blocks {args.eval_blocks} "
                      f"--seed {args.seed}"
                      + (f" --kd-weight {args.kd_weight:g} --kd-temperature {args.kd_temperature:g}"
                         if method in KD_TEACHERS else "")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    final = result_path(setting, method, args)
    tmp = final.with_name(f".{final.name}.tmp")
    tmp.write_text(json.dumps(row, indent=2))
    os.replace(tmp, final)
    print(f"[bench_quality] {setting}/{label} seed {args.seed}: ppl {ppl.ppl:.3f}, val loss {row['val_loss']}"
          + (f" (loss {train_info['first_loss']:.3f} -> {train_info['last_loss']:.3f}, "
             f"{train_info['train_seconds']:.0f} s)" if trained else ""), flush=True)
    return row


def load_results(results_dir: Path = RESULTS) -> list[dict]:
    """Every saved row, with its ``seed``: files ``<setting>__<label>__s<seed>.json``, and old
    ``<setting>__<method>.json`` ones (written before seeds were kept apart) as seed 0; where both
    forms hold the same (setting, label, seed), the new file wins."""
    rows: dict[tuple, dict] = {}
    for path in sorted(results_dir.glob("*.json")):
        r = json.loads(path.read_text())
        parts = path.stem.split("__")
        new = len(parts) == 3 and parts[2].startswith("s") and parts[2][1:].isdigit()
        r.setdefault("seed", int(parts[2][1:]) if new else 0)
        key = (r["setting"], r["method"], r["seed"])
        if new or key not in rows:
            rows[key] = r
    return list(rows.values())


def _stats(values: list[float]) -> str:
    """``mean`` (one value) or ``mean (min-max)``."""
    mean = sum(values) / len(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ({min(values):.3f}-{max(values):.3f})"


def table(results_dir: Path = RESULTS) -> str:
    """Markdown: one block per setting, one line per method (or KD variant) over the seeds present: mean
    and min-max of held-out perplexity and of the validation-stream loss, n seeds, and the share of the
    RTN-to-FP gap recovered (of the means)."""
    rows = load_results(results_dir)
    if not rows:
        return "(no results yet)"
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    fp_rows = [r["ppl"] for r in rows if r["method"] == "fp"]
    fp = mean(fp_rows) if fp_rows else None
    lines = []
    order = {m: i for i, m in enumerate(METHODS)}
    for setting in SETTINGS:
        group = [r for r in rows if r["setting"] == setting and r["method"] != "fp"]
        if not group:
            continue
        methods = sorted({r["method"] for r in group},
                         key=lambda m: (order.get(m.split("@")[0], 99), m))
        rtn_rows = [r["ppl"] for r in group if r["method"] == "rtn"]
        rtn = mean(rtn_rows) if rtn_rows else None
        lines += [f"**{setting}**", "",
                  "| method | n | held-out ppl mean (min-max) | RTN-to-FP gap recovered | val loss mean (min-max) "
                  "| train loss first -> last | tokens |", "|---|---|---|---|---|---|---|"]
        if fp is not None:
            lines.append(f"| FP (as loaded) | {len(fp_rows)} | {fp:.3f} | | | | |")
        for m in methods:
            rs = sorted((r for r in group if r["method"] == m), key=lambda r: r["seed"])
            ppl = [r["ppl"] for r in rs]
            gap = ""
            if fp is not None and rtn is not None and rtn > fp and m != "rtn":
                gap = f"{100 * (rtn - mean(ppl)) / (rtn - fp):.0f}%"
            vals = [r["val_loss"] for r in rs if r.get("val_loss") is not None]
            trained = [r for r in rs if r.get("trained")]
            loss = (f"{mean([r['first_loss'] for r in trained]):.3f} -> {mean([r['last_loss'] for r in trained]):.3f}"
                    if trained else "")
            tokens = f"{trained[0]['tokens']:,}" if trained else ""
            lines.append(f"| {m} | {len(rs)} | {_stats(ppl)} | {gap} | {_stats(vals) if vals else ''} | {loss} "
                         f"| {tokens} |")
        lines.append("")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--row", help="SETTING/METHOD, e.g. w4pc/lrqat-fixed")
    what.add_argument("--setting", help="every default method at SETTING")
    what.add_argument("--table", action="store_true", help="print the markdown table of saved results")
    what.add_argument("--list", action="store_true", help="print settings, methods and their overrides")
    p.add_argument("--methods", help="comma-separated methods for --setting (default: all the issue's rows)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per trained row (default: %(default)s)")
    p.add_argument("--batch", type=int, default=4, help="micro-batch (sequences per step; default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=128, help="training sequence length (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="training seed (data order); results are kept per seed")
    p.add_argument("--kd-weight", type=float, default=KD_WEIGHT,
                   help="distilling rows: loss = (1-w) CE + w KD (default: %(default)s, pure KD)")
    p.add_argument("--kd-temperature", type=float, default=KD_TEMPERATURE,
                   help="distilling rows: KD temperature T, KL scaled by T^2 (default: %(default)s)")
    p.add_argument("--eval-blocks", type=int, default=16, help="held-out blocks (default: %(default)s)")
    p.add_argument("--eval-seq-len", type=int, default=512, help="held-out block length (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.list:
        for s, q in SETTINGS.items():
            print(f"setting {s}: {q}")
        for m, spec in METHODS.items():
            print(f"method {m}: {spec}" + (f" distill: {kd_options(m, args)}" if m in KD_TEACHERS else ""))
        return 0
    if args.table:
        print(table())
        return 0
    if args.row:
        setting, _, method = args.row.partition("/")
        todo = [(setting, method)]
    else:
        setting = args.setting
        default = ACT_METHODS if "activations" in SETTINGS.get(setting, {}) else DEFAULT_METHODS
        todo = [(setting, m) for m in (args.methods.split(",") if args.methods else default)]
    for setting, method in todo:
        if setting not in SETTINGS:
            p.error(f"unknown setting {setting!r}; expected one of {', '.join(SETTINGS)}")
        if method not in METHODS:
            p.error(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    for setting, method in todo:
        run_row(setting, method, args)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(format="%(message)s", stream=sys.stderr)  # warnings from everyone, as without handlers
    logging.getLogger("lrqat_dist.prep").setLevel(logging.INFO)  # model / corpus preparation progress
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
