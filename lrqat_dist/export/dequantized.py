"""The ``dequantized`` format: a plain HF checkpoint whose quantized linears hold ``s * (q - z)``.

Readable by anything that reads HF checkpoints; no integer information is kept. In fp32 the weights
are ``fold().dequantize()`` exactly. In bf16/fp16 they are generally not representable, so such an
export is refused unless rounding is allowed (then it is counted in the report).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import nn

from ..dtypes import dtype_name, parse_dtype
from ..model import quantized_layers
from .activations import check_carried, model_act_config, write_sidecar
from .exactness import DENSE_ALTERNATIVE, DenseCaster
from .hf_dir import DEFAULT_MAX_SHARD_BYTES, ShardWriter, dense_state_dict, save_config, save_tokenizer, staging_dir
from .verify import ExportReport, check_dense, check_loaded_model, progress

logger = logging.getLogger(__name__)

FORMAT = "dequantized"
ALTERNATIVE = ("Alternatives: dtype float32 (exact), or format 'compressed-tensors' or 'native' (integer codes "
               "plus scales, exact). " + DENSE_ALTERNATIVE)


def export_dequantized(model: nn.Module, out_dir: str | Path, tokenizer=None, *,
                       dtype: str | torch.dtype = torch.float32, allow_rounding: bool = False,
                       verify_load: bool = False, overwrite: bool = False,
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                       drop_activation_quant: bool = False) -> ExportReport:
    """Write a prepared (trained) model as a plain HF checkpoint in ``dtype`` (see the module docstring).

    The prepared model is not modified. Every tensor is read back and compared bit for bit;
    ``verify_load`` also loads it with ``transformers.AutoModelForCausalLM``. A plain HF checkpoint
    carries no activation quantization: a model with some is refused unless ``drop_activation_quant``.
    """
    t0 = time.time()
    dtype = parse_dtype(dtype)
    layers = quantized_layers(model)
    if not layers:
        raise ValueError(f"{FORMAT}: model has no quantized linears; call lrqat_dist.prepare first")
    names = list(layers)
    act_cfg = model_act_config(model)
    act_lost = check_carried(FORMAT, act_cfg, drop_activation_quant)
    cast = DenseCaster(FORMAT, dtype, allow_rounding, ALTERNATIVE)
    report = ExportReport(FORMAT, Path(out_dir), dtype_name(dtype), len(layers))

    with staging_dir(out_dir, overwrite) as stage:
        writer = ShardWriter(stage, max_shard_bytes=max_shard_bytes)
        expected = {k: cast(k, v) for k, v in dense_state_dict(model, names).items()}
        for k, v in expected.items():
            writer.add(k, v)
        for i, (name, layer) in enumerate(layers.items()):
            fw = layer.fold()
            expected[f"{name}.weight"] = cast(f"{name}.weight", fw.dequantize())
            writer.add(f"{name}.weight", expected[f"{name}.weight"])
            if fw.bias is not None:
                expected[f"{name}.bias"] = cast(f"{name}.bias", fw.bias)
                writer.add(f"{name}.bias", expected[f"{name}.bias"])
            progress(logger, "dequantized", i, len(layers))
        writer.close()
        save_config(model, stage, dtype)
        act_note = write_sidecar(stage, FORMAT, act_cfg, act_lost)
        if act_note:
            report.notes.append(act_note)
        report.notes.append(save_tokenizer(tokenizer, stage))
        report.notes.append(cast.log.summary(dtype))

        logger.info("[export] verifying %s", stage)
        report.checks.append(check_dense(stage, expected, label=f"tensors (incl. {len(layers)} weights == "
                                                                f"fold().dequantize() in {dtype_name(dtype)})"))
        if verify_load:
            from transformers import AutoModelForCausalLM

            loaded = AutoModelForCausalLM.from_pretrained(str(stage), dtype=dtype, local_files_only=True)
            dense = {k: v for k, v in expected.items() if k.rpartition(".")[0] not in layers}
            report.checks.append(check_loaded_model(loaded, lambda n: expected[f"{n}.weight"], names, dense,
                                                    "transformers.AutoModelForCausalLM"))
    report.seconds = time.time() - t0
    return report
