"""What a format can store exactly, and refusing what it cannot.

Export never changes a value silently. The integer part of a quantized layer (codes, scale,
zero-point) must be stored exactly or the export is refused with :class:`ExportRefused`, whose
message names a format that can hold it. Dense tensors (embeddings, norms, ``lm_head``, biases, and
the dequantized weights of the ``dequantized`` format) are cast to the export dtype; a cast that
changes any value is refused unless the caller allows rounding, and is then counted in the report.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..dtypes import dtype_name
from ..methods import QuantLinear

MAX_LISTED = 8
DENSE_ALTERNATIVE = ("Export with dtype float32, or accept rounding of the dense tensors with allow_rounding=True "
                     "(tools/export.py --allow-rounding).")


class ExportRefused(ValueError):
    """The chosen format (or dtype) cannot store this model exactly; the message names an alternative."""


def _refuse(fmt: str, problems: list[str], alternative: str) -> None:
    if not problems:
        return
    listed = "\n  - ".join(problems[:MAX_LISTED])
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    raise ExportRefused(f"{fmt}: cannot store this model exactly:\n  - {listed}{more}\n{alternative}")


OFFSET_ALTERNATIVE = ("Use format 'native' (stores DL-QAT's float offset m*b in fp32, exactly) or 'dequantized' "
                      "(dense weights (m*s) q + m*b); changing the offset to an integer zero-point would change "
                      "the model's values.")


def check_quantized_layers(layers: dict[str, QuantLinear], fmt: str, scale_dtype: torch.dtype,
                           integer_zero_point: bool, alternative: str, float_offset: bool = False) -> None:
    """Refuse non-finite scales, scales that ``scale_dtype`` would round, (when the format needs
    them) zero-points that are not integers on the layer's grid, and float offsets (DL-QAT) unless
    the format stores them (``float_offset``)."""
    problems = []
    offsets = [n for n, layer in layers.items() if layer.offset_tensor() is not None]
    if offsets and not float_offset:
        _refuse(fmt, [f"{n}: float offset m*b (DL-QAT) has no integer zero-point form" for n in offsets],
                OFFSET_ALTERNATIVE)
    for name, layer in layers.items():
        s = layer.scale_tensor().detach().float()
        if not bool(torch.isfinite(s).all()):
            problems.append(f"{name}: non-finite scale (the training diverged?)")
            continue
        if scale_dtype != torch.float32:
            bad = s.to(scale_dtype).float() != s
            if bool(bad.any()):
                rel = ((s.to(scale_dtype).float() - s).abs() / s.abs().clamp_min(1e-30)).max().item()
                problems.append(f"{name}: {int(bad.sum())}/{s.numel()} scales would be rounded by "
                                f"{dtype_name(scale_dtype)} (max relative change {rel:.2e})")
        zp = layer.zero_point_tensor
        if zp is not None and integer_zero_point:
            if zp.is_floating_point() and not bool((zp == zp.round()).all()):
                problems.append(f"{name}: non-integer zero-point")
            elif int(zp.min()) < layer.spec.qmin or int(zp.max()) > layer.spec.qmax:
                problems.append(f"{name}: zero-point outside [{layer.spec.qmin}, {layer.spec.qmax}]")
    _refuse(fmt, problems, alternative)


@dataclass
class RoundingLog:
    """Dense values changed by the cast to the export dtype (only when rounding was allowed)."""

    tensors: int = 0
    values: int = 0
    max_abs_change: float = 0.0

    def summary(self, dtype: torch.dtype) -> str:
        if not self.tensors:
            return f"dense tensors: cast to {dtype_name(dtype)} without changing any value"
        return (f"dense tensors: {self.values} values in {self.tensors} tensors rounded by the cast to "
                f"{dtype_name(dtype)} (allowed; max abs change {self.max_abs_change:.3e})")


class DenseCaster:
    """Casts dense tensors to the export dtype; refuses (or, if allowed, logs) any value it changes."""

    def __init__(self, fmt: str, dtype: torch.dtype, allow_rounding: bool, alternative: str = DENSE_ALTERNATIVE):
        self.fmt, self.dtype, self.allow_rounding, self.alternative = fmt, dtype, allow_rounding, alternative
        self.log = RoundingLog()

    def __call__(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point() or t.dtype == self.dtype:
            return t
        y = t.to(self.dtype)
        changed = y.to(t.dtype) != t
        if bool(changed.any()):
            if not self.allow_rounding:
                _refuse(self.fmt, [f"{name}: {int(changed.sum())}/{t.numel()} values ({dtype_name(t.dtype)}) "
                                   f"would be rounded by {dtype_name(self.dtype)}"], self.alternative)
            self.log.tensors += 1
            self.log.values += int(changed.sum())
            self.log.max_abs_change = max(self.log.max_abs_change, (y.to(t.dtype) - t).abs().max().item())
        return y


@torch.no_grad()
def round_scales_(model: torch.nn.Module, dtype: str | torch.dtype) -> str:
    """Round the scales of every quantized layer to values ``dtype`` represents (in place, kept fp32).

    This *changes the model* (codes stay; each scale moves by at most half a ``dtype`` ulp), so that
    a half-precision compressed-tensors export can then store it exactly. Returns a one-line summary.
    """
    from ..model import quantized_layers
    from ..dtypes import parse_dtype

    dtype = parse_dtype(dtype)
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("round_scales_: model has no quantized linears")
    changed, total, max_rel = 0, 0, 0.0
    for name, layer in layers.items():
        s = layer.scale_tensor()
        if not isinstance(s, torch.nn.Parameter):
            raise TypeError(f"round_scales_: {name}.scale_tensor() is not a stored parameter; cannot round it")
        r = s.data.to(dtype).float()
        changed += int((r != s.data).sum())
        total += s.numel()
        max_rel = max(max_rel, ((r - s.data).abs() / s.data.abs().clamp_min(1e-30)).max().item())
        s.data.copy_(r)
    return (f"rounded {changed}/{total} scales of {len(layers)} layers to {dtype_name(dtype)} "
            f"(max relative change {max_rel:.2e})")
