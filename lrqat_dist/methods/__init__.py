"""Quantized linear layers, one module per method, all sharing :class:`QuantLinear`."""
from .base import FoldedWeight, QuantLinear
from .config import QATConfig
from .dlqat import DLQATLinear
from .frozen_codes import FrozenCodesLinear
from .full_qat import FullQATLinear
from .loqt import LoQTLinear
from .lrqat import LRQATLinear

METHODS = {"lrqat": LRQATLinear, "rtn": FrozenCodesLinear, "peqa": FrozenCodesLinear, "full_qat": FullQATLinear,
           "dlqat": DLQATLinear, "loqt": LoQTLinear}

__all__ = ["FoldedWeight", "QuantLinear", "QATConfig", "LRQATLinear", "FrozenCodesLinear", "FullQATLinear", "DLQATLinear",
           "LoQTLinear", "METHODS"]
