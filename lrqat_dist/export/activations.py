"""What each export format carries of a model's activation quantization, and refusing what it cannot.

=====================  =====================================================================
format                 carries
=====================  =====================================================================
native                 everything: the ActQuantConfig (in ``lrqat_native.json``) and static
                       ranges (``activations.safetensors``); ``load_native`` re-attaches it
compressed-tensors     dynamic per-token asymmetric **int8** inputs of the quantized linears
                       (``input_activations: {num_bits: 8, strategy: token, dynamic: true,
                       symmetric: false}``), which transformers and vLLM run. Not: 4-bit
                       activations, static ranges, post-RoPE query/key/value (KV cache)
                       quantization (its ``kv_cache_scheme`` is static per-tensor/head only)
dequantized            nothing (a plain HF checkpoint)
=====================  =====================================================================

A part a format cannot carry makes the export fail with :class:`ExportRefused`, unless the caller
passes ``drop_activation_quant=True`` (tools/export.py ``--drop-activation-quant``); then the export
is written without it, the loss is logged, listed in the report's notes and recorded in
``lrqat_activations.json`` inside the export.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ..methods.act_config import ActQuantConfig
from ..model.activations import activation_quantizers
from ..quant.activation import StaticActQuantizer
from .exactness import ExportRefused

logger = logging.getLogger(__name__)

SIDECAR = "lrqat_activations.json"
DROP_HINT = ("Pass drop_activation_quant=True (tools/export.py --drop-activation-quant) to export the weights "
             "without it (recorded in lrqat_activations.json), or use format 'native', which carries every "
             "activation quantizer.")


def model_act_config(model: nn.Module) -> ActQuantConfig | None:
    """The activation scheme a prepared (or materialized) model runs, or None (weight-only)."""
    cfg = getattr(model, "act_quant_config", None)
    if cfg is None and activation_quantizers(model):
        raise ValueError("model has activation quantizers but no act_quant_config; attach them with "
                         "lrqat_dist.model.activations.apply_activation_quant")
    return cfg


def compressed_tensors_parts(cfg: ActQuantConfig) -> tuple[bool, list[str]]:
    """(inputs of the linears expressible as compressed-tensors ``input_activations``, what is not)."""
    lost = []
    inputs = cfg.bits is not None
    if inputs and cfg.mode != "dynamic":
        lost.append(f"static per-tensor {cfg.static_range} input ranges (only dynamic per-token is written)")
        inputs = False
    elif inputs and cfg.bits != 8:
        lost.append(f"{cfg.bits}-bit linear inputs (dynamic int activations are run at 8 bits only)")
        inputs = False
    if cfg.kv_bits is not None:
        lost.append(f"KV{cfg.kv_bits} {cfg.mode} keys-after-RoPE / values (kv_cache_scheme is static only)")
    if cfg.query_bits is not None:
        lost.append(f"{cfg.query_bits}-bit queries after RoPE (no query quantization in the format)")
    return inputs, lost


def input_activation_args(cfg: ActQuantConfig | None):
    """compressed-tensors ``QuantizationArgs`` of the linears' inputs, or None."""
    from compressed_tensors.quantization import QuantizationArgs

    if cfg is None or not compressed_tensors_parts(cfg)[0]:
        return None
    return QuantizationArgs(num_bits=8, type="int", symmetric=cfg.symmetric, strategy="token", dynamic=True)


def check_carried(fmt: str, cfg: ActQuantConfig | None, drop: bool) -> list[str]:
    """What ``fmt`` loses of ``cfg``; refuses unless ``drop``, else logs it. Returns the lost parts."""
    if cfg is None or fmt == "native":
        return []
    lost = compressed_tensors_parts(cfg)[1] if fmt == "compressed-tensors" else [f"all of {cfg.describe()}"]
    if lost and not drop:
        listed = "\n  - ".join(lost)
        raise ExportRefused(f"{fmt}: cannot express this model's activation quantization ({cfg.describe()}):"
                            f"\n  - {listed}\n{DROP_HINT}")
    for part in lost:
        logger.warning("[export] WARNING: %s drops activation quantization: %s", fmt, part)
    return lost


def write_sidecar(stage: Path, fmt: str, cfg: ActQuantConfig | None, lost: list[str]) -> str | None:
    """Record the activation scheme and what the export dropped of it; returns a report note."""
    if cfg is None:
        return None
    carried = "everything" if not lost else ("nothing" if fmt == "dequantized" else "dynamic int8 linear inputs"
                                             if compressed_tensors_parts(cfg)[0] else "nothing")
    record = {"scheme": asdict(cfg), "description": cfg.describe(), "format": fmt, "carried": carried,
              "dropped": lost}
    (stage / SIDECAR).write_text(json.dumps(record, indent=2) + "\n")
    if lost:
        return f"activation quantization {cfg.describe()}: format carries {carried}; DROPPED: {'; '.join(lost)}"
    return f"activation quantization {cfg.describe()}: carried by the format"


def static_ranges(model: nn.Module) -> dict[str, torch.Tensor]:
    """State of the static activation quantizers (``<name>.scale``, ``<name>.zero_point``), fp32."""
    out = {}
    for name, q in activation_quantizers(model).items():
        if isinstance(q, StaticActQuantizer):
            if not bool(q.calibrated):
                raise ValueError(f"{name}: static activation quantizer not calibrated; nothing to export")
            out[f"{name}.scale"] = q.scale.detach().float().cpu().clone()
            out[f"{name}.zero_point"] = q.zero_point.detach().float().cpu().clone()
    return out


@torch.no_grad()
def load_static_ranges(model: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """Put exported static ranges into freshly attached quantizers (every one must be present)."""
    for name, q in activation_quantizers(model).items():
        if isinstance(q, StaticActQuantizer):
            try:
                q.scale.copy_(state[f"{name}.scale"])
                q.zero_point.copy_(state[f"{name}.zero_point"])
            except KeyError:
                raise KeyError(f"{origin}: no static range for activation quantizer {name}") from None
            q.calibrated.fill_(True)
