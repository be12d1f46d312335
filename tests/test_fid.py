"""Standard FID through pytorch-fid: the weights are found (argument, $VAEPROBE_INCEPTION, torch hub cache) or stated
missing, wrong files are refused in one line, the library network gets [0, 1] images, and the Fréchet distance
matches closed forms."""

import numpy as np
import pytest
import torch

from vaeprobe.errors import VaeprobeError, one_line
from vaeprobe.probes import fid
from vaeprobe.probes.fid import (FID_WEIGHTS_FILE, FIDFeatures, FIDWeightsError, find_fid_weights, frechet_distance,
                                 missing_fid_weights_reason)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """A few small forward passes: one thread is as fast, and far faster on a busy shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fid_state(_one_thread):
    """A random-init state dict of the library's FID Inception (``fid_inception_v3``): its exact keys and shapes."""
    from pytorch_fid import inception as lib
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    seed_state = inception_v3(weights=None, num_classes=1008, aux_logits=False, init_weights=False).state_dict()
    with pytest.MonkeyPatch.context() as mp:  # the library would download here; hand it a random state instead
        mp.setattr(lib, "load_state_dict_from_url", lambda *a, **k: seed_state)
        net = lib.fid_inception_v3()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    for k in state:  # He-scale the convolutions so activations stay O(1) (tiny, denormal ones make CPUs crawl)
        if k.endswith("conv.weight"):
            state[k] *= 6 ** 0.5
    return state


@pytest.fixture
def weights(tmp_path, fid_state):
    path = tmp_path / FID_WEIGHTS_FILE
    torch.save(fid_state, path)
    return path


@pytest.fixture
def no_env(monkeypatch, tmp_path):
    monkeypatch.delenv("VAEPROBE_INCEPTION", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty-hub"))


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.rand(2, 3, 64, 64) * 2.4 - 1.2   # a little outside [-1, 1], as reconstructions can be


def _no_download(monkeypatch):
    import torch.hub

    def refuse(*a, **k):
        raise AssertionError("tried to download")
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def test_weights_found_by_argument_env_and_hub_and_give_2048_features(weights, tmp_path, monkeypatch, no_env,
                                                                      images):
    _no_download(monkeypatch)
    assert find_fid_weights(weights) == weights
    assert find_fid_weights(weights.parent) == weights            # a directory holding the file
    assert find_fid_weights() is None                             # nothing in the (empty) hub cache
    monkeypatch.setenv("VAEPROBE_INCEPTION", str(weights))
    assert find_fid_weights() == weights
    monkeypatch.delenv("VAEPROBE_INCEPTION")
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    (hub / "checkpoints" / FID_WEIGHTS_FILE).write_bytes(weights.read_bytes())
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    assert find_fid_weights() == hub / "checkpoints" / FID_WEIGHTS_FILE

    feats = FIDFeatures(find_fid_weights(), device="cpu")
    out = feats(images)
    assert out.shape == (2, 2048) and out.dtype == np.float64 and np.isfinite(out).all()
    assert (out >= 0).all() and out.std() > 0.1 and not np.allclose(out[0], out[1])  # pooled ReLU, not constant
    loaded = feats.net.state_dict()
    lib_keys = {k: v for k, v in loaded.items() if not k.endswith("num_batches_tracked")}
    assert len(lib_keys) > 300
    # the weights in the file are the ones used: the first convolution of the library network equals the file's
    assert torch.equal(feats.net.blocks[0][0].conv.weight, torch.load(weights, weights_only=True)[
        "Conv2d_1a_3x3.conv.weight"])


def test_env_var_pointing_nowhere_is_not_replaced_by_the_cache(weights, tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    (hub / "checkpoints" / FID_WEIGHTS_FILE).write_bytes(weights.read_bytes())
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.setenv("VAEPROBE_INCEPTION", str(tmp_path / "typo.pth"))
    assert find_fid_weights() is None
    assert str(tmp_path / "typo.pth") in missing_fid_weights_reason()


def test_torchvision_inception_is_refused_in_one_line(tmp_path, no_env):
    from torchvision.models import inception_v3

    path = tmp_path / "inception_v3_google.pth"
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), path)
    with pytest.raises(FIDWeightsError) as err:
        FIDFeatures(path, device="cpu")
    msg = one_line(err.value)
    assert isinstance(err.value, VaeprobeError) and "\n" not in str(err.value) and msg == str(err.value)
    assert "torchvision" in msg and str(path) in msg and FID_WEIGHTS_FILE in msg


@pytest.mark.parametrize("content", ["truncated", "not-a-state-dict", "wrong-shape"])
def test_other_wrong_files_are_refused_in_one_line(tmp_path, fid_state, content):
    path = tmp_path / "w.pth"
    if content == "truncated":
        path.write_bytes(b"this is not a torch file")
    elif content == "not-a-state-dict":
        torch.save([torch.zeros(3)], path)
    else:
        bad = dict(fid_state)
        bad["fc.weight"] = torch.zeros(10, 2048)
        torch.save(bad, path)
    with pytest.raises(FIDWeightsError) as err:
        FIDFeatures(path, device="cpu")
    assert "\n" not in str(err.value) and str(path) in str(err.value) and FID_WEIGHTS_FILE in str(err.value)
    if content == "wrong-shape":
        assert "1 misshapen (e.g. fc.weight)" in str(err.value)


def test_absent_weights_are_stated_with_the_file_name(tmp_path, monkeypatch, no_env):
    assert find_fid_weights() is None
    reason = missing_fid_weights_reason()
    assert reason.startswith("not computed: no FID Inception weights (pt_inception-2015-12-05-6726825d.pth) at ")
    assert str(tmp_path / "empty-hub" / "checkpoints" / FID_WEIGHTS_FILE) in reason
    assert reason.endswith("pass --inception PATH or set VAEPROBE_INCEPTION") and "\n" not in reason
    assert find_fid_weights(tmp_path / "absent.pth") is None
    assert str(tmp_path / "absent.pth") in missing_fid_weights_reason(tmp_path / "absent.pth")
    monkeypatch.setenv("VAEPROBE_INCEPTION", str(tmp_path / "env.pth"))
    assert str(tmp_path / "env.pth") in missing_fid_weights_reason()


def test_library_network_receives_images_mapped_to_0_1(weights, images):
    feats = FIDFeatures(weights, device="cpu", batch_size=1)            # two batches of one
    seen = []
    handle = feats.net.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    out = feats(images)
    handle.remove()
    x = torch.cat(seen)
    assert x.min() >= 0 and x.max() <= 1 and x.min() == 0 and x.max() == 1   # clamped, then (x + 1) / 2
    assert torch.allclose(x, (images.clamp(-1, 1) + 1) / 2)
    # the same as the library model called directly on [0, 1] images, the way pytorch-fid's own scripts do
    with torch.no_grad():
        direct = feats.net((images.clamp(-1, 1) + 1) / 2)[0].flatten(1).double().numpy()
    assert len(seen) == 2 and np.allclose(out, direct, rtol=1e-4, atol=1e-5)
    assert feats.net.resize_input and feats.net.normalize_input          # the library's resize and scaling
    with torch.no_grad():                                               # feeding [-1, 1] unmapped would differ
        unmapped = feats.net(images.clamp(-1, 1))[0].flatten(1).double().numpy()
    assert np.abs(unmapped - out).max() > 100 * np.abs(direct - out).max() + 1e-3


def test_frechet_distance_identical_and_closed_form():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    # Gaussians with diagonal covariances: the sample statistics enter the closed form
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.3, 3, d), rng.uniform(0.3, 3, d)
    a = mu1 + rng.normal(size=(20000, d)) * np.sqrt(s1)
    b = mu2 + rng.normal(size=(20000, d)) * np.sqrt(s2)
    exact = float(((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum())
    assert frechet_distance(a, b) == pytest.approx(exact, rel=0.03)
    # and exactly for the sample statistics when those are diagonal: whiten the samples per set
    za = rng.normal(size=(50, d))
    za = (za - za.mean(0)) @ np.linalg.inv(np.linalg.cholesky(np.cov(za, rowvar=False))).T
    zb = rng.normal(size=(70, d))
    zb = (zb - zb.mean(0)) @ np.linalg.inv(np.linalg.cholesky(np.cov(zb, rowvar=False))).T
    a, b = mu1 + za * np.sqrt(s1), mu2 + zb * np.sqrt(s2)
    assert frechet_distance(a, b) == pytest.approx(exact, rel=1e-8)
    assert frechet_distance(b, a) == pytest.approx(exact, rel=1e-8)


def test_frechet_distance_without_the_library_path_agrees(monkeypatch):
    """SciPy >= 1.18 breaks pytorch-fid 0.3.0 (sqrtm's ``disp``); the eigenvalue path must give the same number."""
    import pytorch_fid.fid_score as lib

    rng = np.random.default_rng(2)
    a = rng.normal(size=(400, 5)) @ rng.normal(size=(5, 5))
    b = rng.normal(size=(300, 5)) @ rng.normal(size=(5, 5)) + 0.3
    expected = frechet_distance(a, b)

    def broken(*args, **kwargs):
        raise TypeError("sqrtm() got an unexpected keyword argument 'disp'")
    monkeypatch.setattr(lib, "calculate_frechet_distance", broken)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-7)


def test_frechet_distance_rejects_bad_shapes():
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(np.zeros((1, 3)), np.zeros((4, 3)))


def test_weights_url_is_the_librarys():
    from pytorch_fid import inception as lib

    assert fid.FID_WEIGHTS_URL == lib.FID_WEIGHTS_URL and lib.FID_WEIGHTS_URL.endswith(FID_WEIGHTS_FILE)


def test_few_rows_use_the_exact_low_rank_form():
    """Fewer rows than dimensions: the N x M singular-value form equals the D x D eigenvalue form (and, where the
    covariances are full rank, the library's), and it is what frechet_distance returns."""
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(6, 40)), rng.normal(size=(9, 40)) * 1.5 + 0.3
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    diff = a.mean(0) - b.mean(0)
    dense = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * fid._trace_sqrt_product(s1, s2))
    assert fid._low_rank_fid(a, b) == pytest.approx(dense, rel=1e-7)
    assert frechet_distance(a, b) == pytest.approx(dense, rel=1e-7)
    full_a, full_b = rng.normal(size=(200, 5)), rng.normal(size=(300, 5)) + 1.0   # full rank: the library's path
    assert fid._low_rank_fid(full_a, full_b) == pytest.approx(frechet_distance(full_a, full_b), rel=1e-6)
