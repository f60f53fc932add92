"""``train.distill``: knowledge distillation settings (typed, validated; docs/config.md)."""
from __future__ import annotations

from dataclasses import dataclass

DIVERGENCES = ("forward_kl", "reverse_kl")
PHI0_TEACHER = "phi0"


@dataclass
class DistillConfig:
    """Knowledge distillation (YAML ``train.distill``); see docs/method.md, "Distillation".

    teacher:     null (off), ``phi0`` (the free teacher: the method's own frozen copy of W0, e.g. LR-QAT's
                 ``s0 * (decode(Phi0) - z0)``, run with unquantized activations; no extra weight memory)
                 or a local HF model directory (a separate frozen model, loaded in ``train.dtype``).
    weight:      loss = (1 - weight) * CE + weight * KD; 1.0 = pure distillation, 0.0 = plain CE.
    temperature: T of the softened distributions; the KD term is scaled by T^2.
    divergence:  ``forward_kl`` (KL(teacher || student), the usual KD) or ``reverse_kl`` (KL(student || teacher)).
    chunk_tokens: tokens per chunk of the loss (fp32 vocab-sized temporaries exist for one chunk only).
    """

    teacher: str | None = None
    weight: float = 1.0
    temperature: float = 1.0
    divergence: str = "forward_kl"
    chunk_tokens: int = 1024

    def __post_init__(self):
        if self.teacher is not None and not str(self.teacher).strip():
            raise ValueError("teacher: empty; give 'phi0', a local HF model directory, or null (off)")
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"weight: must be in [0, 1] (loss = (1-weight)*CE + weight*KD), got {self.weight}")
        if not self.temperature > 0:
            raise ValueError(f"temperature: must be > 0, got {self.temperature}")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence: unknown {self.divergence!r}; expected one of {', '.join(DIVERGENCES)}")
        if not isinstance(self.chunk_tokens, int) or self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens: must be an int >= 1, got {self.chunk_tokens!r}")

    @property
    def enabled(self) -> bool:
        return self.teacher is not None

    @property
    def external(self) -> bool:
        """A separate teacher model (an HF directory), not the method's own frozen weights."""
        return self.enabled and self.teacher != PHI0_TEACHER
