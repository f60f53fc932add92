"""Where training progress goes: ``metrics.jsonl``, TensorBoard scalars and a tqdm bar (main rank only).

``<output_dir>/metrics.jsonl`` holds one JSON object per logged step (step, loss, lr, tokens_per_s,
grad_norm, val_loss / val_ppl when computed, data skip counts, peak memory ...). On resume from step
N, records past N (logged after that checkpoint, before the crash) are dropped, so the file always
reads as one continuous run.
"""
from __future__ import annotations

import json
import logging
import math
import resource
import sys
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """All records of ``<output_dir>/metrics.jsonl``."""
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, max resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / 2**20


class MetricsLogger:
    """Writes records on the main rank; a no-op elsewhere."""

    def __init__(self, output_dir: str | Path, enabled: bool, tensorboard: bool, progress_bar: bool,
                 start_step: int, max_steps: int):
        self.enabled = enabled
        self.path = Path(output_dir) / METRICS_FILE
        self._tb = self._bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(output_dir) if r.get("step", 0) <= start_step]
        with open(self.path, "w") as f:  # drop records past the resumed step
            f.writelines(json.dumps(r) + "\n" for r in kept)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events a crashed run logged past the checkpoint.
            self._tb = SummaryWriter(str(Path(output_dir) / TENSORBOARD_DIR),
                                     purge_step=start_step + 1 if start_step else None)
        if progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step",
                             dynamic_ncols=True, file=sys.stderr)

    def log(self, step: int, record: dict[str, Any]) -> None:
        if not self.enabled or not record:
            return
        record = {"step": step, **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in _flatten(record).items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
        if self._bar is not None and "loss" in record:
            lr = record.get("lr") if record.get("lr") is not None else record.get("scale_lr", 0.0)
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def write(self, message: str) -> None:
        """A line of text that does not break the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            logger.info("%s", message)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out
