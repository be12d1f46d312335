"""load_vae through every route, on tiny models built from config; the adapter's contract."""

import pickle
import sys

import pytest
import torch
from safetensors.torch import save_file

from vaeprobe import VAELoadError, load_vae
from vaeprobe.models.ldm import infer_ldm_vae_config, to_ldm_state_dict
from vaeprobe.models.adapter import LOGVAR_CLAMP, VAE

from conftest import run_cli


def _x(seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, size, size, generator=g) * 2 - 1


def _same_outputs(a: VAE, b: VAE, x):
    pa, pb = a.encode(x), b.encode(x)
    assert torch.allclose(pa.mean, pb.mean, atol=1e-6)
    assert torch.allclose(pa.raw_logvar, pb.raw_logvar, atol=1e-6)
    assert torch.allclose(a.decode(pa.mean), b.decode(pb.mean), atol=1e-5)


def test_folder_and_pipeline_folder(tiny_kl, tmp_path):
    tiny_kl.save_pretrained(tmp_path / "vae_only")
    tiny_kl.save_pretrained(tmp_path / "pipe" / "vae")
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    ref = VAE(tiny_kl)
    for spec in (tmp_path / "vae_only", tmp_path / "pipe"):
        vae = load_vae(str(spec))
        assert (vae.latent_channels, vae.factor, vae.scaling_factor) == (4, 8, 0.18215)
        _same_outputs(ref, vae, _x())


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_ldm_single_file_inferred_and_given_config(tiny_kl, tmp_path, fmt):
    ldm = to_ldm_state_dict(tiny_kl)
    assert "encoder.down.0.block.0.norm1.weight" in ldm and "decoder.mid.attn_1.q.weight" in ldm
    assert ldm["decoder.mid.attn_1.q.weight"].ndim == 4  # LDM stores attention as 1x1 convs
    if fmt == "safetensors":
        path = tmp_path / "vae.safetensors"
        save_file(ldm, str(path))
    else:  # as whole SD checkpoints hold it: nested state_dict, first_stage_model. prefix
        path = tmp_path / "model.ckpt"
        torch.save({"state_dict": {f"first_stage_model.{k}": v for k, v in ldm.items()}}, path)
    inferred = infer_ldm_vae_config(ldm)
    assert inferred["block_out_channels"] == [8, 16, 16, 16] and inferred["layers_per_block"] == 1
    # norm_num_groups cannot be read off shapes: the tiny model uses 4, so give the config
    cfg = dict(tiny_kl.config)
    vae = load_vae(str(path), config=cfg)
    _same_outputs(VAE(tiny_kl), vae, _x(1))


def test_ldm_file_with_inferred_config_only(tmp_path):
    from vaeprobe.models.zoo import tiny_random

    model = tiny_random(seed=2, block_out_channels=[32, 32, 64, 64], norm_num_groups=32)
    path = tmp_path / "sdlike.safetensors"
    save_file(to_ldm_state_dict(model), str(path))
    vae = load_vae(str(path))  # no config: everything inferred
    assert list(vae.model.config.block_out_channels) == [32, 32, 64, 64]
    _same_outputs(VAE(model), vae, _x(2))


def test_ckpt_with_foreign_pickle_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("unpickled!",))

    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Payload()}, f)
    with pytest.raises(VAELoadError, match="weights_only"):
        load_vae(str(path))


def test_16_channel_flux_layout_and_tiny(tmp_path):
    from diffusers import AutoencoderKL, AutoencoderTiny

    torch.manual_seed(0)
    flux = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                         block_out_channels=[16, 16, 32, 32], layers_per_block=1, latent_channels=16,
                         norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False,
                         scaling_factor=0.3611, shift_factor=0.1159)
    flux.save_pretrained(tmp_path / "flux")
    vae = load_vae(str(tmp_path / "flux"))
    assert (vae.latent_channels, vae.factor, vae.scaling_factor, vae.shift_factor) == (16, 8, 0.3611, 0.1159)
    z = vae.encode(_x()).mean
    assert torch.allclose(vae.from_diffusion(vae.to_diffusion(z)), z, atol=1e-6)
    # single file of the same model, config inferred (norm groups given)
    save_file(to_ldm_state_dict(flux), str(tmp_path / "flux.safetensors"))
    again = load_vae(str(tmp_path / "flux.safetensors"), config=dict(flux.config))
    _same_outputs(vae, again, _x())

    tiny = AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                           num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), latent_channels=4)
    tiny.save_pretrained(tmp_path / "taesd")
    tv = load_vae(str(tmp_path / "taesd"))
    post = tv.encode(_x())
    assert post.deterministic and post.logvar is None and tv.factor == 8
    assert tv.decode(post.mean).shape == (2, 3, 32, 32)


def test_builtin_factory_and_module_routes(tiny_kl):
    assert load_vae("builtin:tiny-random").factor == 8
    f = load_vae("vae_factories:tiny")
    assert f.spec == "vae_factories:tiny" and f.latent_channels == 4
    m = load_vae(tiny_kl)
    _same_outputs(VAE(tiny_kl), m, _x())
    assert load_vae(m) is m


@pytest.mark.parametrize("spec,match", [
    ("builtin:nope", "unknown builtin model"),
    ("vae_factories:not_a_module", "not a VAE module"),
    ("no_such_module_xyz:f", "cannot import"),
    ("missing/file.safetensors", "no such file"),
    ("stabilityai/sd-vae-ft-mse", "cannot be reached"),
    ("just words", "is not a file"),
])
def test_bad_specs_fail_with_one_clear_line(spec, match, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(VAELoadError, match=match) as err:
        load_vae(spec)
    assert "\n" not in str(err.value)


def test_builtin_names_list_the_controls_and_a_broken_controls_import_surfaces(monkeypatch):
    from vaeprobe.models.controls import CONTROLS, VERDICT_CONTROLS
    from vaeprobe.models.zoo import builtin_names

    names = builtin_names()
    assert {"tiny-random", "mini-kl-f8", "taef2"} <= set(names) and CONTROLS and VERDICT_CONTROLS
    assert set(CONTROLS) | set(VERDICT_CONTROLS) <= set(names)
    monkeypatch.setitem(sys.modules, "vaeprobe.models.controls", None)  # the import now fails
    with pytest.raises(ImportError):
        builtin_names()                                                 # not hidden behind a shorter list


def test_hub_check_keeps_the_users_socket_timeout(monkeypatch):
    """The reachability check must not touch the process-wide socket timeout (it used to reset it to None)."""
    import socket

    import huggingface_hub
    import huggingface_hub.constants as c

    def snapshot_download(repo_id, *, local_files_only=False, **kwargs):
        assert local_files_only, "the test must not fetch anything"
        raise FileNotFoundError(f"{repo_id} is not in the cache")

    def no_network(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "no network in this test")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)       # so the check really runs
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(7.0)
    try:
        with pytest.raises(VAELoadError, match="cannot be reached") as err:
            load_vae("owner/name")
        assert "\n" not in str(err.value)
        assert socket.getdefaulttimeout() == 7.0
    finally:
        socket.setdefaulttimeout(before)


def test_hub_id_cli_offline_is_one_line(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    # what HF_HUB_OFFLINE=1 and an empty HOME give a fresh process (the hub reads both at import): offline, no cache
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / ".cache" / "huggingface" / "hub"))
    proc = run_cli("info", "--vae", "stabilityai/sd-vae-ft-mse", env={"HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)})
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == [lines[0]] and lines[0].startswith("vaeprobe: error: stabilityai/sd-vae-ft-mse")
    assert "local folder" in lines[0] and "Traceback" not in proc.stderr


def test_raw_logvar_is_kept_below_the_clamp(tiny_kl):
    with torch.no_grad():  # push every log-variance far below -30
        tiny_kl.quant_conv.bias[4:] = -45.0
        tiny_kl.quant_conv.weight[4:] = 0.0
    post = VAE(tiny_kl).encode(_x())
    assert torch.allclose(post.raw_logvar, torch.full_like(post.raw_logvar, -45.0))
    assert torch.all(post.logvar == LOGVAR_CLAMP[0])
    assert post.at_clamp_floor().all()
    # diffusers' own posterior agrees on the clamped value
    assert torch.equal(tiny_kl.encode(_x()).latent_dist.logvar, post.logvar)


def test_half_precision_nan_falls_back_to_fp32():
    vae = load_vae("vae_factories:NaNInHalf", dtype="fp16")
    z = torch.randn(1, 4, 4, 4)
    with pytest.warns(RuntimeWarning, match="redone in float32"):
        out = vae.decode(z)
    assert torch.isfinite(out).all() and vae.dtype == torch.float16
    assert torch.allclose(out, torch.nn.functional.interpolate(z[:, :3], scale_factor=8), atol=1e-3)


def test_bf16_decode_close_to_fp32(tiny_kl):
    import copy

    ref = VAE(copy.deepcopy(tiny_kl))
    half = load_vae(tiny_kl, dtype="bf16")
    assert half.dtype == torch.bfloat16
    z = ref.encode(_x()).mean
    a, b = ref.decode(z), half.decode(z)
    assert b.dtype == torch.float32
    assert (a - b).abs().mean() < 0.05 * a.abs().mean() + 1e-3
