"""The TAESD family (builtin:taef2 and published pairs), any-config adapters, and decoders autograd cannot go through."""

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from conftest import shared_or_skip
from vaeprobe.errors import VAELoadError
from vaeprobe.data.images import load_images
from vaeprobe.probes.metrics import psnr
from vaeprobe.reports.plots import tensor_to_unit
from vaeprobe.models.adapter import VAE, config_dict
from vaeprobe.models.loading import load_vae


@pytest.fixture(scope="module")
def taef2():
    return load_vae("builtin:taef2")


def test_builtin_taef2_is_the_published_pair_bit_for_bit(taef2):
    folder = shared_or_skip("taef2")
    published = load_vae(folder)  # the folder holding taef2_encoder.pth / taef2_decoder.pth
    mine, theirs = taef2.model.state_dict(), published.model.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    raw = torch.load(folder / "taef2_decoder.pth", map_location="cpu", weights_only=True)
    assert all(torch.equal(raw[k].float(), taef2.model.decoder.state_dict()[k]) for k in raw)
    # one file of the pair finds its partner; a tuple names both
    one = load_vae(folder / "taef2_decoder.pth")
    pair = load_vae((folder / "taef2_encoder.pth", folder / "taef2_decoder.pth"))
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    assert torch.equal(one.encode(x).mean, taef2.encode(x).mean)
    assert torch.equal(pair.decode(pair.encode(x).mean), taef2.decode(taef2.encode(x).mean))


def test_taef2_layout_and_reconstruction(taef2):
    assert (taef2.latent_channels, taef2.factor, taef2.scaling_factor, taef2.shift_factor) == (32, 8, 1.0, 0.0)
    assert taef2.encode(torch.zeros(1, 3, 64, 64)).deterministic
    groupnorms = [n for n, m in taef2.model.named_modules() if isinstance(m, nn.GroupNorm)]
    assert len(groupnorms) == 6 and all(".pool." in n for n in groupnorms)  # 3 encoder and 3 decoder pool branches
    # A real, trained autoencoder: on the held-out builtin photos it reconstructs well. A mis-wired pool branch
    # (added after the convs, or only into the conv path) loads the same weights and falls to ~17 dB here.
    values = []
    for img in load_images("builtin:photos-heldout", size=128):
        rec = taef2.reconstruct(img.tensor())
        values.append(psnr(img.array, tensor_to_unit(rec)))
    assert np.mean(values) > 25 and min(values) > 20, values


def test_pair_errors_are_one_line(tmp_path):
    enc = tmp_path / "m_encoder.pth"
    torch.save({"0.weight": torch.zeros(64, 3, 3, 3)}, enc)
    with pytest.raises(VAELoadError, match="partner m_decoder.pth is not beside it"):
        load_vae(enc)
    (tmp_path / "m_decoder.pth").write_bytes(b"not a pickle")
    with pytest.raises(VAELoadError, match="weights_only=True"):
        load_vae(enc)
    torch.save({"1.weight": torch.zeros(64, 4, 3, 3)}, tmp_path / "m_decoder.pth")
    with pytest.raises(VAELoadError, match="not a TAESD state dict"):
        load_vae(tmp_path)


def test_diffusers_autoencoder_tiny_folder(tmp_path):
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    model = AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                            num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), latent_channels=4,
                            scaling_factor=0.5).eval()
    model.save_pretrained(tmp_path / "tiny")
    vae = load_vae(tmp_path / "tiny")
    assert type(vae.model).__name__ == "AutoencoderTiny" and vae.scaling_factor == 0.5
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = model.decode(model.encode(x).latents).sample
    assert torch.allclose(vae.reconstruct(x), expected, atol=1e-6)


@dataclasses.dataclass
class _Cfg:
    latent_channels: int = 4
    scaling_factor: float = 0.25
    shift_factor: float = 0.5


class _Obj:
    def __init__(self):
        self.scaling_factor = 0.25
        self.shift_factor = 0.5

    def method(self):  # not config
        return 1


@pytest.mark.parametrize("cfg", [{"scaling_factor": 0.25, "shift_factor": 0.5},
                                 SimpleNamespace(scaling_factor=0.25, shift_factor=0.5), _Cfg(), _Obj(), "frozen"])
def test_adapter_reads_any_config(cfg, tiny_kl):
    from diffusers.configuration_utils import FrozenDict

    if cfg == "frozen":
        cfg = FrozenDict(scaling_factor=0.25, shift_factor=0.5)

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = tiny_kl
            self.config = cfg

        def encode(self, x):
            return self.inner.encode(x)

        def decode(self, z):
            return self.inner.decode(z)

    vae = VAE(Wrapped())
    assert (vae.scaling_factor, vae.shift_factor, vae.latent_channels) == (0.25, 0.5, 4)
    info = vae.info()
    json.dumps(info)  # recorded in every run directory
    z = torch.ones(1, 4, 2, 2)
    assert torch.allclose(vae.from_diffusion(vae.to_diffusion(z)), z)
    assert torch.allclose(vae.to_diffusion(z), (z - 0.5) * 0.25)


def test_config_dict_and_bad_values():
    assert config_dict(None) == {} and config_dict(_Cfg())["scaling_factor"] == 0.25
    assert "method" not in config_dict(_Obj())

    class Bad(nn.Module):
        config = {"scaling_factor": "big"}

        def encode(self, x):
            return x[:, :1, ::8, ::8]

        def decode(self, z):
            return z

    with pytest.raises(VAELoadError, match="scaling_factor='big' is not a number"):
        VAE(Bad()).info()


# -- decoders autograd cannot go through ---------------------------------------------------------------------------

@pytest.mark.parametrize("factory, words", [("inplace_decoder", "in place"), ("nograd_decoder", "no_grad"),
                                            ("rounding_decoder", "zero everywhere")])
def test_not_differentiable_is_named_and_two_stage_falls_back(factory, words):
    from vaeprobe.probes.linear import NotDifferentiableError, check_differentiable, sensitivity_map
    from vaeprobe.probes.scan import two_stage_scan

    vae = load_vae(f"vae_factories:{factory}")
    z = vae.encode(load_images("builtin:photos-heldout", size=64)[0].tensor()).mean
    assert words in check_differentiable(vae, z)
    with pytest.raises(NotDifferentiableError, match=words):
        sensitivity_map(vae, z, n_probes=2)
    # the exact decodes still work, so two-stage ablates the largest norms and a doubled control sample
    df = two_stage_scan(vae, z, n_norm=2, n_linear=2, n_control=5, batch=4).table
    assert words in df.attrs["linear_fallback"]
    assert (df.stage == "norm").sum() == 4 and (df.stage == "control").sum() == 10
    top = divmod(int(z[0].norm(dim=0).argmax()), z.shape[-1])
    assert top in set(zip(df.row[df.stage == "norm"], df.col[df.stage == "norm"]))
    # a differentiable model is not reported as one that is not
    tiny = load_vae("vae_factories:no_config")
    assert check_differentiable(tiny, tiny.encode(torch.zeros(1, 3, 64, 64)).mean) is None
    assert "linear_fallback" not in two_stage_scan(tiny, tiny.encode(torch.zeros(1, 3, 64, 64)).mean,
                                                   n_control=4).table.attrs


def test_a_failing_image_is_reported_and_the_run_goes_on(tmp_path, capsys):
    """A decoder that fails on wide latents (as an out-of-memory error would): that image is recorded as failed,
    the others finish, and --resume retries only the failed one."""
    from PIL import Image

    from vaeprobe import cli

    folder = tmp_path / "imgs"
    folder.mkdir()
    photos = load_images("builtin:photos-heldout", size=96)
    for name, img, (w, h) in (("a.png", photos[0], (64, 64)), ("b.png", photos[1], (96, 64)),
                              ("c.png", photos[2], (64, 64))):
        Image.fromarray((img.array[:h, :w] * 255).round().astype(np.uint8)).save(folder / name)
    out = tmp_path / "run"
    for job, extra in (("latents", []), ("scan", ["--positions", "grid:4"]), ("mechanism", ["--no-figures"])):
        rc = cli.main([job, "--vae", "vae_factories:fails_on_wide", "--images", str(folder), "--quiet",
                       "--out", str(out / job), *extra])
        _, err = capsys.readouterr()
        assert rc == 0 and "Traceback" not in err
        assert err.count("b: failed (RuntimeError: out of memory") == 1, err
        summary = json.loads((out / job / "summary.json").read_text())
        assert [f["image"] for f in summary["failed"]] == ["b"] and summary["n_images"] == 2
    # --resume keeps the finished images and tries the failed one again
    before = {p.name: p.stat().st_mtime_ns for p in (out / "scan" / "parts").glob("*")}
    rc = cli.main(["scan", "--vae", "vae_factories:fails_on_wide", "--images", str(folder), "--quiet", "--resume",
                   "--out", str(out / "scan"), "--positions", "grid:4"])
    assert rc == 0 and capsys.readouterr().err.count("b: failed") == 1
    assert {p.name: p.stat().st_mtime_ns for p in (out / "scan" / "parts").glob("*")} == before
    # every image failing is one line and exit code 2, not an empty success
    rc = cli.main(["scan", "--vae", "vae_factories:fails_on_wide", "--images", str(folder / "b.png"), "--quiet",
                   "--out", str(out / "all_bad"), "--positions", "grid:4"])
    assert rc == 2 and "every image failed" in capsys.readouterr().err


def test_frozen_groupnorm_of_taef2_matches_a_brute_force_reference(taef2):
    """vaeprobe's hook-based freezing of taef2's pool-branch GroupNorms against an independent construction: a copy
    of the decoder whose GroupNorm modules are replaced by modules that normalise with the clean decode's group
    statistics. The far-field energy kept must agree; it must also differ from the live decode (no-op hooks fail)."""
    import copy

    from vaeprobe.probes.mechanism import attribute_pathways
    from vaeprobe.probes.perturb import Site, apply_batch, parse_operator

    x = load_images("builtin:photos-heldout", size=64)[2].tensor()
    z = taef2.encode(x).mean
    sites = [Site(1, 1), Site(4, 6), Site(7, 2)]
    df = attribute_pathways(taef2, z, sites, "zero", radius=2).table

    decoder = taef2.model.decoder
    stats = {}

    def grab(name):
        def hook(mod, args, out):
            g = args[0].reshape(args[0].shape[0], mod.num_groups, -1)
            stats[name] = (g.mean(-1), g.var(-1, unbiased=False))
        return hook

    gns = {n: m for n, m in decoder.named_modules() if isinstance(m, nn.GroupNorm)}
    handles = [m.register_forward_hook(grab(n)) for n, m in gns.items()]
    with torch.no_grad():
        clean = taef2.decode(z)
    for h in handles:
        h.remove()

    class Fixed(nn.Module):
        def __init__(self, gn, mean, var):
            super().__init__()
            self.gn, self.mean, self.var = gn, mean, var

        def forward(self, t):
            b, c = t.shape[:2]
            g = t.reshape(b, self.gn.num_groups, -1)
            out = ((g - self.mean[..., None]) / torch.sqrt(self.var[..., None] + self.gn.eps)).reshape(t.shape)
            return out * self.gn.weight[None, :, None, None] + self.gn.bias[None, :, None, None]

    frozen = copy.deepcopy(decoder)
    for name in gns:
        parent_name, _, child = name.rpartition(".")
        parent = frozen.get_submodule(parent_name)
        setattr(parent, child, Fixed(getattr(parent, child), *stats[name]))
    rows, cols = torch.arange(64) // 8, torch.arange(64) // 8
    for i, site in enumerate(sites):
        zz = apply_batch(z, [site], parse_operator("zero"))
        with torch.no_grad():
            live = taef2.decode(zz)
            fixed = frozen(zz).mul(2).sub(1)
        far = ((rows[:, None] - site.row).abs() > 2) | ((cols[None, :] - site.col).abs() > 2)
        e_live = float(((live - clean) ** 2)[..., far].mean())
        e_fixed = float(((fixed - clean) ** 2)[..., far].mean())
        assert e_fixed < 0.95 * e_live  # freezing the pool branches removes part of the far field
        assert df.far_l2_live[i] == pytest.approx(e_live, rel=1e-4)
        assert df.far_l2_groupnorm_frozen[i] == pytest.approx(e_fixed, rel=1e-3)


def test_an_internal_error_is_one_line_and_debug_shows_the_traceback(capsys, monkeypatch):
    from vaeprobe import cli

    rc = cli.main(["info", "--vae", "vae_factories:broken_encoder"])
    err = capsys.readouterr().err
    assert rc == 1 and err.strip().count("\n") == 0
    assert "internal error: ValueError: shapes do not match (rerun with VAEPROBE_DEBUG=1" in err
    monkeypatch.setenv("VAEPROBE_DEBUG", "1")
    with pytest.raises(ValueError, match="shapes do not match"):
        cli.main(["info", "--vae", "vae_factories:broken_encoder"])
