"""Loading any VAE and driving it through one adapter.

:func:`load_vae` resolves a spec (hub id, local diffusers folder, LDM single file, ``builtin:NAME``,
``package.module:factory`` or a constructed module) to a :class:`VAE`. The adapter's :meth:`VAE.encode` returns a
:class:`Posterior` holding the mean, the clamped log-variance and the *raw* log-variance before diffusers' clamp to
[-30, 20] (Stable Diffusion's spot sits on that clamp); :meth:`VAE.decode` takes raw (unscaled) latents.
Inputs and outputs are float32 images in [-1, 1] whatever the model's dtype; a half-precision encode or decode
that produces NaN/inf is redone in fp32 with a warning.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import torch
from torch import nn

from .errors import VAELoadError

LOGVAR_CLAMP = (-30.0, 20.0)
"""diffusers' ``DiagonalGaussianDistribution`` clamps the log-variance to this range."""

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_WEIGHT_SUFFIXES = {".safetensors", ".ckpt", ".pt", ".pth", ".bin"}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"fp16"``/``"bf16"``/``"fp32"`` (or a torch dtype, or None) to a torch dtype.

    >>> parse_dtype("bf16")
    torch.bfloat16
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise VAELoadError(f"unknown dtype {dtype!r}; use fp32, fp16 or bf16") from None


@dataclass
class Posterior:
    """The encoder's output for a batch: tensors ``[B, C, h, w]`` in float32.

    ``logvar`` is clamped to :data:`LOGVAR_CLAMP` as diffusers does; ``raw_logvar`` is the value before the
    clamp. Deterministic encoders (AutoencoderTiny) have ``logvar = raw_logvar = None``.
    """

    mean: torch.Tensor
    logvar: torch.Tensor | None
    raw_logvar: torch.Tensor | None

    @property
    def deterministic(self) -> bool:
        return self.logvar is None

    @property
    def std(self) -> torch.Tensor:
        if self.logvar is None:
            return torch.zeros_like(self.mean)
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A latent drawn from the posterior (the mean for a deterministic encoder)."""
        if self.logvar is None:
            return self.mean
        noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype).to(self.mean.device)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def at_clamp_floor(self, tol: float = 1e-3) -> torch.Tensor:
        """Boolean ``[B, C, h, w]``: raw log-variance at or below the lower clamp (-30)."""
        if self.raw_logvar is None:
            return torch.zeros_like(self.mean, dtype=torch.bool)
        return self.raw_logvar <= LOGVAR_CLAMP[0] + tol


class VAE:
    """Adapter around a VAE module with the diffusers ``encode``/``decode`` interface.

    Attributes: ``model`` (the wrapped module), ``spec`` (how it was loaded), ``latent_channels``, ``factor``
    (downsampling), ``scaling_factor``/``shift_factor`` (diffusion latents are ``(z - shift) * scale``),
    ``device``, ``dtype``. ``ground_truth`` is set for planted-spot control models.

    >>> vae = load_vae("builtin:tiny-random")
    >>> x = torch.zeros(1, 3, 32, 32)
    >>> post = vae.encode(x)
    >>> tuple(post.mean.shape), vae.factor, vae.latent_channels
    ((1, 4, 4, 4), 8, 4)
    >>> tuple(vae.decode(post.mean).shape)
    (1, 3, 32, 32)
    """

    def __init__(self, model: nn.Module, spec: str = "<module>", device=None, dtype=None):
        if not (hasattr(model, "encode") and hasattr(model, "decode")):
            raise VAELoadError(f"{spec}: {type(model).__name__} has no encode/decode methods; wrap it so it has the "
                               f"diffusers interface (encode(x) -> .latent_dist, decode(z) -> .sample)")
        self.model = model.eval()
        self.spec = spec
        self.ground_truth: Callable | None = getattr(model, "ground_truth", None)
        self.to(device=device, dtype=dtype)
        self._probe: tuple[int, int] | None = None

    # -- placement ---------------------------------------------------------------------------------------------
    def to(self, device=None, dtype=None) -> "VAE":
        dtype = parse_dtype(dtype)
        if device is not None or dtype is not None:
            self.model.to(device=device, dtype=dtype)
        p = next(self.model.parameters(), None)
        self.device = p.device if p is not None else torch.device("cpu")
        self.dtype = p.dtype if p is not None else torch.float32
        return self

    # -- geometry and latent scaling ---------------------------------------------------------------------------
    @property
    def config(self) -> dict:
        """The model's configuration as a plain dict, whatever form it has (see :func:`config_dict`)."""
        return config_dict(getattr(self.model, "config", None))

    def _geometry(self) -> tuple[int, int]:
        if self._probe is None:
            side = 64
            with torch.no_grad():
                mean = self._encode_mean_only(torch.zeros(1, 3, side, side))
            self._probe = (int(mean.shape[1]), side // int(mean.shape[-1]))
        return self._probe

    @property
    def latent_channels(self) -> int:
        return self._geometry()[0]

    @property
    def factor(self) -> int:
        return self._geometry()[1]

    @property
    def scaling_factor(self) -> float:
        return self._config_value("scaling_factor", 1.0)

    @property
    def shift_factor(self) -> float:
        return self._config_value("shift_factor", 0.0)

    def _config_value(self, key: str, default: float) -> float:
        cfg = self.config
        value = cfg[key] if key in cfg else getattr(self.model, key, default)
        try:
            return float(value if value is not None else default)
        except (TypeError, ValueError):
            raise VAELoadError(f"{self.spec}: config {key}={value!r} is not a number; fix the model's config or "
                               f"remove the key") from None

    def to_diffusion(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latent to the diffusion model's space: ``(z - shift) * scale``."""
        return (z - self.shift_factor) * self.scaling_factor

    def from_diffusion(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_diffusion`."""
        return latents / self.scaling_factor + self.shift_factor

    # -- encode / decode ---------------------------------------------------------------------------------------
    def _encode_mean_only(self, x: torch.Tensor) -> torch.Tensor:
        return self._encode_raw(x)[0]

    def _encode_raw(self, x: torch.Tensor):
        out = self.model.encode(x.to(self.device, self.dtype, copy=True))  # a copy: models may write into inputs
        dist = getattr(out, "latent_dist", None)
        if dist is None and isinstance(out, (tuple, list)) and out and hasattr(out[0], "mean"):
            dist = out[0]
        if dist is not None:
            params = getattr(dist, "parameters", None)
            if params is not None and params.shape[1] == 2 * dist.mean.shape[1]:
                mean, raw = torch.chunk(params, 2, dim=1)
            else:
                mean, raw = dist.mean, getattr(dist, "logvar", None)
            if getattr(dist, "deterministic", False):
                raw = None
            return mean, raw
        latents = getattr(out, "latents", None)
        if latents is None:
            latents = out[0] if isinstance(out, (tuple, list)) else out
        if not isinstance(latents, torch.Tensor):
            raise VAELoadError(f"{self.spec}: encode() returned {type(out).__name__}; expected a latent_dist, "
                               f"latents or a tensor")
        return latents, None

    def encode(self, x: torch.Tensor) -> Posterior:
        """Encode images ``[B, 3, H, W]`` in [-1, 1] to a :class:`Posterior` (float32 tensors)."""
        with torch.no_grad():
            mean, raw = self._encode_raw(x)
            if self.dtype in (torch.float16, torch.bfloat16) and not _finite(mean, raw):
                mean, raw = self._in_fp32(lambda: self._encode_raw(x), "encode")
        mean = mean.float()
        if raw is None:
            return Posterior(mean, None, None)
        raw = raw.float()
        return Posterior(mean, raw.clamp(*LOGVAR_CLAMP), raw)

    def decode(self, z: torch.Tensor, grad: bool = False) -> torch.Tensor:
        """Decode raw latents ``[B, C, h, w]`` to float32 images in [-1, 1] (not clipped).

        ``grad=True`` keeps the autograd graph (for Jacobian probes); otherwise runs under ``no_grad``.
        """
        ctx = torch.enable_grad() if grad else torch.no_grad()
        with ctx:
            out = self._decode_raw(z)
            if self.dtype in (torch.float16, torch.bfloat16) and not _finite(out):
                out = self._in_fp32(lambda: self._decode_raw(z), "decode")
        return out.float()

    def _decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        out = self.model.decode(z.to(self.device, self.dtype, copy=True))  # a copy: models may write into inputs
        sample = getattr(out, "sample", None)
        if sample is None:
            sample = out[0] if isinstance(out, (tuple, list)) else out
        return sample

    def _in_fp32(self, fn, what: str):
        warnings.warn(f"{self.spec}: {what} in {self.dtype} produced NaN/inf; redone in float32", RuntimeWarning,
                      stacklevel=3)
        old = self.dtype
        self.model.to(torch.float32)
        self.dtype = torch.float32
        try:
            return fn()
        finally:
            self.model.to(old)
            self.dtype = old

    def reconstruct(self, x: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
        """Encode then decode (the posterior mean unless ``sample=True``)."""
        post = self.encode(x)
        return self.decode(post.sample(generator) if sample else post.mean)

    def info(self) -> dict[str, Any]:
        """A JSON-able description of the model (recorded in every run directory)."""
        return {"spec": self.spec, "class": type(self.model).__name__, "latent_channels": self.latent_channels,
                "factor": self.factor, "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor,
                "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "parameters": sum(p.numel() for p in self.model.parameters()),
                "has_ground_truth": self.ground_truth is not None}

    def __repr__(self) -> str:
        return f"VAE({self.spec!r}, {type(self.model).__name__}, device={self.device}, dtype={self.dtype})"


def config_dict(cfg: Any) -> dict:
    """A model configuration as a plain dict: a diffusers ``FrozenDict`` or any mapping, a dataclass, a
    ``types.SimpleNamespace`` or any object with attributes (its public, non-callable ones), or ``None``.

    >>> from types import SimpleNamespace
    >>> config_dict(SimpleNamespace(latent_channels=32, scaling_factor=1.0))
    {'latent_channels': 32, 'scaling_factor': 1.0}
    >>> config_dict(None), config_dict(42)
    ({}, {})
    """
    import dataclasses
    from collections.abc import Mapping

    if cfg is None:
        return {}
    if isinstance(cfg, Mapping):
        return {str(k): v for k, v in cfg.items()}
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    attrs = getattr(cfg, "__dict__", None)
    if isinstance(attrs, dict):
        return {k: v for k, v in attrs.items() if not k.startswith("_") and not callable(v)}
    return {}


def _finite(*tensors) -> bool:
    return all(t is None or bool(torch.isfinite(t).all()) for t in tensors)


# -- loading ---------------------------------------------------------------------------------------------------
def load_vae(spec: Any, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
             config: dict | str | None = None, subfolder: str | None = None) -> VAE:
    """Load a VAE from any supported spec and wrap it in a :class:`VAE` adapter.

    ``spec``: a hub id (``stabilityai/sd-vae-ft-mse``; a pipeline repo's ``vae`` subfolder is found by itself),
    a local diffusers folder (model or whole pipeline, ``AutoencoderKL`` or ``AutoencoderTiny``), an LDM single
    file (``.safetensors``/``.ckpt``; give ``config`` or it is inferred from shapes), a published TAESD-family
    pair (a folder holding ``NAME_encoder.pth`` and ``NAME_decoder.pth``, one of those files, or the pair as a
    tuple; :mod:`vaeprobe.taesd`), ``builtin:NAME``, ``package.module:factory``, an ``nn.Module`` with the
    diffusers interface (``encode(x)`` giving ``.latent_dist`` or ``.latents``, ``decode(z)`` giving ``.sample``;
    any ``config``: a dict, a dataclass, a namespace or none), or a :class:`VAE` (moved to ``device``/``dtype``).

    >>> load_vae("builtin:tiny-random", dtype="fp32").dtype
    torch.float32
    """
    dtype = parse_dtype(dtype)
    if isinstance(spec, VAE):
        return spec.to(device=device, dtype=dtype)
    if isinstance(spec, nn.Module):
        return VAE(spec, spec=type(spec).__name__, device=device, dtype=dtype)
    if isinstance(spec, (tuple, list)) and len(spec) == 2 and all(isinstance(p, (str, os.PathLike)) for p in spec):
        from .taesd import load_taesd

        missing = [str(p) for p in spec if not Path(p).expanduser().is_file()]
        if missing:
            raise VAELoadError(f"{', '.join(missing)}: no such file (an encoder/decoder pair needs both)")
        model = load_taesd(*(Path(p).expanduser() for p in spec))
        return VAE(model, spec=" + ".join(str(p) for p in spec), device=device, dtype=dtype)
    if not isinstance(spec, (str, os.PathLike)):
        raise VAELoadError(f"cannot load a VAE from a {type(spec).__name__}; pass a path, hub id or builtin:NAME")
    s = str(spec)
    if s.startswith("builtin:"):
        from .zoo import load_builtin

        return VAE(load_builtin(s[len("builtin:"):]), spec=s, device=device, dtype=dtype)
    path = Path(s).expanduser()
    if path.exists():
        return VAE(_load_path(path, config, subfolder), spec=s, device=device, dtype=dtype)
    if _FACTORY.match(s):
        return _load_factory(s, device, dtype)
    if Path(s).suffix in _WEIGHT_SUFFIXES:
        raise VAELoadError(f"{s}: no such file")
    if _HUB_ID.match(s):
        return VAE(_load_hub(s, subfolder), spec=s, device=device, dtype=dtype)
    if Path(s).suffix in _WEIGHT_SUFFIXES or "/" in s or os.sep in s:
        raise VAELoadError(f"{s}: no such file or folder")
    raise VAELoadError(f"{s!r} is not a file, folder, builtin:NAME, package.module:factory or hub id (owner/name)")


def _diffusers_class(name: str):
    import diffusers

    if not name.startswith("Autoencoder") or not hasattr(diffusers, name):
        raise VAELoadError(f"config names class {name!r}, which is not a diffusers autoencoder")
    return getattr(diffusers, name)


def _load_folder(folder: Path, subfolder: str | None):
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
    cls = _diffusers_class(cls_name)
    try:
        return cls.from_pretrained(str(folder), torch_dtype=torch.float32, local_files_only=True,
                                   low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as exc:
        raise VAELoadError(f"{folder}: {str(exc).splitlines()[0][:200]}") from None


def _load_path(path: Path, config, subfolder):
    from .taesd import find_pair, load_taesd

    if path.is_dir() and not subfolder and not (path / "config.json").exists() and (pair := find_pair(path)):
        return load_taesd(*pair)
    if path.is_dir():
        return _load_folder(path, subfolder)
    if (pair := find_pair(path)) is not None:
        return load_taesd(*pair)
    if path.suffix not in _WEIGHT_SUFFIXES:
        raise VAELoadError(f"{path}: expected a diffusers folder or a weights file ({', '.join(sorted(_WEIGHT_SUFFIXES))})")
    from .ldm import load_ldm_vae

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
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(constants.ENDPOINT).hostname or ""
    try:
        socket.setdefaulttimeout(timeout)
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False
    finally:
        socket.setdefaulttimeout(None)


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
    cls = _diffusers_class(json.loads((root / sub / "config.json").read_text()).get("_class_name", "AutoencoderKL"))
    try:
        return cls.from_pretrained(repo_id, subfolder=sub or None, torch_dtype=torch.float32,
                                   local_files_only=not _hub_reachable(), low_cpu_mem_usage=False)
    except Exception as exc:
        raise VAELoadError(f"{repo_id}: {str(exc).splitlines()[0][:200]}") from None
