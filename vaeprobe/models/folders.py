"""Diffusers model folders: the class a config names, loading a folder, the builtin weights' folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vaeprobe.errors import VAELoadError

BUILTIN_DIR = Path(__file__).parent / "builtin"


def diffusers_class(name: str):
    import diffusers

    if not name.startswith("Autoencoder") or not hasattr(diffusers, name):
        raise VAELoadError(f"config names class {name!r}, which is not a diffusers autoencoder")
    return getattr(diffusers, name)


def load_folder(folder: Path, subfolder: str | None):
    if subfolder:
        folder = folder / subfolder
    cfg_path = folder / "config.json"
    if not cfg_path.exists() and (folder / "vae" / "config.json").exists():
        folder = folder / "vae"
        cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise VAELoadError(f"{folder}: no config.json (nor vae/config.json); not a diffusers model folder")
    try:
        cls_name = json.loads(cfg_path.read_text()).get("_class_name", "AutoencoderKL")
    except json.JSONDecodeError as exc:
        raise VAELoadError(f"{cfg_path}: invalid JSON ({exc})") from None
    cls = diffusers_class(cls_name)
    try:
        return cls.from_pretrained(str(folder), torch_dtype=torch.float32, local_files_only=True,
                                   low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as exc:
        raise VAELoadError(f"{folder}: {str(exc).splitlines()[0][:200]}") from None


def folder_model(name: str):
    folder = BUILTIN_DIR / name
    if not (folder / "config.json").exists():
        raise VAELoadError(f"builtin:{name} is not installed in {folder}; reinstall vaeprobe")
    return load_folder(folder, None)
