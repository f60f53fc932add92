"""Activation quantization (W4A8, W4A8KV4, W4A4KV4): quantizer math, placement, gradients, disabling,
folding, export, evaluation and a tiny training run."""
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from torch import nn

import lrqat_dist
from lrqat_dist import QATConfig
from lrqat_dist.methods.act_config import PRESETS, ActQuantConfig
from lrqat_dist.model.activations import (AttentionActQuant, activation_quantizers, calibrate_activations,
                                          remove_activation_quant)
from lrqat_dist.quant.activation import DynamicActQuantizer, StaticActQuantizer
from lrqat_dist.typed_config import from_dict, to_dict

from train_common import job_dict, synthetic_builders


def _prepared(family="llama", impl="sdpa", activations=None, seed=0, **cfg):
    model = lrqat_dist.load_causal_lm(config=tiny_config(family), attn_implementation=impl, seed=seed)
    return lrqat_dist.prepare(model, QATConfig(rank=4, group_size=32, range_init="minmax", activations=activations,
                                               **cfg))


def _direct(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-row asymmetric min-max quantize-dequantize in float64, written out row by row."""
    rows = x.double().reshape(-1, x.shape[-1])
    out = torch.empty_like(rows)
    qmax = 2**bits - 1
    for i, r in enumerate(rows):
        lo, hi = min(float(r.min()), 0.0), max(float(r.max()), 0.0)
        s = (hi - lo) / qmax if hi > lo else 1.0
        z = min(max(round(-lo / s), 0), qmax)
        out[i] = (torch.clamp(torch.round(r / s) + z, 0, qmax) - z) * s
    return out.reshape(x.shape)


# --- quantizer math ---------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
def test_dynamic_per_token_matches_direct_computation(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(3, 5, 40, generator=g) * torch.rand(3, 5, 1, generator=g) * 4 + 0.3
    x[0, 0] = 0.0  # an all-zero token stays zero
    x[1, 1] = x[1, 1].abs() + 0.1  # a one-signed token: the range is stretched to contain 0
    got = DynamicActQuantizer(bits)(x)
    assert torch.allclose(got.double(), _direct(x, bits), atol=1e-5, rtol=0)
    assert torch.equal(got[0, 0], torch.zeros(40))
    for tok in got.reshape(-1, 40):
        assert tok.unique().numel() <= 2**bits
    # bf16 in, bf16 out, computed in fp32
    xb = x.bfloat16()
    assert DynamicActQuantizer(bits)(xb).dtype == torch.bfloat16
    assert torch.equal(DynamicActQuantizer(bits)(xb), DynamicActQuantizer(bits)(xb.float()).bfloat16())


def test_reduce_dims_per_token_over_heads_or_per_head():
    x = torch.randn(2, 3, 6, 8)  # [b, heads, t, d]
    over_heads = DynamicActQuantizer(4, (1, 3))(x)
    per_head = DynamicActQuantizer(4, (3,))(x)
    flat = x.transpose(1, 2).reshape(2, 6, 24)
    assert torch.allclose(over_heads.transpose(1, 2).reshape(2, 6, 24).double(), _direct(flat, 4), atol=1e-5)
    assert torch.allclose(per_head.double(), _direct(x, 4), atol=1e-5)


def test_static_quantizer_calibration_and_math():
    q = StaticActQuantizer(8, learned=True, name="blk.input")
    with pytest.raises(RuntimeError, match="blk.input: static activation quantizer used before calibration"):
        q(torch.ones(2))
    q.observe(torch.tensor([-1.0, 0.5]))
    q.observe(torch.tensor([2.0, 0.0]))
    q.calibrate()
    s = 3.0 / 255
    assert torch.allclose(q.scale, torch.tensor([s])) and q.zero_point.item() == round(1.0 / s)
    x = torch.tensor([-2.0, -1.0, 0.3, 2.0, 5.0])
    z = q.zero_point.item()
    want = (torch.clamp(torch.round(x / q.scale) + z, 0, 255) - z) * q.scale
    assert torch.equal(q(x), want)
    assert q(x)[-1] == (255 - z) * q.scale  # clipped at the top of the range


def test_gradients_ste_and_lsq():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 32, generator=g) * 3).requires_grad_()
    w = torch.randn(4, 32, generator=g)
    dyn = DynamicActQuantizer(4)
    (dyn(x) * w).sum().backward()
    scale, zp = dyn.qparams(x)
    inside = ((torch.round(x / scale) + zp) >= 0) & ((torch.round(x / scale) + zp) <= 15)
    assert torch.allclose(x.grad, torch.where(inside, w, torch.zeros_like(w)), rtol=1e-6, atol=0)  # STE; s, z constants

    q = StaticActQuantizer(4, learned=True)
    q.calibrate(torch.tensor(-2.0), torch.tensor(3.0))
    x2 = x.detach().clone().requires_grad_()
    (q(x2) * w).sum().backward()
    s, z = q.scale.detach(), q.zero_point
    v = torch.round(x2.detach() / s) + z
    lsq = torch.where(v < 0, -z, torch.where(v > 15, 15 - z, v - z - x2.detach() / s))
    assert torch.allclose(q.scale.grad, (w * lsq).sum().reshape(1), rtol=1e-5, atol=1e-5)
    assert torch.allclose(x2.grad, torch.where((v >= 0) & (v <= 15), w, torch.zeros_like(w)), rtol=1e-6, atol=0)
    frozen = StaticActQuantizer(4, learned=False)
    assert not frozen.scale.requires_grad


def test_symmetric_dynamic_inputs_match_compressed_tensors():
    """a8's symmetric per-token int8 grid is compressed-tensors' own (what transformers and vLLM's
    int-activation schemes are configured with): s = max|x| / 127.5, codes in [-128, 127], no zero-point."""
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    x = torch.randn(5, 48, generator=torch.Generator().manual_seed(3)) * torch.tensor([0.1, 1, 10, 100, 0.0])[:, None]
    args = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
    q = DynamicActQuantizer(8, symmetric=True)
    s, z = q.qparams(x)
    assert torch.equal(z, torch.zeros_like(z))
    lib_s, _ = calculate_qparams(x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), args)
    assert torch.equal(s[:4], lib_s[:4])  # the all-zero row: our scale 1 (exact zeros either way)
    got = q(x)
    assert torch.equal(got[:4], fake_quantize(x[:4], lib_s[:4], None, args)) and torch.equal(got[4], x[4])
    codes = torch.round(x[:4] / s[:4])
    assert int(codes.min()) >= -128 and int(codes.max()) <= 128  # +128 (x = max) clamps to 127
    assert ActQuantConfig.from_value("a8").symmetric and not ActQuantConfig.from_value("a8asym").symmetric
    assert "symmetric inputs" in ActQuantConfig.from_value("a8").describe()
    del ct


# --- config -------------------------------------------------------------------------------------

def test_config_presets_and_yaml_errors():
    assert QATConfig(activations="a8kv4").activations == ActQuantConfig(preset="a8kv4", **PRESETS["a8kv4"])
    cfg = from_dict(QATConfig, {"activations": {"preset": "a4kv4", "kv_granularity": "head"}}, "quant")
    assert (cfg.activations.bits, cfg.activations.kv_bits, cfg.activations.kv_granularity) == (4, 4, "head")
    again = from_dict(QATConfig, to_dict(cfg), "quant")  # the resolved config a run writes reads back
    assert again.activations == cfg.activations
    assert QATConfig().activations is None
    with pytest.raises(ValueError, match=r"quant.activations.kv_bits: expected one of \(4, 8\)"):
        from_dict(QATConfig, {"activations": {"kv_bits": 3}}, "quant")
    with pytest.raises(ValueError, match=r"quant.activations.kvbits: unknown key"):
        from_dict(QATConfig, {"activations": {"kvbits": 4}}, "quant")
    with pytest.raises(ValueError, match=r"quant.activations: unknown preset 'a6'"):
        from_dict(QATConfig, {"activations": "a6"}, "quant")
    with pytest.raises(ValueError, match=r"quant.activations.mode: unknown 'lsq'"):
        from_dict(QATConfig, {"activations": {"mode": "lsq"}}, "quant")


# --- placement ----------------------------------------------------------------------------------

def _rope_fn(model):
    return sys.modules[type(model.model.layers[0].self_attn).__module__].apply_rotary_pos_emb


@pytest.mark.parametrize("family,impl,preset", [(f, i, "a4kv4") for f in ("llama", "mistral", "qwen2")
                                                for i in ("sdpa", "eager")] +
                         [("llama", "sdpa", "a8"), ("qwen2", "eager", "a8kv4")])
def test_placement_quantizes_linear_inputs_and_post_rope_qkv(family, impl, preset):
    model = _prepared(family, impl, preset)
    cfg = model.qat_config.activations
    seen, raw = {}, {}
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) or hasattr(m, "spec")}
    for n, m in linears.items():
        m.register_forward_pre_hook(lambda mod, a, n=n: raw.__setitem__(n, a[0]), prepend=True)
        m.register_forward_pre_hook(lambda mod, a, n=n: seen.__setitem__(n, a[0]))
        if n.endswith(("q_proj", "k_proj", "v_proj")):
            m.register_forward_hook(lambda mod, a, out, n=n: seen.__setitem__(n + ":out", out))
    attn_q = {n: m for n, m in model.named_modules() if isinstance(m, AttentionActQuant)}
    for n, m in attn_q.items():
        m.register_forward_hook(lambda mod, a, out, n=n: seen.__setitem__(n + ":qkv", (a, out)))
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids)

    for n in linears:
        if n == "lm_head":
            assert seen[n] is raw[n]  # full precision
        else:
            want = DynamicActQuantizer(cfg.bits, symmetric=cfg.symmetric)(raw[n])
            assert torch.equal(seen[n], want) and not torch.equal(seen[n], raw[n])
    if cfg.kv_bits is None:
        assert not attn_q and model.config._attn_implementation == impl
        return
    assert set(attn_q) == {f"model.layers.{i}.self_attn.act_quant" for i in range(2)}
    assert model.config._attn_implementation == f"lrqat_actq_{impl}"
    attn = model.model.layers[1].self_attn
    prefix = "model.layers.1.self_attn"
    hd = attn.head_dim
    shape = lambda t: t.view(2, 12, -1, hd).transpose(1, 2)  # noqa: E731
    q, k, v = (shape(seen[f"{prefix}.{p}_proj:out"]) for p in "qkv")
    cos, sin = model.model.rotary_emb(q, torch.arange(12)[None])
    q, k = _rope_fn(model)(q, k, cos, sin)
    (q_in, k_in, v_in), (q_out, k_out, v_out) = seen[f"{prefix}.act_quant:qkv"]
    assert torch.allclose(q_in, q, atol=1e-6) and torch.allclose(k_in, k, atol=1e-6) and torch.equal(v_in, v)
    per_token = lambda b: DynamicActQuantizer(b, (1, 3))  # noqa: E731
    assert torch.equal(k_out, per_token(cfg.kv_bits)(k_in)) and torch.equal(v_out, per_token(cfg.kv_bits)(v_in))
    assert torch.equal(q_out, per_token(cfg.query_bits)(q_in))
    # ... and those are what the attention computed with (the o_proj input before its own quantizer)
    rep = attn.num_key_value_groups
    want = F.scaled_dot_product_attention(q_out, k_out.repeat_interleave(rep, 1), v_out.repeat_interleave(rep, 1),
                                          is_causal=True, scale=attn.scaling)
    assert torch.allclose(raw[f"{prefix}.o_proj"], want.transpose(1, 2).reshape(2, 12, -1), atol=1e-5)


def test_disabling_restores_the_weight_only_model_exactly():
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    weight_only = _prepared("mistral", "eager")
    assert not activation_quantizers(weight_only)
    with torch.no_grad():
        ref = weight_only(ids).logits
    model = _prepared("mistral", "eager", "a4kv4")
    folded = lrqat_dist.fold(model)  # folding reads only the weight part
    assert all(torch.equal(folded[n].codes, f.codes) for n, f in lrqat_dist.fold(weight_only).items())
    with torch.no_grad():
        quantized = model(ids).logits
        assert not torch.equal(quantized, ref)
        remove_activation_quant(model)
        assert torch.equal(model(ids).logits, ref)
    assert model.config._attn_implementation == "eager" and not activation_quantizers(model)
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_materialize_keeps_activation_quant_bit_identical():
    model = _prepared("qwen2", "sdpa", "a8kv4")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(ids).logits
        plain = lrqat_dist.materialize(model)
        assert not any(hasattr(m, "spec") for m in plain.modules())
        assert torch.equal(plain(ids).logits, want)


def test_static_learned_scales_train_in_the_scale_group():
    from lrqat_dist.engines import TrainConfig
    from lrqat_dist.engines.optim import param_groups

    model = _prepared("llama", "sdpa", {"preset": "a8kv4", "mode": "static"})
    g = torch.Generator().manual_seed(3)
    calibrate_activations(model, [torch.randint(0, 256, (2, 16), generator=g) for _ in range(2)])
    static = activation_quantizers(model)
    assert len(static) == 14 + 2 * 3 and all(bool(q.calibrated) for q in static.values())
    groups = {gr["name"]: gr["params"] for gr in param_groups(model, TrainConfig(output_dir="unused"))}
    act_scales = [q.scale for q in static.values()]
    assert all(any(p is s for p in groups["scales"]) for s in act_scales)
    loss = model(torch.randint(0, 256, (2, 16), generator=g), labels=torch.randint(0, 256, (2, 16), generator=g)).loss
    loss.backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in act_scales)


# --- export and evaluation --------------------------------------------------------------------------

def test_exports_carry_or_refuse_activation_quant(tmp_path):
    pytest.importorskip("compressed_tensors")
    from lrqat_dist.export import ExportRefused, export_model, load_compressed_tensors, load_native

    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(4))
    a8 = _prepared("llama", "sdpa", "a8")
    with torch.no_grad():
        want = a8(ids).logits
        weight_only = _prepared("llama", "sdpa")(ids).logits
    # a8 (symmetric int8 inputs) and a8asym: written int-quantized (the format vLLM's W4A8/W8A8 int
    # schemes load), and transformers + compressed-tensors run the int8 inputs: same logits, bit for bit.
    for preset, model, symmetric in (("a8", a8, True), ("a8asym", _prepared("llama", "sdpa", "a8asym"), False)):
        with torch.no_grad():
            want = model(ids).logits
        export_model(model, tmp_path / preset, "compressed-tensors")
        qc = json.loads((tmp_path / preset / "config.json").read_text())["quantization_config"]
        group = qc["config_groups"]["group_0"]
        want_args = {"num_bits": 8, "type": "int", "symmetric": symmetric, "strategy": "token", "dynamic": True}
        assert {k: group["input_activations"][k] for k in want_args} == want_args
        assert qc["format"] == group["format"] == "int-quantized"
        with torch.no_grad():
            got = load_compressed_tensors(tmp_path / preset)(ids).logits
        assert torch.equal(got, want) and not torch.equal(got, weight_only), preset

    a4kv4 = _prepared("llama", "sdpa", "a4kv4")
    for fmt in ("compressed-tensors", "dequantized"):
        with pytest.raises(ExportRefused, match=r"(?s)cannot express .*A4-KV4-Q4.*--drop-activation-quant"):
            export_model(a4kv4, tmp_path / fmt, fmt)
        assert not (tmp_path / fmt).exists()
    report = export_model(a4kv4, tmp_path / "ct4", "compressed-tensors", drop_activation_quant=True)
    side = json.loads((tmp_path / "ct4/lrqat_activations.json").read_text())
    assert side["carried"] == "nothing" and len(side["dropped"]) == 3 and "DROPPED" in report.notes[-1]
    assert json.loads((tmp_path / "ct4/config.json").read_text())["quantization_config"]["config_groups"][
        "group_0"]["input_activations"] is None

    with torch.no_grad():
        want4 = a4kv4(ids).logits
    export_model(a4kv4, tmp_path / "nat", "native")
    assert "lrqat_actq" not in (tmp_path / "nat/config.json").read_text()
    with torch.no_grad():
        assert torch.equal(load_native(tmp_path / "nat")(ids).logits, want4)

    static = _prepared("llama", "sdpa", {"preset": "a8kv4", "mode": "static", "static_range": "calibrated"})
    calibrate_activations(static, [ids])
    with torch.no_grad():
        want_s = static(ids).logits
        export_model(static, tmp_path / "nat_s", "native")
        assert torch.equal(load_native(tmp_path / "nat_s")(ids).logits, want_s)


def test_trainer_a8kv4_run_then_eval_applies_activation_quant(tmp_path):
    from lrqat_dist.eval import load_for_eval
    from lrqat_dist.export.run import load_run
    from lrqat_dist.train import train
    from lrqat_dist.train.config import config_from_dict

    tokenizer = Path(__file__).parent / "fixtures" / "lm_eval_task" / "byte_tokenizer"
    job = job_dict(tmp_path, quant={"activations": "a8kv4"}, train={"max_steps": 2, "val_every": 0},
                   model={"tokenizer": str(tokenizer)})
    train(config_from_dict(job), resume="none", builders=synthetic_builders())
    run = load_run(tmp_path)
    assert run.config.quant.activations.kv_bits == 4
    assert run.model.config._attn_implementation == "lrqat_actq_sdpa"
    ids = torch.randint(0, 1024, (2, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = run.model(ids).logits
    loaded = run.model
    remove_activation_quant(loaded)
    with torch.no_grad():
        assert not torch.equal(loaded(ids).logits, want)  # so the next check is not vacuous
    evaluated = load_for_eval(tmp_path)  # what tools/eval.py evaluates: the run, materialized
    assert "activations A8-KV4-Q8 dynamic per-token" in evaluated.description
    with torch.no_grad():
        assert torch.equal(evaluated.model(ids).logits, want)

    job = job_dict(tmp_path / "static", quant={"activations": {"preset": "a8", "mode": "static"}})
    with pytest.raises(ValueError, match="quant.activations.mode: 'static' is supported by the Python API only"):
        train(config_from_dict(job), resume="none", builders=synthetic_builders())


def test_saved_a8_configs_keep_their_grid(tmp_path, caplog):
    """A config saved before 'a8' became symmetric (the fully expanded mapping, no 'symmetric' key)
    loads as the asymmetric grid it was trained with, with a warning; a recipe's plain 'a8' (or a
    partial mapping) is the current symmetric preset; dump_config always writes 'symmetric'."""
    import logging

    import yaml

    from lrqat_dist.train.config import dump_config, load_config

    old = {"preset": "a8", "bits": 8, "kv_bits": None, "query_bits": None, "mode": "dynamic",
           "static_range": "learned", "kv_granularity": "token"}  # what dump_config wrote before
    with caplog.at_level(logging.WARNING, logger="lrqat_dist.methods.act_config"):
        assert ActQuantConfig.from_value(old).symmetric is False
    assert "saved without 'symmetric'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lrqat_dist.methods.act_config"):
        assert ActQuantConfig.from_value("a8").symmetric is True
        assert ActQuantConfig.from_value({"preset": "a8", "kv_bits": 8}).symmetric is True  # user-written
        assert ActQuantConfig.from_value({**old, "symmetric": True}).symmetric is True
    assert caplog.text == ""

    repo = Path(__file__).parents[1]
    for preset, sym in (("a8", True), ("a8asym", False)):
        dumped = dump_config(load_config(repo / "configs/tiny-cpu.yaml", [f"quant.activations={preset}"]))
        assert yaml.safe_load(dumped)["quant"]["activations"]["symmetric"] is sym  # always explicit
        (tmp_path / "c.yaml").write_text(dumped)
        assert load_config(tmp_path / "c.yaml").quant.activations.symmetric is sym
    raw = yaml.safe_load(dumped)
    raw["quant"]["activations"] = old  # an old run's config.yaml
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(raw))
    assert load_config(tmp_path / "old.yaml").quant.activations.symmetric is False
