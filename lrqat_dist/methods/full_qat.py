"""Full-model QAT (LSQ-style): the fp32 weight and the scales are trained through the fake quantizer."""
from __future__ import annotations

import torch
from torch import nn

from ..quant.affine import QuantSpec, quantize
from ..quant.range_init import init_range
from .base import QuantLinear
from .config import QATConfig


class FullQATLinear(QuantLinear):
    """``W_hat = s * (clip(round_ste(W / s + z)) - z)``; gradients reach W (STE) and s (LSQ)."""

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: torch.Tensor | None = None,
                 train_scale: bool = True, name: str = "<layer>"):
        super().__init__(in_features, out_features, spec, bias, name)
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.float32))
        self.scale = nn.Parameter(torch.ones(out_features, self.n_groups, dtype=torch.float32),
                                  requires_grad=train_scale)
        self.register_buffer("zero_point", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, cfg: QATConfig, name: str) -> "FullQATLinear":
        layer = cls(linear.in_features, linear.out_features, cfg.spec, linear.bias, cfg.train_scale, name)
        layer.to(linear.weight.device)
        with torch.no_grad():
            s0, z0 = init_range(linear.weight, cfg.spec, cfg.range_init, cfg.lp_norm, cfg.lp_grid, name)
            layer.scale.copy_(s0)
            layer.zero_point = z0
            layer.weight.copy_(linear.weight)
        return layer

    def codes(self) -> torch.Tensor:
        return quantize(self.weight, self.scale, self.zero_point, self.spec, ste=True)

    def scale_tensor(self) -> torch.Tensor:
        return self.scale
