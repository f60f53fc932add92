"""Memory planning (analytic model of a training step's peak) and its measurement.

``planner`` (exported here), ``measure`` (the kernel's peak-RSS counter) and ``benchmark`` (measured
training steps next to the planner; imports the engines, so not imported here). Building a model
one weight at a time lives with the builder: ``lrqat_dist.model.lean_load``.
"""
from .planner import (GiB, PRESETS, ModelShape, Plan, PlanConfig, layer_activation_bytes, max_micro_batch, plan,
                      shared_activation_bytes)

__all__ = ["GiB", "PRESETS", "ModelShape", "Plan", "PlanConfig", "layer_activation_bytes", "max_micro_batch", "plan",
           "shared_activation_bytes"]
