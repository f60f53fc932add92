"""Activation fake-quantizers: quantize-dequantize of inputs, keys, values and queries (A8, A4, KV4 ...).

Two kinds, asymmetric on the unsigned grid ``[0, 2^b - 1]`` with an integer zero-point and a
range that always contains 0 (so zero, e.g. padding, is exact; the compressed-tensors convention),
or (``symmetric=True``) on the signed grid ``[-2^(b-1), 2^(b-1) - 1]`` with
``s = max|x| / ((2^b - 1) / 2)`` and no zero-point, compressed-tensors' symmetric formula, which is
what vLLM's int8-activation kernels (W4A8 / W8A8 int) run:

- :class:`DynamicActQuantizer` (default, the LR-QAT / LLM-QAT setting): per token, min-max of each
  token's values at run time, nothing learned::

      lo = min(min(x), 0), hi = max(max(x), 0)        over the reduced dims (e.g. the hidden dim)
      s  = (hi - lo) / (2^b - 1),  z = clip(round(-lo / s), 0, 2^b - 1)
      x_hat = s * (clip(round(x / s) + z, 0, 2^b - 1) - z)

  ``s`` and ``z`` are statistics of ``x`` and are treated as constants in backward (straight-through
  estimator: gradient 1 where the code is not clipped, 0 where it is).

- :class:`StaticActQuantizer`: one range per tensor (asymmetric, or ``symmetric`` as above), fixed
  before use by :meth:`calibrate` (min-max
  over calibration batches). ``learned=True`` makes the scale an fp32 ``nn.Parameter`` trained with
  LSQ's gradient (``q - z - x/s`` inside the range, ``qmin - z`` / ``qmax - z`` outside); the
  zero-point stays the calibrated integer buffer.

``round(x / s) + z`` (not ``round(x / s + z)``): ``z`` is an integer, so both give the same codes in
exact arithmetic, and this order keeps the fp32 rounding independent of where the grid is shifted.
"""
from __future__ import annotations

import torch
from torch import nn

from .affine import round_ste

ACT_BITS = (4, 8)


def _check_bits(bits: int, what: str) -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in ACT_BITS:
        raise ValueError(f"{what}: expected one of {ACT_BITS} activation bits, got {bits!r}")
    return bits


def act_grid(bits: int, symmetric: bool = False) -> tuple[int, int]:
    """``(qmin, qmax)`` of an activation grid: ``[0, 2^b - 1]`` or, symmetric, ``[-2^(b-1), 2^(b-1) - 1]``."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def minmax_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero-point (as float) of the ``bits`` grid covering ``[lo, hi]`` and 0.

    Symmetric: ``s = max(|lo|, |hi|) / ((2^b - 1) / 2)`` (compressed-tensors' formula) and z = 0."""
    qmax = 2**bits - 1
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    if symmetric:
        scale = torch.maximum(-lo, hi) / (qmax / 2)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, torch.zeros_like(scale)
    scale = (hi - lo) / qmax
    # An all-zero token has range 0: any scale gives exact zeros, 1 avoids 0/0.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero_point = torch.clamp(torch.round(-lo / scale), 0, qmax)
    return scale, zero_point


def fake_quant_act(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
                   symmetric: bool = False) -> torch.Tensor:
    """``s * (clip(round_ste(x / s) + z, qmin, qmax) - z)``; gradients to ``x`` (STE) and ``scale`` (LSQ)."""
    qmin, qmax = act_grid(bits, symmetric)
    q = torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


class DynamicActQuantizer(nn.Module):
    """Per-token (or per-``reduce_dims`` slice) min-max fake quantization (asymmetric, or ``symmetric``
    on the signed grid); no state.

    ``reduce_dims``: the dims one range covers, e.g. ``(-1,)`` for a linear's input ``[..., hidden]``
    (one range per token), ``(1, 3)`` for keys ``[batch, heads, tokens, head_dim]`` (one range per
    token over all heads) or ``(3,)`` (per token and head).
    """

    def __init__(self, bits: int, reduce_dims: tuple[int, ...] = (-1,), symmetric: bool = False):
        super().__init__()
        self.bits = _check_bits(bits, "bits")
        self.reduce_dims = tuple(reduce_dims)
        self.symmetric = bool(symmetric)

    def qparams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xf = x.detach().float()
        return minmax_qparams(torch.amin(xf, self.reduce_dims, keepdim=True),
                              torch.amax(xf, self.reduce_dims, keepdim=True), self.bits, self.symmetric)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, zp = self.qparams(x)
        # Computed in fp32 whatever x's dtype: the grid position of a bf16 value is exact in fp32.
        return fake_quant_act(x.float(), scale, zp, self.bits, self.symmetric).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"A{self.bits} dynamic per-token {'sym' if self.symmetric else 'asym'}, "
                f"reduce_dims={self.reduce_dims}")


class StaticActQuantizer(nn.Module):
    """Per-tensor asymmetric fake quantization with a calibrated range; scale learned (LSQ) if ``learned``.

    ``scale`` is an fp32 Parameter of shape ``[1]`` (shardable by FSDP2 / ZeRO like the weight
    scales; a name ending in ``.scale`` puts it in the optimizer's scale group), ``zero_point`` an
    integer-valued fp32 buffer. Using it before :meth:`calibrate` (or loading calibrated values) is
    an error: a default range would silently quantize to garbage.
    """

    def __init__(self, bits: int, learned: bool = True, name: str = "<activation>", symmetric: bool = False):
        super().__init__()
        self.bits, self.learned, self.name = _check_bits(bits, "bits"), learned, name
        self.symmetric = bool(symmetric)
        self.scale = nn.Parameter(torch.ones(1, dtype=torch.float32), requires_grad=learned)
        self.register_buffer("zero_point", torch.zeros(1, dtype=torch.float32))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))
        self._observed: tuple[torch.Tensor, torch.Tensor] | None = None

    def observe(self, x: torch.Tensor) -> None:
        """Accumulate the running min / max of ``x`` (call over calibration batches, then :meth:`calibrate`)."""
        xf = x.detach().float()
        lo, hi = xf.amin().reshape(1), xf.amax().reshape(1)
        if self._observed is not None:
            lo, hi = torch.minimum(lo, self._observed[0]), torch.maximum(hi, self._observed[1])
        self._observed = (lo, hi)

    @torch.no_grad()
    def calibrate(self, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None) -> None:
        """Set scale and zero-point from ``[lo, hi]`` (default: what :meth:`observe` saw)."""
        if lo is None or hi is None:
            if self._observed is None:
                raise RuntimeError(f"{self.name}: calibrate() without a range and nothing observed")
            lo, hi = self._observed
        scale, zp = minmax_qparams(lo.float().reshape(1), hi.float().reshape(1), self.bits, self.symmetric)
        self.scale.copy_(scale.to(self.scale.device))
        self.zero_point.copy_(zp.to(self.zero_point.device))
        self.calibrated.fill_(True)
        self._observed = None

    @property
    def observed(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self._observed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.calibrated):
            raise RuntimeError(f"{self.name}: static activation quantizer used before calibration; run "
                               f"lrqat_dist.model.activations.calibrate_activations(model, batches) first")
        return fake_quant_act(x.float(), self.scale, self.zero_point, self.bits, self.symmetric).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"A{self.bits} static per-tensor {'sym' if self.symmetric else 'asym'}, "
                f"{'learned' if self.learned else 'calibrated'} scale")
