"""Baselines with frozen integer codes: RTN (nothing trained) and PEQA (only the scales trained)."""
from __future__ import annotations

import torch
from torch import nn

from ..quant.affine import QuantSpec, quantize
from ..quant.range_init import init_range
from .base import QuantLinear
from .config import QATConfig
from .fast_backward import dense_linear, scale_grad_per_channel, scale_grad_per_group


class FrozenCodesLinear(QuantLinear):
    """``W_hat = s * (q - z)`` with ``q`` a frozen int8 buffer; ``s`` trainable for PEQA, frozen for RTN."""

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: torch.Tensor | None = None,
                 train_scale: bool = False, name: str = "<layer>"):
        super().__init__(in_features, out_features, spec, bias, name)
        self.scale = nn.Parameter(torch.ones(out_features, self.n_groups, dtype=torch.float32),
                                  requires_grad=train_scale)
        # int16 holds every grid up to 8 bits, signed or not.
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int16))
        self.register_buffer("zero_point", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, cfg: QATConfig, name: str) -> "FrozenCodesLinear":
        layer = cls(linear.in_features, linear.out_features, cfg.spec, linear.bias, cfg.method == "peqa", name)
        layer.to(linear.weight.device)
        with torch.no_grad():
            s0, z0 = init_range(linear.weight, cfg.spec, cfg.range_init, cfg.lp_norm, cfg.lp_grid, name)
            layer.scale.copy_(s0)
            layer.zero_point = z0
            layer.qweight.copy_(quantize(linear.weight.float(), s0, z0, cfg.spec))
        layer.backward = cfg.backward
        return layer

    def codes(self) -> torch.Tensor:
        return self.qweight.float()

    def scale_tensor(self) -> torch.Tensor:
        return self.scale

    def fast_function(self):
        return dense_linear

    def dense_param_grads(self, g2: torch.Tensor, x2: torch.Tensor, w: torch.Tensor, need: tuple[bool, ...]):
        """``dL/ds`` of ``s * (q - z)``: per channel from ``x W^T`` (no G), per group from G in chunks."""
        if not need[0]:
            return (None,)
        s = self.scale.detach()
        return ((scale_grad_per_channel if s.shape[1] == 1 else scale_grad_per_group)(g2, x2, w, s),)
