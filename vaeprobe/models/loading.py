"""Loading a VAE from any supported spec (:func:`load_vae`)."""

from __future__ import annotations
import importlib
import json
import os
import re
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
import torch
from torch import nn
from vaeprobe.errors import VAELoadError
from vaeprobe.models.folders import diffusers_class, load_folder
from vaeprobe.models.adapter import VAE, parse_dtype

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
WEIGHT_SUFFIXES = {".safetensors", ".ckpt", ".pt", ".pth", ".bin"}


# -- loading ---------------------------------------------------------------------------------------------------
def load_vae(spec: Any, *, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
             config: dict | str | None = None, subfolder: str | None = None) -> VAE:
    """Load a VAE from any supported spec and wrap it in a :class:`VAE` adapter.

    Parameters
    ----------
    spec : str, os.PathLike, tuple of two paths, torch.nn.Module or VAE
        What to load:

        - a hub id (``stabilityai/sd-vae-ft-mse``; a pipeline repo's ``vae`` subfolder is found by itself);
        - a local diffusers folder (model or whole pipeline, ``AutoencoderKL`` or ``AutoencoderTiny``);
        - an LDM single file (``.safetensors``/``.ckpt``; give ``config`` or it is inferred from shapes);
        - a published TAESD-family pair: a folder holding ``NAME_encoder.pth`` and ``NAME_decoder.pth``, one of
          those files, or the pair as a tuple (:mod:`vaeprobe.models.taesd`);
        - ``builtin:NAME`` (:mod:`vaeprobe.models.zoo`) or ``package.module:factory``;
        - an ``nn.Module`` with the diffusers interface (``encode(x)`` giving ``.latent_dist`` or ``.latents``,
          ``decode(z)`` giving ``.sample``; any ``config``: a dict, a dataclass, a namespace or none);
        - a :class:`VAE`, which is moved to ``device``/``dtype``.
    device : str or torch.device, optional
        Where to put the model (default: leave it where it was built, the CPU for files, folders and builtins).
    dtype : str or torch.dtype, optional
        ``"fp32"``, ``"fp16"``, ``"bf16"`` or a torch dtype (default: the model's own).
    config : dict or str, optional
        Config of an LDM single file: a dict, or the path of a ``config.json`` or of the folder holding it.
    subfolder : str, optional
        Subfolder of a diffusers folder or hub repo that holds the VAE (default: the root, else ``vae``).

    Returns
    -------
    VAE
        The adapter around the loaded module; ``spec`` records how it was loaded.

    Raises
    ------
    VAELoadError
        When ``spec`` cannot be loaded (the message says why and what to pass instead).

    Examples
    --------
    >>> load_vae("builtin:tiny-random", dtype="fp32").dtype
    torch.float32
    """
    dtype = parse_dtype(dtype)
    if isinstance(spec, VAE):
        return spec.to(device=device, dtype=dtype)
    if isinstance(spec, nn.Module):
        return VAE(spec, spec=type(spec).__name__, device=device, dtype=dtype)
    if isinstance(spec, (tuple, list)) and len(spec) == 2 and all(isinstance(p, (str, os.PathLike)) for p in spec):
        from vaeprobe.models.taesd import load_taesd

        missing = [str(p) for p in spec if not Path(p).expanduser().is_file()]
        if missing:
            raise VAELoadError(f"{', '.join(missing)}: no such file (an encoder/decoder pair needs both)")
        model = load_taesd(*(Path(p).expanduser() for p in spec))
        return VAE(model, spec=" + ".join(str(p) for p in spec), device=device, dtype=dtype)
    if not isinstance(spec, (str, os.PathLike)):
        raise VAELoadError(f"cannot load a VAE from a {type(spec).__name__}; pass a path, hub id or builtin:NAME")
    s = str(spec)
    if s.startswith("builtin:"):
        from vaeprobe.models.zoo import load_builtin

        return VAE(load_builtin(s[len("builtin:"):]), spec=s, device=device, dtype=dtype)
    path = Path(s).expanduser()
    if path.exists():
        return VAE(_load_path(path, config, subfolder), spec=s, device=device, dtype=dtype)
    if FACTORY.match(s):
        return _load_factory(s, device, dtype)
    if Path(s).suffix in WEIGHT_SUFFIXES:
        raise VAELoadError(f"{s}: no such file")
    if HUB_ID.match(s):
        return VAE(_load_hub(s, subfolder), spec=s, device=device, dtype=dtype)
    if Path(s).suffix in WEIGHT_SUFFIXES or "/" in s or os.sep in s:
        raise VAELoadError(f"{s}: no such file or folder")
    raise VAELoadError(f"{s!r} is not a file, folder, builtin:NAME, package.module:factory or hub id (owner/name)")


def _load_path(path: Path, config, subfolder):
    from vaeprobe.models.taesd import find_pair, load_taesd

    if path.is_dir() and not subfolder and not (path / "config.json").exists() and (pair := find_pair(path)):
        return load_taesd(*pair)
    if path.is_dir():
        return load_folder(path, subfolder)
    if (pair := find_pair(path)) is not None:
        return load_taesd(*pair)
    if path.suffix not in WEIGHT_SUFFIXES:
        raise VAELoadError(f"{path}: expected a diffusers folder or a weights file ({', '.join(sorted(WEIGHT_SUFFIXES))})")
    from vaeprobe.models.ldm import load_ldm_vae

    try:
        return load_ldm_vae(path, config)
    except VAELoadError:
        raise
    except Exception as exc:  # corrupt file, header errors
        raise VAELoadError(f"{path}: cannot read weights ({str(exc).splitlines()[0][:200]})") from None


def _load_factory(spec: str, device, dtype) -> VAE:
    mod_name, attr = spec.split(":")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise VAELoadError(f"{spec}: cannot import {mod_name} ({exc})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise VAELoadError(f"{spec}: {mod_name} has no callable {attr}")
    made = factory()
    if isinstance(made, VAE):
        made.spec = spec
        return made.to(device=device, dtype=dtype)
    if not isinstance(made, nn.Module):
        raise VAELoadError(f"{spec}: factory returned {type(made).__name__}, not a VAE module")
    return VAE(made, spec=spec, device=device, dtype=dtype)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub's endpoint opens within ``timeout`` seconds.

    The connection is closed at once. The process-wide default socket timeout is neither read nor changed
    (the user's own ``socket.setdefaulttimeout`` stays in force).
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlparse(constants.ENDPOINT)
    if not endpoint.hostname:
        return False
    try:
        port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except (OSError, ValueError):  # no network, DNS failure, refused, timed out; a malformed port
        return False


def _load_hub(repo_id: str, subfolder: str | None):
    from huggingface_hub import snapshot_download

    offline_msg = (f"{repo_id}: the Hugging Face hub cannot be reached and the model is not in the local cache; "
                   f"download it where there is network and pass the local folder or .safetensors file")
    local = None
    try:
        local = snapshot_download(repo_id, local_files_only=True, allow_patterns=["*.json"])
    except Exception:
        local = None
    if local is None:
        if not _hub_reachable():
            raise VAELoadError(offline_msg)
        try:
            local = snapshot_download(repo_id, allow_patterns=["*.json"])
        except Exception as exc:
            raise VAELoadError(f"{repo_id}: {str(exc).splitlines()[0][:200]}") from None
    root = Path(local)
    sub = subfolder if subfolder is not None else ("" if (root / "config.json").exists() else "vae")
    if not (root / sub / "config.json").exists():
        raise VAELoadError(f"{repo_id}: no config.json at its root or in vae/; give subfolder=")
    cls = diffusers_class(json.loads((root / sub / "config.json").read_text()).get("_class_name", "AutoencoderKL"))
    try:
        return cls.from_pretrained(repo_id, subfolder=sub or None, torch_dtype=torch.float32,
                                   local_files_only=not _hub_reachable(), low_cpu_mem_usage=False)
    except Exception as exc:
        raise VAELoadError(f"{repo_id}: {str(exc).splitlines()[0][:200]}") from None
