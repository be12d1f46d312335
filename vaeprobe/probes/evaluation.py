"""Latent-space measures of a VAE for diffusion: equivariance, spectrum, noise robustness and latent statistics.

The measures behind ``vaeprobe evaluate`` (and the latent section of ``vaeprobe compare``); definitions, formulas
and sources: docs/evaluate.md. Every function here takes plain tensors (and, where it must decode, a ``decode``
callable such as :meth:`vaeprobe.models.adapter.VAE.decode`) and returns floats, arrays or tensors; nothing is
written anywhere.

Conventions: images are ``[1, 3, H, W]`` tensors in [-1, 1] (the VAE convention), raw latents ``[1, C, h, w]``;
"diffusion units" are ``(z - shift_factor) * scaling_factor``, what a latent diffusion model sees. Image
comparisons go through :mod:`vaeprobe.probes.metrics` (PSNR on [0, 1] images with data range 1, LPIPS AlexNet
v0.1), as ``vaeprobe compare`` does; LPIPS needs images of at least :data:`LPIPS_MIN_SIDE` pixels a side and is
``nan`` below that.

>>> z = torch.zeros(1, 4, 8, 8); z[0, :, ::2, ::2] = 1.0   # a grid of dots: all its power at high frequency
>>> hf_share(z) > 0.5, math.isnan(hf_share(torch.ones(1, 4, 8, 8)))   # a constant has no power to share
(True, True)
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

TRANSFORMS = ("rot90", "rot180", "rot270", "scale0.5", "scale0.75")
"""The equivariance transforms: rotations by 90, 180 and 270 degrees (counter-clockwise, exact on the grid) and
down-scaling by 0.5 and 0.75 (antialiased bilinear, :func:`apply_transform`)."""

NOISE_STDS = (0.05, 0.1, 0.2, 0.5)
"""Standard deviations, in diffusion units, of the Gaussian latent noise of :func:`noise_robustness`."""

HF_CUTOFF = 0.5
""":func:`hf_share` counts the power above this fraction of the grid's Nyquist frequency (0.5 cycles/sample)."""

OUTLIER_STDS = 3.0
""":func:`latent_statistics` counts values further than this many standard deviations from their channel's mean."""

LPIPS_MIN_SIDE = 32
"""LPIPS (AlexNet) needs at least this many pixels on each side; smaller images get ``nan``."""


# -- transforms ------------------------------------------------------------------------------------------------

def _scale_of(name: str) -> float:
    return float(name[len("scale"):])


def transformed_size(h: int, w: int, name: str) -> tuple[int, int]:
    """The spatial size of an ``h x w`` grid after transform ``name``.

    Parameters
    ----------
    h, w : int
        The grid's height and width.
    name : str
        One of :data:`TRANSFORMS` (``rotK`` for K in 90, 180, 270, or ``scaleS`` for any S in (0, 1]).

    Returns
    -------
    (int, int)
        Rotations by 90 and 270 swap the sides; scaling by S gives ``max(1, round(S * side))``.

    Examples
    --------
    >>> transformed_size(32, 24, "rot90"), transformed_size(32, 32, "scale0.75")
    ((24, 32), (24, 24))
    """
    if name in ("rot90", "rot270"):
        return w, h
    if name == "rot180":
        return h, w
    if name.startswith("scale"):
        s = _scale_of(name)
        return max(1, round(s * h)), max(1, round(s * w))
    raise ValueError(f"unknown transform {name!r}; use one of {', '.join(TRANSFORMS)}")


def apply_transform(x: torch.Tensor, name: str, *, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Transform a batch of images or latents ``[B, C, H, W]`` spatially.

    Rotations are exact permutations of the grid (``torch.rot90`` over the last two dimensions, counter-clockwise).
    Scaling resamples by antialiased bilinear interpolation (``torch.nn.functional.interpolate(mode="bilinear",
    antialias=True, align_corners=False)``), the same for a latent and an image, to ``size`` or to
    :func:`transformed_size`.

    Parameters
    ----------
    x : torch.Tensor
        ``[B, C, H, W]``.
    name : str
        One of :data:`TRANSFORMS`.
    size : (int, int), keyword-only
        The output size of a scaling (default :func:`transformed_size`); for an image, the scaled latent's size
        times the VAE's factor, so that decoding the scaled latent gives an image of the same size.

    Returns
    -------
    torch.Tensor
        The transformed batch (same dtype and device).

    Examples
    --------
    >>> x = torch.arange(4.0).reshape(1, 1, 2, 2)
    >>> apply_transform(x, "rot90")[0, 0].tolist()
    [[1.0, 3.0], [0.0, 2.0]]
    >>> apply_transform(torch.ones(1, 2, 8, 8), "scale0.5").shape, float(apply_transform(torch.ones(1, 2, 8, 8),
    ...                                                                                   "scale0.75").mean())
    (torch.Size([1, 2, 4, 4]), 1.0)
    """
    if name.startswith("rot"):
        k = {"rot90": 1, "rot180": 2, "rot270": 3}.get(name)
        if k is None:
            raise ValueError(f"unknown transform {name!r}; use one of {', '.join(TRANSFORMS)}")
        return torch.rot90(x, k, dims=(-2, -1))
    size = size or transformed_size(x.shape[-2], x.shape[-1], name)
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)


# -- comparisons in [0, 1] (as vaeprobe compare measures) ----------------------------------------------------

def _unit(x: torch.Tensor) -> np.ndarray:
    from vaeprobe.data.images import to_unit

    x = x.detach().float().cpu()
    return to_unit(x[0] if x.dim() == 4 else x).permute(1, 2, 0).numpy()


def image_psnr_lpips(a: torch.Tensor, b: torch.Tensor, *, lpips: bool = True) -> tuple[float, float]:
    """PSNR (dB) and LPIPS of two images in [-1, 1], clamped and mapped to [0, 1] as ``vaeprobe compare`` does.

    Parameters
    ----------
    a, b : torch.Tensor
        ``[1, 3, H, W]`` (or ``[3, H, W]``) of the same shape.
    lpips : bool, keyword-only
        Compute LPIPS (:func:`~vaeprobe.probes.metrics.lpips_distance`); ``nan`` when false or when a side is
        under :data:`LPIPS_MIN_SIDE`.

    Returns
    -------
    (float, float)

    Examples
    --------
    >>> p, d = image_psnr_lpips(torch.zeros(1, 3, 16, 16), torch.full((1, 3, 16, 16), 0.2))
    >>> round(p, 2), d != d
    (20.0, True)
    """
    from vaeprobe.probes.metrics import lpips_distance, psnr

    ua, ub = _unit(a), _unit(b)
    d = lpips_distance(ua, ub) if lpips and min(ua.shape[:2]) >= LPIPS_MIN_SIDE else math.nan
    with np.errstate(divide="ignore"):   # identical images: inf dB
        return psnr(ua, ub), d


def equivariance(decode: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, z: torch.Tensor, *,
                 factor: int, transforms: Sequence[str] = TRANSFORMS, lpips: bool = True) -> dict[str, float]:
    """Equivariance errors: ``decode(τ(z))`` against ``τ(x)`` for each transform τ (EQ-VAE's measure).

    Parameters
    ----------
    decode : callable
        Raw latent ``[1, C, h, w]`` to image ``[1, 3, H, W]`` in [-1, 1] (``vae.decode``).
    x : torch.Tensor
        The image ``[1, 3, H, W]`` in [-1, 1].
    z : torch.Tensor
        Its latent ``[1, C, h, w]`` (the posterior mean).
    factor : int, keyword-only
        The VAE's downsampling factor: a scaled image has the scaled latent's size times ``factor``.
    transforms : sequence of str, keyword-only
        From :data:`TRANSFORMS`.
    lpips : bool, keyword-only
        Also LPIPS (see :func:`image_psnr_lpips`).

    Returns
    -------
    dict of str to float
        ``eq_{τ}_psnr`` and ``eq_{τ}_lpips`` per transform. One decode per transform.

    Examples
    --------
    A latent that is the image itself, decoded by the identity, is equivariant to every transform:

    >>> x = torch.rand(1, 3, 16, 16) * 2 - 1
    >>> res = equivariance(lambda z: z, x, x, factor=1, lpips=False)
    >>> sorted(res)[:2], res["eq_rot90_psnr"], res["eq_scale0.5_psnr"]
    (['eq_rot180_lpips', 'eq_rot180_psnr'], inf, inf)
    """
    out = {}
    for name in transforms:
        zt = apply_transform(z, name)
        size = (zt.shape[-2] * factor, zt.shape[-1] * factor) if name.startswith("scale") else None
        xt = apply_transform(x.to(torch.float32), name, size=size)
        p, d = image_psnr_lpips(decode(zt), xt, lpips=lpips)
        out[f"eq_{name}_psnr"], out[f"eq_{name}_lpips"] = p, d
    return out


# -- spectrum -------------------------------------------------------------------------------------------------

def _dct_matrix(n: int, *, dtype=torch.float64, device=None) -> torch.Tensor:
    """The orthonormal DCT-II matrix ``D[k, i] = sqrt(2/n) c_k cos(pi k (2i + 1) / (2n))``, ``c_0 = 1/sqrt(2)``."""
    k = torch.arange(n, dtype=dtype, device=device)[:, None]
    i = torch.arange(n, dtype=dtype, device=device)[None, :]
    d = torch.cos(math.pi * k * (2 * i + 1) / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d


def dct_power(x: torch.Tensor) -> torch.Tensor:
    """Spatial power per channel: squared orthonormal 2-D DCT-II coefficients, each channel's mean removed.

    Parameters
    ----------
    x : torch.Tensor
        ``[C, h, w]`` or ``[B, C, h, w]``.

    Returns
    -------
    torch.Tensor
        float64, the same shape; entry ``[..., ky, kx]`` is the power at frequency :func:`dct_frequency`. It sums
        to the channel's variance times ``h * w`` (Parseval); the DC term is 0.

    Examples
    --------
    >>> p = dct_power(torch.randn(2, 5, 7))
    >>> float(p[..., 0, 0].abs().max()) < 1e-20
    True
    """
    x = x.detach().to(torch.float64)
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    dh, dw = _dct_matrix(x.shape[-2], device=x.device), _dct_matrix(x.shape[-1], device=x.device)
    return (dh @ x @ dw.T).pow(2)


def dct_frequency(h: int, w: int) -> torch.Tensor:
    """Radial frequency of each DCT-II coefficient of an ``h x w`` grid, in cycles per sample.

    Coefficient ``(ky, kx)`` is a cosine of ``ky / (2h)`` cycles per sample down and ``kx / (2w)`` across; its
    radial frequency is ``sqrt((ky / 2h)^2 + (kx / 2w)^2)``. The grid's Nyquist frequency is 0.5.

    Parameters
    ----------
    h, w : int

    Returns
    -------
    torch.Tensor
        ``[h, w]``, float64.

    Examples
    --------
    >>> f = dct_frequency(4, 4)
    >>> float(f[0, 2]), round(float(f[3, 3]), 3)
    (0.25, 0.53)
    """
    fy = torch.arange(h, dtype=torch.float64)[:, None] / (2 * h)
    fx = torch.arange(w, dtype=torch.float64)[None, :] / (2 * w)
    return torch.sqrt(fy ** 2 + fx ** 2)


def hf_share(x: torch.Tensor, *, cutoff: float = HF_CUTOFF) -> float:
    """Share of the spatial power above ``cutoff`` times the Nyquist frequency of the grid.

    Each channel's mean is removed; the power (:func:`dct_power`) of all channels is pooled, so a channel weighs by
    its variance. Dividing by the total makes it independent of the units (a latent's shift and scale do not
    change it).

    Parameters
    ----------
    x : torch.Tensor
        ``[C, h, w]`` or ``[B, C, h, w]``.
    cutoff : float, keyword-only
        Fraction of the Nyquist frequency (default :data:`HF_CUTOFF`, i.e. 0.25 cycles per sample).

    Returns
    -------
    float
        In [0, 1]; ``nan`` for a constant input (no power).

    Examples
    --------
    >>> i = torch.arange(16.0)
    >>> low = torch.cos(math.pi * (2 * i + 1) / 32).expand(3, 16, 16)   # the first DCT cosine: one half-period
    >>> checker = ((i[:, None] + i[None, :]) % 2 * 2 - 1).expand(3, 16, 16)
    >>> round(hf_share(low), 6), round(hf_share(checker), 3)
    (0.0, 0.999)
    """
    p = dct_power(x)
    total = float(p.sum())
    if total <= 0:
        return math.nan
    high = dct_frequency(p.shape[-2], p.shape[-1]).to(p.device) > cutoff * 0.5
    return float(p[..., high].sum()) / total


SPECTRUM_BINS = 8
"""Bins of :func:`radial_spectrum` between frequency 0 and the grid's Nyquist frequency (one more bin holds the
corners beyond it)."""


def radial_spectrum(x: torch.Tensor, *, bins: int = SPECTRUM_BINS,
                    density: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The radially binned spatial power spectrum, as shares of the total power (channels pooled, means removed).

    Parameters
    ----------
    x : torch.Tensor
        ``[C, h, w]`` or ``[B, C, h, w]``.
    bins : int, keyword-only
        Equal bins ``(lo, hi]`` of radial frequency between 0 and 0.5 cycles per sample; the last bin also takes
        the corner frequencies above 0.5.
    density : bool, keyword-only
        Divide each bin's share of the power by its share of the grid's frequencies (DCT coefficients): the
        relative power density, 1 in every bin for white noise, which does not grow with a bin's size.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        Bin centres in cycles per sample and the share of power in each bin (summing to 1), or the relative
        density; ``nan`` for a bin that holds no frequency of the grid, and all ``nan`` for a constant input.

    Examples
    --------
    >>> f, s = radial_spectrum(torch.randn(4, 16, 16), bins=4)
    >>> f.tolist(), round(float(s.sum()), 6)
    ([0.0625, 0.1875, 0.3125, 0.4375], 1.0)
    >>> np.isnan(radial_spectrum(torch.randn(4, 4, 4), bins=8)[1]).tolist()[:3]   # steps of 1/8: none in bin 0
    [True, False, False]
    >>> d = radial_spectrum(torch.randn(64, 32, 32), bins=4, density=True)[1]   # white noise: flat, about 1
    >>> bool(np.all(np.abs(d - 1) < 0.1))
    True
    """
    p = dct_power(x)
    freq = dct_frequency(p.shape[-2], p.shape[-1]).flatten().numpy()
    power = p.reshape(-1, p.shape[-2] * p.shape[-1]).sum(0).cpu().numpy()
    live = freq > 0   # the DC term is the removed mean
    # bins are (lo, hi]: a frequency of exactly 0.25 is not above half the Nyquist frequency, as in hf_share
    idx = np.clip(np.ceil(freq / 0.5 * bins - 1e-9).astype(int) - 1, 0, bins - 1)
    shares = np.bincount(idx[live], weights=power[live], minlength=bins)[:bins]
    count = np.bincount(idx[live], minlength=bins)[:bins]
    total = shares.sum()
    centres = (np.arange(bins) + 0.5) * 0.5 / bins
    shares = shares / total if total > 0 else np.full(bins, math.nan)
    if density:
        shares = shares / np.maximum(count, 1) * count.sum()
    return centres, np.where(count > 0, shares, math.nan)


def image_at_latent_size(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The image downsampled to the latent grid's size by antialiased bilinear resampling (as
    :func:`apply_transform` scales), so that its spectrum compares with the latent's.

    Parameters
    ----------
    x : torch.Tensor
        ``[B, 3, H, W]``.
    size : (int, int)
        The latent's ``(h, w)``.

    Returns
    -------
    torch.Tensor
        ``[B, 3, h, w]``.

    Examples
    --------
    >>> image_at_latent_size(torch.zeros(1, 3, 64, 32), (8, 4)).shape
    torch.Size([1, 3, 8, 4])
    """
    return F.interpolate(x.to(torch.float32), size=tuple(size), mode="bilinear", antialias=True,
                         align_corners=False)


# -- noise robustness -----------------------------------------------------------------------------------------

def noise_robustness(decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, *, scaling_factor: float,
                     stds: Sequence[float] = NOISE_STDS, seed: int = 0, clean: torch.Tensor | None = None,
                     lpips: bool = True) -> dict[str, float]:
    """How much the decode changes for Gaussian latent noise of std S in diffusion units.

    One standard-normal draw ``e`` (seeded, on the CPU) is used for every S: the decoded latent is
    ``z + S * e / scaling_factor`` (noise of std S in the diffusion model's units ``(z - shift) * scale``).

    Parameters
    ----------
    decode : callable
        Raw latent to image in [-1, 1] (``vae.decode``).
    z : torch.Tensor
        The raw latent ``[1, C, h, w]``.
    scaling_factor : float, keyword-only
        The VAE's ``scaling_factor``.
    stds : sequence of float, keyword-only
        The values of S (default :data:`NOISE_STDS`).
    seed : int, keyword-only
        Seed of the noise draw.
    clean : torch.Tensor, keyword-only
        ``decode(z)`` when already computed (saves a decode).
    lpips : bool, keyword-only
        Also LPIPS against the clean decode (see :func:`image_psnr_lpips`).

    Returns
    -------
    dict of str to float
        ``noise{S}_rms``: the root-mean-square change of the decode in [-1, 1] units (not clamped);
        ``noise{S}_lpips``: LPIPS of the noisy decode against the clean one (both clamped to [-1, 1]). One decode
        per S (plus one without ``clean``).

    Examples
    --------
    The identity decoder passes the noise through, so the change is the noise itself, S / scale:

    >>> res = noise_robustness(lambda z: z, torch.zeros(1, 4, 64, 64), scaling_factor=0.5, lpips=False)
    >>> [round(res[f"noise{s}_rms"] / s, 1) for s in NOISE_STDS]
    [2.0, 2.0, 2.0, 2.0]
    """
    if clean is None:
        clean = decode(z)
    clean = clean.detach().float()
    gen = torch.Generator().manual_seed(int(seed))
    e = torch.randn(tuple(z.shape), generator=gen, dtype=torch.float32).to(z.device)
    out = {}
    for s in stds:
        noisy = decode(z + (float(s) / float(scaling_factor)) * e).detach().float()
        d = (noisy - clean.to(noisy.device)).double()
        out[f"noise{s:g}_rms"] = float(d.pow(2).mean().sqrt())
        out[f"noise{s:g}_lpips"] = image_psnr_lpips(noisy, clean, lpips=lpips)[1]
    return out


# -- latent statistics ----------------------------------------------------------------------------------------

def participation_ratio(cov: torch.Tensor | np.ndarray) -> float:
    """Effective rank of a covariance matrix as its participation ratio ``(sum λ)^2 / sum λ^2``.

    Equal to ``trace(C)^2 / ||C||_F^2``: ``k`` for ``k`` equal eigenvalues and zeros, 1 for rank one.

    Parameters
    ----------
    cov : torch.Tensor or numpy.ndarray
        A symmetric positive semi-definite ``[C, C]`` matrix.

    Returns
    -------
    float
        In [1, C]; ``nan`` for the zero matrix.

    Examples
    --------
    >>> participation_ratio(np.diag([1.0, 1.0, 1.0, 0.0])), round(participation_ratio(np.diag([4.0, 1.0])), 4)
    (3.0, 1.4706)
    """
    c = torch.as_tensor(np.asarray(cov), dtype=torch.float64)
    frob = float(c.pow(2).sum())
    return float(torch.trace(c)) ** 2 / frob if frob > 0 else math.nan


def channel_covariance(z: torch.Tensor) -> torch.Tensor:
    """The channels' covariance over the spatial positions, ``[C, C]`` (float64, divided by the count).

    Parameters
    ----------
    z : torch.Tensor
        ``[C, h, w]`` or ``[1, C, h, w]``.

    Returns
    -------
    torch.Tensor

    Examples
    --------
    >>> channel_covariance(torch.stack([torch.tensor([1.0, -1.0]), torch.tensor([2.0, -2.0])])[..., None]).tolist()
    [[1.0, 2.0], [2.0, 4.0]]
    """
    z = z.detach().to(torch.float64).cpu()
    flat = z.reshape(z.shape[-3], -1)
    flat = flat - flat.mean(1, keepdim=True)
    return flat @ flat.T / flat.shape[1]


def latent_statistics(z: torch.Tensor, *, outlier_stds: float = OUTLIER_STDS) -> dict[str, float]:
    """Statistics of one latent in diffusion units (pass ``(z - shift) * scale``).

    Parameters
    ----------
    z : torch.Tensor
        ``[C, h, w]`` or ``[1, C, h, w]``, in the diffusion model's units.
    outlier_stds : float, keyword-only
        A value is an outlier when it is further than this many standard deviations from its channel's mean.

    Returns
    -------
    dict of str to float
        ``latent_mean_abs``: the mean over channels of |channel mean| (0 for a centred latent);
        ``latent_std``: the standard deviation of all values (1 for a latent scaled as diffusion models want);
        ``latent_outlier_share``: the share of values beyond ± ``outlier_stds`` of their channel's standard
        deviation (0.0027 for Gaussian channels); ``latent_eff_rank``: the participation ratio of the channel
        covariance (:func:`participation_ratio`); ``latent_channel_corr``: the mean |correlation| between two
        different channels (``nan`` with one channel).

    Examples
    --------
    >>> z = torch.zeros(2, 10, 10); z[0] = 1.0; z[1, 0, 0] = 100.0
    >>> s = latent_statistics(z)
    >>> s["latent_mean_abs"], s["latent_outlier_share"], s["latent_eff_rank"]
    (1.0, 0.005, 1.0)
    """
    z = z.detach().to(torch.float64).cpu()
    z = z.reshape(z.shape[-3], -1)
    mu = z.mean(1, keepdim=True)
    sd = z.std(1, unbiased=False, keepdim=True)
    outliers = ((z - mu).abs() > outlier_stds * sd) & (sd > 0)
    cov = channel_covariance(z[..., None])
    var = torch.diag(cov)
    corr = math.nan
    if z.shape[0] > 1:
        live = var > 0
        denom = torch.sqrt(var[:, None] * var[None, :])
        r = torch.where(denom > 0, cov / denom.clamp_min(1e-300), torch.zeros_like(cov))
        off = ~torch.eye(z.shape[0], dtype=torch.bool) & live[:, None] & live[None, :]
        corr = float(r[off].abs().mean()) if off.any() else math.nan
    return {"latent_mean_abs": float(mu.abs().mean()), "latent_std": float(z.std(unbiased=False)),
            "latent_outlier_share": float(outliers.double().mean()), "latent_eff_rank": participation_ratio(cov),
            "latent_channel_corr": corr}


def kl_per_position(mean: torch.Tensor, logvar: torch.Tensor) -> float:
    """KL divergence of the diagonal Gaussian posterior from N(0, I) in the VAE's raw units, per latent position.

    ``0.5 * sum_c (mu^2 + sigma^2 - 1 - log sigma^2)`` at each position (nats), averaged over the positions: the
    KL term of the VAE's training loss divided by the number of latent cells (the ``kl`` map of
    :func:`~vaeprobe.probes.latents.latent_maps`, averaged).

    Parameters
    ----------
    mean, logvar : torch.Tensor
        ``[C, h, w]`` or ``[1, C, h, w]``: the posterior's mean and (clamped) log-variance.

    Returns
    -------
    float

    Examples
    --------
    >>> kl_per_position(torch.zeros(4, 2, 2), torch.zeros(4, 2, 2)), kl_per_position(torch.ones(4, 2, 2),
    ...                                                                              torch.zeros(4, 2, 2))
    (0.0, 2.0)
    """
    mu, lv = mean.detach().to(torch.float64), logvar.detach().to(torch.float64)
    kl = 0.5 * (mu.pow(2) + lv.exp() - 1.0 - lv)
    return float(kl.sum(-3).mean())


def latent_pca(z: torch.Tensor, *, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """The latent projected on its channels' first ``k`` principal components.

    Parameters
    ----------
    z : torch.Tensor
        ``[C, h, w]`` or ``[1, C, h, w]``.
    k : int, keyword-only
        Components (at most C; fewer channels give fewer).

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        The maps ``[k, h, w]`` (each component's sign chosen so that its largest loading is positive) and each
        component's share of the total variance.

    Examples
    --------
    >>> pattern = torch.randn(6, 6)
    >>> maps, shares = latent_pca(torch.stack([pattern, 2 * pattern, -pattern]), k=2)
    >>> maps.shape, round(float(shares[0]), 6)
    ((2, 6, 6), 1.0)
    """
    z = z.detach().to(torch.float64).cpu()
    c, h, w = z.shape[-3:]
    flat = z.reshape(c, -1)
    flat = flat - flat.mean(1, keepdim=True)
    evals, evecs = torch.linalg.eigh(flat @ flat.T / flat.shape[1])
    order = torch.argsort(evals, descending=True)[:min(k, c)]
    vecs = evecs[:, order]
    vecs = vecs * torch.sign(vecs.gather(0, vecs.abs().argmax(0, keepdim=True)))
    total = float(evals.clamp_min(0).sum())
    shares = (evals[order].clamp_min(0) / total).numpy() if total > 0 else np.full(len(order), math.nan)
    return (vecs.T @ flat).reshape(-1, h, w).numpy(), shares


# -- everything for one VAE and one image --------------------------------------------------------------------

LATENT_METRICS = (*(f"eq_{t}_{m}" for t in TRANSFORMS for m in ("psnr", "lpips")), "latent_hf_share",
                  "image_hf_share", *(f"noise{s:g}_{m}" for s in NOISE_STDS for m in ("rms", "lpips")),
                  "latent_mean_abs", "latent_std", "latent_outlier_share", "latent_eff_rank", "latent_channel_corr",
                  "kl", "spot_rate", "norm_ratio_max")
"""The metrics of :func:`latent_measures`, in order (``kl`` only for a VAE with a posterior)."""

METRICS = ("psnr", "ssim", "lpips", *LATENT_METRICS)
"""Every metric of ``vaeprobe evaluate``, in the order of its tables."""


def latent_measures(vae, x: torch.Tensor, post=None, *, rec: torch.Tensor | None = None, seed: int = 0,
                    lpips: bool = True, spectra: dict | None = None) -> dict[str, float]:
    """Every latent measure of one VAE on one image (:data:`LATENT_METRICS`).

    Parameters
    ----------
    vae : vaeprobe.models.adapter.VAE
        The model (its ``decode``, ``factor``, ``scaling_factor`` and ``shift_factor``).
    x : torch.Tensor
        The image ``[1, 3, H, W]`` in [-1, 1], sides multiples of ``vae.factor``.
    post : vaeprobe.models.adapter.Posterior, optional
        ``vae.encode(x)`` when already computed.
    rec : torch.Tensor, keyword-only
        ``vae.decode(post.mean)`` when already computed.
    seed : int, keyword-only
        Seed of the latent noise (:func:`noise_robustness`).
    lpips : bool, keyword-only
        Compute the LPIPS measures (``nan`` otherwise).
    spectra : dict, keyword-only
        When given, filled with ``latent`` and ``image``: the :func:`radial_spectrum` (``density=True``) of the
        latent and of the image at the latent's size, and ``pca``: :func:`latent_pca` of the latent in diffusion units.

    Returns
    -------
    dict of str to float
        Costs 10 decodes (the reconstruction when ``rec`` is not given, 5 transforms of which two are smaller, 4
        noise levels) and 9 LPIPS evaluations.

    Examples
    --------
    >>> from vaeprobe.models.loading import load_vae
    >>> res = latent_measures(load_vae("builtin:tiny-random"), torch.zeros(1, 3, 64, 64), lpips=False)
    >>> [m for m in LATENT_METRICS if m not in res], res["spot_rate"]
    ([], 0.0)
    """
    from vaeprobe.probes.latents import find_spots, latent_maps

    if post is None:
        post = vae.encode(x)
    z = post.mean
    if rec is None:
        rec = vae.decode(z)
    zd = vae.to_diffusion(z.detach().float())
    out = equivariance(vae.decode, x, z, factor=vae.factor, lpips=lpips)
    small = image_at_latent_size(x, tuple(z.shape[-2:]))
    out["latent_hf_share"], out["image_hf_share"] = hf_share(zd), hf_share(small)
    out.update(noise_robustness(vae.decode, z, scaling_factor=vae.scaling_factor, seed=seed, clean=rec,
                                lpips=lpips))
    out.update(latent_statistics(zd))
    if post.logvar is not None:
        out["kl"] = kl_per_position(post.mean, post.logvar)
    maps = latent_maps(post)[0]
    out["spot_rate"] = float(bool(find_spots(maps).is_spot.any()))
    out["norm_ratio_max"] = float(maps.norm_ratio.max())
    if spectra is not None:
        spectra["latent"] = radial_spectrum(zd, density=True)
        spectra["image"] = radial_spectrum(small, density=True)
        spectra["pca"] = latent_pca(zd)
    return {m: out[m] for m in LATENT_METRICS if m in out}
