"""Builtin models (``builtin:NAME``), all offline.

- ``mini-kl-f8``: the project's trained mini VAE (diffusers AutoencoderKL, SD layout at reduced width), shipped
  as fp16 safetensors in ``vaeprobe/models/builtin/mini-kl-f8`` with its model card.
- ``mini-kl-f8-ft-mse``: a decoder-only fine-tune of ``mini-kl-f8`` (MSE + 0.1 LPIPS, encoder frozen; made by
  ``experiments/finetune_decoder.py``): the replacement-VAE example for ``vaeprobe compare``.
- ``taef2``: the published taef2 weights (a TAESD-family autoencoder for FLUX.2's 32-channel latents, trained and
  released under MIT by its author, not by this project), converted to safetensors in ``vaeprobe/models/builtin/taef2``
  with its LICENSE and a model card; built by :mod:`vaeprobe.models.taesd`.
- ``tiny-random``: a seeded, *untrained* tiny AutoencoderKL (factor 8, 4 channels) for unit tests and smoke runs.
- planted-spot controls (see :mod:`vaeprobe.models.controls`), built on ``mini-kl-f8``.
"""

from __future__ import annotations

from typing import Callable

import torch

from vaeprobe.errors import VAELoadError

from vaeprobe.models.folders import BUILTIN_DIR, folder_model

TINY_CONFIG = {
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 16, 16, 16],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 4,
    "sample_size": 64,
}


def tiny_random(*, seed: int = 0, **overrides):
    """A tiny untrained AutoencoderKL with SD's layout (4 levels, GroupNorm, mid-block attention).

    Parameters
    ----------
    seed : int, optional
        Seed of the random weights (``torch.manual_seed``, which also sets the global generator).
    **overrides
        ``AutoencoderKL`` arguments that replace those of :data:`TINY_CONFIG`.

    Returns
    -------
    diffusers.AutoencoderKL
        Factor 8, 4 latent channels unless overridden, in eval mode.

    Examples
    --------
    >>> tiny_random(latent_channels=8).config.latent_channels
    8
    """
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**{**TINY_CONFIG, **overrides}).eval()


def _taesd_model(name: str):
    from vaeprobe.models.taesd import find_pair, load_taesd

    folder = BUILTIN_DIR / name
    pair = find_pair(folder) if folder.is_dir() else None
    if pair is None:
        raise VAELoadError(f"builtin:{name} is not installed in {folder}; reinstall vaeprobe")
    return load_taesd(*pair)


def _registry() -> dict[str, Callable]:
    reg: dict[str, Callable] = {
        "tiny-random": tiny_random,
        "mini-kl-f8": lambda: folder_model("mini-kl-f8"),
        "mini-kl-f8-ft-mse": lambda: folder_model("mini-kl-f8-ft-mse"),
        "taef2": lambda: _taesd_model("taef2"),
    }
    from vaeprobe.models.controls import CONTROLS, VERDICT_CONTROLS

    reg.update(CONTROLS)
    reg.update(VERDICT_CONTROLS)
    return reg


def builtin_names() -> list[str]:
    """The names of the builtin models, for ``builtin:NAME``.

    Returns
    -------
    list of str
        Sorted.

    Examples
    --------
    >>> {"mini-kl-f8", "taef2", "tiny-random"} <= set(builtin_names())
    True
    """
    return sorted(_registry())


def load_builtin(name: str):
    """Build a builtin model (offline) by name.

    Parameters
    ----------
    name : str
        One of :func:`builtin_names`, without the ``builtin:`` prefix.

    Returns
    -------
    torch.nn.Module
        The model with the diffusers ``encode``/``decode`` interface (wrap it with
        :func:`vaeprobe.models.loading.load_vae` for the :class:`~vaeprobe.models.adapter.VAE` adapter).

    Raises
    ------
    VAELoadError
        When ``name`` is unknown or the model's files are not installed.

    Examples
    --------
    >>> type(load_builtin("tiny-random")).__name__
    'AutoencoderKL'
    """
    reg = _registry()
    if name not in reg:
        raise VAELoadError(f"unknown builtin model {name!r}; available: {', '.join(sorted(reg))}")
    return reg[name]()
