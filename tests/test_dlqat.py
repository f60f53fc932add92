"""DL-QAT: the formula against a direct computation, min-max init, the two training phases (layer
and trainer), exact folding, and export (exact where the format stores a float offset, refused where not).

Tolerances: folding and export are exact (bitwise). The direct computation of the paper's formula
``m * (s * q + b)`` is compared with ``allclose(rtol=1e-6)``: the layer computes the folded form
``(m*s) * q + m*b`` (so fold is exact), which differs from it only by fp32 rounding; codes must be equal.
"""

import pytest
import torch
from torch import nn

import lrqat_dist
from lrqat_dist.export import ExportRefused, export_compressed_tensors, export_dequantized, export_native, read_native
from lrqat_dist.methods.dlqat import PHASE1, PHASE2, DLQATLinear, dlqat_init_range
from lrqat_dist.quant.affine import QuantSpec

from conftest import tiny_config

from train_common import job_dict, synthetic_builders

PARAMS = ["scale", "offset", "magnitude", "lora_A", "lora_B"]


def _layer(bits=4, group_size=16, seed=0, range_init="minmax", random_adapters=True):
    torch.manual_seed(seed)
    lin = nn.Linear(64, 24)
    cfg = lrqat_dist.QATConfig(method="dlqat", bits=bits, group_size=group_size, rank=4, alpha=2.0,
                               range_init=range_init)
    layer = DLQATLinear.from_linear(lin, cfg, "layer")
    if random_adapters:
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.05)
            layer.magnitude.uniform_(0.8, 1.2)
            layer.offset.add_(0.01 * torch.randn_like(layer.offset))
    return lin, layer


def _direct(layer, w0):
    """The paper's W_q = m * (s * clip(round((W0 + alpha/r B@A - b)/s), -2^(n-1), 2^(n-1)-1) + b), group by group."""
    n, r = layer.spec.bits, layer.rank
    w = w0 + (layer.alpha / r) * layer.lora_B @ layer.lora_A
    out, codes = torch.empty_like(w), torch.empty_like(w)
    gs = w.shape[1] // layer.n_groups
    for i in range(w.shape[0]):
        for g in range(layer.n_groups):
            cols = slice(g * gs, (g + 1) * gs)
            s, b, m = layer.scale[i, g], layer.offset[i, g], layer.magnitude[i, g]
            q = torch.clamp(torch.round((w[i, cols] - b) / s), -2 ** (n - 1), 2 ** (n - 1) - 1)
            codes[i, cols] = q
            out[i, cols] = m * (s * q + b)
    return out, codes


@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("bits", [3, 4])
def test_formula_matches_direct_computation_and_folds_exactly(bits, group_size):
    lin, layer = _layer(bits, group_size)
    with torch.no_grad():
        want, want_codes = _direct(layer, lin.weight)
        got = layer.weight_hat()
        assert torch.equal(layer.codes(), want_codes)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        folded = layer.fold()
        assert torch.equal(folded.dequantize(), got)  # bit-exact: folded form is what training computes
        assert torch.equal(folded.scale, layer.magnitude * layer.scale)
        assert torch.equal(folded.offset, layer.magnitude * layer.offset)
        x = torch.randn(3, 64)
        assert torch.equal(layer(x), nn.functional.linear(x, folded.dequantize(), folded.bias))


def test_minmax_init_is_the_papers_and_lp_init_is_its_signed_rewrite():
    w = torch.randn(8, 32)
    spec = QuantSpec(4, True, 16)
    s, b = dlqat_init_range(w, spec, "minmax")
    g = w.reshape(8, 2, 16)
    lo, hi = g.amin(-1), g.amax(-1)
    torch.testing.assert_close(s, (hi - lo) / 15)
    torch.testing.assert_close(b, (8 * hi + 7 * lo) / 15)
    # min and max land on the grid's end points -8 and 7
    torch.testing.assert_close((lo - b) / s, torch.full_like(s, -8.0))
    torch.testing.assert_close((hi - b) / s, torch.full_like(s, 7.0))
    s2, b2 = dlqat_init_range(w, spec, "lp")
    z = torch.round(8 - b2 / s2)  # b = s (2^(n-1) - z) with z an integer on [0, 15]
    torch.testing.assert_close(b2, s2 * (8 - z))
    assert bool(((z >= 0) & (z <= 15)).all())


def test_step0_with_zero_b_is_rtn_of_w0():
    lin, layer = _layer(random_adapters=False)
    with torch.no_grad():
        _, codes = _direct(layer, lin.weight)
        assert torch.equal(layer.codes(), codes)


@pytest.mark.parametrize("phase,live", [(PHASE1, {"scale", "offset"}), (PHASE2, {"magnitude", "lora_A", "lora_B"})])
def test_each_phase_gives_gradients_to_its_parameters_only(phase, live):
    _, layer = _layer()
    layer.set_phase(phase)
    layer(torch.randn(5, 64)).square().sum().backward()
    for name in PARAMS:
        grad = getattr(layer, name).grad
        assert grad is not None, name  # every parameter gets a gradient tensor (zeros when frozen): engines see one set
        assert bool(grad.any()) == (name in live), (name, phase)


def test_trainer_switches_phase_at_the_configured_step(tmp_path):
    """Through the trainer (single engine): steps 1-2 move only s, b; steps 3-4 only m, A, B (s, b exactly frozen,
    although they carry Adam momentum from phase 1: their lr is 0 in phase 2)."""
    from lrqat_dist.train.config import config_from_dict
    from lrqat_dist.train.loop import Trainer

    # range_init lp: a clipped start. With min-max nothing clips at step 1, where b's exact gradient,
    # m * (sum of G over the clipped weights), is 0 (docs/dlqat.md): b would rightly not move.
    cfg = config_from_dict(job_dict(tmp_path, quant={"method": "dlqat", "rank": 4, "alpha": 4.0,
                                                     "dlqat_phase1_steps": 2, "range_init": "lp"},
                                    train={"max_steps": 4, "val_every": 0, "save_every": 0, "save_final": False,
                                           "warmup_ratio": 0.0}))
    trainer = Trainer(cfg, synthetic_builders())
    snaps = [trainer.engine.trainable_state()]
    lrs = []
    trainer.run("none", on_step=lambda step: (snaps.append(trainer.engine.trainable_state()),
                                              lrs.append(trainer.engine.lrs())))

    def moved(a, b, kind):
        return any(not torch.equal(snaps[a][n], snaps[b][n]) for n in snaps[0] if n.endswith("." + kind))

    for step in (1, 2):
        assert moved(step - 1, step, "scale") and moved(step - 1, step, "offset")
        assert not any(moved(step - 1, step, k) for k in ("magnitude", "lora_A", "lora_B"))
    for step in (3, 4):
        assert not moved(step - 1, step, "scale") and not moved(step - 1, step, "offset")
        assert moved(step - 1, step, "magnitude") and moved(step - 1, step, "lora_B")
    assert lrs[1]["adapters"] > 0 and lrs[1]["scales"] == 0  # lrs() after step 2: the next step's rates


@pytest.fixture(scope="module")
def tiny_dlqat():
    model = lrqat_dist.load_causal_lm(config=tiny_config(vocab_size=260), seed=0)
    lrqat_dist.prepare(model, lrqat_dist.QATConfig(method="dlqat", bits=4, group_size=32, rank=4, alpha=4.0,
                                                   range_init="minmax"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("lora_B", "magnitude", "offset")):
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_export_native_and_dequantized_exact_compressed_tensors_refuses(tiny_dlqat, tmp_path):
    folded = lrqat_dist.fold(tiny_dlqat)
    report = export_native(tiny_dlqat, tmp_path / "native", verify_load=True)
    back = read_native(tmp_path / "native")
    for name, fw in folded.items():
        assert torch.equal(back[name].offset, fw.offset)
        assert torch.equal(back[name].dequantize(), fw.dequantize())
    assert any("offset" in c or "identical" in c for c in report.checks)
    export_dequantized(tiny_dlqat, tmp_path / "deq", verify_load=True)
    pytest.importorskip("compressed_tensors")
    with pytest.raises(ExportRefused, match="(?s)float offset.*Use format 'native'"):
        export_compressed_tensors(tiny_dlqat, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_config_rejects_asymmetric_dlqat_and_bad_phase_steps():
    with pytest.raises(ValueError, match="symmetric"):
        lrqat_dist.QATConfig(method="dlqat", symmetric=False)
    with pytest.raises(ValueError, match="dlqat_phase1_steps"):
        lrqat_dist.QATConfig(method="dlqat", dlqat_phase1_steps=-1)
