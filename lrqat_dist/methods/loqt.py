"""LoQT (Loeschcke et al., 2024): low-rank adapters merged periodically into quantized weights.

    W = deq(Q) + s * P @ B        (P [out, r], B [r, in]; when out <= in)
    W = deq(Q) + s * B @ P^T      (B [out, r], P [in, r]; when out > in)

``Q`` (integer codes, scales, zero-points: our own int grid, 2-8 bits), and the projection ``P`` are
buffers; ``B`` is the only trained tensor. ``P`` holds the top-``r`` singular vectors of the weight
gradient dL/dW on the smaller side of the weight (so ``B`` spans the larger one). At each update step
(schedule: :func:`loqt_update_steps`) ``B`` is merged, ``Q <- Q(deq(Q) + s P B)``, a fresh ``P`` comes
from that step's gradient, and ``B`` restarts from zero (or from error compensation); the optimizer
state of ``B`` is kept. The trainer drives this (:mod:`lrqat_dist.methods.hooks`); :meth:`LoQTLinear.merge`
is the one merge function, which :meth:`LoQTLinear.fold` also uses.

Folding: the training weight ``deq(Q) + s P B`` is on no integer grid unless ``B == 0``. ``fold()``
therefore returns what a merge would store (requantized ``Q``), which equals :meth:`weight_hat` bit for
bit exactly when ``B == 0``: after the final merge the trainer does (``loqt_final_merge``), or at
any update step without error compensation.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..quant.affine import QuantSpec, dequantize, grouped, quantize, to_codes_domain
from ..quant.range_init import init_range
from .base import FoldedWeight, QuantLinear
from .config import QATConfig


def loqt_update_steps(tau: int, psi: float, max_steps: int) -> list[int]:
    """Optimizer steps (1-based) after which LoQT merges and refreshes P: ``u_0 = 1``,
    ``u_{i+1} = u_i + tau + floor(psi^i)``; step 1 only initialises P (B is still zero)."""
    steps, u, i = [], 1, 0
    while u <= max_steps:
        steps.append(u)
        u, i = u + tau + math.floor(psi**i), i + 1
    return steps


def gradient_projection(grad: torch.Tensor, rank: int, left: bool) -> torch.Tensor:
    """Top-``rank`` singular vectors of ``grad`` ``[out, in]`` (fp32): ``U[:, :r]`` (left, ``[out, r]``)
    or ``V[:, :r]`` (right, ``[in, r]``); orthonormal columns."""
    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    return (u[:, :rank] if left else vh[:rank].t()).contiguous()


class LoQTLinear(QuantLinear):
    """LoQT layer: buffers ``qweight`` (codes), ``qscale``, ``zero_point``, ``proj`` (P); parameter ``lora_B``."""

    trained_buffers = ("qweight", "qscale", "zero_point", "proj")

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, rank: int, s: float,
                 bias: torch.Tensor | None = None, name: str = "<layer>", range_init: str = "minmax",
                 lp_norm: float = 4.0, lp_grid: int = 100):
        super().__init__(in_features, out_features, spec, bias, name)
        if rank > min(in_features, out_features):
            raise ValueError(f"{name}: rank {rank} exceeds min(in, out) = {min(in_features, out_features)}")
        self.rank, self.s = rank, s
        self.range_init, self.lp_norm, self.lp_grid = range_init, lp_norm, lp_grid
        self.left = out_features <= in_features  # P on the smaller side
        small, large = (out_features, in_features) if self.left else (in_features, out_features)
        self.lora_B = nn.Parameter(torch.zeros(*((rank, large) if self.left else (large, rank)), dtype=torch.float32))
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int16))
        self.register_buffer("qscale", torch.ones(out_features, self.n_groups, dtype=torch.float32))
        self.register_buffer("zero_point", None)
        # P = 0 until the first gradient probe (step 1): B's gradient s P^T dL/dW is then exactly zero.
        self.register_buffer("proj", torch.zeros(small, rank, dtype=torch.float32))

    @classmethod
    def from_linear(cls, linear: nn.Linear, cfg: QATConfig, name: str) -> "LoQTLinear":
        layer = cls(linear.in_features, linear.out_features, cfg.spec, cfg.rank, cfg.loqt_scale, linear.bias, name,
                    cfg.range_init, cfg.lp_norm, cfg.lp_grid)
        layer.to(linear.weight.device)
        with torch.no_grad():
            layer._store(*layer.quantize_weight(linear.weight.float()))
        return layer

    # --- the math -----------------------------------------------------------------------------
    def low_rank(self, b: torch.Tensor, proj: torch.Tensor | None = None) -> torch.Tensor:
        """``P @ B`` (left) or ``B @ P^T`` (right), ``[out, in]``; ``proj`` defaults to the stored P."""
        p = self.proj if proj is None else proj
        return p @ b if self.left else b @ p.t()

    def base_weight(self) -> torch.Tensor:
        return dequantize(self.qweight, self.qscale, self.zero_point)

    def weight_with(self, b: torch.Tensor) -> torch.Tensor:
        """``deq(Q) + s * low_rank(b)``: the training weight for adapter value ``b``."""
        return self.base_weight() + self.s * self.low_rank(b)

    def weight_hat(self) -> torch.Tensor:
        return self.weight_with(self.lora_B)

    @torch.no_grad()
    def quantize_weight(self, w: torch.Tensor, keep_grid: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """LoQT's quantizer Q: range (``range_init``) then round-to-nearest; (codes int16, scale, zero-point).

        ``keep_grid`` (merges): each group keeps its current scale and zero-point unless ``w`` leaves
        that grid (by more than half a step), in which case the group's range is set afresh. Re-running
        the range search on every merge would re-round every weight onto a slightly different grid,
        adding a full quantization error per merge even where B changed nothing."""
        def fresh():
            return init_range(w, self.spec, self.range_init, self.lp_norm, self.lp_grid, self.layer_name)

        if not keep_grid:
            scale, zp = fresh()
            return quantize(w, scale, zp, self.spec).to(torch.int16), scale, zp
        scale, zp = self.qscale.clone(), _clone(self.zero_point)
        x = grouped(to_codes_domain(w.float(), scale, zp), scale.shape[1])
        outside = (x.amin(-1) < self.spec.qmin - 0.5) | (x.amax(-1) > self.spec.qmax + 0.5)
        if bool(outside.any()):
            new_scale, new_zp = fresh()
            scale = torch.where(outside, new_scale, scale)
            zp = None if zp is None else torch.where(outside, new_zp, zp)
        return quantize(w, scale, zp, self.spec).to(torch.int16), scale, zp

    @torch.no_grad()
    def merge(self, b: torch.Tensor, proj: torch.Tensor | None = None, error_comp: int = 0):
        """What a merge of adapter value ``b`` stores: ``(codes, scale, zero_point, B_new)``; pure, no state changed.

        Target ``W = deq(Q) + s low_rank(b)``, quantized on the current grid (groups that outgrow it
        get a fresh range, see :meth:`quantize_weight`). Without error compensation: ``Q(W)`` and ``B_new = 0``.
        With ``error_comp = C``, the projection ``proj`` (default: the current P) also absorbs part of
        the quantization error: for c = 1..C, ``Q_c = Q(W_hat)``, ``B_c = P^T (W - deq Q_c) / s``
        (orthonormal P: its pseudo-inverse), ``W_hat = W - s low_rank(B_c)``; the pair with the
        smallest ``||W - deq Q_c - s low_rank(B_c)||`` is kept. ``b == 0`` merges nothing: Q stays.
        """
        b = b.to(self.lora_B.dtype)
        if not bool(b.any()):
            return self.qweight.clone(), self.qscale.clone(), _clone(self.zero_point), torch.zeros_like(b)
        w = self.weight_with(b)
        if error_comp == 0:
            return (*self.quantize_weight(w, keep_grid=True), torch.zeros_like(b))
        p = self.proj if proj is None else proj
        best, best_err, w_hat = None, math.inf, w
        for _ in range(error_comp):
            codes, scale, zp = self.quantize_weight(w_hat, keep_grid=True)
            resid = w - dequantize(codes, scale, zp)
            b_c = (p.t() @ resid if self.left else resid @ p) / self.s
            comp = self.s * self.low_rank(b_c, p)
            err = float(torch.linalg.vector_norm(resid - comp))
            if err < best_err:
                best, best_err = (codes, scale, zp, b_c), err
            w_hat = w - comp
        return best

    @torch.no_grad()
    def apply_merge(self, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                    proj: torch.Tensor | None = None) -> None:
        """Store a merge result (and a new P) in the buffers; B is the caller's (the engine owns it)."""
        self._store(codes, scale, zero_point)
        if proj is not None:
            self.proj.copy_(proj)

    def _store(self, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> None:
        self.qweight.copy_(codes)
        self.qscale.copy_(scale)
        self.zero_point = None if zero_point is None else zero_point.to(torch.int32).clone()

    # --- the QuantLinear interface --------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        return self.qweight.float()

    def scale_tensor(self) -> torch.Tensor:
        return self.qscale

    def trainable_tensors(self) -> list[torch.Tensor]:
        return [self.lora_B]

    @torch.no_grad()
    def fold(self) -> FoldedWeight:
        """The integer weight a merge would store now (see the module docstring): equals
        :meth:`weight_hat` bitwise when ``B == 0``, else ``Q(weight_hat())`` (quantization error)."""
        codes, scale, zp, _ = self.merge(self.lora_B.detach())
        return FoldedWeight(codes=codes.to(torch.int32), scale=scale.float().clone(),
                            zero_point=None if zp is None else zp.to(torch.int32).clone(), bits=self.spec.bits,
                            group_size=self.spec.group_size, bias=None if self.bias is None else self.bias.clone())

    def extra_repr(self) -> str:
        side = "P@B" if self.left else "B@P^T"
        return f"{super().extra_repr()}, rank={self.rank}, s={self.s}, {side}"


def _clone(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clone()
