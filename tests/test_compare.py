"""Comparing replacement VAEs: the Fréchet distance against references, rFID present or stated missing, the
expected direction of every difference on the builtin models, and VAEs with different latent shapes."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import scipy.linalg
import torch

from vaeprobe.jobs.compare import feature_fid, find_inception_weights, frechet_distance, compare_vaes

from conftest import REPO


def test_frechet_distance_against_closed_form_and_symmetric_scipy_form():
    rng = np.random.default_rng(0)
    # commuting (diagonal) covariances: FD = |dmu|^2 + sum (sqrt(s1) - sqrt(s2))^2
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.5, 3, 5), rng.uniform(0.5, 3, 5)
    closed = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum())
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(closed, rel=1e-9)
    # general features: the trace term via the symmetric form sqrt(S1)^(1/2) S2 sqrt(S1)^(1/2), computed directly
    a = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6)) + 0.5
    ma, mb, ca, cb = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(ca).real
    direct = float(((ma - mb) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * np.trace(scipy.linalg.sqrtm(root @ cb @ root).real))
    assert feature_fid(a, b) == pytest.approx(direct, rel=1e-6)
    assert feature_fid(a, a) == pytest.approx(0.0, abs=1e-6)


def test_rfid_runs_with_local_weights_and_is_stated_missing_without(tmp_path, monkeypatch):
    from torchvision.models import inception_v3

    monkeypatch.setenv("VAEPROBE_INCEPTION", str(tmp_path / "absent.pth"))
    assert find_inception_weights() is None
    s = compare_vaes(["builtin:tiny-random", "vae_factories:tiny"], "builtin:photos-heldout", tmp_path / "a",
                     size=32, scan=False, mechanism=False, progress=False)
    assert s["rfid"].startswith("not computed: no Inception-v3 weights")
    assert all(np.isnan(m["rfid"]) for m in s["models"])
    torch.manual_seed(0)
    weights = tmp_path / "inception.pth"
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=True).state_dict(), weights)
    monkeypatch.setenv("VAEPROBE_INCEPTION", str(weights))
    s = compare_vaes(["builtin:tiny-random", "vae_factories:tiny"], "builtin:photos-heldout", tmp_path / "b",
                     size=32, scan=False, mechanism=False, progress=False)
    assert s["rfid"].startswith("computed with")
    assert all(np.isfinite(m["rfid"]) and m["rfid"] >= -1e-6 for m in s["models"])


def test_compare_builtin_models_cli_directions(tmp_path):
    out = tmp_path / "cmp"
    r = subprocess.run([sys.executable, "-m", "vaeprobe.cli", "compare", "builtin:mini-kl-f8",
                        "builtin:planted-groupnorm", "builtin:mini-kl-f8-ft-mse", "--images", "builtin:photos-heldout",
                        "--size", "64", "--out", str(out), "--quiet"], capture_output=True, text=True, timeout=1200,
                       cwd=REPO)
    assert r.returncode == 0, r.stderr
    models = pd.read_parquet(out / "models.parquet").set_index("model")
    compat = pd.read_parquet(out / "compatibility.parquet").set_index("model")
    clean, planted, ft = (models.loc[m] for m in ("builtin:mini-kl-f8", "builtin:planted-groupnorm",
                                                   "builtin:mini-kl-f8-ft-mse"))
    # the spot: high on the planted control, absent on the clean model and its decoder fine-tune
    assert planted.spot_rate == 1.0 and planted.global_rate == 1.0 and planted.dominant == "groupnorm"
    assert clean.spot_rate == 0.0 and clean.global_rate == 0.0 and ft.spot_rate == 0.0
    assert planted.max_norm_ratio > 10 * clean.max_norm_ratio
    # compatibility: the decoder-only fine-tune keeps the encoder; the control's encoder writes the spot
    assert bool(compat.loc["builtin:mini-kl-f8-ft-mse", "encoder_identical"])
    assert bool(compat.loc["builtin:mini-kl-f8-ft-mse", "encoder_weights_identical"])
    assert np.isfinite(compat.loc["builtin:mini-kl-f8-ft-mse", "decoder_psnr_on_shared_latents"])
    assert not bool(compat.loc["builtin:planted-groupnorm", "encoder_identical"])
    assert compat.loc["builtin:planted-groupnorm", "differing_positions"] < 0.05   # one cell per image
    # reconstruction: the MSE fine-tune of the decoder raises PSNR
    assert ft.psnr_mean > clean.psnr_mean
    verdicts = compat.verdict.to_dict()
    assert "latent-compatible (identical encoder" in verdicts["builtin:mini-kl-f8-ft-mse"]
    assert verdicts["builtin:planted-groupnorm"].startswith("spot present")
    assert "not latent-compatible" in verdicts["builtin:planted-groupnorm"]
    md = (out / "comparison.md").read_text()
    assert all(m in md for m in models.index)
    html = (out / "comparison.html").read_text()
    assert "spot present" in html and "http://" not in html and "https://" not in html
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reference"] == "builtin:mini-kl-f8" and summary["rfid"].startswith("not computed")


def test_different_latent_shapes_are_named_not_crashed_on(tmp_path):
    s = compare_vaes(["builtin:mini-kl-f8", "vae_factories:tiny16"], "builtin:photos-heldout", tmp_path,
                     size=32, scan=False, mechanism=False, progress=False)
    (c,) = s["candidates"]
    assert not c["same_latent_shape"] and not c["same_channels"] and c["same_factor"]
    assert "4 ch" in c["shape_note"] and "16 ch" in c["shape_note"]
    assert "not latent-compatible" in c["verdict"]
    assert np.isfinite(s["models"][1]["psnr_mean"])            # reconstruction is still compared
    assert (tmp_path / "comparison.html").exists()


def test_verdict_states_both_models_rates_and_absolute_reconstruction():
    """A reference with false global cells below the spot rule must not read as 'rate 0%' in the verdict."""
    from vaeprobe.jobs.compare import _verdict

    ref = {"spot_rate": 0.0, "global_rate": 1 / 3, "psnr_mean": 19.2, "lpips_mean": 0.306, "dominant": "groupnorm"}
    cand = {"spot_rate": 0.0, "global_rate": 0.0, "psnr_mean": 30.65, "lpips_mean": 0.031, "dominant": "residual"}
    v = _verdict(ref, cand, {"encoder_identical": False, "same_latent_shape": False, "shape_note": "4 vs 32 ch"})
    assert v.startswith("no spot in either (reference: spot rate 0%, global-cell rate 33%; candidate: spot rate 0%, "
                        "global-cell rate 0%")
    assert "PSNR 30.65 vs 19.20 dB (+11.45)" in v and "reconstruction better" in v
    ref["global_rate"] = 0.6
    assert _verdict(ref, cand, {"encoder_identical": True}).startswith("spot removed (reference: spot rate 0%, "
                                                                       "global-cell rate 60%")
