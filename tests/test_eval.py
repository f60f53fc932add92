"""Evaluation: perplexity against a hand computation, lm-eval offline on a local task fixture, and the
eval tool on exports (whose perplexity must equal the training-time model's exactly)."""
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import lrqat_dist
from lrqat_dist.eval import detect_kind, read_text_files, run_lm_eval, summarize, text_perplexity

from conftest import tiny_config

FIXTURE = Path(__file__).parent / "fixtures" / "lm_eval_task"
TOKENIZER = FIXTURE / "byte_tokenizer"
TEXT = ("Quantization-aware training keeps the weights on an integer grid while the network learns. "
        "Low-rank adapters inside the rounding let a frozen model move its codes at little cost.\n") * 6


def tiny_lm(seed=0):
    from transformers import AutoTokenizer

    model = lrqat_dist.load_causal_lm(config=tiny_config(vocab_size=260), seed=seed).eval()
    return model, AutoTokenizer.from_pretrained(str(TOKENIZER))


@pytest.fixture
def offline(monkeypatch):
    """No hub access: the environment (restored afterwards) and the already-imported libraries' flags."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_perplexity_matches_hand_computation(tmp_path):
    model, tok = tiny_lm()
    (tmp_path / "a.txt").write_text(TEXT[:500])
    (tmp_path / "b.txt").write_text(TEXT[500:])
    text = read_text_files([tmp_path / "a.txt", tmp_path / "b.txt"])
    assert text == TEXT[:500] + "\n\n" + TEXT[500:]
    seq_len = 64
    res = text_perplexity(model, tok, text, seq_len=seq_len, batch_size=3)

    ids = [256] + list(text.encode())  # the byte tokenizer: BOS, then one id per UTF-8 byte
    n_blocks = len(ids) // seq_len
    nll = 0.0
    with torch.no_grad():
        for b in range(n_blocks):
            block = ids[b * seq_len:(b + 1) * seq_len]
            logp = model(input_ids=torch.tensor([block])).logits[0].double().log_softmax(-1)
            nll -= sum(logp[t, block[t + 1]].item() for t in range(seq_len - 1))
    hand = math.exp(nll / (n_blocks * (seq_len - 1)))
    assert (res.blocks, res.predicted_tokens, res.text_tokens) == (n_blocks, n_blocks * (seq_len - 1), len(ids))
    assert res.ppl == pytest.approx(hand, rel=1e-5)
    one = text_perplexity(model, tok, text, seq_len=seq_len, batch_size=1, max_blocks=2)
    assert one.blocks == 2 and one.predicted_tokens == 2 * (seq_len - 1)
    with pytest.raises(ValueError, match="fewer than one block"):
        text_perplexity(model, tok, "short", seq_len=seq_len)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        text_perplexity(model, tok, text, seq_len=4096)


def test_lm_eval_offline_on_local_task(offline):
    pytest.importorskip("lm_eval")
    model, tok = tiny_lm()
    out = run_lm_eval(model, tok, ["tiny_mc"], include_path=FIXTURE, batch_size=2)
    res = out["results"]["tiny_mc"]
    rows = {r["metric"]: r for r in summarize(out)}
    assert set(rows) == {"acc", "acc_norm"} and rows["acc"]["n"] == 6

    # The same scores by hand: log-likelihood of " choice" after [BOS] + "Question: ...\nAnswer:".
    docs = [json.loads(line) for line in (FIXTURE / "tiny_mc.jsonl").read_text().splitlines()]
    acc, acc_norm = [], []
    with torch.no_grad():
        for d in docs:
            ctx = [256] + list(f"Question: {d['question']}\nAnswer:".encode())
            lls = []
            for choice in d["choices"]:
                cont = list(f" {choice}".encode())
                logp = model(input_ids=torch.tensor([ctx + cont])).logits[0].double().log_softmax(-1)
                lls.append(sum(logp[len(ctx) - 1 + i, c].item() for i, c in enumerate(cont)))
            acc.append(int(np.argmax(lls)) == d["label"])
            acc_norm.append(int(np.argmax(np.array(lls) / [len(c) for c in d["choices"]])) == d["label"])
    assert res["acc,none"] == pytest.approx(np.mean(acc))
    assert res["acc_norm,none"] == pytest.approx(np.mean(acc_norm))


def test_unknown_task_is_a_clear_error(offline):
    pytest.importorskip("lm_eval")
    from lrqat_dist.eval.lm_eval_runner import expand_tasks, task_manager

    assert expand_tasks(["paper", "boolq"]) == ["boolq", "piqa", "winogrande", "hellaswag", "arc_easy",
                                                "arc_challenge"]
    with pytest.raises(FileNotFoundError, match="include path"):
        task_manager(["tiny_mc"], FIXTURE / "missing")
    assert "tiny_mc" in task_manager(["tiny_mc"], FIXTURE).all_tasks


def _tool(name):
    return importlib.import_module(f"tools.{name}")


def test_eval_tool_on_exports_matches_training_model(tmp_path, offline, capsys):
    pytest.importorskip("compressed_tensors")
    from lrqat_dist.export import export_compressed_tensors, export_native

    model, tok = tiny_lm(seed=1)
    lrqat_dist.prepare(model, lrqat_dist.QATConfig(bits=3, group_size=32, symmetric=False, rank=4,
                                                   range_init="minmax"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 4, generator=torch.Generator().manual_seed(0))
    export_compressed_tensors(model, tmp_path / "ct", tokenizer=tok)
    export_native(model, tmp_path / "native", tokenizer=tok)
    (tmp_path / "t.txt").write_text(TEXT)
    want = text_perplexity(model, tok, TEXT, seq_len=64).ppl  # the training-time (prepared) model

    assert detect_kind(tmp_path / "ct") == "compressed-tensors" and detect_kind(tmp_path / "native") == "native"
    tool = _tool("eval")
    tasks = ["--tasks", "tiny_mc", "--include-path", str(FIXTURE), "--limit", "3"]
    for kind, extra in (("ct", tasks), ("native", [])):
        out = tmp_path / f"{kind}.json"
        assert tool.main([str(tmp_path / kind), "--ppl-files", str(tmp_path / "t.txt"), "--seq-len", "64",
                          "--out", str(out), *extra]) == 0
        res = json.loads(out.read_text())
        assert res["model"]["kind"] == {"ct": "compressed-tensors"}.get(kind, kind)
        assert res["perplexity"]["ppl"] == want, kind  # same weights, same bits
    ct = json.loads((tmp_path / "ct.json").read_text())
    assert {r["metric"] for r in ct["lm_eval"]["table"]} == {"acc", "acc_norm"}
    assert ct["lm_eval"]["table"][0]["n"] == 3
    table = capsys.readouterr().out
    assert "tiny_mc" in table and "perplexity" in table
    assert tool.main([str(tmp_path / "nowhere"), "--ppl-files", str(tmp_path / "t.txt")]) == 2


WIKI = Path(__file__).parent / "fixtures" / "wikitext2_tiny"  # the HF test split's format, 36 rows


def test_wikitext2_gptq_protocol(tmp_path, offline):
    """--ppl wikitext2: the rows (from parquet, jsonl or the raw file alike) joined with "\\n\\n",
    tokenized once, numel // seq_len blocks; ppl = exp(mean over blocks of the block's mean NLL)
    exactly as GPTQ computes it (here with seq_len 64 instead of 2048)."""
    from lrqat_dist.eval.wikitext import wikitext2_rows, wikitext2_text

    rows = [json.loads(line)["text"] for line in (WIKI / "test.jsonl").read_text().splitlines()]
    assert rows[:2] == [" = Robert Boulter = \n", ""] and len(rows) == 36
    for f in ("wiki.test.raw", "test.jsonl", "test-00000-of-00001.parquet"):
        assert wikitext2_rows(WIKI / f) == rows, f
    assert wikitext2_rows(WIKI)  # a directory: the first known file in it
    text, n = wikitext2_text(WIKI / "wiki.test.raw")
    assert n == 36 and text == "\n\n".join(rows) and " = Robert Boulter = \n\n\n\n\n Robert" in text
    with pytest.raises(FileNotFoundError, match="local copy"):
        wikitext2_rows(tmp_path / "missing.parquet")

    model, tok = tiny_lm(seed=2)
    seq_len = 64
    enc = tok(text, return_tensors="pt").input_ids  # GPTQ: tokenizer("\n\n".join(rows), return_tensors="pt")
    nsamples = enc.numel() // seq_len
    nlls = []
    with torch.no_grad():
        for i in range(nsamples):
            batch = enc[:, i * seq_len:(i + 1) * seq_len]
            logits = model(batch).logits
            loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), batch[0, 1:])
            nlls.append(loss.float() * seq_len)
    gptq = torch.exp(torch.stack(nlls).sum() / (nsamples * seq_len)).item()

    model.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    tool = _tool("eval")
    for f in ("wiki.test.raw", "test-00000-of-00001.parquet"):
        out = tmp_path / f"{f}.json"
        assert tool.main([str(tmp_path / "hf"), "--ppl", "wikitext2", "--wikitext-path", str(WIKI / f),
                          "--seq-len", str(seq_len), "--out", str(out)]) == 0
        res = json.loads(out.read_text())["perplexity"]
        assert res["rows"] == 36 and res["blocks"] == nsamples and res["text_tokens"] == enc.numel()
        assert res["ppl"] == pytest.approx(gptq, rel=1e-5)
        assert "seq_len 64 instead of the protocol's 2048" in res["deviation"]
    with pytest.raises(SystemExit):
        tool.parse_args([str(tmp_path / "hf"), "--ppl", "wikitext2"])  # no local path: usage error
