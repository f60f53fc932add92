"""Full-model QAT (LSQ-style): the fp32 weight and the scales are trained through the fake quantizer."""
from __future__ import annotations

import torch
from torch import nn

from ..quant.affine import QuantSpec, grouped, quantize, to_codes_domain
from ..quant.range_init import init_range
from .base import QuantLinear
from .config import QATConfig
from .fast_backward import dense_linear, gram_row_chunks


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
        layer.backward = cfg.backward
        return layer

    def codes(self) -> torch.Tensor:
        return quantize(self.weight, self.scale, self.zero_point, self.spec, ste=True)

    def scale_tensor(self) -> torch.Tensor:
        return self.scale

    def fast_function(self):
        return dense_linear

    @torch.no_grad()
    def dense_param_grads(self, g2: torch.Tensor, x2: torch.Tensor, w_hat: torch.Tensor, need: tuple[bool, ...]):
        """The plain path's gradients, chunk by chunk of G: with ``pre = W/s + z`` and ``M`` the
        in-range mask of ``round(pre)``, ``dW = G s M / s`` (STE) and
        ``ds = sum_g G (q - z) - sum_g G s M W / s^2`` (LSQ)."""
        need_w, need_s = need
        w, s, z = self.weight.detach(), self.scale.detach(), self.zero_point
        ng, spec = s.shape[1], self.spec
        dw = torch.empty_like(w) if need_w else None
        ds = torch.empty_like(s) if need_s else None
        # small chunks: about eight chunk-sized temporaries are alive at once below
        for rows, g in gram_row_chunks(g2, x2, *w.shape, elems=1 << 18):
            zr = None if z is None else z[rows]
            q = torch.round(to_codes_domain(w[rows], s[rows], zr))
            inside = (q >= spec.qmin) & (q <= spec.qmax)
            sg = s[rows].unsqueeze(-1)
            gq = grouped(g, ng) * sg  # dL/dq
            gpre = gq * grouped(inside, ng)
            if need_w:
                dw[rows] = (gpre / sg).reshape(g.shape)
            if need_s:
                qz = grouped(q.clamp_(spec.qmin, spec.qmax), ng)
                if zr is not None:
                    qz = qz - zr.unsqueeze(-1).to(qz.dtype)
                ds[rows] = (grouped(g, ng) * qz).sum(-1) - (gpre * ((grouped(w[rows], ng) / sg) / sg)).sum(-1)
        return dw, ds
