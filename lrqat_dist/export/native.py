"""The ``native`` format: our integer checkpoint as it is, plus a loader.

Directory layout::

    config.json, generation_config.json, tokenizer files   (plain HF, no quantization_config)
    model.safetensors          dense tensors (embeddings, norms, lm_head, biases) in the export dtype
    quantized.safetensors      per quantized linear P: P.qweight  uint8 codes (packed: 2- to 4-bit
                               codes by lrqat_dist.quant.bitpack, low bits first; 5- to 8-bit: one
                               code per byte), stored unsigned as q - qmin
                               P.scale  fp32 [out, n_groups];  P.zero_point  int32 (asymmetric only)
                               P.offset  fp32 [out, n_groups] (DL-QAT's float offset m*b only)
    lrqat_native.json          format version, export dtype, and per layer: bits, group_size,
                               symmetric, shape, storage ("packed" | "uint8"); the activation
                               quantization (ActQuantConfig) and the linears whose inputs it covers
    activations.safetensors    static activation ranges (<quantizer>.scale, .zero_point), if any

Scales stay fp32 whatever the export dtype, so any trained model is stored exactly;
:func:`read_native` returns the :class:`~lrqat_dist.FoldedWeight` s bit for bit and
:func:`load_native` a runnable HF model whose linears hold ``FoldedWeight.dequantize()``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..dtypes import dtype_name, parse_dtype
from ..methods import FoldedWeight
from ..model import quantized_layers
from ..model.activations import INPUT_QUANTIZER
from ..quant.affine import QuantSpec
from ..quant.bitpack import codes_per_byte, pack_codes, unpack_codes
from .activations import load_static_ranges, model_act_config, static_ranges, write_sidecar
from .exactness import DenseCaster, check_quantized_layers
from .hf_dir import (DEFAULT_MAX_SHARD_BYTES, SafetensorsDir, ShardWriter, dense_state_dict, save_config,
                     save_tokenizer, staging_dir)
from .verify import Checker, ExportReport, check_dense, check_loaded_model, progress

logger = logging.getLogger(__name__)

FORMAT = "native"
FORMAT_ID = "lrqat_dist-native"
VERSION = 1
META_FILE = "lrqat_native.json"
QUANT_BASENAME = "quantized"
ACT_FILE = "activations.safetensors"
ALTERNATIVE = "Alternative: format 'dequantized' (dense weights s * (q - z) in fp32)."


def _storage(spec: QuantSpec, in_features: int) -> str:
    if spec.bits <= 4 and in_features % codes_per_byte(spec.bits) == 0:
        return "packed"
    return "uint8"


def encode_codes(codes: torch.Tensor, spec: QuantSpec, storage: str) -> torch.Tensor:
    if storage == "packed":
        return pack_codes(codes, spec)
    return (codes - spec.qmin).to(torch.uint8)


def decode_codes(stored: torch.Tensor, spec: QuantSpec, storage: str) -> torch.Tensor:
    if storage == "packed":
        return unpack_codes(stored, spec).to(torch.int32)
    if storage == "uint8":
        return stored.to(torch.int32) + spec.qmin
    raise ValueError(f"native: unknown code storage {storage!r}")


def export_native(model: nn.Module, out_dir: str | Path, tokenizer=None, *,
                  dtype: str | torch.dtype = torch.float32, allow_rounding: bool = False,
                  verify_load: bool = False, overwrite: bool = False,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, drop_activation_quant: bool = False) -> ExportReport:
    """Write a prepared (trained) model in the ``native`` format (see the module docstring).

    The format carries activation quantization completely (``drop_activation_quant`` is accepted
    for a uniform signature and has nothing to drop).

    ``dtype`` applies to the dense tensors only; codes, fp32 scales and zero-points are stored as
    :func:`lrqat_dist.fold` gives them. The files are read back and compared bit for bit with
    ``fold()``; ``verify_load`` also runs :func:`load_native` and compares every weight.
    """
    t0 = time.time()
    dtype = parse_dtype(dtype)
    layers = quantized_layers(model)
    if not layers:
        raise ValueError(f"{FORMAT}: model has no quantized linears; call lrqat_dist.prepare first")
    check_quantized_layers(layers, FORMAT, torch.float32, integer_zero_point=True, alternative=ALTERNATIVE,
                           float_offset=True)
    names = list(layers)
    cast = DenseCaster(FORMAT, dtype, allow_rounding)
    report = ExportReport(FORMAT, Path(out_dir), dtype_name(dtype), len(layers))
    qat = getattr(model, "qat_config", None)
    meta = {"format": FORMAT_ID, "version": VERSION, "dtype": dtype_name(dtype),
            "qat_config": asdict(qat) if is_dataclass(qat) else None, "layers": {}}
    act_cfg = model_act_config(model)
    act_state = static_ranges(model) if act_cfg is not None else {}
    meta["activations"] = None if act_cfg is None else asdict(act_cfg)
    meta["activation_inputs"] = [n for n, m in model.named_modules() if hasattr(m, INPUT_QUANTIZER)]

    with staging_dir(out_dir, overwrite) as stage:
        dense = {k: cast(k, v) for k, v in dense_state_dict(model, names).items()}
        quant = ShardWriter(stage, QUANT_BASENAME, max_shard_bytes)
        for i, (name, layer) in enumerate(layers.items()):
            fw = layer.fold()
            storage = _storage(fw.spec, layer.in_features)
            quant.add(f"{name}.qweight", encode_codes(fw.codes, fw.spec, storage))
            quant.add(f"{name}.scale", fw.scale)
            if fw.zero_point is not None:
                quant.add(f"{name}.zero_point", fw.zero_point)
            if fw.offset is not None:
                quant.add(f"{name}.offset", fw.offset)
            if fw.bias is not None:
                dense[f"{name}.bias"] = cast(f"{name}.bias", fw.bias)
            meta["layers"][name] = {"bits": fw.bits, "group_size": fw.group_size, "symmetric": fw.symmetric,
                                    "shape": list(fw.codes.shape), "storage": storage,
                                    "offset": fw.offset is not None}
            progress(logger, "encoded", i, len(layers))
        quant.close()
        writer = ShardWriter(stage, "model", max_shard_bytes)
        for k, v in dense.items():
            writer.add(k, v)
        writer.close()
        (stage / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        save_config(model, stage, dtype)
        if act_state:
            save_file(act_state, str(stage / ACT_FILE))
        act_note = write_sidecar(stage, FORMAT, act_cfg, [])
        if act_note:
            report.notes.append(act_note)
        report.notes.append(save_tokenizer(tokenizer, stage))
        report.notes.append(cast.log.summary(dtype))

        logger.info("[export] verifying %s", stage)
        report.checks.append(check_dense(stage, dense))
        report.checks.append(_check_layers(stage, layers))
        if verify_load:
            loaded = load_native(stage)
            expected = lambda n: layers[n].fold().dequantize().to(dtype)  # noqa: E731
            report.checks.append(check_loaded_model(loaded, expected, names, dense, "lrqat_dist.export.load_native"))
    report.seconds = time.time() - t0
    return report


def _check_layers(stage: Path, layers: dict) -> str:
    checker = Checker(f"{stage}: quantized layers")
    folded = read_native(stage)
    if set(folded) != set(layers):
        checker.fail(f"layers on disk differ from the model's: {sorted(set(folded) ^ set(layers))[:5]}")
    for name, layer in layers.items():
        if name not in folded:
            continue
        want, got = layer.fold(), folded[name]
        checker.tensor(f"{name} codes", got.codes, want.codes)
        checker.tensor(f"{name} scale", got.scale, want.scale)
        if want.zero_point is not None or got.zero_point is not None:
            if want.zero_point is None or got.zero_point is None:
                checker.fail(f"{name}: zero-point present on one side only")
            else:
                checker.tensor(f"{name} zero-point", got.zero_point, want.zero_point)
        if got.spec != want.spec:
            checker.fail(f"{name}: grid on disk {got.spec} != model {want.spec}")
        if (want.offset is None) != (got.offset is None):
            checker.fail(f"{name}: float offset present on one side only")
        elif want.offset is not None:
            checker.tensor(f"{name} offset", got.offset, want.offset)
        checker.tensor(f"{name} dequantized", got.dequantize(), want.dequantize())
    return checker.finish(f"{len(layers)} layers read back: codes, fp32 scales, zero-points and "
                          f"dequantize() identical to fold()")


def read_native_meta(path: str | Path) -> dict:
    path = Path(path)
    meta_file = path / META_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path}: not a native export (no {META_FILE})")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT_ID or meta.get("version") != VERSION:
        raise ValueError(f"{meta_file}: format {meta.get('format')!r} version {meta.get('version')!r}; this "
                         f"lrqat_dist reads {FORMAT_ID!r} version {VERSION}")
    return meta


def read_native(path: str | Path) -> dict[str, FoldedWeight]:
    """The integer checkpoint of a native export: ``{layer name: FoldedWeight}`` (biases not included)."""
    meta = read_native_meta(path)
    files = SafetensorsDir(path, QUANT_BASENAME)
    out = {}
    for name, info in meta["layers"].items():
        spec = QuantSpec(info["bits"], info["symmetric"], info["group_size"])
        codes = decode_codes(files.get(f"{name}.qweight"), spec, info["storage"])
        if list(codes.shape) != info["shape"]:
            raise ValueError(f"{path}: {name} codes have shape {list(codes.shape)}, metadata says {info['shape']}")
        zp = None if spec.symmetric else files.get(f"{name}.zero_point")
        offset = files.get(f"{name}.offset") if info.get("offset") else None
        out[name] = FoldedWeight(codes=codes, scale=files.get(f"{name}.scale"), zero_point=zp, bits=spec.bits,
                                 group_size=spec.group_size, offset=offset)
    return out


@contextlib.contextmanager
def _quiet_transformers():
    # The quantized linears' weights are absent from model.safetensors by design; transformers would
    # report them as "newly initialized", which is misleading here (they are filled in right after).
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


@torch.no_grad()
def load_native(path: str | Path, dtype: str | torch.dtype | None = None) -> nn.Module:
    """Load a native export as a runnable HF model (CPU) whose quantized linears are plain
    ``nn.Linear`` s holding ``FoldedWeight.dequantize()`` cast to ``dtype`` (default: the export dtype),
    with the export's activation quantizers attached (lrqat_dist.model.activations)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    meta = read_native_meta(path)
    dtype = parse_dtype(dtype or meta["dtype"])
    with _quiet_transformers():
        model, info = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True,
                                                           output_loading_info=True)
    expected_missing = {f"{n}.weight" for n in meta["layers"]}
    missing = set(info.get("missing_keys", []))
    if missing != expected_missing:
        odd = sorted(missing ^ expected_missing)[:5]
        raise ValueError(f"{path}: model.safetensors does not match the native layout (unexpected "
                         f"missing/present weights: {odd})")
    for name, fw in read_native(path).items():
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear) or tuple(linear.weight.shape) != tuple(fw.codes.shape):
            raise ValueError(f"{path}: {name} is not an nn.Linear of shape {tuple(fw.codes.shape)} in the model")
        linear.weight.copy_(fw.dequantize().to(dtype))
    if meta.get("activations"):  # re-attach the activation quantization the model was trained with
        from ..methods.act_config import ActQuantConfig
        from ..model.activations import apply_activation_quant

        apply_activation_quant(model, ActQuantConfig.from_value(meta["activations"]), meta["activation_inputs"])
        if (path / ACT_FILE).is_file():
            load_static_ranges(model, load_file(str(path / ACT_FILE)), str(path / ACT_FILE))
    return model.eval()
