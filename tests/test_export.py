"""Export: compressed-tensors / native / dequantized checkpoints of a briefly trained tiny LLaMA.

Tolerance: every comparison here is exact (bitwise weights, logits max |diff| == 0 in fp32). The
transformers route decompresses with the same ``(q - zp) * s`` in the scale dtype, so it is bit-exact
too; should a future version reorder that arithmetic, the logits check is the one to relax.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import lrqat_dist
from lrqat_dist.export import (ExportRefused, export_compressed_tensors, export_dequantized, export_native,
                               load_compressed_tensors, load_native, read_native, round_scales_)
from lrqat_dist.export.compressed_tensors import pack_layer
from lrqat_dist.export.verify import same_bits

from conftest import tiny_config

pytest.importorskip("compressed_tensors")
TOKENIZER = Path(__file__).parent / "fixtures" / "lm_eval_task" / "byte_tokenizer"
VOCAB = 260  # the byte tokenizer's 258 ids, padded


def trained_tiny(bits, group_size, symmetric, steps=2, seed=0, **overrides):
    """A tiny LLaMA prepared with LR-QAT, its adapters made non-zero (random lora_B: at 8 bits the
    default fixed-point Phi0 has no fraction, so a few small steps would not move a code) and then
    trained for a few AdamW steps (A, B and the scales all move)."""
    model = lrqat_dist.load_causal_lm(config=tiny_config(vocab_size=VOCAB, **overrides), seed=seed)
    cfg = lrqat_dist.QATConfig(bits=bits, group_size=group_size, symmetric=symmetric, rank=4,
                               range_init="minmax")
    lrqat_dist.prepare(model, cfg)
    rtn = {n: f.codes.clone() for n, f in lrqat_dist.fold(model).items()}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.copy_(8 * torch.randn(p.shape, generator=g))  # ~0.3 code steps (std) of B@A
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (2, 32), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    changed = sum(int((f.codes != rtn[n]).sum()) for n, f in lrqat_dist.fold(model).items())
    assert changed > 0, "no code moved off RTN: the test would not exercise trained adapters"
    return model.eval()


def packed_words(in_features: int, bits: int) -> int:
    """int32 words per row of the installed library's layout: dense from compressed-tensors 0.20 on
    (3-bit codes straddle words), 32 // bits whole codes per word before (0.17-0.19)."""
    import compressed_tensors
    from packaging.version import Version

    if Version(compressed_tensors.__version__) >= Version("0.20") or 32 % bits == 0:
        return -(-in_features * bits // 32)
    return -(-in_features // (32 // bits))


def logits(model, seed=1):
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


GRID = [(b, g, s) for b in (2, 3, 4, 8) for g in (None, 32) for s in (True, False)]


@pytest.mark.parametrize("bits,group_size,symmetric", GRID,
                         ids=[f"w{b}-{'g' + str(g) if g else 'ch'}-{'sym' if s else 'asym'}" for b, g, s in GRID])
def test_compressed_tensors_loads_in_transformers(tmp_path, bits, group_size, symmetric):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    model = trained_tiny(bits, group_size, symmetric)
    export_compressed_tensors(model, tmp_path / "ct")  # checks the files itself (see verify.py)

    # The packed tensors round-trip through the library's own unpacking to our codes / zero-points.
    folded = lrqat_dist.fold(model)
    off = 0 if symmetric else 2 ** (bits - 1)
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as f:
        for name, fw in folded.items():
            packed = f.get_tensor(f"{name}.weight_packed")
            assert packed.dtype == torch.int32 and packed.shape[1] == packed_words(fw.codes.shape[1], bits)
            codes = unpack_from_int32(packed, bits, torch.Size(fw.codes.shape)).to(torch.int32) + off
            assert torch.equal(codes, fw.codes)
            assert same_bits(f.get_tensor(f"{name}.weight_scale"), fw.scale)
            if not symmetric:
                zp = unpack_from_int32(f.get_tensor(f"{name}.weight_zero_point"), bits,
                                       torch.Size(fw.scale.shape), packed_dim=0).to(torch.int32) + off
                assert torch.equal(zp, fw.zero_point)

    # transformers, CPU, fp32: weights and logits identical to the training-time model's.
    loaded = load_compressed_tensors(tmp_path / "ct", torch.float32)
    for name, fw in folded.items():
        assert same_bits(loaded.get_submodule(name).weight, fw.dequantize()), name
    assert torch.equal(logits(loaded), logits(model))
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert config["format"] == "pack-quantized" and config["ignore"] == ["lm_head"]
    assert (weights["num_bits"], weights["symmetric"], weights["strategy"]) == (
        bits, symmetric, "group" if group_size else "channel")


@pytest.mark.parametrize("bits,symmetric", [(4, True), (3, False)])
def test_library_compressor_packs_the_same_bits(bits, symmetric):
    """Our packing equals what compressed_tensors' own compressor writes for the dequantized weight."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    from lrqat_dist.export.compressed_tensors import quantization_args

    model = trained_tiny(bits, 32, symmetric)
    for name, fw in list(lrqat_dist.fold(model).items())[:3]:
        ours = pack_layer(fw, torch.float32)
        off = 0 if symmetric else 2 ** (bits - 1)
        sd = {"weight": fw.dequantize(), "weight_scale": fw.scale}
        if not symmetric:
            sd["weight_zero_point"] = (fw.zero_point - off).to(torch.int8)
        scheme = QuantizationScheme(targets=["Linear"], weights=quantization_args(fw.spec))
        theirs = PackedQuantizationCompressor.compress(sd, scheme)
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), (name, key)


def test_transformers_default_route_symmetric(tmp_path):
    """Plain from_pretrained (no dequantize flag) works for symmetric exports and gives the same logits."""
    from transformers import AutoModelForCausalLM

    model = trained_tiny(4, 32, True)
    export_compressed_tensors(model, tmp_path / "ct")
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"), dtype=torch.float32)
    assert torch.equal(logits(loaded), logits(model))


@pytest.mark.parametrize("bits,group_size,symmetric", [(2, None, False), (3, 32, True), (4, 16, False),
                                                       (8, None, True)])
def test_native_round_trip_bit_exact(tmp_path, bits, group_size, symmetric):
    model = trained_tiny(bits, group_size, symmetric, tie_word_embeddings=True)
    export_native(model, tmp_path / "n", tokenizer=TOKENIZER, verify_load=True)
    back = read_native(tmp_path / "n")
    for name, fw in lrqat_dist.fold(model).items():
        got = back[name]
        assert torch.equal(got.codes, fw.codes) and same_bits(got.scale, fw.scale)
        assert (got.zero_point is None) == symmetric
        if not symmetric:
            assert torch.equal(got.zero_point, fw.zero_point)
        assert same_bits(got.dequantize(), fw.dequantize())
    loaded = load_native(tmp_path / "n")
    assert torch.equal(logits(loaded), logits(model))
    meta = json.loads((tmp_path / "n" / "lrqat_native.json").read_text())
    assert meta["qat_config"]["bits"] == bits and {v["storage"] for v in meta["layers"].values()} == {
        "packed" if bits <= 4 else "uint8"}


def test_native_code_storage_without_packing():
    from lrqat_dist.export.native import decode_codes, encode_codes
    from lrqat_dist.quant.affine import QuantSpec

    for spec in (QuantSpec(3, False, None), QuantSpec(8, True, None), QuantSpec(2, True, None)):
        codes = torch.randint(spec.qmin, spec.qmax + 1, (5, 7), dtype=torch.int32)  # 7: not divisible
        assert torch.equal(decode_codes(encode_codes(codes, spec, "uint8"), spec, "uint8"), codes)


def test_dequantized_export_and_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = trained_tiny(4, None, False)
    report = export_dequantized(model, tmp_path / "d", tokenizer=TOKENIZER, verify_load=True)
    assert "tokenizer saved" in report.notes[0]
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "d"), dtype=torch.float32)
    assert torch.equal(logits(loaded), logits(model))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "d"))
    assert tok("héllo").input_ids == AutoTokenizer.from_pretrained(str(TOKENIZER))("héllo").input_ids
    assert lrqat_dist.fold(model)  # the prepared model was not modified by the export


def test_refusals_name_an_alternative(tmp_path):
    model = trained_tiny(4, 32, True)
    with pytest.raises(ExportRefused, match="scales would be rounded by bfloat16(.|\n)*'native'"):
        export_compressed_tensors(model, tmp_path / "ct-bf16", dtype="bfloat16")
    with pytest.raises(ExportRefused, match="would be rounded by float16(.|\n)*'compressed-tensors' or 'native'"):
        export_dequantized(model, tmp_path / "d-fp16", dtype="float16")
    with pytest.raises(ExportRefused, match="embed_tokens.weight(.|\n)*allow_rounding"):
        export_native(model, tmp_path / "n-bf16", dtype="bfloat16")
    assert not any(tmp_path.iterdir()), "a refused export left files behind"

    # Rounding the model's own scales (explicit, reported) makes a bf16 compressed-tensors export exact.
    assert "rounded" in round_scales_(model, "bfloat16")
    report = export_compressed_tensors(model, tmp_path / "ct-bf16", dtype="bfloat16", allow_rounding=True)
    assert "rounded by the cast to bfloat16" in report.notes[1]
    assert any("(bfloat16) bit for bit" in c for c in report.checks)
    with pytest.raises(FileExistsError):
        export_compressed_tensors(model, tmp_path / "ct-bf16", dtype="bfloat16", allow_rounding=True)


def test_refuses_bad_zero_points_and_scales(tmp_path):
    model = trained_tiny(4, None, False, steps=1)
    layer = model.model.layers[0].self_attn.q_proj
    layer.zero_point = layer.zero_point.float() + 0.5
    with pytest.raises(ExportRefused, match="q_proj: non-integer zero-point(.|\n)*'dequantized'"):
        export_compressed_tensors(model, tmp_path / "a")
    with pytest.raises(ExportRefused, match="non-integer zero-point(.|\n)*'dequantized'"):
        export_native(model, tmp_path / "b")
    layer.zero_point = torch.full_like(layer.zero_point, 16, dtype=torch.int32)
    with pytest.raises(ExportRefused, match=r"zero-point outside \[0, 15\]"):
        export_compressed_tensors(model, tmp_path / "c")
    layer.zero_point = torch.full_like(layer.zero_point, 8, dtype=torch.int32)
    with torch.no_grad():
        layer.scale[0, 0] = float("nan")
    with pytest.raises(ExportRefused, match="non-finite scale"):
        export_native(model, tmp_path / "d")
    assert not any(tmp_path.iterdir())


def test_sharded_exports_load(tmp_path):
    model = trained_tiny(4, 32, False)
    export_compressed_tensors(model, tmp_path / "ct", max_shard_bytes=40_000)
    export_native(model, tmp_path / "n", max_shard_bytes=40_000)
    for d, base in ((tmp_path / "ct", "model"), (tmp_path / "n", "model"), (tmp_path / "n", "quantized")):
        index = json.loads((d / f"{base}.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
    assert torch.equal(logits(load_compressed_tensors(tmp_path / "ct")), logits(model))
    assert torch.equal(logits(load_native(tmp_path / "n")), logits(model))
