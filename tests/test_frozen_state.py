"""Frozen state (rebuilt from the base model, never checkpointed): the per-module fingerprint in
meta.json, its check on resume / export / consolidation, the override, the buffers-free state dict
DeepSpeed saves, and the weights_only rank files. One process, tiny LLaMA saved as a local HF dir."""
import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from train_common import TINY_JOB, job_dict, synthetic_builders

from lrqat_dist.checkpoint import capture_rng, checkpoint_path, restore_rng
from lrqat_dist.checkpoint.checkpointer import load_rank_state
from lrqat_dist.model import build_prepared_model, load_causal_lm
from lrqat_dist.model.frozen_state import (FrozenStateMismatch, buffers_left_out, check_frozen_fingerprint,
                                           frozen_fingerprint, frozen_state_left_out, frozen_tensors)
from lrqat_dist.train import train
from lrqat_dist.train.config import config_from_dict

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "tests" / "fixtures" / "lm_eval_task" / "byte_tokenizer"
QUANT = {"bits": 3, "group_size": 32, "symmetric": False}  # asymmetric: zero-points are frozen state too
CHANGED = "model.layers.1.mlp.up_proj"


def save_tiny_base_model(path: Path) -> Path:
    """The tests' tiny LLaMA (random init, seed 0) as a local safetensors HF directory."""
    model = load_causal_lm(config=TINY_JOB["model"]["config"], dtype=torch.float32, seed=0)
    model.save_pretrained(path, safe_serialization=True)
    return path


def perturb_layer(model_dir: Path, layer: str = CHANGED) -> None:
    """Scale one row of one linear's weight in the base-model file (its range and codes change)."""
    f = model_dir / "model.safetensors"
    sd = load_file(str(f))
    key = f"{layer}.weight"
    sd[key][0] *= 1.75
    save_file(sd, str(f), metadata={"format": "pt"})


def _quant_cfg():
    from lrqat_dist.methods import QATConfig

    return QATConfig(**{**TINY_JOB["quant"], **QUANT})


@pytest.fixture
def base_dir(tmp_path):
    return save_tiny_base_model(tmp_path / "base")


def test_buffers_left_out_of_state_dict_and_restored():
    model = build_prepared_model(_quant_cfg(), config=TINY_JOB["model"]["config"])
    before = model.state_dict()
    buffers = {n for n, b in model.named_buffers() if n in before}
    assert {n.rsplit(".", 1)[1] for n in buffers} >= {"phi0", "s0", "zero_point"}
    with buffers_left_out(model):
        inside = model.state_dict()
        assert not (set(inside) & buffers) and set(inside) == set(before) - buffers
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    # What DeepSpeed saves: trainable parameters only; the tied embedding's lm_head alias (not in
    # named_parameters, so exclude_frozen_parameters would keep it) is gone too.
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "lm_head.weight" in before and "lm_head.weight" not in dict(model.named_parameters())
    with frozen_state_left_out(model):
        assert sorted(model.state_dict()) == sorted(trainable) and len(trainable) == 3 * 14
    assert set(model.state_dict()) == set(before)


def test_fingerprint_split_over_ranks_and_dtypes():
    model = build_prepared_model(_quant_cfg(), config=TINY_JOB["model"]["config"])
    whole = frozen_fingerprint(model)
    groups = frozen_tensors(model)
    assert list(whole["modules"]) == list(groups)
    assert "model.layers.0.self_attn.q_proj" in groups and "model.embed_tokens" in groups
    assert [n for n, _ in groups["model.layers.0.self_attn.q_proj"]] == ["phi0", "s0", "zero_point"]
    # Two "ranks", each hashing every other module, gathered: the same fingerprint.
    seen = {}
    part1 = frozen_fingerprint(model, rank=1, world_size=2, all_gather=lambda t: seen.setdefault(1, [t, t]))
    got = frozen_fingerprint(model, rank=0, world_size=2, all_gather=lambda t: [t, seen[1][0]])
    assert got == whole and part1 != whole  # rank 1 alone saw only its half
    # A bf16 training run hashes its frozen float parameters in bf16; an fp32 rebuild cast to bf16 matches.
    bf16 = build_prepared_model(_quant_cfg(), config=TINY_JOB["model"]["config"], dtype=torch.bfloat16)
    assert frozen_fingerprint(bf16)["param_dtype"] == "bfloat16"
    assert frozen_fingerprint(model, torch.bfloat16) == frozen_fingerprint(bf16)
    assert frozen_fingerprint(model) != frozen_fingerprint(bf16)


def test_fingerprint_names_the_changed_layer(base_dir, caplog):
    cfg = dict(path=base_dir, config=None)
    saved = frozen_fingerprint(build_prepared_model(_quant_cfg(), **cfg))
    perturb_layer(base_dir)
    rebuilt = frozen_fingerprint(build_prepared_model(_quant_cfg(), **cfg))
    with pytest.raises(FrozenStateMismatch, match=rf"first at layer '{CHANGED}' \(1 of \d+ modules differ\)"):
        check_frozen_fingerprint(saved, rebuilt, "here")
    with caplog.at_level(logging.WARNING):
        check_frozen_fingerprint(saved, rebuilt, "here", accept_changed=True)  # the override: a warning
        check_frozen_fingerprint(None, rebuilt, "old")  # no fingerprint (older checkpoint): a warning
    assert CHANGED in caplog.text and "no frozen-state fingerprint" in caplog.text


def _job(out: Path, base: Path, **train_updates) -> dict:
    return job_dict(out, quant=QUANT, model={"path": str(base), "config": None, "tokenizer": str(TOKENIZER)},
                    train={"max_steps": 2, "val_every": 0, **train_updates})


def test_changed_base_model_refused_on_resume_and_export(tmp_path, base_dir, caplog):
    from lrqat_dist.export.run import load_run
    from tools import export as export_tool

    out = tmp_path / "run"
    first = train(config_from_dict(_job(out, base_dir)), resume="none", builders=synthetic_builders())
    ckpt = checkpoint_path(out, 2)
    meta = json.loads((ckpt / "meta.json").read_text())
    fp = meta["frozen_fingerprint"]
    assert first.step == 2 and fp["param_dtype"] == "float32" and CHANGED in fp["modules"]
    assert len(fp["modules"]) == 14 + 2 * 2 + 2  # 14 quantized linears, 2 x 2 norms, final norm, embeddings
    load_run(out)  # unchanged base model: accepted

    perturb_layer(base_dir)
    resumed = config_from_dict(_job(out, base_dir, max_steps=3))
    with pytest.raises(FrozenStateMismatch, match=rf"first at layer '{CHANGED}'.*train\.accept_changed_base_model"):
        train(resumed, resume="auto", builders=synthetic_builders())
    with pytest.raises(FrozenStateMismatch, match=rf"first at layer '{CHANGED}'.*--accept-changed-base-model"):
        load_run(out)
    assert export_tool.main([str(out), "--format", "native", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()

    # The override: resume and export go on, with the warning.
    with caplog.at_level(logging.WARNING):
        again = train(config_from_dict(_job(out, base_dir, max_steps=3, accept_changed_base_model=True)),
                      resume="auto", builders=synthetic_builders())
        assert again.step == 3
        assert export_tool.main([str(out), "--format", "native", "--out", str(tmp_path / "y"),
                                 "--accept-changed-base-model", "--step", "2"]) == 0
    assert f"first at layer '{CHANGED}'" in caplog.text
    # Step 3 was saved from the changed model: it carries the new fingerprint, so it loads without the flag.
    assert load_run(out).meta["step"] == 3


def test_checkpoint_without_fingerprint_warns(tmp_path, base_dir, caplog):
    from lrqat_dist.export.run import load_run

    out = tmp_path / "run"
    train(config_from_dict(_job(out, base_dir)), resume="none", builders=synthetic_builders())
    meta_file = checkpoint_path(out, 2) / "meta.json"
    meta = json.loads(meta_file.read_text())
    del meta["frozen_fingerprint"]
    meta_file.write_text(json.dumps(meta))
    perturb_layer(base_dir)  # not detectable without a fingerprint: warned about, not refused
    with caplog.at_level(logging.WARNING):
        load_run(out)
        assert train(config_from_dict(_job(out, base_dir, max_steps=3)), resume="auto",
                     builders=synthetic_builders()).step == 3
    assert caplog.text.count("no frozen-state fingerprint") == 2


def test_rank_file_loads_with_weights_only(tmp_path):
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    random.gauss(0, 1), np.random.standard_normal()  # a cached Gaussian in both
    state = {"rng": capture_rng(torch.device("cpu")), "data": {"consumed": 3}}
    torch.save(state, tmp_path / "rank_00000.pt")
    expected = (random.random(), float(np.random.standard_normal()), torch.rand(3))
    back = torch.load(tmp_path / "rank_00000.pt", weights_only=True)  # no pickled numpy / Python objects
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    restore_rng(back["rng"], torch.device("cpu"))
    got = (random.random(), float(np.random.standard_normal()), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])
    # A file written the old way (numpy array pickled) still loads, with a warning.
    old = {"rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}}
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(Exception):
        torch.load(tmp_path / "old.pt", weights_only=True)
    restore_rng(load_rank_state(tmp_path / "old.pt")["rng"], torch.device("cpu"))


def test_trainer_rank_file_is_weights_only(tmp_path, base_dir):
    out = tmp_path / "run"
    train(config_from_dict(_job(out, base_dir)), resume="none", builders=synthetic_builders())
    state = torch.load(checkpoint_path(out, 2) / "rank_00000.pt", weights_only=True)
    assert state["data"]["consumed"] == 2 and set(state["rng"]) == {"python", "numpy", "torch"}
