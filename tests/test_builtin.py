"""Integration tests on the shipped mini VAE and its planted controls (the model card's claims)."""

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO
from vaeprobe import load_images, load_vae
from vaeprobe.models.controls import CONTROLS
from vaeprobe.models.folders import BUILTIN_DIR

from oracles import zeroed_far_field, zeroing_test

CARD = json.loads((BUILTIN_DIR / "mini-kl-f8" / "eval.json").read_text())


def _evaluator():
    spec = importlib.util.spec_from_file_location("evaluate_builtin", REPO / "experiments" / "evaluate_builtin.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", ["mini-kl-f8", *CONTROLS])
def test_builtin_models_load_and_round_trip(name):
    vae = load_vae(f"builtin:{name}")
    assert (vae.factor, vae.latent_channels) == (8, 4)
    img = load_images("builtin:photos-heldout", size=64)[0]
    rec = vae.reconstruct(img.tensor())
    assert rec.shape == (1, 3, 64, 64) and torch.isfinite(rec).all()
    assert (vae.ground_truth is not None) == (name != "mini-kl-f8")


def test_model_card_heldout_numbers_reproduce_within_1_percent():
    ev = _evaluator()
    vae = load_vae("builtin:mini-kl-f8")
    rows = ev.reconstruction(vae)
    base = ev.baseline()
    for key in ("psnr", "ssim", "lpips"):
        ours = np.mean([r[key] for r in rows.values()])
        card = np.mean([r[key] for r in CARD["mini"].values()])
        assert abs(ours - card) <= 0.01 * abs(card), (key, ours, card)
    lp_model = np.mean([r["lpips"] for r in rows.values()])
    lp_bicubic = np.mean([r["lpips"] for r in base.values()])
    assert lp_model < lp_bicubic - 0.1, (lp_model, lp_bicubic)  # clearly better than bicubic x8


@pytest.mark.parametrize("name", list(CONTROLS))
def test_control_spot_passes_zeroing_test_on_every_heldout_image(name):
    vae = load_vae(f"builtin:{name}")
    clean = load_vae("builtin:mini-kl-f8")
    ratios = []
    for img in load_images("builtin:photos-heldout", size=128):
        x = img.tensor()
        gt = vae.ground_truth(x)[0]
        res = zeroing_test(vae, x, gt["row"], gt["col"], n_random=20, radius=3)
        ratios.append(res.ratio)
        # and the control still reconstructs nearly as well as the clean model
        err = (vae.reconstruct(x) - x).pow(2).mean()
        err_clean = (clean.reconstruct(x) - x).pow(2).mean()
        assert err <= 1.5 * err_clean + 1e-3, (img.name, float(err), float(err_clean))
    assert min(ratios) >= 10, ratios


SCAN_IMAGES = ["rocket", "camera", "clock"]  # a subset keeps the suite short; the card scans all held-out images


def test_clean_model_has_no_global_cell_on_most_images():
    """Exact every-cell scan at 128 px reproduces the card's verdicts; on most held-out images no cell passes
    the 10x zeroing test."""
    vae = load_vae("builtin:mini-kl-f8")
    card = [v["any_cell_passes_10x"] for v in CARD["spot"].values()]
    assert sum(card) < len(card) / 2, CARD["spot"]
    passes = {}
    for img in load_images("builtin:photos-heldout", size=128):
        if img.name not in SCAN_IMAGES:
            continue
        x = img.tensor()
        z = vae.encode(x).mean
        h, w = z.shape[-2:]
        cells = [(r, c) for r in range(h) for c in range(w)]
        energies = zeroed_far_field(vae, z, cells, batch=16)
        best = int(np.argmax(energies))
        res = zeroing_test(vae, x, *cells[best], z=z)
        passes[img.name] = res.ratio >= 10
        assert passes[img.name] == CARD["spot"][img.name]["any_cell_passes_10x"], img.name
    assert len(passes) == len(SCAN_IMAGES)


def test_training_script_smoke_and_resume(tmp_path):
    script = REPO / "experiments" / "train_mini_vae.py"
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(out), "--export",
                           str(tmp_path / "export")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = json.loads((out / "log.json").read_text())
    assert [e["step"] for e in log] == [1, 2, 3] and all(np.isfinite(e["loss_per_pixel"]) for e in log)
    exported = load_vae(str(tmp_path / "export"))
    assert exported.latent_channels == 4
    proc = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(out), "--steps", "4"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "resumed at step 3" in proc.stdout
    assert json.loads((out / "log.json").read_text())[-1]["step"] == 4
