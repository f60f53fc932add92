"""The training objective every engine's ``forward_backward`` minimises (one place for all of them).

Without distillation: next-token cross-entropy of the student's logits, as always. With
``train.distill``: a no-grad teacher forward first (the same model in :func:`teacher_mode`, or the
separate teacher), then the student's forward, then :func:`distill_loss`. The teacher is deterministic
and draws no random numbers, so resume exactness and gradient accumulation are unchanged.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .config import DistillConfig
from .losses import distill_loss, next_token_loss
from .teacher import check_phi0_teacher, load_teacher, teacher_mode

Forward = Callable[[torch.Tensor], torch.Tensor]  # input_ids -> logits (the engine's, maybe wrapped)


class TrainingObjective:
    """``loss(model, forward, input_ids)``: the mean loss of one micro-batch, with autograd to the student.

    ``model`` is the (unwrapped) module whose quantized linears the phi0 teacher switches; ``forward``
    the engine's forward of that model. ``teacher``: a separate teacher model (``teacher: <HF dir>``).
    """

    def __init__(self, distill: DistillConfig | None = None, teacher: nn.Module | None = None):
        self.distill = distill if distill is not None and distill.enabled else None
        self.teacher = teacher
        if self.distill is not None and self.distill.external and teacher is None:
            raise ValueError("TrainingObjective: an external teacher needs its model (build_objective loads it)")

    @property
    def distills(self) -> bool:
        return self.distill is not None

    @torch.no_grad()
    def teacher_logits(self, model: nn.Module, forward: Forward, input_ids: torch.Tensor) -> torch.Tensor:
        if self.teacher is not None:
            return self.teacher(input_ids=input_ids, use_cache=False).logits
        with teacher_mode(model):
            return forward(input_ids)

    def loss(self, model: nn.Module, forward: Forward, input_ids: torch.Tensor) -> torch.Tensor:
        d = self.distill
        if d is None or d.weight == 0.0:
            return next_token_loss(forward(input_ids), input_ids)
        teacher = self.teacher_logits(model, forward, input_ids)
        return distill_loss(forward(input_ids), teacher, input_ids, d.weight, d.temperature, d.divergence,
                            d.chunk_tokens)


def build_objective(distill: DistillConfig, model: nn.Module, method: str, dtype: torch.dtype,
                    device: torch.device, attn_implementation: str = "sdpa") -> TrainingObjective:
    """The objective of a run: checks that the phi0 teacher exists for ``method`` (a clear error naming it
    otherwise), or loads the external teacher (``dtype`` = ``train.dtype``, on ``device``)."""
    if not distill.enabled or distill.weight == 0.0:  # weight 0 = plain CE: no teacher forward, none loaded
        return TrainingObjective()
    if not distill.external:
        check_phi0_teacher(model, method)
        return TrainingObjective(distill)
    vocab = model.get_output_embeddings().weight.shape[0] if hasattr(model, "get_output_embeddings") else None
    teacher = load_teacher(distill.teacher, dtype, device, attn_implementation, vocab)
    return TrainingObjective(distill, teacher)
