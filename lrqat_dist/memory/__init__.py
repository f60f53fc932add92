"""Memory planning (analytic model of a training step's peak), measurement and lean model loading.

``lean_load`` (imports transformers) is not imported here: ``from lrqat_dist.memory.lean_load import lean_build``.
"""
from .planner import (GiB, PRESETS, ModelShape, Plan, PlanConfig, layer_activation_bytes, max_micro_batch, plan,
                      shared_activation_bytes)

__all__ = ["GiB", "PRESETS", "ModelShape", "Plan", "PlanConfig", "layer_activation_bytes", "max_micro_batch", "plan",
           "shared_activation_bytes"]
