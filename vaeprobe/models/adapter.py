"""Loading any VAE and driving it through one adapter.

:func:`load_vae` resolves a spec (hub id, local diffusers folder, LDM single file, ``builtin:NAME``,
``package.module:factory`` or a constructed module) to a :class:`VAE`. The adapter's :meth:`VAE.encode` returns a
:class:`Posterior` holding the mean, the clamped log-variance and the *raw* log-variance before diffusers' clamp to
[-30, 20] (Stable Diffusion's spot sits on that clamp); :meth:`VAE.decode` takes raw (unscaled) latents.
Inputs and outputs are float32 images in [-1, 1] whatever the model's dtype; a half-precision encode or decode
that produces NaN/inf is redone in fp32 with a warning.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from vaeprobe.errors import VAELoadError

LOGVAR_CLAMP = (-30.0, 20.0)
"""diffusers' ``DiagonalGaussianDistribution`` clamps the log-variance to this range."""

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


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

    >>> from vaeprobe.models.loading import load_vae
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
        self.decoded = 0  # images decoded through this adapter so far (cost accounting: compare before and after)
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
        self.decoded += int(z.shape[0])
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
