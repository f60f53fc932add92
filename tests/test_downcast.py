"""Downcast operators: storage sizes, round trips, and the tie-aware step-0 == RTN guarantee."""
import pytest
import torch

from lrqat_dist.quant import QuantSpec, get_downcast, init_range, pack_codes, quantize, unpack_codes
from lrqat_dist.quant.affine import to_codes_domain

PHIS = ["fp32", "bf16", "fp16", "fixed", "q4.4", "int", "int-packed"]


def _grid_positions(w, spec):
    s, z = init_range(w, spec, "minmax")
    return to_codes_domain(w, s, z), quantize(w, s, z, spec)


def _adversarial(spec, n=4096):
    """Values on and around every half-integer tie of the grid, plus uniform noise."""
    ties = torch.arange(spec.qmin, spec.qmax).float() + 0.5
    eps = torch.tensor([-1 / 16, -1 / 32, -1e-3, -1e-6, 0.0, 1e-6, 1e-3, 1 / 32, 1 / 16])
    near = (ties[:, None] + eps[None]).flatten()
    noise = torch.rand(n) * (spec.qmax - spec.qmin + 2) + spec.qmin - 1
    x = torch.cat([near, noise])
    return x[: (x.numel() // 16) * 16].reshape(-1, 16)


def _valid(phi, spec):
    try:
        return get_downcast(phi, spec)
    except ValueError:
        return None


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_step0_codes_equal_rtn_for_every_phi(bits, symmetric):
    spec = QuantSpec(bits, symmetric, group_size=16)
    torch.manual_seed(bits)
    w = torch.randn(64, 256) * 0.02
    x_rand, _ = _grid_positions(w, spec)
    for x in (x_rand, _adversarial(spec)):
        rtn = torch.clamp(torch.round(x), spec.qmin, spec.qmax)
        checked = 0
        for name in PHIS + [f"q{i}.{8 - i}" for i in range(2, 9)]:
            phi = _valid(name, spec)
            if phi is None:
                continue
            got = torch.clamp(torch.round(phi.decode(phi.encode(x))), spec.qmin, spec.qmax)
            assert torch.equal(got, rtn), f"{name}: {(got != rtn).sum().item()} codes differ from RTN"
            checked += 1
        assert checked >= 5


def test_naive_double_rounding_flips_codes_that_ours_keeps():
    # The official Q4.4: round(round(16 x) / 16). On LLM-like weights it flips a few % of codes.
    spec = QuantSpec(4, True)
    torch.manual_seed(0)
    x, rtn = _grid_positions(torch.randn(512, 512), spec)
    naive = torch.clamp(torch.round(torch.round(16 * torch.clamp(x, -8, 7)) / 16), -8, 7)
    flipped = (naive != rtn).float().mean().item()
    assert 0.01 < flipped < 0.06
    phi = get_downcast("q4.4", spec)
    assert torch.equal(torch.round(phi.decode(phi.encode(x))), rtn)
    # ... while keeping the fractional part to within one fixed-point step.
    assert (phi.decode(phi.encode(x)) - torch.clamp(x, -8, 7)).abs().max() <= 1 / 16 + 1 / 32


def test_step0_rtn_on_real_pretrained_weights(smollm2_weights):
    for name, w in smollm2_weights.items():
        for spec in (QuantSpec(4, True), QuantSpec(3, True), QuantSpec(4, True, 64), QuantSpec(2, False, 64)):
            x, rtn = _grid_positions(w, spec)
            for phi_name in ("bf16", "fp16", "fixed", "int", "int-packed"):
                phi = _valid(phi_name, spec)
                got = torch.clamp(torch.round(phi.decode(phi.encode(x))), spec.qmin, spec.qmax)
                assert torch.equal(got, rtn), f"{name} {spec} {phi_name}"


@pytest.mark.parametrize("bits,per_byte", [(2, 4), (3, 2), (4, 2)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_packing_round_trip_and_size(bits, per_byte, symmetric):
    spec = QuantSpec(bits, symmetric)
    q = torch.randint(spec.qmin, spec.qmax + 1, (48, 64))
    packed = pack_codes(q, spec)
    assert packed.dtype == torch.uint8 and packed.numel() == 48 * 64 // per_byte
    assert torch.equal(unpack_codes(packed, spec), q.to(torch.int32))


def test_packed_int4_phi0_takes_half_a_byte_per_weight():
    spec = QuantSpec(4, True)
    x, _ = _grid_positions(torch.randn(96, 160), spec)
    stored = get_downcast("int-packed", spec).encode(x)
    assert stored.numel() * stored.element_size() == 96 * 160 // 2
    assert get_downcast("q4.4", spec).encode(x).element_size() == 1


def test_bad_downcast_names_are_explained():
    with pytest.raises(ValueError, match="unknown operator 'fp8'"):
        get_downcast("fp8", QuantSpec(4))
    with pytest.raises(ValueError, match="'q4.4' cannot hold the 8-bit grid"):
        get_downcast("q4.4", QuantSpec(8))
    with pytest.raises(ValueError, match="'int-packed' holds 2- to 4-bit codes"):
        get_downcast("int-packed", QuantSpec(8))
    with pytest.raises(ValueError, match="integer \\+ fraction bits must be 8"):
        get_downcast("q4.3", QuantSpec(4))
