"""The one model builder (``lrqat_dist.model.build_prepared_model``) and its lean path: lean loading
equals the eager build bit for bit, every caller (trainer, memory benchmark, quickstart RTN baseline)
gets the same tensors, and lean loading's host peak stays at the prepared model plus one layer."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import lrqat_dist
from lrqat_dist import QATConfig
from lrqat_dist.engines.base import next_token_loss
from lrqat_dist.memory import ModelShape, PlanConfig, plan
from lrqat_dist.model import build_prepared_model, load_causal_lm, prepare
from lrqat_dist.model.lean_load import _meta_model, lean_build
from lrqat_dist.model.loading import build_config
from lrqat_dist.train.build import build_model
from lrqat_dist.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
GQA = ModelShape(hidden=128, intermediate=352, layers=2, heads=8, kv_heads=2, vocab=512, tied_embeddings=True,
                 name="gqa")


def _tiny_saved(tmp_path, tied: bool, dtype: torch.dtype) -> Path:
    cfg = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=256, tie_word_embeddings=tied, max_position_embeddings=128)
    path = tmp_path / f"tiny-{tied}-{str(dtype)[6:]}"
    load_causal_lm(config=cfg, dtype=dtype, seed=1).save_pretrained(path)
    return path


def _eager_build(path: Path, quant: QATConfig, dtype: torch.dtype, init_seed: int = 0):
    """The reference: the whole base model loaded, then prepared, then the frozen floats cast."""
    model = load_causal_lm(path=path, dtype="auto")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        lrqat_dist.prepare(model, quant)
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point():
            p.data = p.data.to(dtype)
    model.config.use_cache = False
    return model


def _assert_same_model(a, b):
    for get in (lambda m: list(m.named_parameters()), lambda m: list(m.named_buffers())):
        ta, tb = get(a), get(b)
        assert [n for n, _ in ta] == [n for n, _ in tb]
        for (name, x), (_, y) in zip(ta, tb):
            assert x.dtype == y.dtype and x.requires_grad == y.requires_grad and torch.equal(x, y), name
    assert (a.lm_head.weight is a.model.embed_tokens.weight) == (b.lm_head.weight is b.model.embed_tokens.weight)


@pytest.mark.parametrize("tied,stored", [(True, torch.float32), (False, torch.bfloat16)])
def test_lean_build_equals_the_eager_build(tmp_path, tied, stored):
    path = _tiny_saved(tmp_path, tied, stored)
    for method, downcast in [("lrqat", "fixed"), ("lrqat", "int-packed"), ("peqa", "fixed")]:
        job = load_config(base={"model": {"path": str(path)}, "quant": {"method": method, "downcast": downcast, "rank": 4},
                                "train": {"output_dir": str(tmp_path / "run"), "dtype": "bfloat16"}})
        a = _eager_build(path, job.quant, torch.bfloat16)
        b = lean_build(job.quant, path=path, dtype=torch.bfloat16)
        _assert_same_model(a, b)
        _assert_same_model(a, build_model(job))  # the trainer builds it leanly
        _assert_same_model(a, build_prepared_model(job.quant, path=path, dtype=torch.bfloat16, lean=False))
        ids = torch.randint(0, 256, (1, 12))
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)
        assert a.config.to_dict() == b.config.to_dict()
        assert a.generation_config.to_dict() == b.generation_config.to_dict()


def test_lean_build_host_peak_is_the_bf16_model_plus_one_layer(tmp_path):
    """Measured (kernel peak RSS, in a fresh process) on a real-shaped fp32 checkpoint: the eager
    path holds the whole fp32 model beside the prepared one; lean loading stays under the issue's
    bound (bf16 model + one decoder layer as stored) and ends holding only the prepared model."""
    # LLaMA proportions (MLP 3x, GQA 4:1); the conversion of one linear needs ~7x its fp32 size in
    # temporaries (range init, codes, downcast), which the int8 Phi0's saving over bf16 must cover
    cfg = dict(model_type="llama", hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
               num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=False, max_position_embeddings=256)
    path = tmp_path / "real-shaped"
    load_causal_lm(config=cfg, dtype=torch.float32, seed=1).save_pretrained(path)
    code = textwrap.dedent(f"""
        import json, torch
        import lrqat_dist.memory.measure as M
        M.exact_malloc()
        x = torch.ones(2**18) + 1; del x
        from lrqat_dist import QATConfig, prepare
        from lrqat_dist.model.lean_load import lean_build
        from lrqat_dist.model import load_causal_lm
        q = QATConfig(rank=8, range_init="minmax")
        lean_build(q, path={str(path)!r}, dtype=torch.bfloat16)  # one-time imports and caches out of the way
        with M.measure() as lean:
            model = lean_build(q, path={str(path)!r}, dtype=torch.bfloat16)
        del model
        with M.measure() as eager:
            model = load_causal_lm(path={str(path)!r}, dtype="auto"); prepare(model, q)
            for p in model.parameters():
                if not p.requires_grad: p.data = p.data.to(torch.bfloat16)
        print(json.dumps([lean.delta, eager.delta, lean.end - lean.baseline]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    lean, eager, lean_end = json.loads(out.stdout.strip().splitlines()[-1])
    shape = ModelShape.from_hf_config(cfg)
    bf16_model = 2 * shape.total_params
    one_layer = 4 * shape.linear_params // shape.layers  # fp32 as stored
    fp32_model = 4 * shape.total_params
    assert lean <= bf16_model + one_layer, (lean, bf16_model, one_layer)
    prepared = plan(shape, PlanConfig(rank=8, dtype="bf16")).frozen + plan(shape, PlanConfig(rank=8)).trainable
    assert lean_end < prepared + 2**20, (lean_end, prepared)  # nothing but the model is left (1 MiB slack)
    assert eager > fp32_model  # the eager path holds the whole base model (and more)


def test_lean_build_from_config_is_deterministic_and_complete():
    cfg = GQA.hf_config()
    q = QATConfig(rank=4, range_init="minmax")
    a, b = lean_build(q, config=cfg), lean_build(q, config=cfg)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not any(t.is_meta for t in list(a.parameters()) + list(a.buffers()))
    loss = next_token_loss(a(input_ids=torch.randint(0, 512, (1, 8))).logits, torch.randint(0, 512, (1, 8)))
    assert torch.isfinite(loss)
    assert sorted({n.rsplit(".", 1)[1] for n, p in a.named_parameters() if p.requires_grad}) == ["lora_A", "lora_B", "scale"]
    assert lrqat_dist.fold(a)  # a prepared model


@pytest.mark.parametrize("preset", ["llama2-7b", "llama2-13b", "llama3-8b", "llama2-70b"])
def test_real_shapes_build_from_config_alone(preset):
    """The HF model of each real shape, built on the meta device from the preset's config alone (no
    memory, no weights), has exactly the planner's parameter count and linear shapes."""
    shape = ModelShape.preset(preset)
    model = _meta_model(build_config(shape.hf_config()), "sdpa")
    assert sum(p.numel() for p in model.parameters()) == shape.total_params
    layer = model.model.layers[0]
    got = [(n, tuple(getattr(getattr(layer, part), n).weight.shape)) for part, names in
           (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj")))
           for n in names]
    assert got == [(n, (o, i)) for n, o, i in shape.linears()]
    assert ModelShape.from_hf_config(model.config.to_dict(), name=preset) == shape


def test_quickstart_rtn_baseline_is_unchanged_by_the_builder(tmp_path):
    """tools/quickstart.py built its RTN row as ``prepare(load_causal_lm(path=dir), rtn)`` (fp32, no
    seed, no cast); it now calls the trainer's builder on the CPU in fp32. Same tensors, same logits,
    so the printed perplexity (29.110 on SmolLM2) cannot move: RTN draws no random numbers, the stored
    fp32 weights need no cast, and ``use_cache`` does not change a forward's logits."""
    path = _tiny_saved(tmp_path, True, torch.float32)
    recipe = {"bits": 4, "group_size": None, "symmetric": True, "rank": 32, "alpha": 32.0, "downcast": "fixed",
              "range_init": "lp", "lp_norm": 4.0}
    rtn = QATConfig(**{**recipe, "method": "rtn"})
    torch.manual_seed(123)  # whatever the caller's RNG state: the old path drew nothing from it
    old = prepare(load_causal_lm(path=path), rtn)
    new = build_prepared_model(rtn, path=path, device="cpu", dtype=torch.float32)
    _assert_same_model(old, new)
    ids = torch.randint(0, 256, (2, 16))
    assert torch.equal(old(input_ids=ids, use_cache=False).logits, new(input_ids=ids, use_cache=False).logits)


def test_builder_seeds_prepare_and_refuses_two_sources(tmp_path):
    cfg = GQA.hf_config()
    q = QATConfig(rank=4, range_init="minmax")
    a = build_prepared_model(q, config=cfg, init_seed=3)
    torch.manual_seed(99)  # the global RNG does not reach the build
    b = build_prepared_model(q, config=cfg, init_seed=3)
    c = build_prepared_model(q, config=cfg, init_seed=4)
    _assert_same_model(a, b)
    assert not torch.equal(a.model.layers[0].self_attn.q_proj.lora_A, c.model.layers[0].self_attn.q_proj.lora_A)
    assert a.config.use_cache is False
    with pytest.raises(ValueError, match="exactly one"):
        build_prepared_model(q)
    with pytest.raises(ValueError, match="prepare_fn needs lean=False"):
        build_prepared_model(q, config=cfg, lean=True, prepare_fn=lambda m: m)


@pytest.mark.parametrize("tied", [True, False])
def test_train_unquantized_from_a_bf16_checkpoint_trains_fp32_masters(tmp_path, tied):
    """Embeddings, norms and lm_head stored in bf16 become fp32 trainable parameters (no bf16
    trainable left: AdamW would round its updates away, FSDP2 refuses mixed dtypes), on the lean and
    the eager path alike; the activations stay in the compute dtype and the gradients reach them."""
    path = _tiny_saved(tmp_path, tied, torch.bfloat16)
    job = load_config(base={"model": {"path": str(path)},
                            "quant": {"method": "lrqat", "downcast": "fixed", "rank": 4, "train_unquantized": True},
                            "train": {"output_dir": str(tmp_path / "run"), "dtype": "bfloat16"}})
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    built = {"trainer": build_model(job),
             "eager": build_prepared_model(job.quant, path=path, dtype=torch.bfloat16, lean=False)}
    for how, model in built.items():
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert {"model.embed_tokens.weight", "model.norm.weight"} <= trainable.keys(), how
        assert {n: p.dtype for n, p in trainable.items() if p.dtype != torch.float32} == {}, how
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
        # the stored bf16 values, exactly, as fp32
        raw = load_causal_lm(path=path, dtype="auto")
        assert raw.model.embed_tokens.weight.dtype == torch.bfloat16
        assert torch.equal(model.model.embed_tokens.weight, raw.model.embed_tokens.weight.float())
        seen = {}
        model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.update(q=a[0].dtype))
        model.model.norm.register_forward_hook(lambda m, a, out: seen.update(norm=out.dtype))
        logits = model(input_ids=ids).logits
        assert seen == {"q": torch.bfloat16, "norm": torch.bfloat16} and logits.dtype == torch.bfloat16, how
        next_token_loss(logits, ids).backward()
        for name in ("model.embed_tokens.weight", "model.layers.0.input_layernorm.weight", "model.norm.weight"):
            g = trainable[name].grad
            assert g is not None and g.dtype == torch.float32 and g.abs().sum() > 0, (how, name)
    a, b = built["trainer"], built["eager"]
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
