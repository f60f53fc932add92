"""tools/export.py and tools/eval.py on a training run directory (checkpoint layout of
lrqat_dist.checkpoint, written here directly so the test needs no training run)."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lrqat_dist
from lrqat_dist.export import read_native

from conftest import tiny_config

FIXTURE = Path(__file__).parent / "fixtures" / "lm_eval_task"
TEXT = "An integer grid, a learned scale and two low-rank factors per layer. " * 12


def _tool(name):
    return importlib.import_module(f"tools.{name}")


def fake_run(root: Path, step: int = 7):
    """A run dir with one complete checkpoint whose trainable tensors are those of the returned model."""
    from lrqat_dist.train.build import build_model
    from lrqat_dist.checkpoint import CONFIG_FILE, META_FILE, TRAINABLE_FILE, checkpoint_path
    from lrqat_dist.train.config import dump_config, load_config

    cfg = load_config(base={
        "model": {"config": tiny_config(vocab_size=260), "tokenizer": str(FIXTURE / "byte_tokenizer"), "init_seed": 3},
        "quant": {"bits": 3, "group_size": 32, "symmetric": False, "rank": 4, "range_init": "minmax"},
        "train": {"output_dir": str(root)}})
    model = build_model(cfg, "cpu", torch.float32)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 4, generator=g)
            elif n.endswith(".scale"):
                p.mul_(1 + 0.01 * torch.randn(p.shape, generator=g))
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ckpt = checkpoint_path(root, step)
    ckpt.mkdir(parents=True)
    (root / CONFIG_FILE).write_text(dump_config(cfg))
    (ckpt / CONFIG_FILE).write_text(dump_config(cfg))
    save_file(trainable, str(ckpt / TRAINABLE_FILE))
    (ckpt / META_FILE).write_text(json.dumps({"format": 1, "step": step, "engine": "none", "world_size": 1,
                                              "zero_stage": None, "trainable": list(trainable),
                                              "complete": True}))
    return model.eval()


def test_export_tool_on_a_run(tmp_path, capsys):
    pytest.importorskip("compressed_tensors")
    model = fake_run(tmp_path / "run")
    tool = _tool("export")
    assert tool.main([str(tmp_path / "run"), "--format", "native", "--out", str(tmp_path / "native")]) == 0
    back = read_native(tmp_path / "native")
    for name, fw in lrqat_dist.fold(model).items():
        assert torch.equal(back[name].codes, fw.codes) and torch.equal(back[name].scale, fw.scale)
        assert torch.equal(back[name].zero_point, fw.zero_point)
    record = json.loads((tmp_path / "native" / "lrqat_export.json").read_text())
    assert record["step"] == 7 and record["trainable_from"] == "trainable.safetensors"
    assert (tmp_path / "native" / "tokenizer.json").is_file()

    ckpt = tmp_path / "run" / "checkpoints" / "step_00000007"
    assert tool.main([str(ckpt), "--format", "compressed-tensors", "--dtype", "bfloat16",
                      "--out", str(tmp_path / "ct")]) == 2
    err = capsys.readouterr().err
    assert "refused" in err and "--round-scales" in err and "'native'" in err
    assert not (tmp_path / "ct").exists()
    assert tool.main([str(ckpt), "--format", "compressed-tensors", "--dtype", "bfloat16", "--round-scales",
                      "--allow-rounding", "--out", str(tmp_path / "ct")]) == 0
    record = json.loads((tmp_path / "ct" / "lrqat_export.json").read_text())
    assert record["notes"][0].startswith("rounded") and record["dtype"] == "bfloat16"
    assert tool.main([str(tmp_path / "run"), "--step", "3", "--format", "native", "--out", str(tmp_path / "x")]) == 2


def test_a_run_trained_in_float16_still_exports(tmp_path):
    """train.dtype float16 is refused for training now (no loss scaling); a checkpoint trained with it
    before still loads for export (rebuilt in fp32, as every export is)."""
    from lrqat_dist.checkpoint import CONFIG_FILE
    from lrqat_dist.export.run import checkpoint_config, load_run

    model = fake_run(tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000007"
    text = (ckpt / CONFIG_FILE).read_text()
    assert "dtype: auto" in text
    (ckpt / CONFIG_FILE).write_text(text.replace("dtype: auto", "dtype: float16"))
    assert checkpoint_config(ckpt).train.dtype == "float32"
    loaded = load_run(ckpt)
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.parameters(), model.parameters()))


def test_eval_tool_on_a_run(tmp_path, monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")  # the tool sets them; restored after the test
    from transformers import AutoTokenizer

    from lrqat_dist.eval import text_perplexity

    model = fake_run(tmp_path / "run")
    (tmp_path / "t.txt").write_text(TEXT)
    out = tmp_path / "r.json"
    assert _tool("eval").main([str(tmp_path / "run"), "--ppl-files", str(tmp_path / "t.txt"), "--seq-len", "64",
                               "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    tok = AutoTokenizer.from_pretrained(str(FIXTURE / "byte_tokenizer"))
    assert res["model"]["kind"] == "run"
    assert res["perplexity"]["ppl"] == text_perplexity(model, tok, TEXT, seq_len=64).ppl


def _set_quant(root: Path, **quant):
    """Rewrite fake_run's config with another grid (the checkpoint is rebuilt to match)."""
    from lrqat_dist.checkpoint import CONFIG_FILE, META_FILE, TRAINABLE_FILE, checkpoint_path
    from lrqat_dist.train.build import build_model
    from lrqat_dist.train.config import dump_config, load_config

    cfg = load_config(base={
        "model": {"config": tiny_config(vocab_size=260), "tokenizer": str(FIXTURE / "byte_tokenizer"), "init_seed": 3},
        "quant": {"rank": 4, "range_init": "minmax", **quant}, "train": {"output_dir": str(root)}})
    model = build_model(cfg, "cpu", torch.float32)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ckpt = checkpoint_path(root, 1)
    ckpt.mkdir(parents=True)
    for d in (root, ckpt):
        (d / CONFIG_FILE).write_text(dump_config(cfg))
    save_file(trainable, str(ckpt / TRAINABLE_FILE))
    (ckpt / META_FILE).write_text(json.dumps({"format": 1, "step": 1, "engine": "none", "world_size": 1,
                                              "zero_stage": None, "trainable": list(trainable), "complete": True}))


def test_export_tool_targets_and_gguf(tmp_path, capsys):
    pytest.importorskip("compressed_tensors")
    pytest.importorskip("gguf")
    tool = _tool("export")
    fake_run(tmp_path / "w3")  # W3 g32 asymmetric
    # vLLM has no 3-bit kernel: refused, nothing written; the table names what would serve
    assert tool.main([str(tmp_path / "w3"), "--format", "compressed-tensors", "--target", "vllm",
                      "--out", str(tmp_path / "ct")]) == 2
    err = capsys.readouterr().err
    assert "--target vllm" in err and "W3: no vLLM GPU kernel" in err and not (tmp_path / "ct").exists()
    assert "llama.cpp    yes  GGUF Q4_0 x14" in err  # asymmetric 3-bit: u - z fits Q4_0 exactly
    # ... but llama.cpp serves it: a GGUF file, exact (Q4_0), with its record
    assert tool.main([str(tmp_path / "w3"), "--format", "gguf", "--target", "llama.cpp",
                      "--out", str(tmp_path / "m.gguf")]) == 0
    record = json.loads((tmp_path / "m.gguf.lrqat_export.json").read_text())
    assert record["stats"]["types"] == {"Q4_0": 14} and record["stats"]["m_rounding_max_abs"] == 0
    assert any("bit for bit" in c for c in record["checks"])
    assert tool.main([str(tmp_path / "w3"), "--format", "native", "--target", "llama.cpp",
                      "--out", str(tmp_path / "n")]) == 2
    assert "reads gguf, not format 'native'" in capsys.readouterr().err

    _set_quant(tmp_path / "a8asym", bits=4, group_size=32, symmetric=True, activations="a8asym")
    assert tool.main([str(tmp_path / "a8asym"), "--format", "compressed-tensors", "--target", "vllm",
                      "--out", str(tmp_path / "x")]) == 2
    assert "asymmetric int8 inputs" in capsys.readouterr().err
    assert tool.main([str(tmp_path / "w3"), "--format", "dequantized", "--target", "vllm",
                      "--out", str(tmp_path / "x")]) == 2  # servable, but fp32 scales would be rounded by vLLM
    assert "would round fp32 scales" in capsys.readouterr().err and not (tmp_path / "x").exists()
    _set_quant(tmp_path / "a8", bits=4, group_size=32, symmetric=True, activations="a8")
    assert tool.main([str(tmp_path / "a8"), "--format", "compressed-tensors", "--target", "vllm", "--dtype",
                      "float16", "--round-scales", "--allow-rounding", "--out", str(tmp_path / "a8ct")]) == 0
    out = capsys.readouterr().out
    assert "CompressedTensorsW4A8Int" in out and "vllm serve" in out
    qc = json.loads((tmp_path / "a8ct" / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    assert qc["format"] == "int-quantized" and group["input_activations"]["symmetric"] is True
    assert (group["weights"]["num_bits"], group["weights"]["symmetric"]) == (4, True)
