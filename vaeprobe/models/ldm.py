"""Original-LDM single-file VAE checkpoints (``vae-ft-mse-840000-ema-pruned.safetensors`` and the like).

Reading: the diffusers config is given or inferred from tensor shapes (:func:`infer_ldm_vae_config`), then the
keys are converted with diffusers' own ``convert_ldm_vae_checkpoint``. Writing (:func:`to_ldm_state_dict`) is
the inverse mapping, used to export a diffusers VAE as a single file for LDM-based tools and to test reading.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from vaeprobe.errors import VAELoadError

LDM_PREFIXES = ("first_stage_model.", "vae.")
DEFAULT_SCALING = {4: 0.18215}
"""Scaling factors that shapes cannot tell: SD1/2 (4 channels) 0.18215; SDXL uses 0.13025 (give ``config``);
16-channel SD3 (1.5305, shift 0.0609) and FLUX.1 (0.3611, shift 0.1159) must be given explicitly."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a ``.ckpt``/``.pt``/``.bin`` read with ``weights_only=True``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle with non-tensor globals, or not a torch file at all
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VAELoadError(
            f"{path}: not loadable with torch.load(weights_only=True) ({first[:160]}); "
            f"convert it to .safetensors from a trusted environment") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise VAELoadError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def strip_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop ``first_stage_model.``/``vae.`` prefixes (a VAE inside a whole SD checkpoint)."""
    for prefix in LDM_PREFIXES:
        if any(k.startswith(prefix + "encoder.") for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def is_ldm_layout(sd: dict) -> bool:
    return any(k.startswith("encoder.down.") for k in sd)


def is_diffusers_layout(sd: dict) -> bool:
    return any(k.startswith("encoder.down_blocks.") for k in sd)


def infer_ldm_vae_config(sd: dict[str, torch.Tensor]) -> dict:
    """A diffusers ``AutoencoderKL`` config inferred from LDM tensor shapes.

    Shapes fix widths, depth, channels and whether quant convs exist; ``norm_num_groups`` (32) and the
    ``scaling_factor`` cannot be read off shapes and take LDM's defaults (see :data:`DEFAULT_SCALING`).
    """
    try:
        ch = sd["encoder.conv_in.weight"].shape[0]
        in_channels = sd["encoder.conv_in.weight"].shape[1]
        out_channels = sd["decoder.conv_out.weight"].shape[0]
        z_channels = sd["decoder.conv_in.weight"].shape[1]
    except KeyError as exc:
        raise VAELoadError(f"not an LDM VAE checkpoint: tensor {exc} missing") from None
    levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    widths = []
    for i in levels:
        w = sd.get(f"encoder.down.{i}.block.0.conv2.weight")
        if w is None:
            raise VAELoadError(f"not an LDM VAE checkpoint: encoder.down.{i}.block.0 missing")
        widths.append(int(w.shape[0]))
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
    has_quant = "quant_conv.weight" in sd
    latent = sd["quant_conv.weight"].shape[0] // 2 if has_quant else z_channels
    has_attn = any(k.startswith("decoder.mid.attn_1.") for k in sd)
    config = {
        "in_channels": int(in_channels),
        "out_channels": int(out_channels),
        "down_block_types": ["DownEncoderBlock2D"] * len(widths),
        "up_block_types": ["UpDecoderBlock2D"] * len(widths),
        "block_out_channels": widths,
        "layers_per_block": len(blocks),
        "latent_channels": int(latent),
        "norm_num_groups": 32,
        "sample_size": 512,
        "use_quant_conv": has_quant,
        "use_post_quant_conv": "post_quant_conv.weight" in sd,
        "mid_block_add_attention": has_attn,
    }
    if widths and widths[0] != ch:
        config["block_out_channels"] = widths
    if latent in DEFAULT_SCALING:
        config["scaling_factor"] = DEFAULT_SCALING[latent]
    return config


def load_ldm_vae(path: str | Path, config: dict | str | Path | None = None):
    """Build a diffusers ``AutoencoderKL`` from an LDM-format (or diffusers-format) single file."""
    import json

    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    sd = strip_prefix(read_state_dict(path))
    if isinstance(config, (str, Path)):
        cpath = Path(config)
        cpath = cpath / "config.json" if cpath.is_dir() else cpath
        config = json.loads(cpath.read_text())
    if is_diffusers_layout(sd):
        if config is None:
            raise VAELoadError(f"{path}: diffusers-layout weights need a config (pass config=FOLDER/config.json)")
        converted = sd
    elif is_ldm_layout(sd):
        if config is None:
            config = infer_ldm_vae_config(sd)
        converted = convert_ldm_vae_checkpoint(sd, dict(config))
    else:
        raise VAELoadError(f"{path}: no VAE encoder tensors found (neither LDM nor diffusers layout)")
    config = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    model = AutoencoderKL.from_config(config)
    result = model.load_state_dict(converted, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise VAELoadError(
            f"{path}: weights do not fit the config (missing {result.missing_keys[:2]}, unexpected "
            f"{result.unexpected_keys[:2]}); pass the matching config")
    return model


def to_ldm_state_dict(model) -> dict[str, torch.Tensor]:
    """The state dict of a diffusers ``AutoencoderKL`` in original-LDM key layout (inverse of loading)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    simple = DIFFUSERS_TO_LDM_MAPPING["vae"]
    n_up = len(model.config.up_block_types)
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        value = value.detach().clone()
        if key in simple:
            out[simple[key]] = value
            continue
        new = key
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        m = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.(.*)", new)
        if m:
            level = n_up - 1 - int(m.group(1))
            part = "block." if m.group(2) == "resnets" else "upsample."
            new = f"decoder.up.{level}.{part}{m.group(3)}"
        new = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda mm: f"mid.block_{int(mm.group(1)) + 1}.", new)
        if ".mid_block.attentions.0." in new:
            new = new.replace("mid_block.attentions.0.", "mid.attn_1.")
            for a, b in (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                         ("to_out.0.", "proj_out.")):
                new = new.replace(a, b)
            if value.ndim == 2:
                value = value[:, :, None, None]
        new = new.replace("conv_shortcut", "nin_shortcut")
        out[new] = value
    return out
