"""Post-export checks: what was written is read back and compared, bit for bit, with the live model.

Every export function ends here; a mismatch raises :class:`ExportVerificationError` and the staging
directory is discarded, so a checkpoint that exists on disk has passed its checks.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .hf_dir import SafetensorsDir

_INT_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


class ExportVerificationError(RuntimeError):
    """The reloaded export differs from the model it was written from."""


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bit patterns (stricter than ``torch.equal``: NaNs and signed zeros count)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        view = _INT_VIEW[a.element_size()]
        return torch.equal(a.contiguous().view(view), b.contiguous().view(view))
    return torch.equal(a, b)


def describe_diff(got: torch.Tensor, want: torch.Tensor) -> str:
    if got.dtype != want.dtype or got.shape != want.shape:
        return f"got {got.dtype} {tuple(got.shape)}, expected {want.dtype} {tuple(want.shape)}"
    diff = (got.double() - want.double()).abs()
    return f"{int((diff > 0).sum())} of {got.numel()} values differ (max abs {diff.max().item():.3e})"


def progress(log: logging.Logger, verb: str, i: int, n: int) -> None:
    """``[export] <verb> i/n layers`` on the caller's logger, about every 10% of the layers."""
    if (i + 1) % max(1, n // 10) == 0 or i + 1 == n:
        log.info("[export] %s %d/%d layers", verb, i + 1, n)


@dataclass
class ExportReport:
    """Where an export went and which checks it passed."""

    format: str
    path: Path
    dtype: str
    quantized_layers: int
    checks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    stats: dict = field(default_factory=dict)  # format-specific measured numbers (e.g. GGUF's m rounding)

    def summary(self) -> str:
        lines = [f"{self.format} export -> {self.path} ({self.dtype}, {self.quantized_layers} quantized layers, "
                 f"{self.seconds:.1f} s)"]
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  check passed: {c}" for c in self.checks]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"format": self.format, "path": str(self.path), "dtype": self.dtype,
                "quantized_layers": self.quantized_layers, "checks": self.checks, "notes": self.notes,
                "seconds": round(self.seconds, 3), **({"stats": self.stats} if self.stats else {})}


class Checker:
    """Collects comparison results; :meth:`finish` raises if any failed."""

    def __init__(self, what: str):
        self.what, self.failures, self.count = what, [], 0

    def tensor(self, name: str, got: torch.Tensor, want: torch.Tensor) -> None:
        self.count += 1
        if not same_bits(got, want):
            self.failures.append(f"{name}: {describe_diff(got, want)}")

    def fail(self, msg: str) -> None:
        self.failures.append(msg)

    def finish(self, passed: str) -> str:
        if self.failures:
            listed = "\n  - ".join(self.failures[:10])
            raise ExportVerificationError(f"{self.what}: verification failed ({len(self.failures)} problems):\n"
                                          f"  - {listed}")
        return passed


def check_dense(directory: Path, expected: dict[str, torch.Tensor], basename: str = "model",
                extra_ok: Callable[[str], bool] = lambda k: False, label: str = "dense tensors") -> str:
    """The dense tensors in ``directory`` are exactly ``expected`` (no more, no fewer)."""
    files = SafetensorsDir(directory, basename)
    checker = Checker(f"{directory}: {label}")
    for name, want in expected.items():
        if name not in files:
            checker.fail(f"{name}: missing from the checkpoint")
            continue
        checker.tensor(name, files.get(name), want)
    for name in files.keys():
        if name not in expected and not extra_ok(name):
            checker.fail(f"{name}: unexpected tensor in the checkpoint")
    return checker.finish(f"{len(expected)} {label} read back bit-identical")


def check_loaded_model(loaded: nn.Module, expected_weights: Callable[[str], torch.Tensor],
                       quantized: list[str], dense: dict[str, torch.Tensor], how: str) -> str:
    """A model loaded the way a consumer loads it holds exactly the expected weights.

    ``expected_weights(name)`` gives the dense weight a quantized layer must have; ``dense`` the other
    tensors (by state-dict name)."""
    t0 = time.time()
    checker = Checker(f"reload via {how}")
    for name in quantized:
        try:
            mod = loaded.get_submodule(name)
        except AttributeError:
            checker.fail(f"{name}: not in the loaded model")
            continue
        checker.tensor(f"{name}.weight", mod.weight.detach(), expected_weights(name))
    state = loaded.state_dict()
    for k, want in dense.items():
        if k not in state:
            checker.fail(f"{k}: not in the loaded model")
            continue
        checker.tensor(k, state[k], want)
    return checker.finish(f"reloaded via {how}: {len(quantized)} quantized weights equal fold().dequantize() "
                          f"bit for bit, {len(dense)} dense tensors identical ({time.time() - t0:.1f} s)")
