"""Quantization primitives: grids, STE gradients, range initialisation."""
import pytest
import torch

from lrqat_dist.quant import QuantSpec, fake_quantize, init_range, quantize, round_ste
from lrqat_dist.quant.affine import dequantize
from lrqat_dist.quant.range_init import MIN_SCALE


@pytest.mark.parametrize("bits", range(2, 9))
def test_grid_ranges(bits):
    assert (QuantSpec(bits, True).qmin, QuantSpec(bits, True).qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert (QuantSpec(bits, False).qmin, QuantSpec(bits, False).qmax) == (0, 2**bits - 1)


def test_bad_specs_name_the_problem():
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(bits=9)
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(group_size=0)
    with pytest.raises(ValueError, match=r"model.layers.3.mlp.down_proj: input dimension 576 is not divisible by group_size 128"):
        QuantSpec(4, True, 128).n_groups(576, "model.layers.3.mlp.down_proj")


def test_round_ste_is_identity_gradient_and_ties_to_even():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, 0.49, 3.51], requires_grad=True)
    y = round_ste(x)
    assert y.tolist() == [0.0, 2.0, 2.0, -0.0, 0.0, 4.0]
    y.sum().backward()
    assert x.grad.tolist() == [1.0] * 6


def test_fake_quant_gradients_match_hand_derived_lsq():
    # 4-bit symmetric, s = 0.1: w = 0.37 sits at 3.7 -> q = 4 (inside), w = 1.0 at 10 -> clipped to 7.
    spec = QuantSpec(4, True)
    w = torch.tensor([[0.37, 1.0, -0.73]], requires_grad=True)
    s = torch.tensor([[0.1]], requires_grad=True)
    y = fake_quantize(w, s, None, spec)
    torch.testing.assert_close(y.detach(), torch.tensor([[0.4, 0.7, -0.7]]))
    y.backward(torch.tensor([[1.0, 2.0, 3.0]]))
    # dy/dw = 1 inside the range, 0 where clipped; dy/ds = q - w/s inside, q (= qmin/qmax) where clipped.
    assert w.grad.tolist() == [[1.0, 0.0, 3.0]]  # upstream grads 1 and 3 pass, 2 is clipped
    expected_ds = 1.0 * (4 - 3.7) + 2.0 * 7 + 3.0 * (-7 - (-7.3))
    assert s.grad.item() == pytest.approx(expected_ds, abs=1e-5)


def test_asymmetric_grid_uses_integer_zero_point():
    spec = QuantSpec(3, False, group_size=4)
    w = torch.tensor([[-0.3, 0.0, 0.1, 0.4, 0.5, 0.6, 0.7, 0.8]])
    s, z = init_range(w, spec, "minmax")
    assert z.dtype == torch.int32 and s.shape == z.shape == (1, 2)
    q = quantize(w, s, z, spec)
    assert q.min() >= 0 and q.max() <= 7
    # 0.0 is exactly representable on an asymmetric grid whose range contains it.
    assert dequantize(q, s, z)[0, 1].item() == 0.0


def test_lp_search_beats_minmax_on_outliers_and_is_chunk_invariant():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    w[:, 0] *= 20  # one outlier per row: min-max wastes the grid on it
    spec = QuantSpec(4, True, group_size=64)

    def l4(s, z):
        return (fake_quantize(w, s, z, spec, ste=False) - w).abs().pow(4).sum()

    s_mm, _ = init_range(w, spec, "minmax")
    s_lp, _ = init_range(w, spec, "lp", p=4.0)
    assert l4(s_lp, None) < 0.9 * l4(s_mm, None)
    assert (s_lp <= s_mm + 1e-7).all()  # candidates only ever clip
    s_small_chunks, _ = init_range(w, spec, "lp", chunk_elems=300)  # one row per chunk
    assert torch.equal(s_lp, s_small_chunks)


def test_all_zero_group_gets_a_finite_scale():
    w = torch.zeros(2, 8)
    w[1] = torch.linspace(-1, 1, 8)
    for method in ("minmax", "lp"):
        s, z = init_range(w, QuantSpec(4, False), method)
        assert torch.isfinite(s).all() and s[0, 0] == MIN_SCALE
        assert torch.isfinite(fake_quantize(w, s, z, QuantSpec(4, False))).all()
