"""Perturbation operators: exact results on small latents, noise seeding, composition and parsing."""

import pytest
from dataclasses import dataclass
import torch

from vaeprobe.errors import VaeprobeError
from vaeprobe.probes.perturb import (REGISTRY, Compose, Fill, Mean, Noise, Operator, check_operator, PerturbError, Scale, Site, Smudge, Swap, Zero, apply_batch, parse_operator)


def arange_latent(c=2, h=4, w=5):
    """Value = 100*channel + 10*row + col, so every entry says where it is."""
    value = 100 * torch.arange(c)[:, None, None] + 10 * torch.arange(h)[None, :, None] + torch.arange(w)
    return value.float().unsqueeze(0)


def changed_cells(a, b):
    """Set of (channel, row, col) where two [1, C, h, w] latents differ."""
    return {tuple(i) for i in (a != b)[0].nonzero().tolist()}


# -- sites ----------------------------------------------------------------------------------------------------

def test_site_cells_and_clipping():
    assert Site(2, 2).cells(5, 5) == [(2, 2)]
    assert Site(2, 2, size=3).cells(5, 5) == [(r, c) for r in (1, 2, 3) for c in (1, 2, 3)]
    assert Site(0, 4, size=3).cells(5, 5) == [(0, 3), (0, 4), (1, 3), (1, 4)]
    # even size: one cell further down/right (rows row-0 .. row+1)
    assert Site(1, 1, size=2).cells(5, 5) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert Site(4, 4, size=4).cells(5, 5) == [(3, 3), (3, 4), (4, 3), (4, 4)]
    assert Site(1, 2, size=3, channel=1).slices(5, 5) == (slice(1, 2), slice(0, 3), slice(1, 4))


@pytest.mark.parametrize("kwargs", [dict(row=-1, col=0), dict(row=0, col=0, size=0),
                                    dict(row=0, col=0, channel=-2), dict(row=0.5, col=0)])
def test_bad_sites_raise(kwargs):
    with pytest.raises(PerturbError):
        Site(**kwargs)


def test_site_outside_latent_or_channel_raises_clearly():
    z = arange_latent()
    with pytest.raises(PerturbError, match="outside the 4x5 latent"):
        Zero().apply(z, Site(4, 0))
    with pytest.raises(PerturbError, match="channel 2 does not exist"):
        Zero().apply(z, Site(0, 0, channel=2))
    with pytest.raises(PerturbError, match=r"\[1, C, h, w\]"):
        Zero().apply(z[0], Site(0, 0))


# -- single operators -----------------------------------------------------------------------------------------

def test_zero_one_cell_exact():
    z = arange_latent()
    out = Zero().apply(z, Site(1, 2))
    expected = z.clone()
    expected[0, :, 1, 2] = 0
    assert torch.equal(out, expected)
    assert changed_cells(z, out) == {(0, 1, 2), (1, 1, 2)}


def test_zero_patch_clipped_at_border():
    z = arange_latent(c=2, h=4, w=5)
    out = Zero().apply(z, Site(0, 4, size=3))
    expected = z.clone()
    expected[0, :, 0:2, 3:5] = 0
    assert torch.equal(out, expected)


def test_channel_only_change_leaves_other_channels_equal():
    z = arange_latent(c=3)
    out = Scale(2.0).apply(z, Site(2, 1, size=3, channel=1))
    assert torch.equal(out[0, 0], z[0, 0]) and torch.equal(out[0, 2], z[0, 2])
    expected = z[0, 1].clone()
    expected[1:4, 0:3] *= 2
    assert torch.equal(out[0, 1], expected)
    assert out[0, 1, 2, 1].item() == 2 * 121.0


def test_fill_per_channel_and_scalar():
    z = arange_latent(c=3)
    mean = torch.tensor([0.5, -1.0, 2.0])
    out = Fill.from_stats(mean).apply(z, Site(3, 4))
    assert out[0, :, 3, 4].tolist() == [0.5, -1.0, 2.0]
    assert changed_cells(z, out) == {(0, 3, 4), (1, 3, 4), (2, 3, 4)}
    out = Fill.from_stats(mean).apply(z, Site(0, 0, channel=2))
    assert out[0, :, 0, 0].tolist() == [0.0, 100.0, 2.0]
    out = Fill(7).apply(z, Site(1, 1, size=2))
    assert (out[0, :, 1:3, 1:3] == 7).all() and changed_cells(z, out) == {
        (c, r, k) for c in range(3) for r in (1, 2) for k in (1, 2)}


def test_fill_with_wrong_channel_count_raises():
    with pytest.raises(PerturbError, match="has 4 values but the latent has 3 channels"):
        Fill.from_stats(torch.zeros(4)).apply(arange_latent(c=3), Site(0, 0))


def test_scale_exact():
    z = arange_latent()
    out = Scale(-0.5).apply(z, Site(3, 3))
    assert out[0, :, 3, 3].tolist() == [-16.5, -66.5]
    assert changed_cells(z, out) == {(0, 3, 3), (1, 3, 3)}


def test_swap_takes_other_values_at_the_site():
    z = arange_latent()
    other = -arange_latent()
    out = Swap(other).apply(z, Site(1, 1, size=3, channel=0))
    expected = z.clone()
    expected[0, 0, 0:3, 0:3] = other[0, 0, 0:3, 0:3]
    assert torch.equal(out, expected)
    with pytest.raises(PerturbError, match="swap partner has shape"):
        Swap(torch.zeros(1, 2, 3, 3)).apply(z, Site(0, 0))


def test_smudge_corner_uses_three_neighbours():
    z = arange_latent(c=2, h=4, w=5)
    out = Smudge().apply(z, Site(0, 0))
    # channel 0: neighbours (0,1)=1, (1,0)=10, (1,1)=11 -> 22/3 ; channel 1: +100 each
    assert out[0, 0, 0, 0].item() == pytest.approx(22 / 3)
    assert out[0, 1, 0, 0].item() == pytest.approx(100 + 22 / 3)
    assert changed_cells(z, out) == {(0, 0, 0), (1, 0, 0)}


def test_smudge_interior_uses_eight_neighbours():
    z = torch.zeros(1, 1, 3, 3)
    z[0, 0, 1, 1] = 50.0
    z[0, 0, 0, 0] = 8.0
    z[0, 0, 2, 1] = 16.0
    out = Smudge().apply(z, Site(1, 1))
    assert out[0, 0, 1, 1].item() == 3.0  # (8 + 16) / 8, the centre's own value is not used


def test_smudge_patch_uses_ring_inside_latent():
    z = arange_latent(c=1, h=4, w=5)
    out = Smudge().apply(z, Site(0, 0, size=3))  # patch rows 0-1, cols 0-1; ring (0,2) (1,2) (2,0) (2,1) (2,2)
    ring = [2.0, 12.0, 20.0, 21.0, 22.0]
    assert torch.allclose(out[0, 0, 0:2, 0:2], torch.full((2, 2), sum(ring) / 5))
    assert changed_cells(z, out) == {(0, r, c) for r in (0, 1) for c in (0, 1)}


def test_smudge_of_whole_latent_raises():
    with pytest.raises(PerturbError, match="covers the whole latent"):
        Smudge().apply(torch.zeros(1, 1, 2, 2), Site(0, 0, size=4))


@pytest.mark.parametrize("op", [Zero(), Fill(3.0), Noise(1.0, std=1.0), Scale(2.0), Swap(torch.ones(1, 2, 4, 5)),
                                Smudge(), Compose(Scale(2.0), Noise(0.1, std=1.0))])
def test_input_not_modified_and_new_tensor(op):
    z = arange_latent()
    before = z.clone()
    out = op.apply(z, Site(1, 1, size=3))
    batch = apply_batch(z, [Site(0, 0), Site(2, 2)], op)
    assert torch.equal(z, before)
    assert out.data_ptr() != z.data_ptr() and out.shape == z.shape
    assert batch.shape == (2, 2, 4, 5)


# -- noise ----------------------------------------------------------------------------------------------------

def test_noise_changes_only_the_site():
    z = arange_latent()
    out = Noise(0.5).apply(z, Site(2, 2, channel=1))
    assert changed_cells(z, out) == {(1, 2, 2)}


def test_noise_is_the_same_for_a_site_whatever_the_batch():
    z = torch.zeros(1, 4, 6, 6)
    op = Noise(1.0, std=1.0, seed=5)
    a, b, c = Site(0, 0), Site(3, 4, size=2), Site(5, 5, channel=2)
    first = apply_batch(z, [a, b, c], op)
    second = apply_batch(z, [c, Site(1, 1), b], op)
    assert torch.equal(first[1], second[2])
    assert torch.equal(first[2], second[0])
    assert torch.equal(first[1:2], op.apply(z, b))
    # same noise on any latent values (it is added, not re-drawn per value)
    assert torch.allclose(op.apply(z + 1, b) - 1, op.apply(z, b), atol=1e-6)


def test_noise_depends_on_seed_index_and_site():
    z = torch.zeros(1, 4, 6, 6)
    site = Site(2, 3, size=2)
    base = Noise(1.0, std=1.0, seed=0).apply(z, site)
    assert not torch.equal(base, Noise(1.0, std=1.0, seed=1).apply(z, site))
    assert not torch.equal(base, Noise(1.0, std=1.0, seed=0).apply(z, site, index=1))
    assert torch.equal(base, Noise(1.0, std=1.0, seed=0).apply(z, site, index=0))
    shifted = Noise(1.0, std=1.0, seed=0).apply(z, Site(2, 2, size=2))
    assert not torch.equal(base[0, :, 2:4, 3:5], shifted[0, :, 2:4, 2:4])


def test_noise_per_site_indices_in_batch():
    z = torch.zeros(1, 2, 3, 3)
    op = Noise(1.0, std=1.0)
    site = Site(1, 1)
    batch = apply_batch(z, [site, site, site], op, index=[0, 1, 0])
    assert torch.equal(batch[0], batch[2]) and not torch.equal(batch[0], batch[1])
    assert torch.equal(batch[1:2], op.apply(z, site, index=1))


def test_noise_std_matches_sigma_times_channel_std():
    z = torch.zeros(1, 4, 64, 64)
    std = torch.tensor([1.0, 2.0, 0.5, 3.0])
    out = Noise(0.5, std=std, seed=11).apply(z, Site(31, 31, size=64))
    assert len(changed_cells(z, out)) == 4 * 64 * 64
    measured = out[0].flatten(1).std(1)
    assert torch.allclose(measured, 0.5 * std, rtol=0.05)
    assert out[0].flatten(1).mean(1).abs().max() < 0.06 * 3.0


def test_zero_sigma_noise_is_identity():
    z = arange_latent()
    assert torch.equal(Noise(0.0).apply(z, Site(1, 1)), z)


# -- composition ----------------------------------------------------------------------------------------------

def test_compose_applies_in_order():
    z = torch.full((1, 1, 2, 2), 4.0)
    site = Site(0, 0)
    assert Compose(Scale(0.5), Fill(1.0)).apply(z, site)[0, 0, 0, 0].item() == 1.0
    assert Compose(Fill(1.0), Scale(0.5)).apply(z, site)[0, 0, 0, 0].item() == 0.5
    assert Compose(Fill(1.0), Scale(3.0), Scale(0.5)).apply(z, site)[0, 0, 0, 0].item() == 1.5
    # the + shorthand and flattening
    op = Scale(2.0) + Compose(Fill(1.0), Scale(3.0))
    assert op.ops == (Scale(2.0), Fill(1.0), Scale(3.0))
    assert op.apply(z, site)[0, 0, 0, 0].item() == 3.0
    assert op.apply(z, site)[0, 0, 1, 1].item() == 4.0


def test_compose_noise_first_equals_plain_noise_and_second_is_independent():
    z = torch.zeros(1, 2, 4, 4)
    site = Site(1, 1, size=2)
    plain = Noise(1.0, std=1.0).apply(z, site)
    assert torch.equal(Compose(Noise(1.0, std=1.0), Scale(1.0)).apply(z, site), plain)
    twice = Compose(Noise(1.0, std=1.0), Noise(1.0, std=1.0)).apply(z, site)
    assert not torch.allclose(twice, 2 * plain)


def test_compose_smudge_reads_the_unchanged_ring():
    z = torch.zeros(1, 1, 3, 3)
    z[0, 0, 0, 1] = 9.0
    out = Compose(Scale(100.0), Smudge()).apply(z, Site(0, 0))  # ring (0,1) (1,0) (1,1)
    assert out[0, 0, 0, 0].item() == 3.0


def test_apply_batch_equals_per_site_apply():
    z = arange_latent(c=3, h=4, w=5)
    sites = [Site(0, 0), Site(3, 4, size=3), Site(1, 2, channel=2), Site(2, 2, size=2, channel=0)]
    for op in (Zero(), Smudge(), Noise(0.3, std=torch.tensor([1.0, 2.0, 3.0]), seed=4),
               Compose(Scale(0.5), Noise(0.1, std=1.0)), Swap(-z)):
        batch = apply_batch(z, sites, op)
        for i, site in enumerate(sites):
            assert torch.equal(batch[i:i + 1], op.apply(z, site)), (op.name, site)
    assert apply_batch(z, [], Zero()).shape == (0, 3, 4, 5)


# -- parsing --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["zero", "mean", "fill:0.25", "noise:0.5", "scale:2", "scale:-0.125", "swap",
                                  "smudge", "scale:0.5+noise:0.1", "mean+noise:1e-05+smudge"])
def test_parse_operator_round_trip(spec):
    stats = {"channel_mean": [0.1, 0.2], "channel_std": [1.0, 3.0]}
    other = torch.ones(1, 2, 4, 5)
    op = parse_operator(spec, stats=stats, other=other, seed=3)
    assert op.name == spec
    again = parse_operator(op.name, stats=stats, other=other, seed=3)
    z = arange_latent()
    assert torch.equal(again.apply(z, Site(1, 1)), op.apply(z, Site(1, 1)))


def test_parse_operator_normalises_text_and_builds_the_right_operators():
    op = parse_operator(" Scale:2.0 + NOISE:.5 ", stats={"std": [2.0, 4.0]}, seed=9)
    assert op.name == "scale:2+noise:0.5"
    assert op == Compose(Scale(2.0), Noise(0.5, std=(2.0, 4.0), seed=9))
    assert parse_operator("mean", stats={"mean": torch.tensor([1.0, 2.0])}) == Mean((1.0, 2.0))
    assert parse_operator("noise:0.5") == Noise(0.5)
    assert parse_operator("zero") == Zero()


def test_fill_and_noise_names():
    assert Fill(0.5).name == "fill:0.5"
    assert Fill(torch.tensor([1.0, 2.0])).name == "mean"
    assert Noise(2, seed=7).name == "noise:2"
    assert str(Scale(0.1)) == "scale:0.1"


@pytest.mark.parametrize("spec, message", [
    ("swap", "needs the latent of a second image"),
    ("blur", "unknown operator 'blur'.*use one of zero, mean"),
    ("noise", "needs a number, e.g. 'noise:0.5'"),
    ("scale:big", "'big' is not a number"),
    ("zero:1", "takes no argument"),
    ("scale:2++zero", "empty operator"),
    ("", "empty operator spec"),
    ("noise:-1", "sigma must be >= 0"),
    ("scale:inf", "must be finite"),
])
def test_parse_operator_errors_are_clear(spec, message):
    with pytest.raises(PerturbError, match=message) as info:
        parse_operator(spec)
    assert isinstance(info.value, VaeprobeError) and isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)


# -- one meaning per text form, one class per operator -------------------------------------------------------

def test_text_noise_is_in_the_perturbed_latents_own_robust_std():
    """``noise:S`` without statistics: S x the latent's robust per-channel std (spot excluded), whoever parses it."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 3, 64, 64, generator=g) * torch.tensor([0.5, 2.0, 8.0]).reshape(1, 3, 1, 1) + 3.0
    z[0, :, 10, 10] = 500.0  # a spot must not inflate the noise
    out = parse_operator("noise:0.25", seed=1).apply(z, Site(40, 40, size=40))
    change = (out - z)[0, :, 20:60, 20:60].flatten(1).std(1)
    assert torch.allclose(change, 0.25 * torch.tensor([0.5, 2.0, 8.0]), rtol=0.08)
    # the same latent scaled by 10: the same noise relative to it (raw units would not scale)
    out10 = parse_operator("noise:0.25", seed=1).apply(z * 10, Site(40, 40, size=40))
    assert torch.allclose(out10 - z * 10, (out - z) * 10, rtol=1e-4, atol=1e-3)


def test_text_mean_is_the_latents_own_centre_and_follows_a_shift():
    z = torch.randn(1, 2, 16, 16, generator=torch.Generator().manual_seed(2))
    op = parse_operator("mean")
    a = op.apply(z, Site(3, 3))[0, :, 3, 3]
    b = op.apply(z + 5.0, Site(3, 3))[0, :, 3, 3]
    assert torch.allclose(b - a, torch.full((2,), 5.0), atol=1e-5)
    assert torch.allclose(a, z[0].flatten(1).median(1).values, atol=1e-6)


def test_a_new_operator_is_one_class():
    @dataclass(frozen=True)
    class Negate(Operator):
        word = "negate-test"

        @property
        def name(self):
            return "negate-test"

        def _edit(self, patch, z, site, box, index, stream):
            return -patch

    try:
        op = parse_operator("negate-test+scale:2")
        assert op.name == "negate-test+scale:2"
        assert op.apply(torch.ones(1, 1, 1, 2), Site(0, 1)).flatten().tolist() == [1.0, -2.0]
        assert check_operator("negate-test", command="mechanism") == "negate-test"
    finally:
        REGISTRY.pop("negate-test")


def test_check_operator_refuses_what_a_command_cannot_give_in_one_line():
    with pytest.raises(PerturbError) as info:
        check_operator("scale:2+swap", command="mechanism")
    msg = str(info.value)
    assert "mechanism cannot use operator 'swap'" in msg and "\n" not in msg and "use one of zero" in msg
    assert check_operator("swap", provides=("other",), command="scan") == "swap"
    with pytest.raises(PerturbError, match="needs a number"):
        check_operator("noise", provides=("other",))
