"""Latent diagnostics: maps, streamed statistics, the spot detector scored on ground truth, and `vaeprobe latents`."""

import json

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch
from PIL import Image

from vaeprobe.data.images import load_images
from vaeprobe.probes.latents import (DEFAULT_THRESHOLD, LatentStats, Moments, find_spots, latent_maps, score_localisation)
from vaeprobe.jobs.latents import run_latents
from vaeprobe.models.adapter import Posterior
from vaeprobe.models.loading import load_vae

from conftest import REPO, run_and_kill, run_cli

ENCODER_TRACE = ["planted-direct-fixed", "planted-direct", "planted-groupnorm", "planted-attention"]


# -- maps and statistics on hand-computable cases --------------------------------------------------------------

def test_maps_hand_values():
    mean = torch.zeros(1, 3, 4, 4)
    mean[0, :, 1, 2] = torch.tensor([3.0, 4.0, 0.0])       # norm 5
    mean[0, 0] += 1.0                                       # every position: norm >= 1
    raw = torch.full((1, 3, 4, 4), -2.0)
    raw[0, 1, 1, 2] = -31.0                                 # one channel below the floor
    m = latent_maps(Posterior(mean, raw.clamp(-30, 20), raw), names=["x"])[0]
    assert m.norm[1, 2].item() == pytest.approx(float(np.sqrt(16 + 16)))
    assert m.norm[0, 0].item() == 1.0 and m.norm_ratio[0, 0].item() == 1.0  # median norm is 1
    assert int(m.clamp_channels[1, 2]) == 1 and int(m.at_clamp.sum()) == 1
    assert m.raw_logvar_min[1, 2].item() == -31.0
    assert m.raw_logvar[1, 2].item() == pytest.approx((-2 - 31 - 2) / 3)
    # KL per channel 0.5 (mu^2 + e^lv - 1 - lv), clamped lv; position (0, 0): mu = (1, 0, 0), lv = -2
    kl00 = 0.5 * (1 + np.exp(-2) - 1 + 2) + 2 * 0.5 * (np.exp(-2) - 1 + 2)
    assert m.kl[0, 0].item() == pytest.approx(kl00, rel=1e-5)
    kl12 = 0.5 * (16 + np.exp(-2) + 1) + 0.5 * (16 + np.exp(-30) - 1 + 30) + 0.5 * (np.exp(-2) + 1)
    assert m.kl[1, 2].item() == pytest.approx(kl12, rel=1e-5)
    assert m.mad_z[0, 0].item() == 0.0
    t = m.table()
    assert len(t) == 16 and t.loc[(t.row == 1) & (t.col == 2), "clamp_channels"].item() == 1


def test_moments_merge_matches_scipy_with_large_offset():
    rng = np.random.default_rng(1)
    parts = [rng.standard_t(5, size=(3, n)) * 0.01 + 1e3 for n in (7, 300, 1, 50)]
    m = Moments.of(parts[0])
    for p in parts[1:]:
        m = m.merge(Moments.of(p))
    allv = np.concatenate(parts, 1)
    assert np.allclose(m.mean, allv.mean(1), rtol=0, atol=1e-9)
    assert np.allclose(m.std, allv.std(1), rtol=1e-9)
    assert np.allclose(m.kurtosis, scipy.stats.kurtosis(allv, axis=1), rtol=1e-6)


def test_stats_stream_equal_to_batch_and_suggest_factors():
    g = torch.Generator().manual_seed(0)
    means = torch.randn(5, 4, 6, 6, generator=g) * torch.tensor([1.0, 2.0, 3.0, 4.0])[:, None, None] + 0.5
    means[2, :, 3, 3] = 80.0
    stats = LatentStats()
    for m in latent_maps(Posterior(means, None, None)):
        spots = find_spots(m)
        cells = [tuple(v) for v in spots.loc[spots.is_spot, ["row", "col"]].values.tolist()]
        stats.add(m, means[int(m.name)], spots=cells)
    s = stats.summary()
    flat = means.permute(1, 0, 2, 3).reshape(4, -1).double().numpy()
    assert np.allclose(s["channel_mean"], flat.mean(1)) and np.allclose(s["channel_std"], flat.std(1))
    assert np.allclose(s["channel_kurtosis"], scipy.stats.kurtosis(flat, axis=1))
    assert s["shift_factor"] == pytest.approx(flat.mean()) and s["scaling_factor"] == pytest.approx(1 / flat.std())
    mask = np.ones((5, 6, 6), bool)
    mask[2, 3, 3] = False
    ordinary = means.permute(1, 0, 2, 3).numpy()[:, mask].astype(np.float64)
    assert s["scaling_factor_ordinary"] == pytest.approx(1 / ordinary.std())
    assert s["n_spot_images"] == 1 and s["spot_rate"] == pytest.approx(0.2)
    assert s["spot_locations"]["6x6"][3][3] == 1
    assert sum(s["norm_ratio"]["counts"]) == 5 and s["norm_ratio"]["max"] > 10


def test_find_spots_rules():
    mean = torch.ones(3, 4, 8, 8)
    mean[0, :, 1, 1] = 6.0                      # ratio 6: below the default threshold
    raw = torch.full_like(mean, -20.0)
    raw[1, :, 4, 4] = -30.0                     # isolated pinned position at ordinary norm
    raw[1, 0, 5, 5] = -33.0                     # one channel below the floor: not pinned
    raw[2] = -30.0                              # the whole image at the floor: no spot in that sense
    df = find_spots(Posterior(mean, raw.clamp(-30, 20), raw), top_k=1)
    flagged = df[df.is_spot]
    assert flagged[["image", "row", "col"]].values.tolist() == [["1", 4, 4]]
    assert bool(flagged.by_clamp.item()) and not bool(flagged.by_norm.item())
    assert find_spots(latent_maps(Posterior(mean, None, None))[0], threshold=5).is_spot.sum() == 1


def test_score_localisation_counts():
    df = pd.DataFrame({"image": ["a", "a", "b", "c"], "row": [2, 0, 1, 3], "col": [5, 0, 1, 3],
                       "is_spot": [True, True, False, True]})
    s = score_localisation(df, {"a": [(2, 5)], "b": [(1, 1)], "c": []}, {k: (4, 8) for k in "abc"})
    assert (s.recall, s.precision, s.image_fpr) == (0.5, 1 / 3, 1.0)
    assert s.position_fpr == pytest.approx(2 / (3 * 32 - 2)) and s.misses == ["b"]


# -- scored against ground truth ---------------------------------------------------------------------------------

def _score(spec, images, **kw):
    vae = load_vae(spec)
    truth, shapes, maps = {}, {}, []
    for img in images:
        x = img.tensor()
        post = vae.encode(x)
        m = latent_maps(post, names=[img.name])[0]
        maps.append(m)
        shapes[img.name] = m.shape
        gt = vae.ground_truth(x) if vae.ground_truth else []
        truth[img.name] = [(g["row"], g["col"]) for g in gt if g["encoder_trace"]]
    return score_localisation(find_spots(maps, **kw), truth, shapes), maps


@pytest.mark.slow
@pytest.mark.parametrize("size", [128, 256])
def test_detector_recall_on_controls_with_encoder_trace(size):
    images = load_images("builtin:photos-heldout", size=size)
    for spec in ENCODER_TRACE:
        score, _ = _score(f"builtin:{spec}", images)
        assert score.recall >= 0.95 and score.precision >= 0.95, (spec, size, score)
        # the norm rule alone finds them too: the detector does not lean on the planted -35 log-variance
        norm_only, _ = _score(f"builtin:{spec}", images, clamp_rule=False)
        assert norm_only.recall >= 0.95, (spec, size, norm_only)


@pytest.mark.slow
def test_hidden_control_is_invisible_to_encoder_statistics():
    images = load_images("builtin:photos-heldout", size=128)
    vae = load_vae("builtin:planted-hidden")
    hits = 0
    for img in images:
        x = img.tensor()
        gt = vae.ground_truth(x)[0]
        df = find_spots(latent_maps(vae.encode(x))[0])
        hits += bool(((df.row == gt["row"]) & (df.col == gt["col"]) & df.is_spot).any())
    assert hits == 0  # a decoder-only mechanism: perturbation probes are needed (issue: perturbation scans)


@pytest.mark.slow
@pytest.mark.parametrize("size", [128, 256])
def test_false_positive_rate_on_clean_model(size):
    images = load_images("builtin:photos", size=size)
    score, maps = _score("builtin:mini-kl-f8", images)
    assert score.image_fpr <= 0.05, score
    assert max(float(m.norm_ratio.max()) for m in maps) < DEFAULT_THRESHOLD


def test_sixteen_channel_path(tmp_path):
    vae = load_vae("vae_factories:planted16")
    assert vae.latent_channels == 16
    images = load_images("builtin:photos-heldout", size=64)
    score, maps = _score("vae_factories:planted16", images)
    assert score.recall == 1.0 and maps[0].channel_mean.shape == (16,)
    run = run_latents(load_vae("vae_factories:tiny16"), "builtin:photos-heldout", tmp_path / "r", size=64,
                      progress=False, maps=False)
    s = json.loads((run.path / "summary.json").read_text())
    assert len(s["channel_mean"]) == 16 and len(s["channel_kurtosis"]) == 16 and s["n_images"] == 7
    assert len(pd.read_parquet(run.path / "positions.parquet")) == 7 * 64


# -- the command -------------------------------------------------------------------------------------------------

def _cli(*args):
    return run_cli(*args, cwd=REPO)


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["tiny-random", "mini-kl-f8", "planted-direct-fixed", "planted-direct",
                                  "planted-groupnorm", "planted-attention", "planted-hidden"])
def test_latents_on_every_builtin_model(spec, tmp_path):
    run = run_latents(load_vae(f"builtin:{spec}"), "builtin:photos", tmp_path, size=64, progress=False,
                      maps=spec == "planted-groupnorm")
    images = pd.read_parquet(run.path / "images.parquet")
    positions = pd.read_parquet(run.path / "positions.parquet")
    spots = pd.read_parquet(run.path / "spots.parquet")
    assert len(images) == 15 and len(positions) == 15 * 64 and set(spots.image) == set(images.image)
    summary = json.loads((run.path / "summary.json").read_text())
    expect_spots = spec.startswith("planted") and spec != "planted-hidden"
    assert summary["spot_rate"] == (1.0 if expect_spots else 0.0)
    if spec == "planted-groupnorm":
        pngs = sorted((run.path / "maps").glob("*.png"))
        assert len(pngs) == 15
        with Image.open(pngs[0]) as im:
            assert im.format == "PNG" and im.size[0] > 200


def test_cli_latents_kill_and_resume(tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(src / f"im{i:02d}.png")
    (src / "broken.png").write_bytes(b"not a png")
    out, ref = tmp_path / "run", tmp_path / "ref"
    args = ["latents", "--vae", "builtin:tiny-random", "--images", str(src), "--quiet", "--no-maps"]
    done = run_and_kill(args, out, 3, 12)
    assert not (out / "summary.json").exists()

    again = _cli(*args, "--out", str(out))
    assert again.returncode == 2 and "--resume" in again.stderr and again.stderr.count("\n") == 1
    resumed = _cli(*args, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "broken.png" in resumed.stderr
    for name, mtime in done.items():  # finished images were not redone
        assert (out / "parts" / name).stat().st_mtime_ns == mtime
    full = _cli(*args, "--out", str(ref))
    assert full.returncode == 0, full.stderr
    for table in ("positions.parquet", "images.parquet", "spots.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(out / table), pd.read_parquet(ref / table))
    a, b = (json.loads((d / "summary.json").read_text()) for d in (out, ref))
    assert a == b and len(a["skipped"]) == 1 and a["n_images"] == 12

    other = _cli(*args, "--out", str(out), "--resume", "--threshold", "5")
    assert other.returncode == 2 and "threshold" in other.stderr


# -- robust operator statistics --------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["planted-direct", "planted-groupnorm"])
def test_operator_statistics_ignore_the_spot(spec):
    """The `mean`/`noise` statistics match those of the image without its (ground-truth) spot; the plain std
    with the spot, which a wrong method would use, is off by more than 2x."""
    from vaeprobe.probes.latents import robust_channel_stats

    vae = load_vae(f"builtin:{spec}")
    for img in load_images("builtin:photos-heldout", factor=8, size=128)[:3]:
        x = img.tensor()
        z = vae.encode(x).mean[0]
        gt = vae.ground_truth(x)[0]
        s = robust_channel_stats(z)
        assert s["excluded"] == [(gt["row"], gt["col"])]
        keep = torch.ones(z.shape[1:], dtype=torch.bool)
        keep[gt["row"], gt["col"]] = False
        rest = z[:, keep]
        # brute force: median and scaled MAD of the ordinary positions, per channel
        med = rest.median(dim=1).values
        mad = (rest - med[:, None]).abs().median(dim=1).values * 1.4826
        assert torch.allclose(s["mean"], med) and torch.allclose(s["std"], mad)
        ratio = s["std"] / rest.std(dim=1)  # trained latents are heavy-tailed: the MAD spread sits below the std
        assert ((ratio > 0.3) & (ratio < 1.2)).all()
        assert (z.std(dim=(1, 2)) / rest.std(dim=1)).max() > 2  # the plain std is dominated by the spot


def test_skip_messages_do_not_break_the_progress_bar(tmp_path, capsys):
    """An unreadable input is reported on its own line, not glued to the progress bar that is on screen."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(folder / "a.png")
    (folder / "b.png").write_bytes(b"not a png")
    Image.fromarray(np.full((32, 32, 3), 64, np.uint8)).save(folder / "c.png")
    run = run_latents("builtin:tiny-random", str(folder), tmp_path / "run", maps=False, progress=True)
    err = capsys.readouterr().err
    segments = [s for s in err.replace("\r", "\n").split("\n") if "skipped" in s]
    assert segments, err
    assert all(s.startswith("vaeprobe: skipped") for s in segments), segments
    assert run.summary["n_images"] == 2 and len(run.summary["skipped"]) == 1
