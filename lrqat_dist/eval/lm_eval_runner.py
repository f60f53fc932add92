"""Zero-shot lm-eval harness tasks on an in-memory model, offline.

Built-in tasks load their datasets through ``datasets`` from the local HF cache (run with
``HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1``; tools/eval.py sets both); any local task directory (YAML +
data) is added with ``include_path``. The six tasks of the LR-QAT paper are :data:`PAPER_TASKS`.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from torch import nn

logger = logging.getLogger(__name__)

# 0-shot average of the LR-QAT paper (Table 1 onwards).
PAPER_TASKS = ["boolq", "piqa", "winogrande", "hellaswag", "arc_easy", "arc_challenge"]
TASK_ALIASES = {"paper": PAPER_TASKS, "lrqat": PAPER_TASKS}
# Per-task metric of the paper's average: not stated in the paper; the usual convention of quantization
# papers (inferred). Every metric lm-eval reports is kept in the results anyway.
PAPER_METRIC = {"boolq": "acc", "piqa": "acc_norm", "winogrande": "acc", "hellaswag": "acc_norm",
                "arc_easy": "acc_norm", "arc_challenge": "acc_norm"}


def expand_tasks(tasks: list[str]) -> list[str]:
    """Task names with aliases (``paper``) expanded, order kept, duplicates dropped."""
    out: list[str] = []
    for t in tasks:
        for name in TASK_ALIASES.get(t, [t]):
            if name not in out:
                out.append(name)
    return out


def task_manager(tasks: list[str], include_path: str | Path | list[str | Path] | None = None):
    """A ``TaskManager`` that knows ``tasks``: only the include path when it has them all (fast), the
    built-in index too otherwise (~10 s to index); unknown names raise with the closest matches."""
    from lm_eval.tasks import TaskManager

    paths = [include_path] if isinstance(include_path, (str, Path)) else list(include_path or [])
    for p in paths:
        if not Path(p).is_dir():
            raise FileNotFoundError(f"lm-eval: include path {p} is not a directory")
    if paths:
        local = TaskManager(include_path=[str(p) for p in paths], include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    tm = TaskManager(include_path=[str(p) for p in paths] or None, include_defaults=True)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        import difflib

        hints = {t: difflib.get_close_matches(t, tm.all_tasks, n=3) for t in unknown}
        raise ValueError("lm-eval: unknown task(s) " + "; ".join(f"{t!r} (close: {', '.join(h) or 'none'})"
                                                                  for t, h in hints.items()))
    return tm


def run_lm_eval(model: nn.Module, tokenizer, tasks: list[str], *,
                include_path: str | Path | list[str | Path] | None = None, batch_size: int = 1,
                num_fewshot: int = 0, limit: int | float | None = None, bootstrap_iters: int = 1000) -> dict:
    """Evaluate ``model`` (a causal LM, already on its device) on lm-eval ``tasks``.

    Returns lm-eval's results dict (``results``, ``n-samples``, ``configs``, ``versions`` ...) minus
    per-sample logs. A dataset that is not available offline raises a RuntimeError that says so.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    tasks = expand_tasks(tasks)
    if not tasks:
        raise ValueError("lm-eval: no tasks given")
    t0 = time.time()
    tm = task_manager(tasks, include_path)
    logger.info("[lm-eval] %s (%d-shot, batch %d%s)", ", ".join(tasks), num_fewshot, batch_size,
                "" if limit is None else f", limit {limit}")
    was_training = model.training
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        out = simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=tm,
                              log_samples=False, bootstrap_iters=bootstrap_iters)
    except ConnectionError as e:  # datasets / huggingface_hub offline mode (OfflineModeIsEnabled) or no network
        raise RuntimeError(f"lm-eval: a task's dataset is not available offline ({e}). Built-in tasks need "
                           f"their datasets in the local HF cache (download once with network access), or "
                           f"give a local task directory with --include-path.") from e
    finally:
        model.train(was_training)
    out.pop("samples", None)
    out["lrqat_seconds"] = time.time() - t0
    return out


def summarize(results: dict) -> list[dict]:
    """One row per (task, metric): ``{"task", "metric", "value", "stderr", "n"}`` (lm-eval's numbers)."""
    rows = []
    n_samples = results.get("n-samples", {})
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            metric, comma, filt = key.partition(",")
            if not comma or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append({"task": task, "metric": metric, "value": float(value),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                         "n": (n_samples.get(task) or {}).get("effective")})
    return rows


def paper_average(results: dict) -> float | None:
    """Mean of the paper's per-task metric over :data:`PAPER_TASKS`, if all six were run."""
    res = results.get("results", {})
    vals = []
    for task in PAPER_TASKS:
        v = (res.get(task) or {}).get(f"{PAPER_METRIC[task]},none")
        if not isinstance(v, (int, float)) or math.isnan(v):
            return None
        vals.append(float(v))
    return sum(vals) / len(vals)
