"""The non-finite guard: a step whose loss or global gradient norm is NaN/inf is skipped, not applied.

How a skip happens (every engine, every rank at the same step):

- Each engine backpropagates ``loss * c`` with ``c = 1`` for a finite loss and ``c = NaN`` otherwise
  (:func:`lrqat_dist.engines.base.poison_nonfinite`; no host sync, and ``x * 1.0`` is exact), so a
  non-finite loss on *any* rank makes the reduced gradients, and hence the global grad norm, NaN on
  *every* rank.
- The engine's ``step()`` then sees a non-finite global norm and skips: no optimizer step, no LR
  scheduler step, gradients zeroed (``Engine.last_step_skipped``). The torch-optimizer engines agree
  on it with an all-reduce before touching the optimizer; DeepSpeed ZeRO 1-3 skip through ZeRO's own
  overflow path (the same global norm on every rank), ZeRO-0 through the engine (see
  :mod:`lrqat_dist.engines.deepspeed`).
- :class:`NonfiniteGuard` (here) counts skips, checks that all ranks skipped together, and stops the
  run with :class:`NonfiniteError` naming the step after ``train.max_nonfinite`` consecutive skips.

Test hook (tests only, never set it in a real run): ``LRQAT_TEST_NAN_STEPS="3"`` or ``"5-7,9"``
multiplies the model's output logits by NaN in the forward passes of those optimizer steps, on the
ranks listed in ``LRQAT_TEST_NAN_RANKS`` (comma list; default ``0``). It exercises the real path:
NaN logits -> NaN loss -> NaN gradients -> skipped step.
"""
from __future__ import annotations

import logging
import os
from typing import Any

from torch import nn

logger = logging.getLogger(__name__)

TEST_NAN_STEPS_ENV = "LRQAT_TEST_NAN_STEPS"
TEST_NAN_RANKS_ENV = "LRQAT_TEST_NAN_RANKS"


class NonfiniteError(RuntimeError):
    """Too many consecutive non-finite steps: the run cannot recover by skipping."""


class NonfiniteGuard:
    """Counts skipped steps; raises after ``max_consecutive`` skips in a row."""

    def __init__(self, max_consecutive: int, total: int = 0):
        self.max_consecutive = max_consecutive
        self.total = total  # skipped steps over the whole run (restored from the checkpoint)
        self.consecutive = 0
        self.first_of_run: int | None = None  # first step of the current run of skips

    def record(self, step: int, skipped: bool, loss: float, grad_norm: float | None) -> None:
        """After each optimizer step (every rank, the same ``skipped``)."""
        if not skipped:
            self.consecutive, self.first_of_run = 0, None
            return
        self.total += 1
        self.consecutive += 1
        if self.first_of_run is None:
            self.first_of_run = step
        logger.warning("step %d: non-finite loss (%s) or gradient norm (%s); step skipped on every rank "
                       "(no optimizer or LR-schedule update); %d in a row, %d in this run",
                       step, loss, grad_norm, self.consecutive, self.total)
        if self.consecutive >= self.max_consecutive:
            raise NonfiniteError(
                f"step {step}: {self.consecutive} consecutive steps (steps {self.first_of_run}-{step}) had a "
                f"non-finite loss or gradient norm (train.max_nonfinite={self.max_consecutive}); stopping. "
                "The newest checkpoint with finite trainable tensors is kept; lower train.lr, check the data "
                "around these steps, or resume from an earlier checkpoint")


# --- test hook ----------------------------------------------------------------------------------

def _parse_steps(text: str) -> set[int]:
    steps: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            steps.update(range(int(lo), int(hi) + 1) if sep else [int(lo)])
        except ValueError:
            raise ValueError(f"{TEST_NAN_STEPS_ENV}={text!r}: expected steps like '3' or '5-7,9'") from None
    return steps


class NanInjection:
    """The ``LRQAT_TEST_NAN_STEPS`` test hook (see the module docstring); ``None`` from
    :meth:`from_env` when the variable is unset."""

    def __init__(self, steps: set[int], ranks: set[int]):
        self.steps, self.ranks = steps, ranks
        self.active = False

    @classmethod
    def from_env(cls, rank: int) -> "NanInjection | None":
        text = os.environ.get(TEST_NAN_STEPS_ENV)
        if not text:
            return None
        ranks = {int(r) for r in os.environ.get(TEST_NAN_RANKS_ENV, "0").split(",") if r.strip()}
        logger.warning("TEST HOOK %s=%s: NaN logits at these steps on ranks %s", TEST_NAN_STEPS_ENV, text,
                       sorted(ranks))
        inj = cls(_parse_steps(text), ranks)
        return inj if rank in ranks else None

    def install(self, model: nn.Module) -> None:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None:
            raise ValueError(f"{TEST_NAN_STEPS_ENV}: {type(model).__name__} has no output embedding to hook")
        head.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        return output * float("nan") if self.active and module.training else output

    def before_step(self, step: int) -> None:
        self.active = step in self.steps
