"""LoQT: the formula against a direct computation (both orientations), the merge schedule, the gradient
probe and its SVD (P orthonormal, top subspace), merges (function kept up to quantization error, error
compensation, B = 0 is a no-op), exact fold after the final merge, and the trainer: merges at the
scheduled steps, optimizer state kept, checkpoint/resume and export carrying the merged buffers,
continued pretraining and pretraining from random init.

Tolerances: a merge changes each weight by at most half a step of its new grid (min-max range, no
clipping): |W - deq Q(W)| <= s/2 (+1e-6 for fp32 arithmetic). Folding after the final merge is exact.
"""
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import lrqat_dist
from lrqat_dist.methods.hooks import LocalParams, LoQTHooks
from lrqat_dist.methods.loqt import LoQTLinear, gradient_projection, loqt_update_steps
from lrqat_dist.quant.affine import dequantize, grouped

from train_common import job_dict, synthetic_builders


def _layer(out=24, inp=64, bits=4, group_size=None, rank=4, seed=0, error_comp=0, symmetric=True):
    torch.manual_seed(seed)
    lin = nn.Linear(inp, out)
    cfg = lrqat_dist.QATConfig(method="loqt", bits=bits, group_size=group_size, rank=rank, range_init="minmax",
                               symmetric=symmetric, loqt_scale=0.5, loqt_error_comp=error_comp)
    return lin, LoQTLinear.from_linear(lin, cfg, "layer")


def _probe(layer, seed=1):
    """dL/dW of a random loss through the layer, via the layer's gradient sink."""
    layer.weight_grad_sink = torch.zeros(layer.out_features, layer.in_features)
    x = torch.randn(6, layer.in_features, generator=torch.Generator().manual_seed(seed))
    layer(x).pow(2).sum().backward()
    grad, layer.weight_grad_sink = layer.weight_grad_sink, None
    return grad, x


@pytest.mark.parametrize("out,inp", [(24, 64), (64, 24)])
def test_formula_matches_direct_computation(out, inp):
    lin, layer = _layer(out, inp)
    with torch.no_grad():
        layer.proj.copy_(torch.linalg.qr(torch.randn(layer.proj.shape))[0])
        layer.lora_B.normal_()
        q, s = layer.qweight.float(), layer.qscale
        base = q * s  # per-channel symmetric: deq(Q) = s * q
        low = layer.proj @ layer.lora_B if out <= inp else layer.lora_B @ layer.proj.t()
        torch.testing.assert_close(layer.weight_hat(), base + 0.5 * low, rtol=0, atol=1e-6)
        # initial Q is round-to-nearest of W0 on the min-max grid
        torch.testing.assert_close(s, lin.weight.abs().amax(1, keepdim=True) / 7)
        assert torch.equal(q, torch.clamp(torch.round(lin.weight / s), -8, 7))
    assert layer.lora_B.shape == ((4, inp) if out <= inp else (out, 4))  # P on the smaller side


def test_update_schedule():
    steps = loqt_update_steps(100, 1.2, 20_000)
    direct, u, i = [], 1, 0
    while u <= 20_000:
        direct.append(u)
        u += 100 + math.floor(1.2**i)
        i += 1
    assert steps == direct
    assert steps[:4] == [1, 102, 203, 304]
    gaps = [b - a for a, b in zip(steps, steps[1:])]
    assert gaps == sorted(gaps) and gaps[0] == 101
    assert loqt_update_steps(1, 1.2, 8) == [1, 3, 5, 7]


@pytest.mark.parametrize("out,inp", [(24, 64), (64, 24)])
def test_gradient_probe_and_projection(out, inp):
    lin, layer = _layer(out, inp)
    with torch.no_grad():
        layer.lora_B.normal_()
    grad, x = _probe(layer)
    # direct: the gradient of the same loss w.r.t. a plain weight equal to weight_hat
    w = layer.weight_hat().detach().requires_grad_(True)
    nn.functional.linear(x, w, layer.bias).pow(2).sum().backward()
    torch.testing.assert_close(grad, w.grad, rtol=1e-5, atol=1e-5)
    left = out <= inp
    p = gradient_projection(grad, 4, left)
    assert p.shape == ((out, 4) if left else (inp, 4))
    torch.testing.assert_close(p.t() @ p, torch.eye(4), rtol=0, atol=1e-5)  # orthonormal columns
    u, sv, vh = torch.linalg.svd(grad)
    top = u[:, :4] if left else vh[:4].t()
    torch.testing.assert_close((p @ p.t()) @ top, top, rtol=0, atol=1e-4)  # spans the top-4 singular subspace


@pytest.mark.parametrize("group_size,symmetric", [(None, True), (16, True), (16, False)])
def test_merge_keeps_the_function_up_to_quantization_error(group_size, symmetric):
    _, layer = _layer(group_size=group_size, symmetric=symmetric)
    with torch.no_grad():
        layer.proj.copy_(torch.linalg.qr(torch.randn(layer.proj.shape))[0])
        layer.lora_B.normal_(0, 0.05)
        before = layer.weight_hat()
        codes, scale, zp, b_new = layer.merge(layer.lora_B)
        assert not bool(b_new.any())
        after = dequantize(codes, scale, zp)
        err = grouped((after - before).abs(), scale.shape[1])
        assert bool((err <= scale.unsqueeze(-1) / 2 + 1e-6).all())
        assert not torch.equal(codes, layer.qweight)  # the merge did move codes
        layer.apply_merge(codes, scale, zp)
        layer.lora_B.zero_()
        assert torch.equal(layer.weight_hat(), after)
        fw = layer.fold()  # B == 0: fold is exact and a further merge is a no-op
        assert torch.equal(fw.dequantize(), layer.weight_hat())
        again = layer.merge(layer.lora_B)
        assert torch.equal(again[0], layer.qweight) and torch.equal(again[1], layer.qscale)


def test_error_compensation_absorbs_part_of_the_quantization_error():
    _, layer = _layer(rank=8, error_comp=3)
    with torch.no_grad():
        layer.proj.copy_(torch.linalg.qr(torch.randn(layer.proj.shape))[0])
        layer.lora_B.normal_(0, 0.05)
        target = layer.weight_hat()
        c0, s0, z0, b0 = layer.merge(layer.lora_B, error_comp=0)
        c3, s3, z3, b3 = layer.merge(layer.lora_B, error_comp=3)
        err0 = torch.linalg.vector_norm(target - dequantize(c0, s0, z0))
        err3 = torch.linalg.vector_norm(target - dequantize(c3, s3, z3) - layer.s * layer.low_rank(b3))
        assert bool(b3.any()) and err3 < err0
        # fold of a layer with B != 0 is the merge it would do (requantized), not weight_hat
        layer.lora_B.copy_(b3)
        fw = layer.fold()
        c, s, z, _ = layer.merge(layer.lora_B)
        assert torch.equal(fw.codes, c.to(torch.int32)) and torch.equal(fw.scale, s)


def test_hooks_without_a_trainer():
    """prepare users drive LoQT with LoQTHooks + LocalParams; step 1 (P = 0) gives B a zero gradient."""
    model = nn.Sequential(nn.Linear(32, 16))
    lrqat_dist.prepare(model, lrqat_dist.QATConfig(method="loqt", rank=4, range_init="minmax", targets=["0"],
                                                   loqt_tau=1))
    layer = model[0]
    hooks, params = LoQTHooks({"0": layer}, model.qat_config, max_steps=10), LocalParams(model)
    hooks.before_step(1, params)
    model(torch.randn(4, 32)).sum().backward()
    assert not bool(layer.lora_B.grad.any())
    hooks.after_step(1, params)
    torch.testing.assert_close(layer.proj.t() @ layer.proj, torch.eye(4), rtol=0, atol=1e-5)


def _run(tmp_path, **quant):
    from lrqat_dist.train.config import config_from_dict
    from lrqat_dist.train.loop import Trainer

    q = {"method": "loqt", "rank": 4, "range_init": "minmax", "loqt_tau": 1, "loqt_scale": 0.5, **quant}
    tok = str(Path(__file__).parent / "fixtures" / "lm_eval_task" / "byte_tokenizer")  # for load_run
    cfg = config_from_dict(job_dict(tmp_path, model={"tokenizer": tok}, quant=q,
                                    train={"max_steps": 6, "val_every": 0, "save_every": 3, "warmup_ratio": 0.0}))
    trainer = Trainer(cfg, synthetic_builders())
    layers = {n: m for n, m in trainer.engine.module.named_modules() if isinstance(m, LoQTLinear)}
    snaps = []

    def on_step(step):
        name, layer = next(iter(layers.items()))
        b = dict(trainer.engine.module.named_parameters())[f"{name}.lora_B"]
        state = trainer.engine.optimizer.state[b]
        codes = torch.cat([m.qweight.flatten() for m in layers.values()])  # any layer's codes may move
        snaps.append({"q": codes, "p": layer.proj.clone(), "b": b.detach().clone(),
                      "exp_avg": state["exp_avg"].clone() if state else None, "merges": trainer.hooks.merges})

    result = trainer.run("none", on_step=on_step)
    return trainer, layers, snaps, result


def test_trainer_merges_on_schedule_keeps_adam_state_and_exports_exactly(tmp_path):
    """tau = 1: updates after steps 1, 3, 5 and the final merge after 6; checkpoint at 3 and 6."""
    trainer, layers, snaps, result = _run(tmp_path)
    assert trainer.hooks.update_steps == {1, 3, 5}
    assert not bool(snaps[0]["b"].any())  # step 1: B had a zero gradient (P = 0), P now from the gradient
    torch.testing.assert_close(snaps[0]["p"].t() @ snaps[0]["p"], torch.eye(4), rtol=0, atol=1e-5)
    n = len(layers)
    assert [s["merges"] for s in snaps] == [0, 0, n, n, 2 * n, 3 * n]  # every layer merged a non-zero B
    assert not torch.equal(snaps[2]["q"], snaps[1]["q"])  # the first merge (2 steps of B) moved codes
    assert torch.equal(snaps[1]["q"], snaps[0]["q"]) and torch.equal(snaps[3]["q"], snaps[2]["q"])  # no merge
    for step in (3, 5, 6):  # merged: B restarted from zero, Adam state of B kept
        s = snaps[step - 1]
        assert not bool(s["b"].any()) and bool(s["exp_avg"].any()), step
    assert torch.equal(snaps[3]["p"], snaps[2]["p"]) and not torch.equal(snaps[4]["p"], snaps[3]["p"])
    assert bool(snaps[3]["b"].any())  # step 4 trained B
    # after the final merge the fold is exact; the exported run reloads the merged buffers bit for bit
    folded = lrqat_dist.fold(trainer.engine.module)
    for name, lay in layers.items():
        assert torch.equal(folded[name].dequantize(), lay.weight_hat().detach())
    from lrqat_dist.export import export_native, read_native
    from lrqat_dist.export.run import load_run

    run = load_run(tmp_path)
    for name, lay in lrqat_dist.model.quantized_layers(run.model).items():
        assert torch.equal(lay.qweight, layers[name].qweight) and torch.equal(lay.proj, layers[name].proj)
    export_native(run.model, tmp_path / "native")
    back = read_native(tmp_path / "native")
    assert all(torch.equal(back[n].dequantize(), folded[n].dequantize()) for n in folded)
    # resume from the step-3 checkpoint restores the merged buffers of step 3 (not the base model's)
    from lrqat_dist.train.config import load_config
    from lrqat_dist.train.loop import Trainer

    cfg = load_config(tmp_path / "config.yaml")
    again = Trainer(cfg, synthetic_builders())
    again.checkpointer.load(tmp_path / "checkpoints" / "step_00000003", again.engine)
    lays = [m for m in again.engine.module.modules() if isinstance(m, LoQTLinear)]
    assert torch.equal(torch.cat([m.qweight.flatten() for m in lays]), snaps[2]["q"])
    assert torch.equal(lays[0].proj, snaps[2]["p"])


def test_pretraining_from_random_init_trains_embeddings_too(tmp_path):
    trainer, layers, snaps, result = _run(tmp_path, train_unquantized=True, loqt_error_comp=1)
    names = trainer.engine.trainable_names
    assert "model.embed_tokens.weight" in names and any(n.endswith("lora_B") for n in names)
    from lrqat_dist.train import read_metrics

    losses = [r["loss"] for r in read_metrics(tmp_path) if "loss" in r]
    assert losses[-1] < losses[0]


def test_merge_keeps_each_groups_grid_unless_the_group_outgrows_it():
    _, layer = _layer(group_size=16)
    with torch.no_grad():
        layer.proj.copy_(torch.linalg.qr(torch.randn(layer.proj.shape))[0])
        b = torch.zeros_like(layer.lora_B)
        b[:, :16] = 1e-3 * torch.randn(4, 16)  # small change: the first column group of some rows
        codes, scale, _, _ = layer.merge(b)
        assert torch.equal(scale, layer.qscale)  # no group left its grid: scales kept (no re-rounding elsewhere)
        assert torch.equal(codes[:, 16:], layer.qweight[:, 16:])  # untouched groups keep their codes exactly
        b[:, 16:32] = 10 * torch.randn(4, 16)  # second group of every row grows far beyond its grid
        codes, scale, _, _ = layer.merge(b)
        assert not bool((scale[:, 1] == layer.qscale[:, 1]).any()) and torch.equal(scale[:, 2:], layer.qscale[:, 2:])
