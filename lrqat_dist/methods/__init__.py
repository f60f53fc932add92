"""Quantized linear layers, one module per method, all sharing :class:`QuantLinear`."""
from .base import FoldedWeight, QuantLinear
from .config import QATConfig
from .frozen_codes import FrozenCodesLinear
from .full_qat import FullQATLinear
from .lrqat import LRQATLinear

METHODS = {"lrqat": LRQATLinear, "rtn": FrozenCodesLinear, "peqa": FrozenCodesLinear, "full_qat": FullQATLinear}

__all__ = ["FoldedWeight", "QuantLinear", "QATConfig", "LRQATLinear", "FrozenCodesLinear", "FullQATLinear", "METHODS"]
