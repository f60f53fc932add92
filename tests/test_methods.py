"""Quantized linear layers: exact folding, step-0 RTN, gradients, parameter/buffer split, memory."""
import itertools

import pytest
import torch
from torch import nn

from lrqat_dist import QATConfig
from lrqat_dist.methods import METHODS, FrozenCodesLinear, LRQATLinear
from lrqat_dist.quant.affine import dequantize, quantize


def _layer(method="lrqat", in_f=64, out_f=48, bias=True, seed=0, **cfg):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    return METHODS[method].from_linear(lin, QATConfig(method=method, **cfg), "blk.proj"), lin


def _perturb(layer, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.5 if name == "lora_B" else 1e-3 * p.abs().mean()))


CASES = [
    (m, bits, gs, sym, phi)
    for m, bits, gs, sym, phi in itertools.product(
        ["lrqat", "rtn", "peqa", "full_qat"], [2, 3, 4, 8], [None, 16], [True, False],
        ["fp32", "bf16", "fp16", "fixed", "int", "int-packed"])
    if (m == "lrqat" or phi == "fixed") and not (phi == "int-packed" and bits > 4)
]


@pytest.mark.parametrize("method,bits,group_size,symmetric,phi", CASES)
def test_fold_is_bit_exact(method, bits, group_size, symmetric, phi):
    layer, _ = _layer(method, bits=bits, group_size=group_size, symmetric=symmetric, downcast=phi, rank=4,
                      range_init="minmax")
    _perturb(layer)
    folded = layer.fold()
    w_hat = layer.weight_hat()
    assert folded.codes.dtype == torch.int32
    assert folded.codes.min() >= layer.spec.qmin and folded.codes.max() <= layer.spec.qmax
    assert torch.equal(folded.dequantize(), w_hat.detach())
    assert folded.scale.shape == (48, 1 if group_size is None else 64 // group_size)
    x = torch.randn(3, 5, 64)
    assert torch.equal(layer(x), nn.functional.linear(x, folded.dequantize(), folded.bias))


@pytest.mark.parametrize("phi", ["fp32", "bf16", "fp16", "fixed", "int", "int-packed"])
def test_lrqat_step0_is_rtn(phi):
    layer, lin = _layer("lrqat", bits=4, group_size=16, downcast=phi)
    rtn, _ = _layer("rtn", bits=4, group_size=16)
    assert torch.equal(layer.fold().codes, rtn.fold().codes)
    assert torch.equal(layer.weight_hat(), rtn.weight_hat())


def test_trainable_parameters_are_exactly_A_B_s_in_fp32():
    layer, _ = _layer("lrqat", rank=8, downcast="int-packed")
    params = {n: p for n, p in layer.named_parameters()}
    assert set(params) == {"lora_A", "lora_B", "scale"}
    assert all(p.dtype == torch.float32 and p.requires_grad for p in params.values())
    assert {n for n, _ in layer.named_buffers()} == {"bias", "phi0", "s0", "zero_point"} - {"zero_point"}
    assert layer.phi0.dtype == torch.uint8
    frozen, _ = _layer("lrqat", train_scale=False)
    assert [n for n, p in frozen.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    assert {n for n, p in _layer("peqa")[0].named_parameters() if p.requires_grad} == {"scale"}
    assert {n for n, p in _layer("rtn")[0].named_parameters() if p.requires_grad} == set()
    assert {n for n, p in _layer("full_qat")[0].named_parameters() if p.requires_grad} == {"weight", "scale"}


def test_lrqat_gradients_match_the_hand_derived_ste():
    layer, _ = _layer("lrqat", bits=3, group_size=16, rank=4, alpha=8.0, downcast="fixed", bias=False)
    _perturb(layer)
    x = torch.randn(7, 64)
    g_out = torch.randn(7, 48)
    layer(x).backward(g_out)
    # Closed form: M = Phi0 + c B@A; W = s (clip(round M) - z); the STE passes dL/dW * s where round(M)
    # lies in [qmin, qmax] (clip's gradient) and blocks it elsewhere.
    with torch.no_grad():
        c, A, B, s = layer.scaling, layer.lora_A, layer.lora_B, layer.scale
        m = layer.downcast.decode(layer.phi0) + c * B @ A
        r = torch.round(m)
        inside = ((r >= layer.spec.qmin) & (r <= layer.spec.qmax)).float()
        g_w = g_out.t() @ x
        s_full = s.repeat_interleave(16, dim=1)
        g_m = g_w * s_full * inside
        q = torch.clamp(r, layer.spec.qmin, layer.spec.qmax)
        g_s = (g_w * q).reshape(48, 4, 16).sum(-1)
    torch.testing.assert_close(layer.lora_B.grad, c * g_m @ A.t(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.lora_A.grad, c * B.t() @ g_m, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.scale.grad, g_s, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["lrqat", "peqa", "full_qat"])
def test_recomputed_backward_equals_plain_autograd(method):
    layer, _ = _layer(method, bits=4, group_size=16, symmetric=False, rank=4)
    _perturb(layer)
    x = torch.randn(2, 5, 64, requires_grad=True)
    g = torch.randn(2, 5, 48)
    layer(x).backward(g)
    ours = [p.grad.clone() for p in layer.parameters()] + [x.grad.clone()]
    layer.zero_grad()
    x.grad = None
    nn.functional.linear(x, layer.weight_hat(), layer.bias).backward(g)
    plain = [p.grad for p in layer.parameters()] + [x.grad]
    for a, b in zip(ours, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_compute_keeps_fp32_masters():
    layer, _ = _layer("lrqat", rank=4)
    _perturb(layer)
    y = layer(torch.randn(3, 64, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(p.dtype == p.grad.dtype == torch.float32 for p in layer.parameters())
    assert layer.scale.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0


def _saved_activation_bytes(layers, x, recompute):
    """Bytes autograd keeps between forward and backward, excluding parameters and buffers."""
    owned = {t.untyped_storage().data_ptr() for l in layers for t in list(l.parameters()) + list(l.buffers())}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in owned:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        h = x
        for l in layers:
            h = l(h) if recompute else nn.functional.linear(h, l.weight_hat(), l.bias)
    h.sum().backward()
    return sum(seen.values())


def test_backward_keeps_no_weight_sized_intermediates():
    torch.manual_seed(0)
    dim, tokens = 256, 4
    x = torch.randn(tokens, dim, requires_grad=True)
    act = tokens * dim * 4
    for n in (2, 6):
        layers = [_layer("lrqat", in_f=dim, out_f=dim, rank=8, seed=i, range_init="minmax")[0] for i in range(n)]
        saved = _saved_activation_bytes(layers, x, recompute=True)
        assert saved <= n * act  # only each layer's input activation
        plain = _saved_activation_bytes(layers, x, recompute=False)
        assert plain > n * dim * dim * 4  # without recomputation, [out, in] tensors pile up per layer


def test_svd_init_recovers_what_int_storage_lost():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    cfg = dict(method="lrqat", bits=4, downcast="int", rank=16, range_init="minmax")
    lora = LRQATLinear.from_linear(lin, QATConfig(**cfg, init="lora"), "p")
    svd = LRQATLinear.from_linear(lin, QATConfig(**cfg, init="svd"), "p")
    target = lin.weight / lora.s0

    def err(layer):
        with torch.no_grad():
            return (layer.downcast.decode(layer.phi0) + layer.scaling * layer.lora_B @ layer.lora_A - target).norm()

    assert err(svd) < 0.75 * err(lora)


def test_frozen_codes_match_rtn_quantizer():
    layer, lin = _layer("rtn", bits=3, group_size=8, symmetric=False)
    assert isinstance(layer, FrozenCodesLinear)
    q = quantize(lin.weight.float(), layer.scale, layer.zero_point, layer.spec)
    assert torch.equal(layer.codes(), q)
    assert torch.equal(layer.weight_hat(), dequantize(q, layer.scale, layer.zero_point))


def test_rank_larger_than_layer_is_an_error():
    with pytest.raises(ValueError, match="blk.proj: rank 64 exceeds min"):
        _layer("lrqat", in_f=32, out_f=32, rank=64)
