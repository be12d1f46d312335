"""The mini VAE's training data pieces: colour augmentation, synthetic colour fields, the wallpaper splits."""

import importlib.util
import sys

import numpy as np
import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def train():
    spec = importlib.util.spec_from_file_location("train_mini_vae", REPO / "experiments" / "train_mini_vae.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["train_mini_vae"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_hue_jitter_keeps_luma_and_moves_chroma(train):
    rng = np.random.default_rng(0)
    patch = np.clip(0.5 + 0.15 * rng.standard_normal((16, 16, 3)), 0, 1).astype(np.float32)
    out = train.jitter_colour(patch, np.random.default_rng(1), hue=0.5, sat=(1.0, 1.0))
    luma = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    assert out.dtype == np.float32 and out.shape == patch.shape
    assert np.allclose(out @ luma, patch @ luma, atol=2e-3)  # a rotation of the chroma plane: luma stays
    moved = [np.abs(train.jitter_colour(patch, np.random.default_rng(k), 0.5, (1.0, 1.0)) - patch).mean()
             for k in range(8)]
    assert max(moved) > 0.05  # and the colours move (by how much depends on the angle drawn)
    grey = train.jitter_colour(patch, np.random.default_rng(1), hue=0.0, sat=(0.0, 0.0))
    assert np.allclose(grey - grey.mean(-1, keepdims=True), 0, atol=2e-3)  # saturation 0: grey


def test_colour_fields_are_saturated_float32_images(train):
    rng = np.random.default_rng(0)
    fields = [train.colour_field(rng, 64) for _ in range(8)]
    assert all(f.dtype == np.float32 and f.shape == (64, 64, 3) and 0 <= f.min() and f.max() <= 1 for f in fields)
    sat = [float(np.median(f.max(-1) - f.min(-1))) for f in fields]
    assert np.median(sat) > 0.3  # photos' median chroma is far lower; these are the saturated colours photos lack
    batch = train.sample_batch([fields[0]], rng, 6, 32, 0.5, {"synthetic_p": 0.5, "jitter_p": 0.5, "hue": 0.5,
                                                              "saturation": [0.5, 1.5]})
    assert batch.dtype.is_floating_point and batch.dtype.itemsize == 4 and tuple(batch.shape) == (6, 3, 32, 32)


def test_wallpaper_splits_refuse_the_reserved_evaluation_set(train, tmp_path):
    (tmp_path / "manifest.csv").write_text("split,package,file\ntrain,a,train/a/x.png\nheldout,b,heldout/b/y.png\n"
                                           "reserved-eval,c,reserved-eval/c/z.png\n")
    assert [p.name for p in train.wallpaper_files({"dir": str(tmp_path)})] == ["x.png"]
    assert [p.name for p in train.wallpaper_files({"dir": str(tmp_path), "split": "heldout"})] == ["y.png"]
    with pytest.raises(SystemExit, match="never be used for training"):
        train.wallpaper_files({"dir": str(tmp_path), "split": "reserved-eval"})


def test_cosine_schedule_is_a_function_of_the_step(train):
    tr = {"lr": 2e-4, "lr_schedule": "cosine", "warmup_steps": 10, "lr_min": 1e-5, "steps": 110}
    lrs = [train.lr_at(tr, s) for s in range(111)]
    assert lrs[0] == pytest.approx(2e-5) and lrs[9] == pytest.approx(2e-4)  # linear warm-up
    assert lrs[10] == pytest.approx(2e-4) and lrs[110] == pytest.approx(1e-5)
    assert lrs[60] == pytest.approx(1e-5 + (2e-4 - 1e-5) / 2)  # half-way down the cosine
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # decays monotonically after the warm-up
    assert train.lr_at({"lr": 3e-4}, 5000) == 3e-4  # constant by default
    assert all(type(v) is float for v in lrs)  # plain floats: the checkpoint loads with weights_only=True


def test_low_frequency_l1_sees_colour_shifts_not_zero_mean_texture(train):
    import torch

    x = torch.zeros(1, 3, 32, 32)
    checker = (torch.arange(32)[:, None] + torch.arange(32)[None]) % 2 * 0.4 - 0.2  # zero mean in every 8x8 block
    assert train.low_frequency_l1(x + checker, x).item() == pytest.approx(0.0, abs=1e-7)
    shifted = x.clone()
    shifted[:, 0] += 0.3  # red up by 0.3 everywhere: one channel of three
    assert train.low_frequency_l1(shifted, x).item() == pytest.approx(0.1, rel=1e-5)
    assert (shifted - x).abs().mean().item() == pytest.approx(0.1, rel=1e-5)
