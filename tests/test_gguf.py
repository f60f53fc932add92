"""GGUF export: the trained grid in llama.cpp's block types, read back by gguf-py, transformers and llama.cpp."""
from pathlib import Path

import numpy as np
import pytest
import torch

import lrqat_dist
from lrqat_dist.export import ExportRefused, export_gguf
from lrqat_dist.export.gguf import block_mapping, pack_blocks, rope_permute, rope_unpermute
from lrqat_dist.export.gguf_runtime import LlamaCpp, llama_cpp_missing, load_gguf_dequantized
from lrqat_dist.quant.affine import QuantSpec

from test_export import TOKENIZER, VOCAB, trained_tiny

gguf = pytest.importorskip("gguf")


def test_block_mapping_table_and_refusals():
    m = lambda b, s, g, asym="compact": block_mapping(QuantSpec(b, s, g), 128, "L", asym)  # noqa: E731
    assert [m(b, True, None).qtype for b in (2, 3, 4, 5, 6, 7, 8)] == ["Q4_0"] * 3 + ["Q5_0"] + ["Q8_0"] * 3
    assert [m(b, False, 64).qtype for b in (2, 3, 4, 5, 6, 7, 8)] == ["Q4_0", "Q4_0", "Q4_1", "Q5_1"] + ["Q8_0"] * 3
    assert (m(4, False, 32, "exact").qtype, m(5, False, 32, "exact").qtype) == ("Q5_0", "Q8_0")
    assert m(4, False, 32).exact is False and m(3, False, 32).exact and m(4, True, 64).exact
    with pytest.raises(ExportRefused, match=r"L: group_size 16 is not a multiple .* nearest exportable setting: "
                                            r"group_size 32"):
        m(4, True, 16)
    with pytest.raises(ExportRefused, match=r"L: group_size 48 .* group_size 64"):
        m(4, True, 48)
    with pytest.raises(ExportRefused, match=r"odd: input dimension 100 is not a multiple of 32"):
        block_mapping(QuantSpec(4, True, None), 100, "odd")


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_pack_blocks_is_ggml_layout(qtype):
    """Our packing, dequantized by gguf-py's reference code, gives d*(c - shift) (+ m); and where
    gguf-py's own quantizer picks the same d and codes, the bytes are identical."""
    g = torch.Generator().manual_seed(0)
    rows, n = 3, 64
    hi = {"Q4_0": 15, "Q4_1": 15, "Q5_0": 31, "Q5_1": 31, "Q8_0": 127}[qtype]
    lo = -128 if qtype == "Q8_0" else 0
    c = torch.randint(lo, hi + 1, (rows, n), generator=g).numpy().astype(np.int16)
    d = (torch.rand(rows, n // 32, generator=g) + 0.5).numpy().astype(np.float16)
    m = (-torch.rand(rows, n // 32, generator=g)).numpy().astype(np.float16) if qtype.endswith("_1") else None
    data = pack_blocks(c, d, m, qtype)
    qt = getattr(gguf.GGMLQuantizationType, qtype)
    assert data.shape == (rows, n // 32 * gguf.GGML_QUANT_SIZES[qt][1])
    got = gguf.quants.dequantize(data, qt)
    shift = {"Q4_0": 8, "Q5_0": 16}.get(qtype, 0)
    dd = np.repeat(d.astype(np.float32), 32, axis=1)
    want = dd * (c - shift).astype(np.float32) + (0 if m is None else np.repeat(m.astype(np.float32), 32, axis=1))
    assert np.array_equal(got, want)
    if qtype == "Q4_0":  # a block whose largest |value| is -8d: gguf-py's quantizer recovers d and the codes
        c[:, ::32] = 0
        x = dd * (c - 8).astype(np.float32)
        assert np.array_equal(gguf.quants.quantize(x, qt), pack_blocks(c, d, None, qtype))


def test_rope_permutation_is_llama_cpp_converters():
    w = torch.arange(4 * 8 * 3).reshape(4 * 8, 3)  # 4 heads of dim 8
    p = rope_permute(w, 4)
    # convert_hf_to_gguf.py: reshape(n_head, 2, d/2, ...).swapaxes(1, 2): rows i and i + d/2 become adjacent
    assert torch.equal(p[:4, 0], torch.tensor([0, 12, 3, 15])) and torch.equal(rope_unpermute(p, 4), w)


GRID = [(4, None, True, "compact"), (3, None, True, "compact"), (2, 32, True, "compact"), (5, 32, True, "compact"),
        (8, None, True, "compact"), (3, 32, False, "compact"), (4, 64, False, "compact"), (4, 32, False, "exact")]


@pytest.mark.parametrize("bits,group,sym,asym", GRID, ids=[f"w{b}-{g or 'pc'}-{'sym' if s else 'asym'}-{a}"
                                                          for b, g, s, a in GRID])
def test_gguf_export_is_the_fold(tmp_path, bits, group, sym, asym):
    model = trained_tiny(bits, group, sym, tie_word_embeddings=bits == 4)
    probe = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(2))
    report = export_gguf(model, tmp_path / "m.gguf", TOKENIZER, probe_ids=probe, embeddings="f32", asym=asym)
    mp = block_mapping(QuantSpec(bits, sym, group), 64, "x", asym)
    assert report.stats["types"] == {mp.qtype: 14}
    assert any("logit drift of the fp16 scale rounding" in n for n in report.notes)
    # independent read-back: gguf's reader + reference dequantization, q/k un-permuted by hand
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    assert ("output.weight" in tensors) == (bits != 4)  # tied embeddings: no output tensor
    folded = lrqat_dist.fold(model)  # the model's scales are now fp16 values (rounded in place)
    worst = 0.0
    for name, fw in folded.items():
        assert torch.equal(fw.scale, fw.scale.half().float())
        i, kind = name.split(".")[2], name.rsplit(".", 1)[1]
        gname = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                 "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[kind]
        t = tensors[f"blk.{i}.{gname}.weight"]
        assert t.tensor_type.name == mp.qtype
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        if kind in ("q_proj", "k_proj"):
            w = rope_unpermute(w, 4 if kind == "q_proj" else 2)
        if mp.exact:
            assert torch.equal(w, fw.dequantize()), name
        else:  # Q4_1: only m = -d*z is rounded to fp16
            err = (w - fw.dequantize()).abs().max().item()
            worst = max(worst, err)
            assert err <= fw.scale.abs().max().item() * 2 ** -6
    if mp.exact:
        assert report.stats["m_rounding_max_abs"] == 0
    else:
        assert 0 < worst == pytest.approx(report.stats["m_rounding_max_abs"])
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["llama.attention.head_count_kv"].contents() == 2
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert len(fields["tokenizer.ggml.tokens"].contents()) == VOCAB
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True  # the byte tokenizer prepends <s>
    assert fields["tokenizer.ggml.add_eos_token"].contents() is False
    assert fields["tokenizer.ggml.bos_token_id"].contents() == 256


def test_activation_quant_refused_unless_dropped(tmp_path):
    from conftest import tiny_config

    model = lrqat_dist.load_causal_lm(config=tiny_config(vocab_size=VOCAB))
    lrqat_dist.prepare(model, lrqat_dist.QATConfig(bits=4, group_size=32, rank=4, range_init="minmax",
                                                   activations="a8"))
    with pytest.raises(ExportRefused, match=r"(?s)gguf: cannot express .*A8.*--drop-activation-quant"):
        export_gguf(model, tmp_path / "a.gguf", TOKENIZER)
    assert not (tmp_path / "a.gguf").exists() and not (tmp_path / "a.gguf.partial").exists()
    report = export_gguf(model, tmp_path / "a.gguf", TOKENIZER, drop_activation_quant=True)
    assert any("DROPPED" in n for n in report.notes)
    with pytest.raises(FileExistsError):
        export_gguf(model, tmp_path / "a.gguf", TOKENIZER, drop_activation_quant=True)


def _bpe_tokenizer(tmp_path: Path):
    """A small byte-level BPE tokenizer with merges (llama.cpp requires merges for 'gpt2' vocabularies)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    text = ["the quick brown fox jumps over the lazy dog; an integer grid and a learned scale " * 20]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(text, vocab_size=VOCAB, min_frequency=2, special_tokens=["<s>", "</s>"],
                            show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(tmp_path / "bpe")
    return tok


def test_transformers_and_llama_cpp_read_the_export(tmp_path):
    """transformers' GGUF loader (independent names, un-permutation, tokenizer) gives the fold's weights;
    llama.cpp, when installed, gives logits close to the dequantized model's."""
    tok = _bpe_tokenizer(tmp_path)
    model = trained_tiny(4, None, True)
    assert len(tok) <= VOCAB
    ids = torch.tensor([tok("the lazy fox and the quick dog").input_ids[:12]])
    export_gguf(model, tmp_path / "m.gguf", tok, embeddings="f32", probe_ids=ids)
    deq, gtok = load_gguf_dequantized(tmp_path / "m.gguf")
    for name, fw in lrqat_dist.fold(model).items():
        assert torch.equal(deq.get_submodule(name).weight, fw.dequantize()), name
    sample = "the quick brown fox"
    assert gtok(sample, add_special_tokens=False).input_ids == tok(sample, add_special_tokens=False).input_ids
    with torch.no_grad():
        want = deq(input_ids=ids).logits[0]
        assert torch.allclose(want, model(input_ids=ids).logits[0], atol=1e-4)
    missing = llama_cpp_missing()
    if missing:
        pytest.skip(f"llama.cpp part skipped: {missing}")
    with LlamaCpp(tmp_path / "m.gguf", n_ctx=64) as lc:
        got = lc.logits(ids[0])
        assert lc.tokenize(sample) == tok(sample, add_special_tokens=False).input_ids
    # llama.cpp quantizes activations to 8 bits inside its Q4_0 dot products: close, not identical
    # (a random tiny model's logits are nearly flat, so no argmax check); another model is far off
    diff = (got - want).abs()
    print(f"llama.cpp vs dequantized: max {diff.max():.4f}, mean {diff.mean():.5f}, logits spread {want.std():.4f}")
    assert diff.max() < 0.05 * want.abs().max() and diff.mean() < 0.05 * want.std()


def test_refusal_lists_every_layer_once_and_changes_nothing(tmp_path):
    model = trained_tiny(8, 32, False)  # asymmetric 8-bit: Q8_0 only where every u - z fits int8
    folded = lrqat_dist.fold(model)
    spans = {n: f.codes - f.zero_point.repeat_interleave(32, dim=1) for n, f in folded.items()}
    outside = [n for n, c in spans.items() if int(c.min()) < -128 or int(c.max()) > 127]
    assert outside  # min-max ranges over 255 codes: u - z leaves int8 in every layer here
    with pytest.raises(ExportRefused) as e:
        export_gguf(model, tmp_path / "m.gguf", TOKENIZER)
    msg = str(e.value)
    assert all(f"{n}: codes minus zero-point span" in msg for n in outside[:8])
    assert "outside Q8_0's [-128, 127]; nearest exportable setting: 7-bit asymmetric" in msg
    assert msg.count("Alternatives:") == 1 and not (tmp_path / "m.gguf").exists()
    assert all(torch.equal(f.scale, folded[n].scale) for n, f in lrqat_dist.fold(model).items())  # untouched


def test_eval_tool_on_a_gguf_file(tmp_path):
    """tools/eval.py MODEL.gguf: transformers' GGUF loader (the dequantized export) and, when installed,
    llama.cpp (--runtime llama.cpp) give the held-out perplexity of the exported model."""
    import json

    from lrqat_dist.eval.perplexity import text_perplexity

    tok = _bpe_tokenizer(tmp_path)
    model = trained_tiny(4, 32, True)
    export_gguf(model, tmp_path / "m.gguf", tok, embeddings="f32")
    text = "the quick brown fox jumps over the lazy dog; an integer grid and a learned scale. " * 30
    (tmp_path / "t.txt").write_text(text)
    want = text_perplexity(model, tok, text, seq_len=64).ppl  # the model with its (now fp16) scales
    from tools import eval as tool
    args = [str(tmp_path / "m.gguf"), "--ppl-files", str(tmp_path / "t.txt"), "--seq-len", "64"]
    assert tool.main(args + ["--out", str(tmp_path / "deq.json")]) == 0
    res = json.loads((tmp_path / "deq.json").read_text())
    assert res["model"]["kind"] == "gguf" and res["perplexity"]["ppl"] == pytest.approx(want, rel=1e-5)
    missing = llama_cpp_missing()
    if missing:
        pytest.skip(f"llama.cpp part skipped: {missing}")
    assert tool.main(args + ["--runtime", "llama.cpp", "--out", str(tmp_path / "lc.json")]) == 0
    lc = json.loads((tmp_path / "lc.json").read_text())["perplexity"]
    assert lc["runtime"].startswith("llama.cpp") and lc["blocks"] == res["perplexity"]["blocks"]
    assert lc["ppl"] == pytest.approx(want, rel=0.01)
