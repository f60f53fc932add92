"""LR-QAT: low-rank adapters placed inside the rounding of a frozen, downcast integer-domain weight.

    W_hat = s * (clip(round(Phi0 + (alpha / r) B @ A), qmin, qmax) - z)

Phi0 = phi(W0 / s0 + z0) is a buffer in the downcast format; A, B and s are the only Parameters.
Folding gives integer codes clip(round(Phi0 + (alpha/r) B@A)) with scale s: no extra inference cost.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..quant.affine import (QuantSpec, clamp_codes, dequantize, round_clamp_dequantize_, round_ste, row_blocks,
                            to_codes_domain)
from ..quant.downcast import Downcast, IntDowncast, get_downcast
from ..quant.range_init import init_range
from . import compiled_rebuild
from .base import QuantLinear
from .config import QATConfig
from .fast_backward import lrqat_linear


class LRQATLinear(QuantLinear):
    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, downcast: Downcast, rank: int,
                 alpha: float, bias: torch.Tensor | None = None, train_scale: bool = True, name: str = "<layer>"):
        super().__init__(in_features, out_features, spec, bias, name)
        if rank > min(in_features, out_features):
            raise ValueError(f"{name}: rank {rank} exceeds min(in, out) = {min(in_features, out_features)}")
        self.downcast, self.rank, self.alpha = downcast, rank, alpha
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=torch.float32))
        self.scale = nn.Parameter(torch.ones(out_features, self.n_groups, dtype=torch.float32),
                                  requires_grad=train_scale)
        self.register_buffer("phi0", None)
        self.register_buffer("s0", torch.ones(out_features, self.n_groups, dtype=torch.float32))
        self.register_buffer("zero_point", None)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @classmethod
    def from_linear(cls, linear: nn.Linear, cfg: QATConfig, name: str) -> "LRQATLinear":
        spec = cfg.spec
        layer = cls(linear.in_features, linear.out_features, spec, get_downcast(cfg.downcast, spec), cfg.rank,
                    cfg.alpha, linear.bias, cfg.train_scale, name)
        layer.to(linear.weight.device)
        layer.init_from_weight(linear.weight, cfg)
        layer.backward = cfg.backward
        layer.compile_rebuild = cfg.compile_rebuild
        return layer

    @torch.no_grad()
    def init_from_weight(self, w0: torch.Tensor, cfg: QATConfig) -> None:
        """Range-initialise s0 (z0), store Phi0 = phi(W0/s0 + z0) and initialise the adapters."""
        s0, z0 = init_range(w0, self.spec, cfg.range_init, cfg.lp_norm, cfg.lp_grid, self.layer_name)
        x = to_codes_domain(w0.float(), s0, z0)
        self.s0.copy_(s0)
        self.scale.copy_(s0)
        self.zero_point = z0
        self.phi0 = self.downcast.encode(x)
        if cfg.init == "svd":
            self._svd_init(x - self.downcast.decode(self.phi0))

    def _svd_init(self, residual: torch.Tensor) -> None:
        # LoftQ-like: (alpha/r) B@A is the best rank-r approximation of what the downcast lost.
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)
        root = (s[: self.rank] / self.scaling).sqrt()
        self.lora_B.copy_(u[:, : self.rank] * root)
        self.lora_A.copy_(root[:, None] * vh[: self.rank])

    def codes(self) -> torch.Tensor:
        phi = self.downcast.decode(self.phi0)
        return clamp_codes(round_ste(phi + self.scaling * (self.lora_B @ self.lora_A)), self.spec)

    def scale_tensor(self) -> torch.Tensor:
        return self.scale

    def teacher_unavailable(self) -> str | None:
        if isinstance(self.downcast, IntDowncast):
            return (f"downcast {self.downcast.name!r} stores the rounded codes, so s0 * (decode(Phi0) - z0) is the "
                    "RTN weight the student starts from: it teaches nothing new")
        return None

    @torch.no_grad()
    def teacher_weight(self) -> torch.Tensor:
        """``s0 * (decode(Phi0) - z0)``: W0 on the downcast's grid (8-bit for Q4.4, ~exact for bf16/fp32)."""
        reason = self.teacher_unavailable()
        if reason is not None:
            raise ValueError(f"{self.layer_name}: {reason}")
        return dequantize(self.downcast.decode(self.phi0), self.s0, self.zero_point)

    compile_rebuild = False  # QATConfig.compile_rebuild: forward/backward rebuild through torch.compile

    @torch.no_grad()
    def fused_rebuild(self, dequant: bool = True, with_mask: bool = False, scratch=None, compiled: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``W_hat`` (or the codes, ``dequant=False``) and optionally the clipped mask, without autograd:
        one ``[out, in]`` fp32 tensor (B@A, overwritten in place row block by row block) plus the mask.

        The same operations as :meth:`codes` + :meth:`weight_hat` in the same order (B@A as one
        matmul: row-sliced matmuls round differently), so the bits are identical; forward, backward,
        :meth:`fold` and export all rebuild through here. ``scratch`` (forward/backward only, see
        :class:`~lrqat_dist.methods.fast_backward._Scratch`): write into its reused buffers; the
        result is then valid only until the next rebuild. ``compiled`` (forward/backward only, with
        ``compile_rebuild``): the elementwise chain through :mod:`.compiled_rebuild`, which checks
        its first result per shape against this eager chain and falls back to it."""
        shape, dev = (self.out_features, self.in_features), self.lora_B.device
        pre = None if scratch is None else scratch.get("weight", shape, torch.float32, dev)
        pre = torch.matmul(self.lora_B, self.lora_A, out=pre) if pre is not None else self.lora_B @ self.lora_A
        clipped = None
        if with_mask:
            clipped = None if scratch is None else scratch.get("clipped", shape, torch.bool, dev)
            clipped = torch.empty(shape, dtype=torch.bool, device=dev) if clipped is None else clipped
        def eager(pre, clipped):
            zp = self.zero_point
            for rows in row_blocks(*pre.shape):
                blk = pre[rows]
                blk.mul_(self.scaling).add_(self.downcast.decode(self.phi0[rows]))
                round_clamp_dequantize_(blk, self.scale[rows], None if zp is None else zp[rows], self.spec,
                                        None if clipped is None else clipped[rows], dequant)

        if not (compiled and compiled_rebuild.rebuild_(self, pre, clipped, dequant, eager)):
            eager(pre, clipped)
        return pre, clipped

    def rebuilt_weight(self) -> torch.Tensor:
        return self.fused_rebuild()[0]

    def rebuilt_codes(self) -> torch.Tensor:
        return self.fused_rebuild(dequant=False)[0]

    def fast_function(self):
        return lrqat_linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}, phi={self.downcast.name}"
