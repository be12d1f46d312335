"""Planted-spot controls: each construction does what its ground truth declares (on a tiny base, fast)."""

import pytest
import torch

from vaeprobe.models.controls import MECHANISMS, PlantedSpotVAE, spot_locations, strongest_positions
from vaeprobe.models.adapter import VAE
from vaeprobe.models.zoo import tiny_random
from vaeprobe.probes.geometry import far_mask

from oracles import far_field_mask, zeroing_test


def _image(seed=0, size=64, flat_at=(5, 2)):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, size, size, generator=g) * 2 - 1
    r, c = flat_at  # a flat 3x3-cell patch centred on this cell
    x[:, :, (r - 1) * 8:(r + 2) * 8, (c - 1) * 8:(c + 2) * 8] = 0.3
    return x


def test_flattest_location_finds_the_flat_patch():
    for flat in [(5, 2), (2, 6), (4, 4)]:
        x = _image(flat_at=flat)
        assert spot_locations(x, 8, "flattest").tolist() == [list(flat)]
    assert spot_locations(x, 8, "fixed").tolist() == [[2, 2]]


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_encoder_trace_and_ground_truth(mechanism):
    vae = VAE(PlantedSpotVAE(tiny_random(seed=4), mechanism=mechanism))
    x = _image()
    gt = vae.ground_truth(x)[0]
    assert gt["mechanism"] == mechanism
    post = vae.encode(x)
    r, c = gt["row"], gt["col"]
    if mechanism == "hidden":
        assert not post.at_clamp_floor().any() and not gt["encoder_trace"]
    else:
        assert strongest_positions(post.mean).tolist() == [[r, c]]
        assert post.at_clamp_floor()[0, :, r, c].all() and post.at_clamp_floor()[0].any(0).sum() == 1
        assert torch.allclose(post.raw_logvar[0, :, r, c], torch.full((4,), -35.0))
        norm = post.mean[0].norm(dim=0)
        assert norm[r, c] > 10 * norm.median()


def test_droplet_groupnorm_is_identity_off_the_spot():
    model = PlantedSpotVAE(tiny_random(seed=4), mechanism="groupnorm")
    x = _image()
    z = model.encode(x).latent_dist.mean
    r, c = model.ground_truth(x)[0]["row"], model.ground_truth(x)[0]["col"]
    out = model.decoder.droplet(z)
    keep = torch.ones(8, 8, dtype=torch.bool)
    keep[r, c] = False
    assert torch.allclose(out[0][:, keep], z[0][:, keep], atol=1e-3)
    # erase the spike: the statistics change and every other position is rescaled
    z0 = z.clone()
    z0[0, :, r, c] = 0
    out0 = model.decoder.droplet(z0)
    assert (out0[0][:, keep] - z[0][:, keep]).abs().mean() > 1.0


def test_attention_control_attends_to_the_spot():
    model = PlantedSpotVAE(tiny_random(seed=4), mechanism="attention")
    x = _image()
    z = model.encode(x).latent_dist.mean
    attn = model.decoder.attention
    h = z.flatten(2).transpose(1, 2)  # [1, N, C]
    probs = attn.get_attention_scores(attn.to_q(h), attn.to_k(h))
    gt = model.ground_truth(x)[0]
    spot = gt["row"] * 8 + gt["col"]
    assert probs[0, :, spot].min() > 0.99


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_zeroing_the_spot_moves_the_far_field(mechanism):
    vae = VAE(PlantedSpotVAE(tiny_random(seed=4), mechanism=mechanism))
    x = _image(size=96, flat_at=(8, 3))
    gt = vae.ground_truth(x)[0]
    res = zeroing_test(vae, x, gt["row"], gt["col"], n_random=10, radius=3)
    assert res.ratio >= 10, res


def test_far_field_mask_counts():
    for m in (far_field_mask((64, 64), 3, 3, 8, 1), far_mask((3, 3), (64, 64), 8, 1)):
        assert m.sum() == 64 * 64 - 9 * 64 and not m[3 * 8, 3 * 8]


def test_weighted_stats_groupnorm_matches_a_brute_force_weighted_normalisation():
    """The internal control's layer normalises with statistics in which one latent cell's block has the share
    alpha (up to rounding of the copy count), computed here by hand."""
    from vaeprobe.models.controls import WeightedStatsGroupNorm

    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(4, 8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.2, 0.2)
    s, alpha = 2, 0.3
    layer = WeightedStatsGroupNorm(norm, alpha, scale=s)
    x = torch.randn(2, 8, 8 * s, 8 * s)
    x[:, :, 4:6, 4:6] += 3.0   # the block of latent cell (2, 2), as (h // 4, w // 4) with h = 8
    k = round(alpha / (1 - alpha) * 64)
    share = k * s * s / (64 * s * s + k * s * s)
    xg = x.reshape(2, 4, -1)
    block = x[:, :, 4:6, 4:6].reshape(2, 4, -1)
    mean = (1 - share) * xg.mean(-1) + share * block.mean(-1)
    sq = (1 - share) * xg.pow(2).mean(-1) + share * block.pow(2).mean(-1)
    var = sq - mean ** 2
    ref = (x.reshape(2, 4, -1) - mean[..., None]) / torch.sqrt(var[..., None] + norm.eps)
    ref = ref.reshape_as(x) * norm.weight[None, :, None, None] + norm.bias[None, :, None, None]
    assert torch.allclose(layer(x), ref, atol=1e-5)
    assert not torch.allclose(norm(x), ref, atol=1e-3)  # a plain GroupNorm is not it
    with pytest.raises(ValueError):
        WeightedStatsGroupNorm(norm, 1.0)


def test_internal_control_is_the_clean_model_but_for_a_decoder_groupnorm():
    """Same latents as the clean mini (the planted cell has an ordinary norm, so the argmax norm misses it); zeroing
    the cell moves the far field far more than in the clean decoder, and freezing the GroupNorm statistics
    (the mechanism module) removes that excess."""
    from vaeprobe.data.images import load_images
    from vaeprobe.probes.mechanism import decode_frozen, record_pathways
    from vaeprobe.models.loading import load_vae

    clean, internal = load_vae("builtin:mini-kl-f8"), load_vae("builtin:internal")
    x = load_images("builtin:photos-heldout", size=64)[1].tensor()
    gt = internal.ground_truth(x)[0]
    assert gt["expected_verdict"] == "global" and gt["mechanism"] == "internal"
    with torch.no_grad():
        z = internal.encode(x).mean
        assert torch.allclose(z, clean.encode(x).mean)
        norm = z[0].norm(dim=0)
        assert (gt["row"], gt["col"]) != divmod(int(norm.argmax()), norm.shape[1])
        assert float(norm[gt["row"], gt["col"]] / norm.median()) < 3
        z0 = z.clone()
        z0[0, :, gt["row"], gt["col"]] = 0
        far = far_field_mask((64, 64), gt["row"], gt["col"], factor=8, radius=2)
        def far_energy(a, b):
            return float((a - b).pow(2).sum(1)[0][far].mean())

        e_clean = far_energy(clean.decode(z0), clean.decode(z))
        ref, rec = record_pathways(internal, z)
        live = internal.decode(z0)
        e_live = far_energy(live, ref)
        frozen = decode_frozen(internal, z0, rec, groupnorm=True, attention=None)
        e_frozen = far_energy(frozen, ref)
    assert e_live > 20 * e_clean
    assert e_frozen < 0.2 * e_live


def test_high_norm_decoy_is_an_outlier_the_decoder_drops():
    """decoy-high-norm: the encoder writes a vector of norm 160 (a latent outlier, log-variance at the clamp) that
    the decoder inpaints before decoding, so the decode is the plain decoder's of the inpainted latent; the same
    latent through the plain decoder (the droplet control) reads the vector and moves the far field."""
    from vaeprobe.data.images import load_images
    from vaeprobe.models.controls import inpaint
    from vaeprobe.models.loading import load_vae

    decoy, droplet = load_vae("builtin:decoy-high-norm"), load_vae("builtin:decoy-droplet")
    x = load_images("builtin:photos-heldout", size=64)[2].tensor()
    gt = decoy.ground_truth(x)[0]
    assert gt["expected_verdict"] == "high-norm"
    with torch.no_grad():
        z = decoy.encode(x).mean
        assert torch.equal(z, droplet.encode(x).mean)
        norm = z[0].norm(dim=0)
        assert (gt["row"], gt["col"]) == divmod(int(norm.argmax()), norm.shape[1])
        assert float(norm[gt["row"], gt["col"]] / norm.median()) > 10
        pos = torch.tensor([[gt["row"], gt["col"]]])
        base = decoy.model.base
        plain = base.decoder(base.post_quant_conv(inpaint(z, pos)))
        assert torch.equal(decoy.decode(z), plain)
        far = far_field_mask((64, 64), gt["row"], gt["col"], factor=8, radius=2)
        z0 = z.clone()
        z0[0, :, gt["row"], gt["col"]] = 0
        moved_decoy = float((decoy.decode(z0) - decoy.decode(z)).pow(2).sum(1)[0][far].mean())
        moved_droplet = float((droplet.decode(z0) - droplet.decode(z)).pow(2).sum(1)[0][far].mean())
    assert moved_droplet > 100 * moved_decoy
