"""DL-QAT (Ke et al., 2025): weight-decomposed low-rank QAT with a per-group magnitude.

    W_q = m * (s * clip(round((W0 + (alpha/r) B @ A - b) / s), -2^(n-1), 2^(n-1)-1) + b)

``m`` (magnitude, init 1), ``s`` (scale) and ``b`` (float offset) are per group ``[out, n_groups]``;
the frozen ``W0`` is a buffer. Training has two phases (the trainer switches them, see
:mod:`lrqat_dist.methods.hooks`): phase 1 trains only ``s`` and ``b``; phase 2 freezes them and trains
``m``, ``A`` and ``B``. The weight is computed in its folded form, ``(m*s) * q + (m*b)``, so that
``fold()`` (integer codes ``q``, scale ``m*s``, float offset ``m*b``) is bit-identical to training.

Backward (``QATConfig.backward: fast``, both phases): the exact no-autograd gradients of
:func:`lrqat_dist.methods.fast_backward.dlqat_linear`, from the same rebuild (:meth:`DLQATLinear.codes_domain`).
"""
from __future__ import annotations

import torch
from torch import nn

from ..quant.affine import QuantSpec, clamp_codes, dequantize, grouped, round_ste, row_blocks, to_codes_domain
from ..quant.range_init import MIN_SCALE, init_range
from .base import QuantLinear
from .config import QATConfig
from .fast_backward import dlqat_linear

PHASE1, PHASE2 = 1, 2


@torch.no_grad()
def dlqat_init_range(w0: torch.Tensor, spec: QuantSpec, method: str = "minmax", p: float = 4.0, grid: int = 100,
                     layer: str = "<layer>") -> tuple[torch.Tensor, torch.Tensor]:
    """Initial ``(s, b)`` per group for the signed grid ``[-2^(n-1), 2^(n-1)-1]``.

    ``minmax`` is the paper's: ``[min, max]`` of each group maps onto the grid's end points,
    ``s = (max - min) / (2^n - 1)``, ``b = (2^(n-1) max + (2^(n-1) - 1) min) / (2^n - 1)``.
    ``lp`` takes the Lp-searched asymmetric range (integer zero-point ``z`` on ``[0, 2^n - 1]``)
    and rewrites it for the signed grid: ``b = s * (2^(n-1) - z)``.
    """
    n, half = spec.bits, 2 ** (spec.bits - 1)
    if method == "minmax":
        g = grouped(w0.float(), spec.n_groups(w0.shape[1], layer))
        lo, hi = g.amin(-1), g.amax(-1)
        s = ((hi - lo) / (2**n - 1)).clamp_min(MIN_SCALE)
        b = (half * hi + (half - 1) * lo) / (2**n - 1)
        return s, b
    s, z = init_range(w0, QuantSpec(n, False, spec.group_size), method, p, grid, layer)
    return s, s * (half - z.float())


class DLQATLinear(QuantLinear):
    """DL-QAT layer; parameters ``scale`` (s), ``offset`` (b), ``magnitude`` (m), ``lora_A``, ``lora_B``."""

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, rank: int, alpha: float,
                 bias: torch.Tensor | None = None, name: str = "<layer>"):
        if not spec.symmetric:
            raise ValueError(f"{name}: DL-QAT uses the signed grid with a float offset; symmetric must be true")
        super().__init__(in_features, out_features, spec, bias, name)
        if rank > min(in_features, out_features):
            raise ValueError(f"{name}: rank {rank} exceeds min(in, out) = {min(in_features, out_features)}")
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        shape = (out_features, self.n_groups)
        # Creation order = trainable_tensors() order, which gradient_mask() relies on.
        self.scale = nn.Parameter(torch.ones(shape, dtype=torch.float32))
        self.offset = nn.Parameter(torch.zeros(shape, dtype=torch.float32))
        self.magnitude = nn.Parameter(torch.ones(shape, dtype=torch.float32))
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=torch.float32))
        self.register_buffer("weight0", torch.zeros(out_features, in_features))
        nn.init.normal_(self.lora_A, std=1.0 / rank)  # the paper's Gaussian A, zero B: step 0 is Q(W0)
        self.phase = PHASE1

    @classmethod
    def from_linear(cls, linear: nn.Linear, cfg: QATConfig, name: str) -> "DLQATLinear":
        layer = cls(linear.in_features, linear.out_features, cfg.spec, cfg.rank, cfg.alpha, linear.bias, name)
        layer.to(linear.weight.device)
        with torch.no_grad():
            s, b = dlqat_init_range(linear.weight, cfg.spec, cfg.range_init, cfg.lp_norm, cfg.lp_grid, name)
            layer.scale.copy_(s)
            layer.offset.copy_(b)
            layer.weight0 = linear.weight.detach().clone()  # kept in the base model's dtype
        layer.phase = PHASE1 if cfg.dlqat_phase1_steps > 0 else PHASE2
        layer.backward = cfg.backward
        return layer

    def set_phase(self, phase: int) -> None:
        if phase not in (PHASE1, PHASE2):
            raise ValueError(f"{self.layer_name}: DL-QAT phase must be 1 or 2, got {phase!r}")
        self.phase = phase

    def codes_domain(self, rows: slice = slice(None), ba: torch.Tensor | None = None) -> torch.Tensor:
        """``(W0 + c B@A - b) / s`` (the real-valued grid positions) of rows ``rows``; ``ba`` a
        precomputed whole ``B@A`` (a row-sliced matmul would round differently). Elementwise after
        the matmul, so any row slice has the bits of the whole: the one rebuild that :meth:`codes`
        (forward, fold, export) and the fast backward share."""
        ba = self.lora_B @ self.lora_A if ba is None else ba
        w = self.weight0[rows].float() + self.scaling * ba[rows]
        return to_codes_domain(w, self.scale[rows], None, self.offset[rows])

    def codes(self) -> torch.Tensor:
        return clamp_codes(round_ste(self.codes_domain()), self.spec)

    @torch.no_grad()
    def rebuild_rows_(self, w: torch.Tensor, rows: slice, ms: torch.Tensor, mb: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """In place: ``w[rows]`` holds ``B@A`` (the whole product's rows) and receives ``W_hat``'s
        rows ``(m*s) q + m*b`` (``ms``, ``mb``: :meth:`scale_tensor`, :meth:`offset_tensor`). Returns
        the grid positions ``u``, the codes ``q`` and the in-range mask of ``round(u)`` (the STE's
        gradient passes there: ``torch.clamp``'s rule, ends included). Elementwise, so the bits are
        :meth:`weight_hat`'s (round_ste's value is exactly round)."""
        u = self.codes_domain(rows, w)
        q = torch.round(u)
        inside = (q >= self.spec.qmin) & (q <= self.spec.qmax)
        q.clamp_(self.spec.qmin, self.spec.qmax)
        w[rows] = dequantize(q, ms[rows], None, mb[rows])
        return u, q, inside

    @torch.no_grad()
    def fused_rebuild(self, scratch=None) -> torch.Tensor:
        """:meth:`weight_hat` without autograd, bit for bit, in L2-sized row blocks: one ``[out, in]``
        fp32 tensor (``B@A`` as one matmul, overwritten in place) instead of about ten full-size
        temporaries. ``scratch`` (forward/backward only): write into its reused buffer
        (:class:`~lrqat_dist.methods.fast_backward._Scratch`). :meth:`fold` keeps :meth:`codes`."""
        w = self.lowrank_product(scratch)
        ms, mb = self.scale_tensor(), self.offset_tensor()
        for rows in row_blocks(*w.shape):
            self.rebuild_rows_(w, rows, ms, mb)
        return w

    @torch.no_grad()
    def lowrank_product(self, scratch=None) -> torch.Tensor:
        """``B@A`` as one matmul (row-sliced matmuls round differently), into ``scratch``'s reused
        ``weight`` buffer when given (CPU, large layers)."""
        shape, dev = (self.out_features, self.in_features), self.lora_B.device
        w = None if scratch is None else scratch.get("weight", shape, torch.float32, dev)
        return torch.matmul(self.lora_B, self.lora_A, out=w) if w is not None else self.lora_B @ self.lora_A

    def rebuilt_weight(self) -> torch.Tensor:
        return self.fused_rebuild()

    def scale_tensor(self) -> torch.Tensor:
        return self.magnitude * self.scale

    def teacher_unavailable(self) -> str | None:
        return None

    @torch.no_grad()
    def teacher_weight(self) -> torch.Tensor:
        """The frozen ``W0`` (kept in the base model's dtype) in fp32."""
        return self.weight0.float()

    def offset_tensor(self) -> torch.Tensor:
        return self.magnitude * self.offset

    def gradient_mask(self) -> list[bool]:
        p1 = self.phase == PHASE1
        return [p1, p1, not p1, not p1, not p1]  # scale, offset | magnitude, lora_A, lora_B

    def fast_function(self):
        return dlqat_linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}, phase={self.phase}"
