"""Response measures on toy "decoders" whose answers can be worked out by hand."""

import math

import numpy as np
import pytest
import torch

from vaeprobe.probes.metrics import get_lpips
from vaeprobe.probes.perturb import Fill, Site, Zero, apply_batch
from vaeprobe.data.images import luma, to_unit
from vaeprobe.probes.response import (ALL_MEASURES, DEFAULT_MEASURES, DEFAULT_RADIUS, MeasureError, far_colour_shift, far_fraction, far_l2, global_effect_ratio, l1, l2, lpips, lpips_map, measure, psnr, radius90, ssim)
from vaeprobe.probes.geometry import (Block, GeometryError, cell_distance, cell_gap, far_mask, latent_grid,
                                      region_bounds, ring_profile, ring_sums)

from oracles import (block_cells, brute_cell_distance, brute_ring_profile, far_field_energy, far_field_mask, gap,
                     grid_of, patch_cells)

FACTOR = 8
TINT = torch.tensor([0.25, -0.5, 0.125])  # colour added everywhere per unit of channel 3's mean


def local_decode(z):
    """Nearest-neighbour x8 upsampling of channels 0-2: a cell changes exactly its own 8x8 block."""
    return z[:, :3].repeat_interleave(FACTOR, -2).repeat_interleave(FACTOR, -1)


def tint_decode(z):
    """The local decoder plus a uniform colour whose strength is the mean of channel 3 (a global channel)."""
    return local_decode(z) + z[:, 3].mean((1, 2)).reshape(-1, 1, 1, 1) * TINT.reshape(1, 3, 1, 1)


def latent(h=8, w=8):
    z = (torch.arange(4 * h * w, dtype=torch.float32).reshape(1, 4, h, w) % 7 - 3) / 4
    z[:, 3] = 0.0
    return z


# -- local change: everything stays on the site ---------------------------------------------------------------

def test_local_change_stays_on_site():
    z = latent()
    sites = [Site(1, 2), Site(7, 7), Site(2, 5, size=3)]
    ref = local_decode(z)[0]
    out = local_decode(apply_batch(z, sites, Zero()))
    rows = measure(ref, out, sites, FACTOR)
    n_pix = 3 * 64 * 64
    for site, row in zip(sites, rows):
        assert list(row) == list(DEFAULT_MEASURES)
        vals = z[0, :3][:, [r for r, _ in site.cells(8, 8)], [c for _, c in site.cells(8, 8)]]
        assert row["l2"] == pytest.approx(float(vals.pow(2).sum()) * 64 / n_pix, rel=1e-6)
        assert row["l1"] == pytest.approx(float(vals.abs().sum()) * 64 / n_pix, rel=1e-6)
        assert row["far_fraction"] == 0.0
        assert row["radius90"] == 0.0
        assert row["far_l2"] == 0.0
        assert row["far_dr"] == row["far_dg"] == row["far_db"] == row["far_dy"] == 0.0
        assert row["psnr"] == pytest.approx(10 * math.log10(4 / row["l2"]))


def test_local_change_hand_value():
    z = torch.zeros(1, 4, 8, 8)
    z[0, :3, 2, 5] = torch.tensor([0.5, -0.25, 1.0])
    ref = local_decode(z)
    out = local_decode(Zero().apply(z, Site(2, 5)))
    # one 8x8 block changes by (0.5, 0.25, 1.0) in absolute value out of 3 * 64 * 64 values
    assert l2(ref, out).item() == pytest.approx(64 * (0.25 + 0.0625 + 1.0) / 12288)
    assert l1(ref, out).item() == pytest.approx(64 * 1.75 / 12288)


# -- global change: a uniform tint ----------------------------------------------------------------------------

def tinted(site, radius=DEFAULT_RADIUS, measures=DEFAULT_MEASURES):
    """Measures for raising channel 3's mean by exactly 1 at one cell, so the image gains TINT everywhere."""
    z = latent()
    op = Fill(64.0)  # 64 / (8 * 8 cells) = 1 added to channel 3's mean
    out = tint_decode(op.apply(z, Site(site.row, site.col, channel=3)))
    return measure(tint_decode(z), out, [site], FACTOR, radius=radius, measures=measures)[0]


def test_uniform_tint_far_measures():
    row = tinted(Site(3, 3))
    # far field at radius 3: cells more than 3 from (3, 3) are row 7 or column 7: 64 - 49 = 15 cells
    assert row["far_fraction"] == pytest.approx(15 / 64)
    assert row["far_l2"] == pytest.approx(float(TINT.pow(2).mean()), rel=1e-6)
    assert row["l2"] == pytest.approx(0.109375, rel=1e-6)
    assert row["psnr"] == pytest.approx(10 * math.log10(4 / 0.109375), rel=1e-6)
    assert row["far_dr"] == pytest.approx(0.25, rel=1e-6)
    assert row["far_dg"] == pytest.approx(-0.5, rel=1e-6)
    assert row["far_db"] == pytest.approx(0.125, rel=1e-6)
    assert row["far_dy"] == pytest.approx(0.299 * 0.25 - 0.587 * 0.5 + 0.114 * 0.125, rel=1e-6)  # -0.2045
    # cells within R of (3, 3): 1, 9, 25, 49, 64 -> 49/64 < 0.9 <= 64/64 at R = 4
    assert row["radius90"] == 4.0


def test_uniform_tint_corner_and_radius():
    row = tinted(Site(0, 0))
    assert row["far_fraction"] == pytest.approx(48 / 64)  # cells with max(r, c) > 3
    assert row["radius90"] == 7.0  # (R + 1)^2 / 64 >= 0.9 first at R = 7
    row = tinted(Site(0, 0), radius=6)
    assert row["far_fraction"] == pytest.approx(15 / 64)
    row = tinted(Site(0, 0), radius=7)
    assert row["far_fraction"] == 0.0 and math.isnan(row["far_l2"]) and math.isnan(row["far_dy"])


def test_patch_site_far_field_and_radius90():
    z = latent()
    out = z.clone()
    out[0, 3] = 1.0  # channel 3 mean 0 -> 1 (only the tint changes)
    site = Site(3, 3, size=3)  # cells 2..4 in both directions
    row = measure(tint_decode(z), tint_decode(out), [site], FACTOR, radius=1)[0]
    assert row["far_fraction"] == pytest.approx(39 / 64)  # cells within 1 of the patch: rows/cols 1..5 = 25
    assert row["radius90"] == 3.0  # within R: 9, 25, 49, 64 cells
    assert row["far_dr"] == pytest.approx(0.25, rel=1e-6)


# -- radius90 and far measures on a hand-made strip ------------------------------------------------------------

def strip(*changes):
    """A 1x10-pixel image pair (factor 1, so each pixel is a cell); ``changes`` maps column -> RGB change."""
    ref = torch.zeros(3, 1, 10)
    out = torch.zeros(1, 3, 1, 10)
    for col, rgb in changes:
        out[0, :, 0, col] = torch.tensor(rgb)
    return ref, out


def test_radius90_exactly_at_ninety_percent():
    ref, out = strip((0, (3.0, 0.0, 0.0)), (5, (1.0, 0.0, 0.0)))  # energy 9 at distance 0, 1 at 5
    assert radius90(ref, out, [Site(0, 0)], 1).tolist() == [0.0]
    ref, out = strip((0, (2.0, 2.0, 0.0)), (5, (1.0, 0.0, 0.0)), (9, (0.0, 0.0, -1.0)))  # 8, 1, 1
    assert radius90(ref, out, [Site(0, 0)], 1).tolist() == [5.0]
    row = measure(ref, out, [Site(0, 0)], 1, radius=3)[0]
    assert row["far_fraction"] == pytest.approx(0.2)  # columns 4..9 hold 2 of 10
    assert row["far_l2"] == pytest.approx(2 / 18)  # 2 over 6 pixels x 3 channels
    assert row["far_dr"] == pytest.approx(1 / 6) and row["far_db"] == pytest.approx(-1 / 6)
    assert row["far_dg"] == 0.0
    assert row["far_dy"] == pytest.approx((0.299 - 0.114) / 6)
    assert row["l2"] == pytest.approx(10 / 30) and row["l1"] == pytest.approx(6 / 30)


def test_no_change_gives_nan_and_inf():
    ref = torch.zeros(3, 16, 16)
    row = measure(ref, ref[None].clone(), [Site(0, 0)], FACTOR, radius=0)[0]
    assert math.isnan(row["far_fraction"]) and math.isnan(row["radius90"])
    assert row["psnr"] == float("inf") and row["l2"] == 0.0 and row["far_l2"] == 0.0


def test_psnr_from_known_l2():
    ref = torch.zeros(3, 8, 8)
    out = torch.full((2, 3, 8, 8), 0.5)
    out[1] = 0.0
    out[1, 0] = 1.0  # l2 = 1/3
    values = psnr(ref, out).tolist()
    assert values[0] == pytest.approx(10 * math.log10(4 / 0.25))  # 12.04 dB
    assert values[1] == pytest.approx(10 * math.log10(12.0))


# -- agreement with the oracle's zeroing-test energy ---------------------------------------------------------

def test_far_l2_equals_the_oracle_energy_for_single_cells():
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(3, 48, 40, generator=gen)
    out = torch.randn(4, 3, 48, 40, generator=gen)
    sites = [Site(0, 0), Site(2, 3), Site(5, 4), Site(3, 1)]
    ours = far_l2(ref, out, sites, FACTOR, radius=2).tolist()
    for i, s in enumerate(sites):
        assert ours[i] == pytest.approx(far_field_energy(out[i] - ref, s.row, s.col, FACTOR, 2), rel=1e-6)
        assert torch.equal(far_mask(s, (48, 40), FACTOR, 2), far_field_mask((48, 40), s.row, s.col, FACTOR, 2))


# -- the geometry core against brute force (tests/oracles.py) --------------------------------------------------

SHAPES = [(48, 40), (37, 50), (8, 64), (24, 24)]  # non-square, partial cells (37 x 50 at factor 8), one row
REGIONS = [Site(0, 0), Site(5, 4), Site(2, 6), Site(4, 0), Site(0, 3, size=2), Site(5, 4, size=3), Site(2, 2, size=4),
           Site(3, 0, size=5), (1, 2), Block((0, 2), (3, 6)), Block((4, 5), (0, 1)), Block((1, 4), (1, 3))]


def _fits(region, h, w):
    if isinstance(region, Block):
        return region.rows[0] < h and region.cols[0] < w
    r, c = (region.row, region.col) if isinstance(region, Site) else region
    return r < h and c < w


def _cells(region, shape, factor):
    h, w = grid_of(shape, factor)
    if isinstance(region, Site):
        return patch_cells(region.row, region.col, region.size, h, w)
    if isinstance(region, Block):
        return block_cells(region.rows, region.cols, h, w)
    return [tuple(region)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("metric", ["chebyshev", "euclidean"])
def test_cell_distance_matches_brute_force(shape, metric):
    h, w = latent_grid(shape, FACTOR)
    assert (h, w) == grid_of(shape, FACTOR)
    for region in REGIONS:
        if not _fits(region, h, w):
            with pytest.raises(ValueError, match="outside"):
                cell_distance(region, shape, FACTOR, metric=metric)
            continue
        cells = _cells(region, shape, FACTOR)
        r0, r1, c0, c1 = region_bounds(region, (h, w))
        assert sorted(cells) == [(r, c) for r in range(r0, r1) for c in range(c0, c1)]
        got = cell_distance(region, shape, FACTOR, metric=metric)
        want = torch.from_numpy(brute_cell_distance(cells, shape, FACTOR, metric))
        assert got.shape == shape and got.dtype == (torch.int64 if metric == "chebyshev" else torch.float32)
        if metric == "chebyshev":
            assert torch.equal(got, want.long()), region
        else:
            torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0, msg=str(region))
        for radius in (0, 1, 1.5, 2, 3):
            assert torch.equal(far_mask(region, shape, FACTOR, radius, metric=metric), want > radius), (region, radius)


def test_site_cells_follow_the_oracle_patch_convention():
    for site in REGIONS[:8]:
        assert site.cells(6, 7) == patch_cells(site.row, site.col, site.size, 6, 7)


def test_chebyshev_far_mask_is_the_intersection_of_single_cell_far_fields():
    for region in [Site(5, 4, size=3), Site(0, 0, size=2), Block((0, 2), (3, 6))]:
        for radius in (0, 1, 2):
            want = torch.ones(45, 50, dtype=torch.bool)
            for r, c in _cells(region, (45, 50), FACTOR):
                want &= far_field_mask((45, 50), r, c, FACTOR, radius)
            assert torch.equal(far_mask(region, (45, 50), FACTOR, radius), want)


def test_cell_distance_hand_example():
    d = cell_distance(Site(1, 1, size=2), (8, 8), 2)  # cells (1..2, 1..2) of a 4x4 latent, 2x2 pixels each
    cells = d[::2, ::2]
    assert cells.tolist() == [[1, 1, 1, 1], [1, 0, 0, 1], [1, 0, 0, 1], [1, 1, 1, 1]]
    assert torch.equal(d, cells.repeat_interleave(2, 0).repeat_interleave(2, 1))
    assert torch.equal(d, cell_distance(Block((1, 3), (1, 3)), (8, 8), 2))


@pytest.mark.parametrize("metric", ["chebyshev", "euclidean"])
def test_rings_match_brute_force(metric):
    gen = torch.Generator().manual_seed(3)
    values = torch.rand(37, 50, generator=gen, dtype=torch.float64)
    for region in [Site(0, 0), Site(2, 3), Site(4, 6, size=3), Block((0, 5), (2, 3))]:
        dist = cell_distance(region, (37, 50), FACTOR, metric=metric)
        want = brute_ring_profile(values.numpy(), dist.double().numpy())
        got = ring_profile(values, dist)
        np.testing.assert_allclose(got, want, rtol=1e-12, equal_nan=True)
        sums = ring_sums(values, dist)
        counts = ring_sums(torch.ones_like(values), dist)
        np.testing.assert_allclose((sums / counts).numpy(), np.array(want), rtol=1e-12, equal_nan=True)
        assert float(sums.sum()) == pytest.approx(float(values.sum()), rel=1e-12)


def test_cell_gap_and_bad_regions():
    for a, b in [((0, 0), (3, 4)), ((5, 1), (2, 2)), ((4, 4), (4, 4))]:
        assert cell_gap(a, b) == gap(a, b)
        assert cell_gap(a, b, metric="euclidean") == pytest.approx(gap(a, b, "euclidean"))
    with pytest.raises(GeometryError, match="metric"):
        cell_distance(Site(0, 0), (16, 16), 8, metric="manhattan")
    with pytest.raises(GeometryError, match="Block"):
        Block((2, 2), (0, 1))
    with pytest.raises(GeometryError, match="outside"):
        cell_distance(Block((4, 6), (0, 1)), (16, 16), 8)
    with pytest.raises(ValueError):
        cell_distance(Site(3, 0), (16, 16), 8)  # the site's centre lies outside the 2x2 grid


def test_to_unit_and_luma():
    x = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.25, 1.0, 7.0], dtype=torch.float64)
    assert to_unit(x).tolist() == [0.0, 0.0, 0.25, 0.5, 0.625, 1.0, 1.0]
    assert to_unit(x.float()).dtype == torch.float32
    img = torch.rand(2, 3, 4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    want = np.einsum("nchw,c->nhw", img.numpy(), np.array([0.299, 0.587, 0.114]))
    np.testing.assert_allclose(luma(img).numpy(), want, rtol=1e-15)
    assert luma(img[0]).shape == (4, 5)


# -- individual functions, ssim, lpips ------------------------------------------------------------------------

def test_individual_functions_match_measure():
    z = latent()
    sites = [Site(0, 0), Site(6, 2)]
    out = z.repeat(2, 1, 1, 1)
    out[:, 3] = torch.tensor([1.0, -2.0]).reshape(2, 1, 1)
    ref, dec = tint_decode(z), tint_decode(out)
    rows = measure(ref, dec, sites, FACTOR)
    assert far_fraction(ref, dec, sites, FACTOR).tolist() == [r["far_fraction"] for r in rows]
    assert radius90(ref, dec, sites, FACTOR).tolist() == [r["radius90"] for r in rows]
    shift = far_colour_shift(ref, dec, sites, FACTOR)
    assert shift[:, 3].tolist() == [r["far_dy"] for r in rows]
    assert shift[1, 0].item() == pytest.approx(-0.5, rel=1e-6)
    assert l2(ref, dec).tolist() == [r["l2"] for r in rows]


def test_ssim_identical_is_one_and_change_lowers_it():
    gen = torch.Generator().manual_seed(1)
    ref = torch.rand(3, 16, 16, generator=gen) * 2 - 1
    out = torch.stack([ref, (ref + 0.3 * torch.randn(3, 16, 16, generator=gen)).clamp(-1, 1)])
    values = ssim(ref, out).tolist()
    assert values[0] == pytest.approx(1.0)
    assert values[1] < 0.95
    row = measure(ref, out[:1], [Site(0, 0)], FACTOR, measures=("ssim",))[0]
    assert row == {"ssim": pytest.approx(1.0)}


def test_lpips_identical_is_zero():
    model = get_lpips()  # must load offline; a failure here is a setup problem to report, not to skip
    gen = torch.Generator().manual_seed(2)
    ref = torch.rand(1, 3, 32, 32, generator=gen) * 2 - 1
    out = torch.cat([ref, (ref + 0.5 * torch.randn(1, 3, 32, 32, generator=gen)).clamp(-1, 1)])
    values = lpips(ref, out, lpips_model=model).tolist()
    assert values[0] == pytest.approx(0.0, abs=1e-7)
    assert values[1] > 0.01
    rows = measure(ref, out, [Site(0, 0), Site(1, 1)], FACTOR, measures=ALL_MEASURES, lpips_model=model)
    assert rows[0]["lpips"] == pytest.approx(0.0, abs=1e-7) and rows[1]["lpips"] == pytest.approx(values[1])
    spatial = lpips_map(ref, out, lpips_model=model)
    assert spatial.shape == (2, 1, 32, 32)
    assert spatial[0].abs().max().item() < 1e-7 and spatial[1].mean().item() > 0


# -- global effect ratio and errors ---------------------------------------------------------------------------

def test_global_effect_ratio_hand_example():
    assert global_effect_ratio([2.0, 1.0, 4.0, 100.0, 8.0]).tolist() == [0.5, 0.25, 1.0, 25.0, 2.0]
    # even count: median of 1, 2, 3, 6 is 2.5
    np.testing.assert_allclose(global_effect_ratio(torch.tensor([1.0, 2.0, 3.0, 6.0])), [0.4, 0.8, 1.2, 2.4])
    out = global_effect_ratio([1.0, float("nan"), 3.0])  # nan positions ignored for the median
    assert out[0] == 0.5 and math.isnan(out[1]) and out[2] == 1.5


def test_measure_names_and_errors():
    assert DEFAULT_RADIUS == 3
    assert set(ALL_MEASURES) == set(DEFAULT_MEASURES) | {"ssim", "lpips"}
    assert "ssim" not in DEFAULT_MEASURES and "lpips" not in DEFAULT_MEASURES
    ref = torch.zeros(3, 16, 16)
    out = torch.zeros(1, 3, 16, 16)
    with pytest.raises(ValueError, match="unknown measure.*'far'.*valid: l2, l1, psnr"):
        measure(ref, out, [Site(0, 0)], FACTOR, measures=("l2", "far"))
    with pytest.raises(MeasureError, match="2 sites for 1 perturbed images"):
        measure(ref, out, [Site(0, 0), Site(1, 1)], FACTOR)
    with pytest.raises(MeasureError, match="must be \\[N, 3, H, W\\]"):
        measure(ref, torch.zeros(1, 3, 8, 8), [Site(0, 0)], FACTOR)
    with pytest.raises(ValueError, match="outside the 2x2 latent"):
        measure(ref, out, [Site(2, 0)], FACTOR)
    # tuples are accepted as 1x1 sites and the order of the requested measures is kept
    assert list(measure(ref, out, [(1, 1)], FACTOR, measures=("psnr", "l1"))[0]) == ["psnr", "l1"]


def test_subsets_of_measures_agree_with_the_full_set():
    ref, out = strip((0, (2.0, 2.0, 0.0)), (5, (1.0, 0.0, 0.0)), (9, (0.0, 0.0, -1.0)))
    full = measure(ref, out, [Site(0, 0)], 1, radius=3)[0]
    for names in (("far_fraction", "radius90"), ("far_l2",), ("radius90",), ("far_dy", "l1")):
        assert measure(ref, out, [Site(0, 0)], 1, radius=3, measures=names)[0] == {k: full[k] for k in names}
