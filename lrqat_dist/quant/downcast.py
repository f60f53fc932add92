"""Downcast operators phi: how the frozen grid position Phi0 = W0/s0 (+ z0) is stored.

Each operator encodes an fp32 tensor into a compact buffer and decodes it back to fp32. All of them
except INT-b keep a fractional part; the *tie-aware* ones guarantee ``round(decode(encode(x))) ==
round(x)`` elementwise, so a model with zero adapters reproduces round-to-nearest (RTN) exactly.
(The official Q4.4 rounds twice, round(round(16 x) / 16), and flips ~3% of codes at step 0.)
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..dtypes import DTYPES
from .affine import QuantSpec
from .bitpack import pack_codes, unpack_codes


class Downcast:
    """Base: ``encode(x) -> stored`` and ``decode(stored) -> fp32`` for an ``[out, in]`` tensor."""

    name: str

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, stored: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _nudge_ties(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Where ``y`` (a low-precision copy of ``x``) rounds to a different integer than ``x``, move it one
    step of its own format towards ``x``. Such ``y`` can only sit on a half-integer tie (ties are
    representable and nearer to ``x`` than anything past them), so one step lands on ``x``'s side."""
    bad = torch.round(y.float()) != torch.round(x)
    if not bool(bad.any()):
        return y
    toward = torch.where(x > y.float(), torch.inf, -torch.inf).to(y.dtype)
    return torch.where(bad, torch.nextafter(y, toward), y)


@dataclass(frozen=True)
class FloatDowncast(Downcast):
    """fp32 / bf16 / fp16 storage (bf16 and fp16 tie-aware)."""

    dtype: torch.dtype
    name: str

    def encode(self, x):
        x = x.float()
        y = x.to(self.dtype)
        return y if self.dtype == torch.float32 else _nudge_ties(y, x)

    def decode(self, stored):
        return stored.float()


@dataclass(frozen=True)
class FixedPointDowncast(Downcast):
    """Signed fixed point Qi.f in int8 (i + f = 8), tie-aware.

    The stored value is ``round(2^f * (clip(x, qmin, qmax) - shift))`` with ``shift = 2^(b-1)`` for
    asymmetric (unsigned) grids, so both symmetric and asymmetric ranges fit the signed byte.
    """

    int_bits: int
    frac_bits: int
    spec: QuantSpec
    name: str

    @property
    def shift(self) -> int:
        return 0 if self.spec.symmetric else 2 ** (self.spec.bits - 1)

    def encode(self, x):
        x = torch.clamp(x.float(), self.spec.qmin, self.spec.qmax)
        step = 2.0**self.frac_bits
        q = torch.round((x - self.shift) * step)
        y = q / step + self.shift
        # A fixed-point value on a half-integer tie may round away from x's own integer: nudge the
        # code by one fractional step towards x. Exact integer arithmetic in fp32 (|q| <= 128).
        bad = torch.round(y) != torch.round(x)
        q = torch.where(bad, q + torch.sign(x - y), q)
        return q.to(torch.int8)

    def decode(self, stored):
        return stored.float() / 2.0**self.frac_bits + self.shift


@dataclass(frozen=True)
class IntDowncast(Downcast):
    """INT-b: the rounded codes themselves (fractional part lost), int8 or packed into bytes."""

    spec: QuantSpec
    packed: bool
    name: str

    def encode(self, x):
        q = torch.clamp(torch.round(x.float()), self.spec.qmin, self.spec.qmax)
        if self.packed:
            return pack_codes(q, self.spec)
        return q.to(torch.int8) if self.spec.symmetric else (q - 2 ** (self.spec.bits - 1)).to(torch.int8)

    def decode(self, stored):
        if self.packed:
            return unpack_codes(stored, self.spec).float()
        return stored.float() + (0 if self.spec.symmetric else 2 ** (self.spec.bits - 1))


_FIXED = re.compile(r"^q(\d)\.(\d)$")
FLOAT_DOWNCASTS = ("fp32", "bf16", "fp16")  # short spellings of lrqat_dist.dtypes only
DOWNCAST_NAMES = ("fp32", "bf16", "fp16", "fixed", "q<i>.<f>", "int", "int-packed")


def get_downcast(name: str, spec: QuantSpec) -> Downcast:
    """Parse a downcast name: ``fp32``, ``bf16``, ``fp16``, ``fixed`` (= Q{b}.{8-b} for b-bit weights),
    ``q4.4`` / ``q3.5`` / ``q2.6`` (any Qi.f with i + f = 8 whose range holds the grid), ``int``
    (int8 codes) or ``int-packed`` (two 4-bit / four 2-bit codes per byte)."""
    key = name.lower()
    if key in FLOAT_DOWNCASTS:
        return FloatDowncast(DTYPES[key], key)
    if key in ("int", "int-packed"):
        if key == "int-packed" and spec.bits > 4:
            raise ValueError(f"downcast: 'int-packed' holds 2- to 4-bit codes, got bits={spec.bits}; use 'int'")
        return IntDowncast(spec, key == "int-packed", key)
    if key == "fixed":
        key = f"q{spec.bits}.{8 - spec.bits}"
    m = _FIXED.match(key)
    if not m:
        raise ValueError(f"downcast: unknown operator {name!r}; expected one of {', '.join(DOWNCAST_NAMES)}")
    i, f = int(m.group(1)), int(m.group(2))
    if i + f != 8:
        raise ValueError(f"downcast: {name!r} is not an int8 fixed-point format (integer + fraction bits must be 8)")
    shift = 0 if spec.symmetric else 2 ** (spec.bits - 1)
    lo, hi = (spec.qmin - shift) * 2**f, (spec.qmax - shift) * 2**f
    if lo < -128 or hi > 127:
        raise ValueError(f"downcast: {name!r} cannot hold the {spec.bits}-bit grid [{spec.qmin}, {spec.qmax}]; "
                         f"use 'q{spec.bits}.{8 - spec.bits}' or 'fixed'")
    return FixedPointDowncast(i, f, spec, key)
