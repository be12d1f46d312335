"""Tests for vaeprobe.probes.linear: exact Jacobian norms, the randomised sensitivity map and their agreement."""

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vaeprobe.probes.linear import (SensitivityMap, _forward_ad_safe, agreement, jacobian_norms, sensitivity_map)
from vaeprobe.probes.geometry import Block, far_mask
from vaeprobe.models.adapter import VAE
from vaeprobe.models.zoo import tiny_random

from oracles import far_field_mask


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These models are tiny: a second OpenMP thread buys nothing and, on a shared 2-core machine, spinning
    # barriers make every small op hundreds of times slower. Restored after the module.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# -- a decoder with a Jacobian known by hand ---------------------------------------------------------------------
class BlockDecoder(nn.Module):
    """decode(z) = nearest-upsample-x8(gain * (W z + b)), with W a fixed 1x1 conv from C channels to 3 and
    gain[r, c] = 1 + r/2 + c/4. So J e_{p,ch} is the 8x8 pixel block of cell p holding gain_p * W[:, ch], and
    S_p = 64 * gain_p^2 * ||W||_F^2; nothing leaves the cell, so every far field is exactly 0."""

    W = torch.tensor([[1.0, -1.0, 0.0, 0.0, 0.0],
                      [0.0, 0.0, 2.0, 1.0, 0.0],
                      [0.0, 0.0, 0.0, 0.0, 3.0]]) * 0.5  # orthogonal rows: a low-variance probe estimate

    def __init__(self):
        super().__init__()
        self.channels = self.W.shape[1]
        self.mix = nn.Conv2d(self.channels, 3, 1)
        with torch.no_grad():
            self.mix.weight.copy_(self.W[:, :, None, None])
            self.mix.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))

    @staticmethod
    def gain(h, w):
        return 1.0 + 0.5 * torch.arange(h)[:, None] + 0.25 * torch.arange(w)[None, :]

    def encode(self, x):
        return F.avg_pool2d(x, 8)[:, :1].repeat(1, self.channels, 1, 1)

    def decode(self, z):
        h, w = z.shape[-2:]
        return F.interpolate(self.mix(z) * self.gain(h, w), scale_factor=8, mode="nearest")

    def hand_norms(self, h, w):
        return (64.0 * self.gain(h, w) ** 2 * self.W.pow(2).sum()).reshape(-1)


@pytest.fixture(scope="module")
def block():
    return VAE(BlockDecoder())


@pytest.fixture(scope="module")
def tiny():
    return VAE(tiny_random(seed=1))


def _latent(channels, h, w, seed=0):
    return torch.randn(1, channels, h, w, generator=torch.Generator().manual_seed(seed))


# -- exact reference ---------------------------------------------------------------------------------------------
def test_exact_norms_equal_hand_values(block):
    z = _latent(5, 8, 8)
    assert block.latent_channels == 5 and block.factor == 8
    hand = BlockDecoder().hand_norms(8, 8)
    got = jacobian_norms(block, z)
    assert got.shape == (64,) and got.dtype == torch.float32
    torch.testing.assert_close(got, hand, rtol=1e-5, atol=0)
    # explicit positions keep their order (gain differs along rows and columns, so a transposition would show)
    pos = [(7, 0), (0, 7), (3, 5)]
    torch.testing.assert_close(jacobian_norms(block, z, positions=pos, batch=2),
                               torch.stack([hand[r * 8 + c] for r, c in pos]), rtol=1e-5, atol=0)
    torch.testing.assert_close(jacobian_norms(block, z[0], positions=torch.tensor(pos)), got[[56, 7, 29]])


@pytest.mark.parametrize("radius", [0, 1, 3])
def test_far_field_of_a_cell_local_decoder_is_zero(block, radius):
    z = _latent(5, 8, 8)
    assert jacobian_norms(block, z, radius=radius).abs().max().item() < 1e-12
    est = sensitivity_map(block, z, n_probes=4, radius=radius, blocks=(2, 2))
    assert est.map.abs().max().item() < 1e-12


def test_bad_positions_and_shapes_are_refused(block):
    with pytest.raises(ValueError, match="outside"):
        jacobian_norms(block, _latent(5, 8, 8), positions=[(8, 0)])
    with pytest.raises(ValueError, match="one latent"):
        jacobian_norms(block, _latent(5, 8, 8).repeat(2, 1, 1, 1))
    with pytest.raises(ValueError, match="n_probes"):
        sensitivity_map(block, _latent(5, 8, 8), n_probes=0)


# -- estimate on the hand-known decoder --------------------------------------------------------------------------
def test_many_probes_estimate_hand_values(block):
    z = _latent(5, 8, 8)
    hand = BlockDecoder().hand_norms(8, 8)
    est = sensitivity_map(block, z, n_probes=1000, seed=3)
    ratio = est.map.reshape(-1) / hand
    # per probe the relative std here is ~0.93, so ~3% per position after 1000 probes; cells see disjoint pixels,
    # so the 64 ratios are independent and their mean has a std of ~0.4%
    assert (ratio - 1).abs().max().item() < 0.15
    assert abs(ratio.mean().item() - 1) < 0.02


def test_estimate_is_unbiased_and_seeded(block):
    z = _latent(5, 8, 8)
    hand = BlockDecoder().hand_norms(8, 8).reshape(8, 8)
    maps = torch.stack([sensitivity_map(block, z, n_probes=8, seed=s).map for s in range(40)])
    assert abs((maps.mean(0) / hand).mean().item() - 1) < 0.03
    assert torch.equal(sensitivity_map(block, z, n_probes=8, seed=5).map, maps[5])
    assert not torch.equal(maps[0], maps[1])


def test_parameters_untouched_by_the_estimate(block):
    params = list(block.model.parameters())
    assert all(p.requires_grad for p in params)
    sensitivity_map(block, _latent(5, 8, 8), n_probes=2, radius=0)
    assert all(p.requires_grad and p.grad is None for p in params)


# -- tiny diffusers AutoencoderKL (GroupNorm, mid-block attention) -----------------------------------------------
def test_exact_norms_match_finite_differences(tiny):
    z = _latent(4, 4, 4, seed=2)
    model64 = copy.deepcopy(tiny.model).double()  # SDPA attention in float64 (the classic processor upcasts
    z64 = z.double()                                # its softmax to float32, which would limit the differences)
    eps = 1e-5

    def fd_columns(r, c):
        cols = []
        for ch in range(4):
            e = torch.zeros_like(z64)
            e[0, ch, r, c] = eps
            with torch.no_grad():
                cols.append((model64.decode(z64 + e).sample - model64.decode(z64 - e).sample)[0] / (2 * eps))
        return cols

    pos = [(0, 0), (1, 2), (3, 1)]
    fd = torch.tensor([sum(float(col.pow(2).sum()) for col in fd_columns(r, c)) for r, c in pos],
                      dtype=torch.float64)
    torch.testing.assert_close(jacobian_norms(tiny, z, positions=pos).double(), fd, rtol=1e-4, atol=0)

    mask = far_field_mask((32, 32), 1, 2, 8, 1)
    fd_far = sum(float(col.pow(2).sum(0)[mask].sum()) for col in fd_columns(1, 2))
    got = jacobian_norms(tiny, z, positions=[(1, 2)], radius=1).item()
    assert got == pytest.approx(fd_far, rel=1e-4)
    assert 0 < got < fd[1].item()


def test_vmap_batches_equal_the_loop(tiny):
    z = _latent(4, 4, 4, seed=2)
    pos = [(0, 3), (2, 2)]
    torch.testing.assert_close(jacobian_norms(tiny, z, positions=pos, batch=1),
                               jacobian_norms(tiny, z, positions=pos, batch=8), rtol=1e-5, atol=0)


def test_estimate_ranks_like_exact_on_tiny_kl(tiny):
    z = _latent(4, 8, 8)  # 64x64 px
    exact = jacobian_norms(tiny, z, batch=64)
    assert exact.max() / exact.min() > 5  # enough spread for a rank test to mean something
    est = sensitivity_map(tiny, z, n_probes=64, seed=0)
    res = agreement(est, exact, k=10)
    assert res["spearman"] >= 0.9, res  # 0.96-0.97 seen over seeds 0-9 (and 0.82-0.87 with 8 probes)
    assert res["topk"] >= 0.5, res


def test_estimate_is_unbiased_on_tiny_kl(tiny):
    z = _latent(4, 4, 4, seed=1)
    exact = jacobian_norms(tiny, z).reshape(4, 4)
    mean = torch.stack([sensitivity_map(tiny, z, n_probes=8, seed=s).map for s in range(32)]).mean(0)
    assert abs((mean / exact).mean().item() - 1) < 0.1


def test_far_field_estimate_on_tiny_kl(tiny):
    # 8x8 grid, radius 1, quadrant blocks: the block far field of a cell lacks the ring of cells that its own far
    # field has just beyond the radius, so the values are biased low (about 1/3 here) but the ranking survives.
    z = _latent(4, 8, 8)
    exact = jacobian_norms(tiny, z, radius=1, batch=64)
    est = sensitivity_map(tiny, z, n_probes=64, radius=1, blocks=(2, 2), seed=0)
    assert est.n_backward == 64 * 4
    res = agreement(est, exact)
    assert res["spearman"] >= 0.8, res  # 0.86-0.91 seen over seeds 0-9 on two latents
    ratio = (est.map.reshape(-1) / exact).mean().item()
    assert 0.1 < ratio < 0.7  # documented: biased low


def test_far_field_estimate_with_one_block_per_cell_is_unbiased(tiny):
    # With a block per cell the block far field is the cell's own far field: no bias left, only noise.
    z = _latent(4, 4, 4)
    exact = jacobian_norms(tiny, z, radius=1)
    est = sensitivity_map(tiny, z, n_probes=64, radius=1, blocks=(4, 4), seed=1)
    assert est.n_backward == 64 * 16 and est.blocks == (4, 4)
    assert abs((est.map.reshape(-1) / exact).mean().item() - 1) < 0.12


# -- attention processors -----------------------------------------------------------------------------------------
def test_attention_processors_restored():
    vae = VAE(tiny_random(seed=1))
    before = vae.model.attn_processors
    assert {type(p).__name__ for p in before.values()} == {"AttnProcessor2_0"}
    jacobian_norms(vae, _latent(4, 4, 4), positions=[(1, 1)])
    after = vae.model.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


def test_attention_processors_restored_after_an_exception(monkeypatch):
    vae = VAE(tiny_random(seed=1))
    before = vae.model.attn_processors
    seen = {}

    class Boom(Exception):
        pass

    def failing_decode(z, grad=False):
        seen.update(vae.model.attn_processors)
        raise Boom("forced")

    monkeypatch.setattr(vae, "decode", failing_decode)
    with pytest.raises(Boom):
        jacobian_norms(vae, _latent(4, 4, 4), positions=[(1, 1)])
    assert {type(p).__name__ for p in seen.values()} == {"AttnProcessor"}  # it was swapped inside
    after = vae.model.attn_processors
    assert all(after[k] is before[k] for k in before)


def test_custom_processors_are_left_alone():
    from diffusers.models.attention_processor import AttnProcessor

    vae = VAE(tiny_random(seed=1))
    custom = {name: AttnProcessor() for name in vae.model.attn_processors}
    vae.model.set_attn_processor(dict(custom))
    with _forward_ad_safe(vae.model):
        assert all(vae.model.attn_processors[k] is custom[k] for k in custom)
    assert all(vae.model.attn_processors[k] is custom[k] for k in custom)


def test_wrapper_that_is_not_a_diffusers_model():
    # The attention control wraps a diffusers Attention in a plain nn.Module without set_attn_processor.
    from vaeprobe.models.controls import PlantedSpotVAE

    model = PlantedSpotVAE(tiny_random(seed=2), mechanism="attention").eval()
    assert not hasattr(model, "set_attn_processor")
    procs = {name: m.processor for name, m in model.named_modules() if hasattr(m, "set_processor")}
    assert procs
    vae = VAE(model)
    got = jacobian_norms(vae, _latent(4, 4, 4), positions=[(0, 0), (2, 3)], batch=4)
    assert torch.isfinite(got).all() and (got > 0).all()
    assert all(m.processor is procs[name] for name, m in model.named_modules() if name in procs)


def test_loop_fallback_when_vmap_fails(tiny, monkeypatch):
    z = _latent(4, 4, 4, seed=2)
    pos = [(0, 3), (2, 2), (3, 0)]
    want = jacobian_norms(tiny, z, positions=pos, batch=4)
    calls = []

    def no_vmap(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("vmap: data-dependent control flow is not supported")

    monkeypatch.setattr(torch.func, "vmap", no_vmap)
    torch.testing.assert_close(jacobian_norms(tiny, z, positions=pos, batch=4), want, rtol=1e-5, atol=0)
    assert len(calls) == 1  # not retried for the later batches


# -- blocks and cost accounting -----------------------------------------------------------------------------------
def test_block_mask_is_the_intersection_of_cell_far_fields():
    for rows, cols, radius in [((0, 2), (0, 2), 0), ((1, 4), (2, 3), 1), ((0, 5), (0, 6), 0), ((2, 3), (4, 6), 2)]:
        want = torch.ones(40, 48, dtype=torch.bool)
        for r in range(*rows):
            for c in range(*cols):
                want &= far_field_mask((40, 48), r, c, 8, radius)
        assert torch.equal(far_mask(Block(rows, cols), (40, 48), 8, radius), want)


def test_cost_fields_count_passes(block):
    z = _latent(5, 4, 6)  # non-square grid: 32x48 px
    plain = sensitivity_map(block, z, n_probes=3)
    assert isinstance(plain, SensitivityMap)
    assert (plain.n_forward, plain.n_backward, plain.n_probes, plain.radius, plain.blocks) == (1, 3, 3, None, None)
    assert plain.map.shape == (4, 6)
    for blocks, n_blocks, stored in [((2, 2), 4, (2, 2)), ((2, 3), 6, (2, 3)), ((1, 3), 3, (1, 3)),
                                     ((10, 10), 24, (4, 6))]:
        est = sensitivity_map(block, z, n_probes=3, radius=0, blocks=blocks)
        assert est.n_backward == 3 * n_blocks and est.n_forward == 1 and est.blocks == stored


def test_empty_block_far_field_gives_nan_and_skips_the_block(block):
    z = _latent(5, 4, 4)
    with pytest.warns(RuntimeWarning, match="empty far field"):
        est = sensitivity_map(block, z, n_probes=2, radius=2, blocks=(2, 2))
    assert torch.isnan(est.map).all() and est.n_backward == 0
    # one block per cell: only the 4 central cells have nothing more than 2 cells away on a 4x4 grid
    with pytest.warns(RuntimeWarning, match="empty far field"):
        est = sensitivity_map(block, z, n_probes=2, radius=2, blocks=(4, 4))
    centre = torch.zeros(4, 4, dtype=torch.bool)
    centre[1:3, 1:3] = True
    assert torch.equal(torch.isnan(est.map), centre) and est.n_backward == 2 * 12
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sensitivity_map(block, z, n_probes=2, radius=1, blocks=(4, 4)).n_backward == 2 * 16


# -- agreement ----------------------------------------------------------------------------------------------------
def test_agreement_values():
    exact = torch.arange(20.0)
    res = agreement(exact.flip(0), exact, k=5)
    assert res["spearman"] == pytest.approx(-1.0) and res["topk"] == 0.0 and res["n"] == 20
    noisy = exact.clone()
    noisy[[0, 19]] = noisy[[19, 0]]  # swap the largest and the smallest
    res = agreement(noisy.reshape(4, 5), exact, k=4)
    assert res["topk"] == 0.75 and 0 < res["spearman"] < 1
    assert agreement(exact, exact, k=50)["k"] == 20


def test_agreement_skips_non_finite_and_flags_constant():
    est = torch.tensor([1.0, float("nan"), 3.0, 4.0])
    res = agreement(est, torch.tensor([1.0, 2.0, 3.0, 4.0]), k=2)
    assert res["n"] == 3 and res["spearman"] == pytest.approx(1.0) and res["topk"] == 1.0
    assert math.isnan(agreement(torch.ones(5), torch.arange(5.0))["spearman"])
    with pytest.raises(ValueError):
        agreement(torch.ones(3), torch.ones(4))


def test_kept_probes_reproduce_the_map_and_its_standard_error(tiny):
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    est = sensitivity_map(tiny, z, n_probes=6, seed=4, keep_probes=True)
    again = SensitivityMap.from_probes(est.probes)
    assert est.probes.shape == (6, 4, 4)
    assert torch.allclose(again.map, est.map, rtol=1e-5) and torch.allclose(again.rel_se, est.rel_se, rtol=1e-4)
    with pytest.raises(ValueError, match="whole-image"):
        sensitivity_map(tiny, z, n_probes=2, radius=0, keep_probes=True)


def test_shrinkage_keeps_an_isolated_peak_and_moves_cells_by_at_most_one_standard_error():
    """A smooth map plus independent probe noise, with one cell 50x above its neighbours (a spot): shrinking
    lowers the error against the truth, moves no cell by more than its standard error, and the peak stays first."""
    from vaeprobe.probes.linear import shrink_map

    gen = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(24.0), torch.arange(24.0), indexing="ij")
    truth = torch.exp(0.15 * torch.sin(yy / 4) + 0.15 * torch.cos(xx / 5) + 0.02 * yy)
    truth[7, 15] *= 50
    K = 16
    probes = truth * torch.randn(K, 24, 24, generator=gen).pow(2)  # E = truth, like one-channel Hutchinson
    raw = SensitivityMap.from_probes(probes)
    out = shrink_map(raw)
    move = (out.map.log() - raw.map.log()).abs()
    assert bool((move <= raw.rel_se + 1e-6).all())
    err_raw = (raw.map.log() - truth.log()).pow(2).mean()
    err_out = (out.map.log() - truth.log()).pow(2).mean()
    assert err_out < 0.6 * err_raw
    assert agreement(out, truth)["spearman"] > agreement(raw, truth)["spearman"]
    assert int(out.map.flatten().argmax()) == 7 * 24 + 15
    with pytest.raises(ValueError, match="whole-image"):
        shrink_map(SensitivityMap(raw.map, K, radius=1, blocks=(2, 2), n_backward=K, n_forward=1, rel_se=raw.rel_se))


def test_shrinkage_tau2_is_not_inflated_by_one_huge_cell():
    """The local variation tau^2 is estimated robustly: a spot 1e6x above its neighbours leaves it within 25 % of
    the estimate without the spot, where the mean-based estimate is more than 10x larger; so the smoothing of the
    ordinary cells is the same with and without the spot."""
    from vaeprobe.probes.linear import shrink_map

    gen = torch.Generator().manual_seed(1)
    yy, xx = torch.meshgrid(torch.arange(24.0), torch.arange(24.0), indexing="ij")
    truth = torch.exp(0.15 * torch.sin(yy / 4) + 0.15 * torch.cos(xx / 5) + 0.02 * yy)
    noise = torch.randn(16, 24, 24, generator=gen).pow(2)
    plain = SensitivityMap.from_probes(truth * noise)
    spotted_truth = truth.clone()
    spotted_truth[7, 15] *= 1e6
    spotted = SensitivityMap.from_probes(spotted_truth * noise)
    a, b = shrink_map(plain), shrink_map(spotted)
    assert b.tau2 == pytest.approx(a.tau2, rel=0.25)
    log = spotted.map.double().log()
    neigh = (torch.nn.functional.avg_pool2d(log[None, None], 3, 1, 1, count_include_pad=False)[0, 0] * 9 - log) / 8
    mean_based = float(((log - neigh)[1:-1, 1:-1] ** 2).mean())
    assert mean_based > 10 * b.tau2
    away = torch.ones(24, 24, dtype=torch.bool)
    away[5:10, 13:18] = False  # the spot and its neighbours
    assert float((a.map[away] / b.map[away]).log().abs().max()) < 0.02
    assert int(b.map.flatten().argmax()) == 7 * 24 + 15
