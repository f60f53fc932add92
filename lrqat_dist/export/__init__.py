"""Exporting a trained (prepared) model: integer checkpoints that load without lrqat_dist's training code.

    from lrqat_dist.export import export_model
    report = export_model(model, "out/ct", format="compressed-tensors", tokenizer=tok)
    print(report.summary())

Formats: ``compressed-tensors`` (pack-quantized, or int-quantized with int8 inputs; transformers
and vLLM), ``native`` (our packed codes + fp32 scales, :func:`load_native`), ``dequantized`` (plain
HF weights), ``gguf`` (one file for llama.cpp / Ollama: the trained grid in Q4_0/Q5_0/Q8_0/Q4_1/Q5_1
blocks, fp16 scales; ``out_dir`` is then the file). Every export is read back and compared bit for
bit with :func:`lrqat_dist.fold` before it is put in place; what a format cannot store exactly is
refused with :class:`ExportRefused`. Which runtime serves what: :mod:`lrqat_dist.export.serving`.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from .compressed_tensors import export_compressed_tensors, load_compressed_tensors
from .dequantized import export_dequantized
from .exactness import ExportRefused, round_scales_
from .gguf import export_gguf
from .native import export_native, load_native, read_native
from .verify import ExportReport, ExportVerificationError

EXPORTERS = {"compressed-tensors": export_compressed_tensors, "native": export_native,
             "dequantized": export_dequantized, "gguf": export_gguf}


def export_model(model: nn.Module, out_dir: str | Path, format: str, tokenizer=None, **kwargs) -> ExportReport:
    """Export with the named format; ``kwargs`` go to the format's function (``dtype``, ``allow_rounding``,
    ``verify_load``, ``overwrite``, ``max_shard_bytes``, ``drop_activation_quant``). Progress goes to the
    ``lrqat_dist.export.*`` loggers."""
    if format not in EXPORTERS:
        raise ValueError(f"format: unknown {format!r}; expected one of {', '.join(EXPORTERS)}")
    return EXPORTERS[format](model, out_dir, tokenizer, **kwargs)


__all__ = ["export_model", "export_compressed_tensors", "export_native", "export_dequantized", "load_native",
           "read_native", "load_compressed_tensors", "export_gguf", "round_scales_", "ExportRefused", "ExportReport",
           "ExportVerificationError", "EXPORTERS"]
