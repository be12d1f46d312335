"""Comparing replacement VAEs: the Fréchet distance against references, rFID present or stated missing, the
expected direction of every difference on the builtin models, and VAEs with different latent shapes."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from vaeprobe.jobs.compare import compare_vaes

from conftest import REPO, run_cli


def test_rfid_runs_with_local_weights_and_is_stated_missing_without(tmp_path, monkeypatch):
    """rFID goes through the standard FID Inception (vaeprobe.probes.fid; its own tests check the network, the
    preprocessing and the distance): absent weights are stated in the summary, a weights file gives finite values,
    and resuming the run reuses every finished image."""
    from PIL import Image

    from vaeprobe.data.images import load_images
    from vaeprobe.probes.fid import FID_WEIGHTS_FILE

    from conftest import random_fid_state

    photos = tmp_path / "photos"   # three photos keep the Inception forward passes few
    photos.mkdir()
    for img in list(load_images("builtin:photos-heldout", size=32))[:3]:
        Image.fromarray((img.array * 255).round().astype(np.uint8)).save(photos / f"{img.name}.png")
    monkeypatch.setenv("VAEPROBE_INCEPTION", str(tmp_path / "absent.pth"))
    monkeypatch.setattr("torch.hub.get_dir", lambda: str(tmp_path / "hub"))
    run = compare_vaes(["builtin:tiny-random", "vae_factories:tiny"], str(photos), tmp_path / "a",
                       size=32, scan=False, mechanism=False, progress=False)
    assert run.summary["rfid"].startswith("not computed") and FID_WEIGHTS_FILE in run.summary["rfid"]
    assert all(np.isnan(m["rfid"]) for m in run.summary["models"])
    weights = tmp_path / FID_WEIGHTS_FILE
    torch.save(random_fid_state(), weights)
    run = compare_vaes(["builtin:tiny-random", "vae_factories:tiny"], str(photos), tmp_path / "b",
                       size=32, scan=False, mechanism=False, progress=False, inception=weights)
    assert run.summary["rfid"].startswith("computed with")
    first = [m["rfid"] for m in run.summary["models"]]
    assert all(np.isfinite(v) and v >= -1e-6 for v in first)
    # a resumed run recomputes nothing and gives the same numbers
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "b" / "parts").glob("*.json")}
    again = compare_vaes(["builtin:tiny-random", "vae_factories:tiny"], str(photos), tmp_path / "b",
                         size=32, scan=False, mechanism=False, progress=False, inception=weights, resume=True)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "b" / "parts").glob("*.json")} == stamps
    assert [m["rfid"] for m in again.summary["models"]] == pytest.approx(first)


def test_compare_resumes_after_a_failed_image(tmp_path, monkeypatch):
    """A failing image is reported and left out; --resume computes only that image, and the tables then equal an
    uninterrupted run's."""
    from vaeprobe.jobs import compare as cmp

    args = (["builtin:tiny-random", "vae_factories:tiny"], "builtin:photos-heldout")
    kw = {"size": 32, "scan": False, "mechanism": False, "rfid": False, "progress": False}
    full = compare_vaes(*args, tmp_path / "full", **kw)
    real = cmp.CompareJob._model_image

    def flaky(self, vae, img):
        if img.name == "rocket" and vae.spec == "vae_factories:tiny":
            raise RuntimeError("out of memory")
        return real(self, vae, img)

    monkeypatch.setattr(cmp.CompareJob, "_model_image", flaky)
    part = compare_vaes(*args, tmp_path / "part", **kw)
    assert [f["image"] for f in part.summary["failed"]] == ["rocket"]
    assert "vae_factories:tiny" in part.summary["failed"][0]["error"]
    assert part.summary["n_images"] == full.summary["n_images"] - 1
    monkeypatch.setattr(cmp.CompareJob, "_model_image", real)
    calls = []
    monkeypatch.setattr(cmp.CompareJob, "_model_image", lambda self, vae, img: calls.append(img.name) or
                        real(self, vae, img))
    done = compare_vaes(*args, tmp_path / "part", resume=True, **kw)
    assert set(calls) == {"rocket"}
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "part" / "models.parquet"),
                                  pd.read_parquet(tmp_path / "full" / "models.parquet"))
    assert done.summary["failed"] == []


def test_compare_builtin_models_cli_directions(tmp_path):
    out = tmp_path / "cmp"
    # 128 px: at 64 px (an 8x8 latent) the clean decoders' ordinary cells keep up to about 2.7 levels far away,
    # over the one-level threshold, so a clean cell can read global there (docs/verdicts.md, "At 64 px")
    r = run_cli("compare", "builtin:mini-kl-f8", "builtin:planted-groupnorm", "builtin:mini-kl-f8-ft-mse",
                "--images", "builtin:photos-heldout", "--size", "128", "--out", out, "--quiet", cwd=REPO)
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
                     size=32, scan=False, mechanism=False, progress=False).summary
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
