"""What a training step minimises: next-token cross-entropy, optionally mixed with distillation from a
teacher (the method's own full-precision copy of W0, or a separate model). One place for the loss math,
used by every engine (:meth:`lrqat_dist.engines.base.Engine.training_loss`)."""
from .config import DistillConfig
from .losses import distill_loss, next_token_loss
from .objective import TrainingObjective, build_objective
from .teacher import teacher_mode

__all__ = ["DistillConfig", "TrainingObjective", "build_objective", "distill_loss", "next_token_loss", "teacher_mode"]
