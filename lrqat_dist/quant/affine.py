"""Uniform affine quantization: the one place where codes, scales and zero-points meet.

Every path (training forward, folding, export) dequantizes through :func:`dequantize`, so the
weights a checkpoint holds are the weights training saw, bit for bit.

Layout convention: a weight is ``[out, in]``; its scale and zero-point are ``[out, n_groups]`` where
``n_groups = in // group_size`` (per-channel is the special case ``n_groups == 1``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantSpec:
    """What integer grid a weight lives on."""

    bits: int = 4
    symmetric: bool = True
    group_size: int | None = None  # None = per output channel

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits: expected an int in [2, 8], got {self.bits!r}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size <= 0):
            raise ValueError(f"group_size: expected a positive int or None, got {self.group_size!r}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def n_groups(self, in_features: int, layer: str = "<layer>") -> int:
        """Groups along the input dimension; a clear error when they do not tile it."""
        if self.group_size is None:
            return 1
        if in_features % self.group_size:
            raise ValueError(
                f"{layer}: input dimension {in_features} is not divisible by group_size {self.group_size}; "
                f"choose a divisor of {in_features} or group_size=None (per-channel)"
            )
        return in_features // self.group_size


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest (ties to even) with a straight-through gradient."""
    return x + (torch.round(x) - x).detach()


def clamp_codes(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    # torch.clamp passes gradient inside [qmin, qmax] and zero outside: the STE's clipping rule.
    return torch.clamp(x, spec.qmin, spec.qmax)


def grouped(w: torch.Tensor, n_groups: int) -> torch.Tensor:
    """View ``[out, in]`` as ``[out, n_groups, in // n_groups]``."""
    out, inp = w.shape
    return w.reshape(out, n_groups, inp // n_groups)


def to_codes_domain(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                    offset: torch.Tensor | None = None) -> torch.Tensor:
    """``(w - o) / s (+ z)`` per group, no rounding: the real-valued position of ``w`` on the grid.

    ``offset`` is a float per-group shift (DL-QAT's ``b``); integer grids leave it None."""
    g = grouped(w, scale.shape[1])
    if offset is not None:
        g = g - offset.unsqueeze(-1)
    x = g / scale.unsqueeze(-1)
    if zero_point is not None:
        x = x + zero_point.unsqueeze(-1).to(x.dtype)
    return x.reshape(w.shape)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
               offset: torch.Tensor | None = None) -> torch.Tensor:
    """``s * (q - z) (+ o)`` expanded to the weight shape; ``codes`` may be float-valued integers
    (training, with STE gradients) or an integer tensor (folded). Both give identical fp32 bits.

    ``offset`` (per group, float) is DL-QAT's folded ``m * b``; None for integer zero-point grids."""
    q = grouped(codes.to(scale.dtype), scale.shape[1])
    if zero_point is not None:
        q = q - zero_point.unsqueeze(-1).to(scale.dtype)
    w = q * scale.unsqueeze(-1)
    if offset is not None:
        w = w + offset.unsqueeze(-1)
    return w.reshape(codes.shape)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, spec: QuantSpec,
             ste: bool = False, offset: torch.Tensor | None = None) -> torch.Tensor:
    """Integer codes ``clip(round((w - o) / s + z))`` as a float tensor (STE rounding when ``ste``)."""
    x = to_codes_domain(w, scale, zero_point, offset)
    return clamp_codes(round_ste(x) if ste else torch.round(x), spec)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, spec: QuantSpec,
                  ste: bool = True) -> torch.Tensor:
    """Quantize-dequantize; gradients flow to ``w`` (STE) and to ``scale`` (LSQ-style)."""
    return dequantize(quantize(w, scale, zero_point, spec, ste=ste), scale, zero_point)


# --- the fused, in-place rebuild ----------------------------------------------------------------
# Elementwise passes over a row block that fits in L2 (256 KiB of fp32) instead of ~10 full-size
# passes, each its own [out, in] temporary. Elementwise only, so the bits equal the unblocked ops.
ROW_BLOCK_ELEMS = 1 << 16


def row_blocks(out_features: int, in_features: int, elems: int = ROW_BLOCK_ELEMS) -> list[slice]:
    """Row slices of an ``[out, in]`` weight, each about ``elems`` elements (at least one row)."""
    rows = max(1, elems // max(1, in_features))
    return [slice(r, min(r + rows, out_features)) for r in range(0, out_features, rows)]


def round_clamp_dequantize_(pre: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, spec: QuantSpec,
                            clipped: torch.Tensor | None = None, dequant: bool = True) -> torch.Tensor:
    """In place on a row block ``pre`` ([rows, in], fp32, real-valued grid positions): the codes
    ``clip(round(pre))`` (``dequant=False``) or the weight ``s * (codes - z)``; bit-identical to
    :func:`clamp_codes` of :func:`round_ste` followed by :func:`dequantize` (``round_ste``'s value is
    exactly ``round``). ``clipped`` (bool, same shape), when given, receives where the rounded code
    fell outside ``[qmin, qmax]``: the STE passes no gradient there (``torch.clamp``'s rule)."""
    torch.round(pre, out=pre)
    if clipped is not None:
        torch.lt(pre, spec.qmin, out=clipped)
        clipped.logical_or_(pre > spec.qmax)
    pre.clamp_(spec.qmin, spec.qmax)
    if dequant:
        g = grouped(pre, scale.shape[1])
        if zero_point is not None:
            g.sub_(zero_point.unsqueeze(-1).to(scale.dtype))
        g.mul_(scale.unsqueeze(-1))
    return pre
