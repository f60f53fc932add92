"""Export to the compressed-tensors ``pack-quantized`` / ``int-quantized`` formats (transformers, vLLM).

Weight-only models are written ``pack-quantized``. Per quantized linear ``P``: ``P.weight_packed``
(int32, codes packed along the input dimension), ``P.weight_scale`` (``[out, n_groups]`` in the
export dtype), ``P.weight_shape`` and, asymmetric only, ``P.weight_zero_point`` (packed along the
output dimension). Models whose linear inputs are quantized (dynamic per-token int8) are written
``int-quantized``: ``P.weight`` holds the codes as int8 (one per byte, unpacked) and the zero-point,
if any, is int8 ``[out, n_groups]``; vLLM only matches its int-activation schemes (W4A8 / W8A8 int)
in that format (``pack-quantized`` with ``input_activations`` finds "No compressed-tensors
compatible scheme"). Packing and the decompression used to
verify the files are the *installed* compressed_tensors library's own functions, so the bit layout
(which changed for 3-bit in 2026) is whatever the library that will read the checkpoint expects.

Convention mapping (exact, integer arithmetic): compressed-tensors stores signed codes in
``[-2^(b-1), 2^(b-1)-1]`` for symmetric *and* asymmetric grids and dequantizes ``(q - zp) * s``. Our
symmetric codes are already on that grid; our asymmetric codes ``u`` in ``[0, 2^b-1]`` with integer
zero-point ``z`` become ``u - 2^(b-1)`` and ``z - 2^(b-1)``, which leaves ``q - zp = u - z`` unchanged.

Scales are stored in the export dtype (that is the dtype transformers and vLLM create them in); a
scale that dtype would round is refused (see :func:`lrqat_dist.export.round_scales_`).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import nn

from ..dtypes import dtype_name, parse_dtype
from ..methods import FoldedWeight
from ..model import quantized_layers
from ..quant.affine import QuantSpec
from .activations import check_carried, input_activation_args, model_act_config, write_sidecar
from .exactness import DenseCaster, check_quantized_layers
from .hf_dir import (DEFAULT_MAX_SHARD_BYTES, SafetensorsDir, ShardWriter, dense_state_dict, save_config,
                     save_tokenizer, staging_dir, unquantized_linears)
from .verify import Checker, ExportReport, check_dense, check_loaded_model, progress

logger = logging.getLogger(__name__)

FORMAT = "compressed-tensors"
ALTERNATIVE = ("Alternatives: export with dtype float32 (fp32 scales are exact); or call "
               "lrqat_dist.export.round_scales_(model, dtype) (tools/export.py --round-scales) to make the "
               "model's own scales representable first; or use format 'native' (fp32 scales, any dtype) or "
               "'dequantized' (dense weights; also for non-integer zero-points).")

def _require_ct():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise ImportError("format 'compressed-tensors' needs the compressed-tensors package: "
                          "pip install 'lrqat_dist[export]'") from None


def quantization_args(spec: QuantSpec):
    """The compressed-tensors ``QuantizationArgs`` of one of our grids."""
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=spec.bits, type="int", symmetric=spec.symmetric,
                            strategy="channel" if spec.group_size is None else "group",
                            group_size=spec.group_size, dynamic=False)


def weight_format(input_activations) -> str:
    """``int-quantized`` when the linears' inputs are quantized (what vLLM's W4A8 / W8A8 int schemes
    load), else ``pack-quantized`` (WNA16)."""
    return "pack-quantized" if input_activations is None else "int-quantized"


def build_quantization_config(model: nn.Module, specs: dict[str, QuantSpec], input_activations=None):
    """One config group per distinct grid. A single grid targets every ``Linear`` (the usual form,
    what vLLM expects); the linears left in full precision (``lm_head``...) go to ``ignore``.
    ``input_activations`` (QuantizationArgs or None) goes into every group."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, QuantizationStatus

    by_spec: dict[QuantSpec, list[str]] = {}
    for name, spec in specs.items():
        by_spec.setdefault(spec, []).append(name)
    single = len(by_spec) == 1
    groups = {f"group_{i}": QuantizationScheme(targets=["Linear"] if single else names,
                                               weights=quantization_args(spec), input_activations=input_activations,
                                               format=weight_format(input_activations))
              for i, (spec, names) in enumerate(by_spec.items())}
    return QuantizationConfig(config_groups=groups, format=weight_format(input_activations),
                              quantization_status=QuantizationStatus.COMPRESSED,
                              ignore=unquantized_linears(model, list(specs)))


def _offset(fw: FoldedWeight) -> int:
    return 0 if fw.symmetric else 2 ** (fw.bits - 1)


def pack_layer(fw: FoldedWeight, dtype: torch.dtype, fmt: str = "pack-quantized") -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors (local names) of one folded layer."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    off = _offset(fw)
    spec = fw.spec
    if int(fw.codes.min()) < spec.qmin or int(fw.codes.max()) > spec.qmax:
        raise ValueError(f"codes outside the {fw.bits}-bit grid [{spec.qmin}, {spec.qmax}]")
    if fmt == "int-quantized":
        out = {"weight": (fw.codes - off).to(torch.int8), "weight_scale": fw.scale.to(dtype)}
        if not fw.symmetric:
            out["weight_zero_point"] = (fw.zero_point - off).to(torch.int8)
        return out
    out = {"weight_packed": pack_to_int32((fw.codes - off).to(torch.int8), fw.bits),
           "weight_scale": fw.scale.to(dtype),
           "weight_shape": torch.tensor(list(fw.codes.shape), dtype=torch.int64)}
    if not fw.symmetric:
        out["weight_zero_point"] = pack_to_int32((fw.zero_point - off).to(torch.int8), fw.bits, packed_dim=0)
    return out


def unpack_layer(tensors: dict[str, torch.Tensor], spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Our int32 codes (and zero-point) back from the packed tensors, via the library's own unpacking
    (``int-quantized``: the int8 tensors as they are)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    off = 0 if spec.symmetric else 2 ** (spec.bits - 1)
    if "weight" in tensors:
        zp = tensors.get("weight_zero_point")
        return tensors["weight"].to(torch.int32) + off, None if zp is None else zp.to(torch.int32) + off
    shape = torch.Size(tensors["weight_shape"].tolist())
    codes = unpack_from_int32(tensors["weight_packed"], spec.bits, shape).to(torch.int32) + off
    zp = None
    if not spec.symmetric:
        zp_shape = torch.Size([shape[0], tensors["weight_scale"].shape[1]])
        zp = unpack_from_int32(tensors["weight_zero_point"], spec.bits, zp_shape, packed_dim=0).to(torch.int32) + off
    return codes, zp


def decompress_layer(tensors: dict[str, torch.Tensor], spec: QuantSpec) -> torch.Tensor:
    """The dense weight exactly as the library (hence transformers) decompresses it."""
    from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    scheme = QuantizationScheme(targets=["Linear"], weights=quantization_args(spec))
    compressor = IntQuantizationCompressor if "weight" in tensors else PackedQuantizationCompressor
    return compressor.decompress(dict(tensors), scheme)["weight"]


def export_compressed_tensors(model: nn.Module, out_dir: str | Path, tokenizer=None, *,
                              dtype: str | torch.dtype = torch.float32, allow_rounding: bool = False,
                              verify_load: bool = False, overwrite: bool = False,
                              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                              drop_activation_quant: bool = False) -> ExportReport:
    """Write a prepared (trained) model as a compressed-tensors ``pack-quantized`` HF checkpoint.

    Activation quantization: dynamic per-token int8 inputs of the linears are written as the
    groups' ``input_activations``; anything else of the model's activation scheme is refused unless
    ``drop_activation_quant`` (see :mod:`lrqat_dist.export.activations`).

    ``dtype`` is the model dtype of the checkpoint (dense tensors and scales); load it with the same
    ``dtype``. After writing, every file is read back: codes and zero-points unpacked with the library
    must equal :func:`lrqat_dist.fold`'s, and the library's decompression must give
    ``fold().dequantize()`` (cast to ``dtype``) bit for bit. ``verify_load`` also loads the whole
    checkpoint with ``transformers.AutoModelForCausalLM`` and compares every weight.
    Raises :class:`ExportRefused` (nothing written) if a value cannot be stored exactly.
    """
    _require_ct()
    from compressed_tensors.compressors import ModelCompressor

    t0 = time.time()
    dtype = parse_dtype(dtype)
    layers = quantized_layers(model)
    if not layers:
        raise ValueError(f"{FORMAT}: model has no quantized linears; call lrqat_dist.prepare first")
    check_quantized_layers(layers, FORMAT, dtype, integer_zero_point=True, alternative=ALTERNATIVE)
    names = list(layers)
    act_cfg = model_act_config(model)
    act_lost = check_carried(FORMAT, act_cfg, drop_activation_quant)
    qconfig = build_quantization_config(model, {n: layer.spec for n, layer in layers.items()},
                                        input_activation_args(act_cfg))
    fmt = weight_format(input_activation_args(act_cfg))
    cast = DenseCaster(FORMAT, dtype, allow_rounding)
    report = ExportReport(FORMAT, Path(out_dir), dtype_name(dtype), len(layers))

    with staging_dir(out_dir, overwrite) as stage:
        writer = ShardWriter(stage, max_shard_bytes=max_shard_bytes)
        dense = {k: cast(k, v) for k, v in dense_state_dict(model, names).items()}
        for k, v in dense.items():
            writer.add(k, v)
        for i, (name, layer) in enumerate(layers.items()):
            fw = layer.fold()
            for k, v in pack_layer(fw, dtype, fmt).items():
                writer.add(f"{name}.{k}", v)
            if fw.bias is not None:
                dense[f"{name}.bias"] = cast(f"{name}.bias", fw.bias)
                writer.add(f"{name}.bias", dense[f"{name}.bias"])
            progress(logger, "packed", i, len(layers))
        writer.close()
        save_config(model, stage, dtype)
        ModelCompressor(quantization_config=qconfig).update_config(str(stage))
        report.notes.append(save_tokenizer(tokenizer, stage))
        report.notes.append(cast.log.summary(dtype))
        act_note = write_sidecar(stage, FORMAT, act_cfg, act_lost)
        if act_note:
            report.notes.append(act_note)

        logger.info("[export] verifying %s", stage)
        report.checks.append(_check_config(stage, model, layers, input_activation_args(act_cfg)))
        report.checks.append(check_dense(stage, dense, extra_ok=lambda k: k.rpartition(".")[0] in layers))
        report.checks.append(_check_layers(stage, layers, dtype, fmt))
        if verify_load:
            report.checks.append(_check_transformers_load(stage, layers, dense, dtype))
    report.seconds = time.time() - t0
    return report


def _check_config(stage: Path, model: nn.Module, layers: dict, input_activations=None) -> str:
    """config.json parses with the library and maps every layer to its own grid (and nothing else)."""
    import json

    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus
    from compressed_tensors.utils.match import is_match

    raw = json.loads((stage / "config.json").read_text())["quantization_config"]
    qc = QuantizationConfig.model_validate(raw)
    checker = Checker(f"{stage}/config.json")
    if qc.format != weight_format(input_activations) or qc.quantization_status != QuantizationStatus.COMPRESSED:
        checker.fail(f"format/status are {qc.format}/{qc.quantization_status}")
    probe = nn.Linear(1, 1, device="meta")
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)] + list(layers)
    for name in linears:
        hits = [g for g, scheme in qc.config_groups.items() if is_match(name, probe, scheme.targets, qc.ignore)]
        want = layers[name].spec if name in layers else None
        if want is None and hits:
            checker.fail(f"{name}: full-precision linear matched by {hits}")
        elif want is not None:
            if len(hits) != 1:
                checker.fail(f"{name}: matched by {len(hits)} config groups")
                continue
            w = qc.config_groups[hits[0]].weights
            got = QuantSpec(w.num_bits, w.symmetric, w.group_size if w.strategy == "group" else None)
            if got != want:
                checker.fail(f"{name}: config says {got}, model has {want}")
            if qc.config_groups[hits[0]].input_activations != input_activations:
                checker.fail(f"{name}: input_activations {qc.config_groups[hits[0]].input_activations} "
                             f"!= {input_activations}")
    return checker.finish(f"config.json: quantization_config parses with compressed_tensors and maps "
                          f"{len(layers)} layers to their grids, {len(linears) - len(layers)} linears ignored")


def _check_layers(stage: Path, layers: dict, dtype: torch.dtype, fmt: str = "pack-quantized") -> str:
    files = SafetensorsDir(stage)
    checker = Checker(f"{stage}: quantized layers")
    for i, (name, layer) in enumerate(layers.items()):
        fw = layer.fold()
        keys = (["weight", "weight_scale"] if fmt == "int-quantized" else
                ["weight_packed", "weight_scale", "weight_shape"]) + ([] if fw.symmetric else ["weight_zero_point"])
        tensors = {k: files.get(f"{name}.{k}") for k in keys}
        codes, zp = unpack_layer(tensors, fw.spec)
        checker.tensor(f"{name} codes", codes, fw.codes)
        if zp is not None:
            checker.tensor(f"{name} zero-point", zp, fw.zero_point)
        checker.tensor(f"{name} scale", tensors["weight_scale"].float(), fw.scale)
        checker.tensor(f"{name} dequantized", decompress_layer(tensors, fw.spec), fw.dequantize().to(dtype))
        progress(logger, "verified", i, len(layers))
    return checker.finish(f"{len(layers)} layers ({fmt}): codes/zero-points read with compressed_tensors equal "
                          f"fold(), scales exact, library decompression == fold().dequantize() "
                          f"({dtype_name(dtype)}) bit for bit")


def _check_transformers_load(stage: Path, layers: dict, dense: dict, dtype: torch.dtype) -> str:
    asym = any(not layer.spec.symmetric for layer in layers.values())
    loaded = load_compressed_tensors(stage, dtype)
    expected = {n: layer.fold().dequantize().to(dtype) for n, layer in layers.items()}
    how = ("transformers.AutoModelForCausalLM with CompressedTensorsConfig(dequantize=True) (asymmetric)" if asym
           else "transformers.AutoModelForCausalLM")
    return check_loaded_model(loaded, expected.__getitem__, list(layers), dense, how)


def load_compressed_tensors(path: str | Path, dtype: str | torch.dtype = torch.float32,
                            dequantize: bool | None = None) -> nn.Module:
    """Load a compressed-tensors checkpoint with transformers on CPU, decompressed to dense weights.

    ``dequantize=None`` picks the loading route: symmetric checkpoints take transformers' default
    route (weights decompressed on the first forward, which this function runs); asymmetric ones
    need ``CompressedTensorsConfig(dequantize=True)``, because the default route of transformers 5 +
    compressed-tensors 0.20 allocates ``weight_zero_point`` unpacked and rejects the packed tensor
    the format specifies (upstream: vllm-project/llm-compressor#1618). Both give the same weights.
    """
    import json

    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    path, dtype = Path(path), parse_dtype(dtype)
    raw = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    if raw.get("quant_method") != "compressed-tensors":
        raise ValueError(f"{path}: config.json has no compressed-tensors quantization_config")
    if dequantize is None:
        dequantize = any(not (g.get("weights") or {}).get("symmetric", True)
                         for g in raw.get("config_groups", {}).values() if isinstance(g, dict))
    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True, **kwargs)
    if not dequantize:
        with torch.no_grad():  # the default route decompresses on the first forward
            model(input_ids=torch.zeros(1, 1, dtype=torch.long))
    return model.eval()
