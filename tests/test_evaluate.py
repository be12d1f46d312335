"""vaeprobe evaluate: every metric against a model or signal whose answer is known by construction, the job
(files, every metric name, resume, a failing image), the CLI (one run, bad input in one line) and compare's
latent section."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vaeprobe.models.adapter import VAE
from vaeprobe.probes import evaluation as ev
from vaeprobe.probes.metrics import psnr

from conftest import run_cli


@pytest.fixture(autouse=True)
def _one_thread():
    """Two threads on two shared cores oversubscribe badly when the machine is busy: these models are tiny."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# -- models with known answers ------------------------------------------------------------------------------------

class PoolNearest(nn.Module):
    """Encoder: average pooling over factor x factor blocks (3 latent channels, the block's colour); decoder:
    nearest upsampling times ``gain``. Rotations commute with both, so it is exactly rotation-equivariant."""

    def __init__(self, factor=8, scale=1.0, gain=1.0):
        super().__init__()
        self.f, self.gain = factor, gain
        self.config = {"scaling_factor": scale, "shift_factor": 0.0}
        self.w = nn.Parameter(torch.ones(1))

    def encode(self, x):
        return F.avg_pool2d(x, self.f) * self.w

    def decode(self, z):
        return F.interpolate(z, scale_factor=self.f, mode="nearest") * self.gain


class Unshuffle(PoolNearest):
    """Encoder: average pooling by 2, then each 4x4 block's pixels into channels (pixel unshuffle); decoder: the
    inverse. It reconstructs as well as pooling by 2, but a rotated latent puts each block's pixels back in the
    unrotated order: not equivariant."""

    def encode(self, x):
        return F.pixel_unshuffle(F.avg_pool2d(x, 2), 4) * self.w

    def decode(self, z):
        return F.interpolate(F.pixel_shuffle(z, 4), scale_factor=2, mode="nearest")


class Identity(PoolNearest):
    """Factor 1, the latent is the image: equivariant to every transform, scaling included, when latent and image
    are resampled the same way."""

    def encode(self, x):
        return x * self.w

    def decode(self, z):
        return z * self.w


def photo(size=64):
    from vaeprobe.data.images import load_images

    return load_images("builtin:photos-heldout", size=size)[0].tensor()


# -- equivariance -----------------------------------------------------------------------------------------------

def test_rotation_equivariance_equals_reconstruction_for_pool_nearest_and_is_lower_for_a_scrambling_decoder():
    x = photo(64)
    recs = {}
    for model, equivariant in ((PoolNearest(), True), (Unshuffle(), False)):
        vae = VAE(model, "test")
        z = vae.encode(x).mean
        recs[equivariant] = rec_psnr = ev.image_psnr_lpips(vae.decode(z), x, lpips=False)[0]
        eq = ev.equivariance(vae.decode, x, z, factor=vae.factor, transforms=("rot90", "rot180", "rot270"),
                             lpips=False)
        for t in ("rot90", "rot180", "rot270"):
            if equivariant:
                assert eq[f"eq_{t}_psnr"] == pytest.approx(rec_psnr, abs=1e-6)
            else:
                assert eq[f"eq_{t}_psnr"] < rec_psnr - 3.0, (t, eq[f"eq_{t}_psnr"], rec_psnr)
    # the scrambling model reconstructs better than 8x8 pooling (it pools by 2 only): its low equivariance is not
    # a poor reconstruction
    assert recs[False] > recs[True]


def test_scale_equivariance_is_exact_when_latent_and_image_are_resampled_alike():
    x = photo(64)
    vae = VAE(Identity(), "identity")
    assert vae.factor == 1
    eq = ev.equivariance(vae.decode, x, vae.encode(x).mean, factor=1, lpips=True)
    assert all(math.isinf(eq[f"eq_{t}_psnr"]) for t in ev.TRANSFORMS)
    assert all(eq[f"eq_{t}_lpips"] == 0.0 for t in ev.TRANSFORMS)
    # and the scaled target has the scaled latent's size times the factor (0.75 of 8 cells: 6 cells, 48 px)
    pool = VAE(PoolNearest(), "pool")
    z = pool.encode(x).mean
    assert ev.apply_transform(z, "scale0.75").shape[-1] * 8 == 48
    eq = ev.equivariance(pool.decode, x, z, factor=8, transforms=("scale0.5", "scale0.75"))
    assert all(np.isfinite(v) for v in eq.values())


def test_transforms_are_exact_rotations_and_constant_preserving_resampling():
    x = torch.randn(1, 2, 6, 6)
    assert torch.equal(ev.apply_transform(ev.apply_transform(x, "rot90"), "rot270"), x)
    assert torch.equal(ev.apply_transform(x, "rot180"), x.flip(-1).flip(-2))
    c = torch.full((1, 2, 12, 12), 0.3)
    assert torch.allclose(ev.apply_transform(c, "scale0.75"), torch.full((1, 2, 9, 9), 0.3))
    with pytest.raises(ValueError, match="unknown transform"):
        ev.apply_transform(x, "shear")


# -- spectrum ----------------------------------------------------------------------------------------------------

def test_hf_share_of_known_signals():
    n = 32
    i = torch.arange(float(n))
    low = torch.cos(2 * math.pi * i / n)[None, :] + torch.cos(2 * math.pi * i / n)[:, None]  # one period
    checker = ((i[:, None] + i[None, :]) % 2) * 2 - 1
    assert ev.hf_share(low.expand(4, n, n)) < 0.01
    assert ev.hf_share(checker.expand(4, n, n)) > 0.99
    # half the power in each: a low and a high DCT basis function of equal energy
    d = ev._dct_matrix(n)
    mix = torch.stack([d[1][:, None] * d[0][None, :], d[n - 2][:, None] * d[n - 3][None, :]]).float()
    assert ev.hf_share(mix) == pytest.approx(0.5, abs=1e-6)
    # white noise: the share of the frequency quarter-plane outside the radius-0.25 disc, 1 - pi/16
    noise = torch.randn(8, 64, 64, generator=torch.Generator().manual_seed(0))
    assert ev.hf_share(noise) == pytest.approx(1 - math.pi / 16, abs=0.02)
    # units do not matter: shift and scale leave it as it is
    assert ev.hf_share(3.0 * noise - 7.0) == pytest.approx(ev.hf_share(noise), rel=1e-9)
    # the radial spectrum agrees with it: the bins above 0.25 hold the high share
    f, s = ev.radial_spectrum(noise, bins=8)
    assert np.nansum(s[f > 0.25]) == pytest.approx(ev.hf_share(noise), abs=1e-9)


def test_latent_and_image_hf_share_of_a_smooth_image_on_pool_nearest():
    """A smooth image (one period of a cosine over 64 px) pooled to 8x8: both shares are small; a pixel
    checkerboard is averaged away by the pooling and by the antialiased downsampling alike."""
    n = 64
    i = torch.arange(float(n))
    smooth = torch.cos(2 * math.pi * i / n)[None, :].expand(n, n)
    x = (0.5 * smooth).expand(1, 3, n, n)
    res = ev.latent_measures(VAE(PoolNearest(), "pool"), x, lpips=False)
    assert res["latent_hf_share"] < 0.05 and res["image_hf_share"] < 0.05
    z = torch.zeros(1, 3, 8, 8)
    z[..., ::2, ::2] = 1.0
    assert ev.hf_share(z) > 0.5


# -- noise robustness ----------------------------------------------------------------------------------------------

def test_noise_rms_is_the_noise_std_over_the_scale_times_the_decoders_gain():
    x = photo(128)
    out = {}
    for gain in (1.0, 2.0):
        vae = VAE(PoolNearest(scale=0.5, gain=gain), "pool")
        z = vae.encode(x).mean
        out[gain] = ev.noise_robustness(vae.decode, z, scaling_factor=vae.scaling_factor, seed=1)
    for s in ev.NOISE_STDS:
        # nearest upsampling repeats each latent value: the image's RMS change is the latent noise's, S / scale
        assert out[1.0][f"noise{s:g}_rms"] == pytest.approx(s / 0.5, rel=0.1)
        assert out[2.0][f"noise{s:g}_rms"] == pytest.approx(2 * out[1.0][f"noise{s:g}_rms"], rel=1e-6)
    rms = [out[1.0][f"noise{s:g}_rms"] for s in ev.NOISE_STDS]
    assert rms[-1] / rms[0] == pytest.approx(ev.NOISE_STDS[-1] / ev.NOISE_STDS[0], rel=1e-5)   # one draw
    lp = [out[1.0][f"noise{s:g}_lpips"] for s in ev.NOISE_STDS]
    assert all(a < b for a, b in zip(lp, lp[1:])) and lp[0] > 0


# -- latent statistics -------------------------------------------------------------------------------------------

def test_eff_rank_of_a_known_covariance():
    from scipy.linalg import hadamard

    h = torch.tensor(hadamard(64), dtype=torch.float64)[1:7]     # 6 orthogonal zero-mean patterns of 64 cells
    lam = torch.tensor([4.0, 2.0, 1.0, 1.0, 0.5, 0.0], dtype=torch.float64)
    z = (lam.sqrt()[:, None] * h).reshape(6, 8, 8)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    rotated = torch.einsum("ij,jhw->ihw", q, z)                   # the same covariance spectrum, mixed channels
    expected = float(lam.sum() ** 2 / (lam ** 2).sum())
    for latent in (z, rotated):
        s = ev.latent_statistics(latent)
        assert s["latent_eff_rank"] == pytest.approx(expected, rel=1e-9)
    assert ev.latent_statistics(z)["latent_channel_corr"] == pytest.approx(0.0, abs=1e-12)
    same = h[0].reshape(1, 8, 8).repeat(3, 1, 1) * torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)[:, None, None]
    s = ev.latent_statistics(same)
    assert s["latent_eff_rank"] == pytest.approx(1.0) and s["latent_channel_corr"] == pytest.approx(1.0)


def test_outlier_share_mean_and_std_of_planted_values():
    n = 10_000
    signs = torch.tensor([1.0, -1.0]).repeat(n // 2)              # mean 0, std 1: nothing beyond 3 std
    z = torch.stack([signs, signs + 5.0]).reshape(2, 100, 100).clone()
    assert ev.latent_statistics(z)["latent_outlier_share"] == 0.0
    flat = z.view(2, -1)
    flat[0, :10] = 100.0                                           # 10 planted values in channel 0
    s = ev.latent_statistics(z)
    assert s["latent_outlier_share"] == pytest.approx(10 / (2 * n))
    assert s["latent_mean_abs"] == pytest.approx((abs(float(flat[0].mean())) + 5.0) / 2)
    assert s["latent_std"] == pytest.approx(float(flat.std(unbiased=False)), rel=1e-6)
    g = torch.randn(4, 200, 200, generator=torch.Generator().manual_seed(2))
    assert ev.latent_statistics(g)["latent_outlier_share"] == pytest.approx(0.0027, abs=0.0008)


def test_kl_and_pca_of_known_posteriors():
    mu, lv = torch.full((4, 3, 3), 0.5), torch.full((4, 3, 3), math.log(2.0))
    per_channel = 0.5 * (0.25 + 2.0 - 1.0 - math.log(2.0))
    assert ev.kl_per_position(mu, lv) == pytest.approx(4 * per_channel)
    pattern = torch.randn(8, 8, generator=torch.Generator().manual_seed(3))
    other = torch.randn(8, 8, generator=torch.Generator().manual_seed(4))
    maps, shares = ev.latent_pca(torch.stack([3 * pattern, 0.1 * other, -3 * pattern]))
    assert shares[0] > 0.99 and shares.sum() == pytest.approx(1.0)
    centred = pattern - pattern.mean()
    corr = np.corrcoef(maps[0].ravel(), centred.numpy().ravel())[0, 1]
    assert abs(corr) == pytest.approx(1.0, abs=1e-6)   # the small third channel tilts PC1 a little


def test_latent_measures_on_the_models_with_known_answers():
    """The whole per-image function: a deterministic encoder has no kl row; the pooling model's rotations equal
    its reconstruction; the scrambling model has a high latent spectrum (pixels of a block in the channels)."""
    x = photo(64)
    pool = ev.latent_measures(VAE(PoolNearest(), "pool"), x, lpips=False)
    assert "kl" not in pool and pool["spot_rate"] in (0.0, 1.0)
    rec = ev.image_psnr_lpips(VAE(PoolNearest()).reconstruct(x), x, lpips=False)[0]
    assert pool["eq_rot90_psnr"] == pytest.approx(rec, abs=1e-6)
    from vaeprobe.models.loading import load_vae

    tiny = ev.latent_measures(load_vae("builtin:tiny-random"), x, lpips=False)
    assert tiny["kl"] > 0 and set(ev.LATENT_METRICS) == set(tiny)


# -- the job and the CLI -------------------------------------------------------------------------------------------

def test_cli_evaluate_writes_every_metric_and_the_files(tmp_path):
    out = tmp_path / "ev"
    r = run_cli("evaluate", "builtin:tiny-random", "test_evaluate:pool_nearest", "--images", "builtin:photos-heldout",
                "--size", "64", "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    for name in ("metrics.parquet", "summary.parquet", "evaluate.html", "evaluate.md", "spectra.parquet",
                 "figures/spectra.png", "figures/equivariance.png", "figures/noise.png", "figures/pca-0.png",
                 "figures/pca-1.png", "run.json"):
        assert (out / name).exists(), name
    metrics = pd.read_parquet(out / "metrics.parquet")
    assert list(metrics.columns[:4]) == ["vae", "image", "metric", "value"]
    names = set(metrics[metrics.vae == "builtin:tiny-random"].metric)
    required = {"psnr", "ssim", "lpips", "latent_hf_share", "image_hf_share", "latent_mean_abs", "latent_std",
                "latent_outlier_share", "latent_eff_rank", "kl", "spot_rate",
                *(f"eq_{t}_{m}" for t in ("rot90", "rot180", "rot270", "scale0.5", "scale0.75")
                  for m in ("psnr", "lpips")),
                *(f"noise{s}_{m}" for s in ("0.05", "0.1", "0.2", "0.5") for m in ("rms", "lpips"))}
    assert required <= names
    assert "kl" not in set(metrics[metrics.vae == "test_evaluate:pool_nearest"].metric)   # no posterior
    assert metrics.groupby(["vae", "metric"]).size().eq(7).all()                          # 7 images each
    summary = pd.read_parquet(out / "summary.parquet")
    assert list(summary.columns[:5]) == ["vae", "metric", "mean", "std", "n"]
    mean = metrics.groupby(["vae", "metric"]).value.mean()
    for row in summary.itertuples():
        assert row.mean == pytest.approx(mean[(row.vae, row.metric)], nan_ok=True)
    pool = summary[summary.vae == "test_evaluate:pool_nearest"].set_index("metric")["mean"]
    assert pool["eq_rot90_psnr"] == pytest.approx(pool["psnr"], abs=1e-5)
    md, html = (out / "evaluate.md").read_text(), (out / "evaluate.html").read_text()
    assert all(f"`{m}`" in md for m in required) and "http://" not in html and "data:image/png" in html
    assert "builtin:tiny-random: PSNR" in r.stdout
    # resume: nothing recomputed, same tables
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "parts").glob("*.json")}
    r = run_cli("evaluate", "builtin:tiny-random", "test_evaluate:pool_nearest", "--images", "builtin:photos-heldout",
                "--size", "64", "--out", out, "--quiet", "--resume")
    assert r.returncode == 0, r.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (out / "parts").glob("*.json")} == stamps
    pd.testing.assert_frame_equal(pd.read_parquet(out / "metrics.parquet"), metrics)


def pool_nearest():
    return PoolNearest(scale=1.0)


def test_a_failing_image_is_reported_and_left_out(tmp_path, monkeypatch):
    from vaeprobe.jobs import evaluate as job
    from vaeprobe.jobs.evaluate import evaluate_vaes

    real = job.EvaluateJob._one

    def flaky(self, k, vae, img, *args):
        if img.name == "rocket":
            raise RuntimeError("out of memory")
        return real(self, k, vae, img, *args)

    monkeypatch.setattr(job.EvaluateJob, "_one", flaky)
    run = evaluate_vaes([pool_nearest()], "builtin:photos-heldout", tmp_path, size=32, progress=False)
    assert [f["image"] for f in run.summary["failed"]] == ["rocket"]
    assert "out of memory" in run.summary["failed"][0]["error"]
    assert run.summary["n_images"] == 6
    assert "rocket" not in set(pd.read_parquet(tmp_path / "metrics.parquet").image)
    assert json.loads((tmp_path / "summary.json").read_text())["vaes"][0]["metrics"]["psnr"]["n"] == 6


@pytest.mark.parametrize("args, words", [
    (["builtin:no-such-model", "--size", "64"], "no-such-model"),
    (["builtin:tiny-random", "--size", "16"], "at least 32"),
])
def test_bad_input_is_one_line(tmp_path, args, words):
    r = run_cli("evaluate", *args, "--images", "builtin:photos-heldout", "--out", tmp_path / "x", "--quiet")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("vaeprobe: error:") and words in r.stderr
    assert "Traceback" not in r.stderr


def test_compare_shows_the_latent_measures(tmp_path):
    from vaeprobe.jobs.compare import compare_vaes

    run = compare_vaes(["builtin:tiny-random", pool_nearest()], "builtin:photos-heldout", tmp_path, size=32,
                       scan=False, mechanism=False, rfid=False, progress=False)
    models = pd.read_parquet(tmp_path / "models.parquet").set_index("model")
    pool = models.loc["<module>"] if "<module>" in models.index else models.iloc[1]
    assert pool["eq_rot90_psnr"] == pytest.approx(pool["psnr_mean"], abs=1e-5)
    for m in ("latent_hf_share", "latent_eff_rank", "noise0.1_rms", "eq_scale0.5_psnr"):
        assert np.isfinite(models[m]).all(), m
    assert np.isfinite(models.iloc[0]["kl"]) and np.isnan(pool["kl"])
    md = (tmp_path / "comparison.md").read_text()
    assert "## Latent measures" in md and "eq_rot90_psnr" in md.replace("\\_", "_")
    assert "Latent measures" in (tmp_path / "comparison.html").read_text()
    assert run.summary["models"][0]["latent_eff_rank"] > 0
