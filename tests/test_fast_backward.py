"""The fast backward (methods/fast_backward.py) against the plain autograd path, and the fused rebuild
against the unfused weight, bit for bit. Tiny shapes: the whole file runs in seconds."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from lrqat_dist import QATConfig
from lrqat_dist.methods import METHODS, fast_backward
from lrqat_dist.methods.dlqat import PHASE1, PHASE2
from lrqat_dist.model.activations import attach_input_quantizer
from lrqat_dist.quant.activation import DynamicActQuantizer
from lrqat_dist.quant.affine import to_codes_domain

IN, OUT, RANK, GROUP = 64, 48, 4, 16
TOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _layer(method: str, seed: int = 0, spread: float = 0.0, **kw):
    torch.manual_seed(seed)
    lin = nn.Linear(IN, OUT, bias=True)
    with torch.no_grad():
        lin.weight[0, :5] *= 6.0  # outliers: the Lp range clips the rest of their rows' extremes
    layer = METHODS[method].from_linear(lin, QATConfig(method=method, rank=RANK, **kw), "layer")
    if method == "lrqat" and spread:
        with torch.no_grad():  # adapters large enough that c B@A moves codes past the grid ends
            layer.lora_B.normal_(0.0, spread / (layer.scaling * layer.lora_A.std().item() * RANK**0.5))
    return layer


def _grads(layer, x: torch.Tensor, mode: str):
    layer.backward = mode
    for p in layer.parameters():
        p.grad = None
    x = x.clone().requires_grad_(True)
    y = layer(x)
    ran = type(y.grad_fn).__name__
    (y * torch.linspace(-1.0, 2.0, y.shape[-1])).pow(2).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}, ran


FAST_FUNCTIONS = {"_LowRankLinearBackward", "_DenseGradLinearBackward", "_DLQATLinearBackward"}


def _assert_ran(ran: str, mode: str) -> None:
    """The path compared is the one asked for (else fast == reference would hold trivially)."""
    if mode == "fast":
        assert ran in FAST_FUNCTIONS, ran
    else:
        assert ran == "_RecomputedLinearBackward", ran


def _assert_same_grads(layer, x):
    y_ref, gx_ref, ref, ran_ref = _grads(layer, x, "autograd")
    y, gx, fast, ran = _grads(layer, x, "fast")
    _assert_ran(ran_ref, "autograd")
    _assert_ran(ran, "fast")
    assert torch.equal(y, y_ref)  # the same rebuilt weight, the same matmul
    assert set(fast) == set(ref) and ref
    assert _rel(gx, gx_ref) <= TOL
    errs = {n: _rel(fast[n], ref[n]) for n in ref}
    assert max(errs.values()) <= TOL, errs
    return errs


def _clipped_fraction(layer) -> float:
    _, clipped = layer.fused_rebuild(with_mask=True)
    return float(clipped.float().mean())


def _lrqat_cases():
    downcasts = ["fp32", "bf16", "fp16", "fixed", "int", "int-packed"]
    cases = []
    for i, (bits, group, sym) in enumerate(itertools.product(range(2, 9), (None, GROUP), (True, False))):
        dc = downcasts[i % len(downcasts)]
        if dc == "int-packed" and bits > 4:
            dc = "int"
        cases.append((bits, group, sym, dc))
    return cases


@pytest.mark.parametrize("path", ["lowrank", "dense"])
@pytest.mark.parametrize("bits,group,sym,downcast", _lrqat_cases())
def test_lrqat_gradients_equal_autograd(bits, group, sym, downcast, path, monkeypatch):
    monkeypatch.setattr(fast_backward, "DENSE_CLIPPED_FRACTION", 1.0 if path == "lowrank" else 0.0)
    layer = _layer("lrqat", seed=bits, spread=1.0, bits=bits, group_size=group, symmetric=sym, downcast=downcast)
    frac = _clipped_fraction(layer)
    assert 0.0 < frac < 0.5, frac  # clipping present (the correction is exercised), not everything
    _assert_same_grads(layer, torch.randn(2, 7, IN))
    if group is not None:  # per-group without a trained scale: the low-rank per-group form
        layer.scale.requires_grad_(False)
        _assert_same_grads(layer, torch.randn(2, 7, IN))


def test_lrqat_gradients_with_activation_quantization():
    layer = _layer("lrqat", spread=1.0, bits=4)
    attach_input_quantizer(layer, DynamicActQuantizer(8))
    assert _clipped_fraction(layer) > 0
    _assert_same_grads(layer, torch.randn(3, 5, IN))


def test_lrqat_gradients_bf16_compute():
    """bf16 inputs: both paths round differently (the plain one rounds G to bf16), so a looser bound."""
    layer = _layer("lrqat", spread=1.0, bits=4)
    x = torch.randn(2, 9, IN).to(torch.bfloat16)
    _, _, ref, ran_ref = _grads(layer, x, "autograd")
    _, _, fast, ran = _grads(layer, x, "fast")
    _assert_ran(ran_ref, "autograd")
    _assert_ran(ran, "fast")
    assert all(fast[n].dtype == torch.float32 for n in fast)  # fp32 masters get fp32 gradients
    assert max(_rel(fast[n], ref[n]) for n in ref) < 2e-2


@pytest.mark.parametrize("group,sym", [(None, True), (None, False), (GROUP, True), (GROUP, False)])
@pytest.mark.parametrize("method", ["peqa", "full_qat"])
def test_peqa_and_full_qat_gradients_equal_autograd(method, group, sym):
    for bits in (2, 3, 4, 8):
        layer = _layer(method, seed=bits, bits=bits, group_size=group, symmetric=sym)
        if method == "full_qat":  # clipping present: some weights pushed beyond the range
            with torch.no_grad():
                layer.weight[1, :3] *= 50.0
            r = torch.round(to_codes_domain(layer.weight.detach(), layer.scale.detach(), layer.zero_point))
            assert bool(((r < layer.spec.qmin) | (r > layer.spec.qmax)).any())
        _assert_same_grads(layer, torch.randn(2, 6, IN))


@pytest.mark.parametrize("downcast", ["fp32", "bf16", "fp16", "fixed", "int", "int-packed"])
@pytest.mark.parametrize("group,sym", [(None, True), (GROUP, False)])
def test_fused_rebuild_is_the_unfused_weight_bit_for_bit(downcast, group, sym):
    layer = _layer("lrqat", spread=1.0, bits=4, group_size=group, symmetric=sym, downcast=downcast)
    w, clipped = layer.fused_rebuild(with_mask=True)
    assert torch.equal(w, layer.weight_hat().detach())
    assert torch.equal(layer.fused_rebuild(dequant=False)[0], layer.codes().detach())
    assert torch.equal(layer.fold().dequantize(), w)
    pre = layer.downcast.decode(layer.phi0) + layer.scaling * (layer.lora_B @ layer.lora_A)
    r = torch.round(pre.detach())
    assert torch.equal(clipped, (r < layer.spec.qmin) | (r > layer.spec.qmax)) and bool(clipped.any())


def test_fused_rebuild_uses_row_blocks(monkeypatch):
    """Several row blocks (tiny block size) give the same bits as one."""
    layer = _layer("lrqat", spread=1.0, bits=3, group_size=GROUP)
    whole = layer.fused_rebuild()[0]
    import lrqat_dist.methods.lrqat as lrqat_mod
    from lrqat_dist.quant import affine
    monkeypatch.setattr(lrqat_mod, "row_blocks", lambda o, i: affine.row_blocks(o, i, elems=3 * IN))
    assert len(affine.row_blocks(OUT, IN, elems=3 * IN)) == OUT // 3
    assert torch.equal(layer.fused_rebuild()[0], whole)


def test_backward_switch_from_config_and_validation():
    lin = nn.Linear(IN, OUT)
    assert METHODS["lrqat"].from_linear(lin, QATConfig(backward="autograd", rank=RANK), "l").backward == "autograd"
    with pytest.raises(ValueError, match="backward"):
        QATConfig(backward="fastest")


def test_scratch_buffers_give_the_same_bits_and_are_reused(monkeypatch):
    """The reused CPU buffers (kept only above a size threshold, lowered here) change no bit."""
    monkeypatch.setattr(fast_backward, "SCRATCH_MIN_BYTES", 0)
    monkeypatch.setattr(fast_backward, "SCRATCH", fast_backward._Scratch())
    layer = _layer("lrqat", spread=1.0, bits=4)
    w, clipped = layer.fused_rebuild(with_mask=True)
    ws, cs = layer.fused_rebuild(with_mask=True, scratch=fast_backward.SCRATCH)
    assert torch.equal(ws, w) and torch.equal(cs, clipped)
    assert ws.data_ptr() == fast_backward.SCRATCH.buffers[("weight", torch.float32)].data_ptr()
    _assert_same_grads(layer, torch.randn(2, 7, IN))  # forward and backward through the buffers
    x = torch.randn(2, 5, IN).to(torch.bfloat16)
    y_fast = layer(x)
    layer.backward = "autograd"
    assert torch.equal(y_fast, layer(x))  # the bf16 cast buffer too


def test_cost_model_picks_the_cheaper_form():
    use = fast_backward._use_dense
    big, small = (4096, 4096), (576, 576)
    assert not use(False, 1, 1e-4, 1024, 32, *big)  # frozen scale, few clipped: low-rank + gather
    assert use(False, 1, 0.01, 1024, 32, *big)  # 1% clipped: the gather costs more than G
    assert not use(True, 1, 0.0, 256, 32, *big)  # nothing clipped: x W^T for ds, no G
    assert use(True, 1, 0.0023, 1024, 32, *big)  # SmolLM2's W4 fraction with a trained scale: G gives ds too
    assert use(True, 4, 0.0, 1024, 32, *big)  # per-group trained scales need G
    # small layers: the four skinny T-long products (0.22 of a matmul at 576x576) cost more than
    # the dense form's 2r/T (0.06 at 1,024 tokens), even with nothing clipped (SmolLM2 at 4x256)
    assert use(True, 1, 0.0, 1024, 32, *small)
    assert use(True, 1, 0.0, 1024, 32, 192, 576)
    assert not use(True, 1, 0.0, 1024, 32, 11008, 4096)


class _Stack(nn.Module):
    """Three stacked LR-QAT layers, optionally each under activation checkpointing."""

    def __init__(self, checkpoint: str | None):
        super().__init__()
        torch.manual_seed(0)
        dims = [(IN, IN), (IN, IN), (IN, OUT)]
        self.layers = nn.ModuleList()
        for k, (i, o) in enumerate(dims):
            lin = nn.Linear(i, o, bias=True)
            layer = METHODS["lrqat"].from_linear(lin, QATConfig(method="lrqat", rank=RANK, bits=4), f"l{k}")
            with torch.no_grad():  # some codes clip (the mask buffer is used too)
                layer.lora_B.normal_(0.0, 1.0 / (layer.scaling * layer.lora_A.std().item() * RANK**0.5))
            self.layers.append(layer)
        self.checkpoint = checkpoint

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        for layer in self.layers:
            if self.checkpoint is None:
                x = torch.tanh(layer(x))
            else:
                x = checkpoint(lambda t, m=layer: torch.tanh(m(t)), x, use_reentrant=self.checkpoint == "reentrant")
        return x

    def grads(self, x, mode):
        for layer in self.layers:
            layer.backward = mode
        self.zero_grad(set_to_none=True)
        x = x.clone().requires_grad_(True)
        (self(x) * torch.linspace(-1.0, 2.0, OUT)).pow(2).sum().backward()
        return x.grad, {n: p.grad.clone() for n, p in self.named_parameters()}


@pytest.mark.parametrize("kw", [dict(downcast="q4.4"), dict(downcast="int-packed", symmetric=False, group_size=GROUP)])
def test_compiled_rebuild_is_bit_identical_and_gives_the_same_gradients(kw):
    """``compile_rebuild``: the torch.compile-d rebuild (CPU inductor) equals the eager one bit for bit
    (weight and clipped mask), so forward output and gradients are equal, not merely close; fold is
    unaffected. Without a working compiler the module falls back to eager: then this test fails
    (it checks that the compiled path really ran)."""
    from lrqat_dist.methods import compiled_rebuild

    eager = _layer("lrqat", spread=1.5, **kw)
    comp = _layer("lrqat", spread=1.5, compile_rebuild=True, **kw)
    assert comp.compile_rebuild and _clipped_fraction(eager) > 0
    x = torch.randn(2, 5, IN, generator=torch.Generator().manual_seed(3))
    y_ref, gx_ref, ref, ran_ref = _grads(eager, x, "fast")
    y, gx, got, ran = _grads(comp, x, "fast")
    _assert_ran(ran_ref, "fast")
    _assert_ran(ran, "fast")
    assert compiled_rebuild.enabled(), "the compiled rebuild fell back to eager (see the warning)"
    assert any(s[-4] == (OUT, IN) for s in compiled_rebuild._VERIFIED)  # it ran, on this shape
    assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref)
    assert set(got) == set(ref) and all(torch.equal(got[n], ref[n]) for n in ref)
    w_c, m_c = comp.fused_rebuild(with_mask=True, compiled=True)
    w_e, m_e = eager.fused_rebuild(with_mask=True)
    assert torch.equal(w_c, w_e) and torch.equal(m_c, m_e)
    assert torch.equal(comp.fold().codes, eager.fold().codes)


def test_compiled_rebuild_falls_back_to_eager_on_a_mismatch(monkeypatch, caplog):
    """A compiled result that differs from the eager one is replaced by it, with one warning, and
    compiling stays off afterwards."""
    from lrqat_dist.methods import compiled_rebuild

    def wrong(*args, **kw):
        def fn(pre, *rest):
            pre.fill_(7.0)
        return fn

    monkeypatch.setattr(compiled_rebuild, "_make", wrong)
    monkeypatch.setattr(compiled_rebuild, "_COMPILED", {})
    monkeypatch.setattr(compiled_rebuild, "_VERIFIED", set())
    monkeypatch.setattr(compiled_rebuild, "_STATE", {"enabled": True})
    layer = _layer("lrqat", spread=1.5, compile_rebuild=True)
    with caplog.at_level("WARNING", logger="lrqat_dist.methods.compiled_rebuild"):
        w, m = layer.fused_rebuild(with_mask=True, compiled=True)
        w2, _ = layer.fused_rebuild(compiled=True)
    ref, ref_m = layer.fused_rebuild(with_mask=True)
    assert torch.equal(w, ref) and torch.equal(m, ref_m) and torch.equal(w2, ref)
    assert not compiled_rebuild.enabled()
    assert [r.message for r in caplog.records if "differs from the eager" in r.message] and len(caplog.records) == 1


def test_compile_rebuild_config_is_validated():
    with pytest.raises(ValueError, match="compile_rebuild"):
        QATConfig(method="peqa", compile_rebuild=True)
    with pytest.raises(ValueError, match="compile_rebuild"):
        QATConfig(backward="autograd", compile_rebuild=True)
    with pytest.raises(ValueError, match="compile_rebuild"):
        QATConfig(compile_rebuild="yes")


@pytest.mark.parametrize("checkpoint", [None, "reentrant", "non-reentrant"])
def test_stacked_layers_share_scratch_and_match_autograd(checkpoint, monkeypatch):
    """Every layer's rebuild goes through the same reused buffers (forced on for tiny tensors):
    no layer may read a weight or mask another layer (or a checkpoint recompute) overwrote."""
    monkeypatch.setattr(fast_backward, "SCRATCH_MIN_BYTES", 0)
    monkeypatch.setattr(fast_backward, "SCRATCH", fast_backward._Scratch())
    stack = _Stack(checkpoint)
    assert all(_clipped_fraction(layer) > 0 for layer in stack.layers)
    x = torch.randn(2, 5, IN)
    gx_ref, ref = stack.grads(x, "autograd")
    assert not fast_backward.SCRATCH.buffers  # the plain path never touches them
    calls = []
    orig = fast_backward._LowRankLinear.backward
    monkeypatch.setattr(fast_backward._LowRankLinear, "backward",
                        staticmethod(lambda ctx, g: calls.append(1) or orig(ctx, g)))
    gx, fast = stack.grads(x, "fast")
    assert len(calls) == 3  # the fast backward ran for every layer
    assert {k for k, _ in fast_backward.SCRATCH.buffers} == {"weight", "clipped"}
    assert _rel(gx, gx_ref) <= TOL
    errs = {n: _rel(fast[n], ref[n]) for n in ref}
    assert max(errs.values()) <= TOL, errs


def test_release_scratch_frees_the_buffers_per_thread(monkeypatch):
    import threading

    monkeypatch.setattr(fast_backward, "SCRATCH_MIN_BYTES", 0)
    monkeypatch.setattr(fast_backward, "SCRATCH", fast_backward._Scratch())
    layer = _layer("lrqat", spread=1.0, bits=4)
    _grads(layer, torch.randn(2, 7, IN), "fast")
    assert fast_backward.SCRATCH.buffers
    seen = []
    t = threading.Thread(target=lambda: seen.append(dict(fast_backward.SCRATCH.buffers)))
    t.start()
    t.join()
    assert seen == [{}]  # another thread has its own (empty) buffers
    fast_backward.release_scratch()
    assert not fast_backward.SCRATCH.buffers


# --- DL-QAT -------------------------------------------------------------------------------------
DLQAT_PARAMS = ["scale", "offset", "magnitude", "lora_A", "lora_B"]


def _dlqat_layer(bits: int, group, range_init: str = "lp", seed: int = 0):
    """Trained-looking adapters (c B@A moves codes by about a grid step: some clip), m and b moved
    off their init, and four weights of row 1 placed on the grid ends: ``u = (W0 - b)/s`` at
    ``qmax + 0.3`` and ``qmin - 0.3`` (round onto the end codes: in range, gradient passes) and at
    ``qmax + 0.7``, ``qmin - 0.7`` (clipped)."""
    layer = _layer("dlqat", seed=seed, bits=bits, group_size=group, range_init=range_init)
    spec = layer.spec
    with torch.no_grad():
        layer.lora_B.normal_(0.0, float(layer.scale.mean()) / (layer.scaling * float(layer.lora_A.std()) * RANK**0.5))
        layer.lora_B[1].zero_()  # row 1: the positions below exactly
        layer.magnitude.uniform_(0.8, 1.2)
        layer.offset.add_(0.01 * torch.randn_like(layer.offset))
        s, b = layer.scale[1, 0], layer.offset[1, 0]
        u = torch.tensor([spec.qmax + 0.3, spec.qmin - 0.3, spec.qmax + 0.7, spec.qmin - 0.7])
        layer.weight0[1, :4] = b + s * u
        u1 = layer.codes_domain(slice(1, 2))[0, :4]
    # the constructed positions survived fp32 rounding: two on the ends (in range), two clipped
    assert torch.equal(torch.round(u1), torch.tensor([spec.qmax, spec.qmin, spec.qmax + 1, spec.qmin - 1],
                                                     dtype=torch.float32)), u1
    return layer


def _dlqat_clipped_fraction(layer) -> float:
    with torch.no_grad():
        r = torch.round(layer.codes_domain())
    return float(((r < layer.spec.qmin) | (r > layer.spec.qmax)).float().mean())


@pytest.mark.parametrize("range_init", ["lp", "minmax"])
@pytest.mark.parametrize("group", [None, GROUP, 2 * GROUP])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dlqat_gradients_equal_autograd_in_both_phases(bits, group, range_init):
    """Phase 1 (s, b: LSQ through round and clip) and phase 2 (m, A, B: STE), x too; the frozen
    phase's tensors get exact zeros on both paths (the trainer's phase switch relies on it)."""
    layer = _dlqat_layer(bits, group, range_init, seed=bits)
    frac = _dlqat_clipped_fraction(layer)
    assert 0.0 < frac < 0.5, frac
    for phase, trained in ((PHASE1, {"scale", "offset"}), (PHASE2, {"magnitude", "lora_A", "lora_B"})):
        layer.set_phase(phase)
        _assert_same_grads(layer, torch.randn(2, 7, IN))
        _, _, fast, _ = _grads(layer, torch.randn(3, IN), "fast")
        assert set(fast) == set(DLQAT_PARAMS)
        for n in DLQAT_PARAMS:
            assert (fast[n].norm() > 0) == (n in trained), (phase, n)


def test_dlqat_boundary_codes_pass_gradient_and_clipped_do_not():
    """torch.clamp's rule, by hand: dL/dB of row 1 (B = c (G m M) A^T) sees the two weights whose
    codes rounded onto the grid ends and not the two clipped ones."""
    layer = _dlqat_layer(4, None)
    layer.set_phase(PHASE2)
    x = torch.zeros(1, IN)
    x[0, :4] = torch.tensor([1.0, 10.0, 100.0, 1000.0])  # one weight's contribution per decade
    c, m = layer.scaling, float(layer.magnitude.detach()[1, 0])
    want = c * m * (x[0, :2] @ layer.lora_A.detach()[:, :2].t())  # positions 0, 1 only
    for mode in ("fast", "autograd"):  # the rule is the plain path's; the fast path keeps it
        layer.backward, layer.lora_B.grad = mode, None
        y = layer(x)
        _assert_ran(type(y.grad_fn).__name__, mode)
        go = torch.zeros_like(y)
        go[0, 1] = 1.0  # only row 1: G[1, i] = x[i]
        y.backward(go)
        assert torch.allclose(layer.lora_B.grad[1], want, rtol=1e-5, atol=0), (mode, layer.lora_B.grad[1], want)


@pytest.mark.parametrize("group", [None, GROUP])
def test_dlqat_fast_backward_rebuilds_the_forward_weight_bit_for_bit(group, monkeypatch):
    """The backward's row-chunked rebuild (one row per chunk here, through the scratch buffer) and
    the forward's row-blocked one are weight_hat() and fold().dequantize() bit for bit."""
    monkeypatch.setattr(fast_backward, "DLQAT_CHUNK_ELEMS", 1)
    monkeypatch.setattr(fast_backward, "SCRATCH_MIN_BYTES", 0)
    monkeypatch.setattr(fast_backward, "SCRATCH", fast_backward._Scratch())
    layer = _dlqat_layer(3, group)
    g2, x2 = torch.randn(5, OUT), torch.randn(5, IN)
    w, grads = fast_backward.dlqat_param_grads(layer, g2, x2, (True,) * 5)
    assert w.data_ptr() == fast_backward.SCRATCH.buffers[("weight", torch.float32)].data_ptr()
    with torch.no_grad():
        want = layer.weight_hat()  # the unfused autograd-path weight
    assert torch.equal(w, want)
    assert torch.equal(layer.fused_rebuild(), want)  # forward's (and eval's) row-blocked rebuild
    assert torch.equal(layer.fused_rebuild(scratch=fast_backward.SCRATCH), want)
    assert torch.equal(layer.rebuilt_weight(), want)
    assert torch.equal(layer.fold().dequantize(), want)
    assert all(g is not None for g in grads)


def test_dlqat_respects_requires_grad_and_the_backward_switch():
    layer = _dlqat_layer(4, GROUP)
    layer.set_phase(PHASE2)
    layer.magnitude.requires_grad_(False)  # frozen by the user: no gradient at all (None), both paths
    errs = _assert_same_grads(layer, torch.randn(2, 5, IN))
    assert "magnitude" not in errs and {"lora_A", "lora_B"} <= set(errs)
    lin = nn.Linear(IN, OUT)
    cfg = QATConfig(method="dlqat", rank=RANK, backward="autograd")
    auto = METHODS["dlqat"].from_linear(lin, cfg, "l")
    assert auto.backward == "autograd"
    y = auto(torch.randn(2, IN))
    assert type(y.grad_fn).__name__ == "_RecomputedLinearBackward"
    assert METHODS["dlqat"].from_linear(lin, QATConfig(method="dlqat", rank=RANK), "l").backward == "fast"


def test_dlqat_gradients_bf16_compute():
    """bf16 inputs: the plain path rounds G to bf16 as the fast one does; a looser bound (as LR-QAT's)."""
    layer = _dlqat_layer(4, GROUP)
    x = torch.randn(2, 9, IN).to(torch.bfloat16)
    for phase in (PHASE1, PHASE2):
        layer.set_phase(phase)
        _, _, ref, ran_ref = _grads(layer, x, "autograd")
        _, _, fast, ran = _grads(layer, x, "fast")
        _assert_ran(ran_ref, "autograd")
        _assert_ran(ran, "fast")
        assert all(fast[n].dtype == torch.float32 for n in fast)
        assert max(_rel(fast[n], ref[n]) for n in ref if ref[n].norm() > 0) < 2e-2
