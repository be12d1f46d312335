"""Response measures: how a perturbed decode ``decode(z')`` differs from the reference ``decode(z)``.

Everything here is a pure function of plain tensors: the reference image ``[3, H, W]`` (or ``[1, 3, H, W]``),
a batch of perturbed decodes ``[N, 3, H, W]`` in roughly [-1, 1], the :class:`~vaeprobe.probes.perturb.Site` behind
each one and the VAE's downsampling ``factor`` (pixel ``(y, x)`` belongs to latent cell
``(y // factor, x // factor)``). :func:`measure` returns one dict of floats per perturbed image, keyed by measure
name:

============== ==================================================================================================
``l2``         mean squared change over all pixels and channels
``l1``         mean absolute change
``psnr``       dB with data range 2 (images in [-1, 1]); ``inf`` when nothing changed
``ssim``       :func:`vaeprobe.probes.metrics.ssim` after mapping to [0, 1] and clipping
``lpips``      LPIPS distance (slow; off by default)
``far_l2``     mean squared change over the site's far field
``far_fraction`` share of the change energy (sum of squared change) inside the far field; nan if no change
``radius90``   smallest radius R (latent cells, Chebyshev) whose pixels hold >= 90% of the energy; nan if none
``far_dr/dg/db`` mean colour shift (perturbed - reference) over the far field, per RGB channel
``far_dy``     the same for BT.601 luma (:data:`vaeprobe.data.images.LUMA_WEIGHTS` on the [-1, 1] values)
============== ==================================================================================================

The far field is :func:`vaeprobe.probes.geometry.far_mask`: pixels whose latent cell is more than ``radius`` cells
(Chebyshev distance) from every cell of the site; ``radius90`` uses :func:`~vaeprobe.probes.geometry.cell_distance`.
Far-field measures are nan when the far field is empty.
:func:`global_effect_ratio` compares ``far_l2`` across all positions of one image.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import torch

from . import metrics as _metrics
from vaeprobe.data.images import LUMA_WEIGHTS, to_unit
from vaeprobe.errors import VaeprobeError
from vaeprobe.probes.geometry import cell_distance, far_mask, latent_grid, ring_sums
from vaeprobe.probes.perturb import Site

DEFAULT_RADIUS = 3  # default far-field radius, in latent cells (Chebyshev distance from the site)

DEFAULT_MEASURES: tuple[str, ...] = ("l2", "l1", "psnr", "far_l2", "far_fraction", "radius90",
                                     "far_dr", "far_dg", "far_db", "far_dy")
"""The cheap measures (a few passes over the pixels), computed unless asked otherwise."""

ALL_MEASURES: tuple[str, ...] = DEFAULT_MEASURES + ("ssim", "lpips")
"""Every measure :func:`measure` knows; ``ssim`` runs on the CPU in numpy and ``lpips`` needs a network."""

ENERGY_SHARE = 0.9  # the share of the change energy that radius90 encloses

_SHIFT_MEASURES = ("far_dr", "far_dg", "far_db", "far_dy")  # the columns of far_colour_shift, in order
_SITE_MEASURES = {"far_l2", "far_fraction", "radius90", *_SHIFT_MEASURES}
_REL_TOL = 1e-9  # relative slack when comparing an energy share with ENERGY_SHARE (rounding in the sums)


class MeasureError(VaeprobeError, ValueError):
    """Inputs that :mod:`vaeprobe.probes.response` cannot measure (the message says what to change)."""


# -- input checks ---------------------------------------------------------------------------------------------

def _images(ref: torch.Tensor, perturbed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``ref`` as ``[1, 3, H, W]`` and ``perturbed`` as ``[N, 3, H, W]`` (a single ``[3, H, W]`` is N = 1)."""
    if ref.ndim == 3:
        ref = ref.unsqueeze(0)
    if perturbed.ndim == 3:
        perturbed = perturbed.unsqueeze(0)
    if ref.ndim != 4 or ref.shape[0] != 1 or ref.shape[1] != 3:
        raise MeasureError(f"reference image must be [3, H, W] or [1, 3, H, W], got {tuple(ref.shape)}")
    if perturbed.ndim != 4 or perturbed.shape[1:] != ref.shape[1:]:
        raise MeasureError(f"perturbed images must be [N, 3, H, W] matching the reference "
                           f"{tuple(ref.shape[1:])}, got {tuple(perturbed.shape)}")
    return ref, perturbed.to(ref.device)


def _sites(sites: Sequence[Site | tuple[int, int]], n: int, shape: tuple[int, int], factor: int) -> list[Site]:
    if not isinstance(factor, int) or factor < 1:
        raise MeasureError(f"factor must be a positive int (the VAE's downsampling, e.g. 8), got {factor!r}")
    out = [s if isinstance(s, Site) else Site(*s) for s in sites]
    if len(out) != n:
        raise MeasureError(f"got {len(out)} sites for {n} perturbed images; pass one site per image")
    h, w = latent_grid(shape, factor)
    for s in out:
        s.bounds(h, w)  # raises when the site lies outside the image
    return out


def _check_measures(measures: Sequence[str]) -> tuple[str, ...]:
    if isinstance(measures, str):
        measures = (measures,)
    unknown = [m for m in measures if m not in ALL_MEASURES]
    if unknown:
        raise MeasureError(f"unknown measure(s) {', '.join(map(repr, unknown))}; valid: {', '.join(ALL_MEASURES)}")
    return tuple(dict.fromkeys(measures))


# -- whole-image measures -------------------------------------------------------------------------------------

def l2(ref: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
    """Mean squared change per image over all pixels and channels.

    Parameters
    ----------
    ref, perturbed
        As in :func:`measure`.

    Returns
    -------
    torch.Tensor
        ``[N]`` float64, the mean of ``(perturbed - ref) ** 2``.

    Examples
    --------
    >>> l2(torch.zeros(3, 4, 4), torch.full((2, 3, 4, 4), 0.5)).tolist()
    [0.25, 0.25]
    """
    ref, perturbed = _images(ref, perturbed)
    return (perturbed - ref).pow(2).mean((1, 2, 3), dtype=torch.float64)


def l1(ref: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
    """Mean absolute change per image over all pixels and channels.

    Parameters
    ----------
    ref, perturbed
        As in :func:`measure` and :func:`l2`.

    Returns
    -------
    torch.Tensor
        ``[N]`` float64, the mean of ``|perturbed - ref|``.

    Examples
    --------
    >>> l1(torch.zeros(3, 4, 4), -torch.full((1, 3, 4, 4), 0.5)).tolist()
    [0.5]
    """
    ref, perturbed = _images(ref, perturbed)
    return (perturbed - ref).abs().mean((1, 2, 3), dtype=torch.float64)


def _psnr_from_l2(mse: torch.Tensor) -> torch.Tensor:
    # data range 2 for images in [-1, 1]; log10(4 / 0) = inf for an unchanged image
    return 10.0 * torch.log10(4.0 / mse)


def psnr(ref: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image with data range 2 (images in [-1, 1]); ``inf`` for an unchanged image.

    Parameters
    ----------
    ref, perturbed
        As in :func:`l2`, whose value it converts to dB.

    Returns
    -------
    torch.Tensor
        ``[N]`` float64, ``10 log10(4 / l2)``.

    Examples
    --------
    >>> out = torch.stack([torch.full((3, 4, 4), 0.2), torch.zeros(3, 4, 4)])  # l2 0.04 and 0
    >>> [round(v, 4) for v in psnr(torch.zeros(3, 4, 4), out).tolist()]
    [20.0, inf]
    """
    return _psnr_from_l2(l2(ref, perturbed))


def _to_unit_numpy(img: torch.Tensor) -> np.ndarray:
    return to_unit(img.detach().double().cpu()).permute(1, 2, 0).numpy()


def ssim(ref: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
    """SSIM per image (:func:`vaeprobe.probes.metrics.ssim`, RGB, 7x7 window) after mapping [-1, 1] to [0, 1] and
    clipping. Runs on the CPU in numpy.

    Parameters
    ----------
    ref, perturbed
        As in :func:`measure`; at least 7x7 pixels.

    Returns
    -------
    torch.Tensor
        ``[N]`` float64, 1.0 for an unchanged image.

    Raises
    ------
    MeasureError
        When the images are smaller than 7 pixels on a side.

    Examples
    --------
    >>> ssim(torch.zeros(3, 8, 8), torch.zeros(1, 3, 8, 8)).tolist()
    [1.0]
    """
    ref, perturbed = _images(ref, perturbed)
    if min(ref.shape[-2:]) < 7:
        raise MeasureError(f"ssim needs images of at least 7x7 pixels, got {tuple(ref.shape[-2:])}; drop 'ssim'")
    a = _to_unit_numpy(ref[0])
    return torch.tensor([_metrics.ssim(a, _to_unit_numpy(p)) for p in perturbed], dtype=torch.float64)


def _lpips_model(lpips_model, device):
    return lpips_model if lpips_model is not None else _metrics.get_lpips(device)


def _lpips_out(ref: torch.Tensor, perturbed: torch.Tensor, lpips_model, spatial: bool) -> torch.Tensor:
    """The network's output for each perturbed image against ``ref`` (no gradients)."""
    ref, perturbed = _images(ref, perturbed)
    model = _lpips_model(lpips_model, ref.device)
    with torch.no_grad():
        return model(ref.expand_as(perturbed), perturbed, spatial=spatial).detach()


def lpips(ref: torch.Tensor, perturbed: torch.Tensor, *, lpips_model=None) -> torch.Tensor:
    """LPIPS distance per image.

    Parameters
    ----------
    ref, perturbed, lpips_model
        As in :func:`measure`.

    Returns
    -------
    torch.Tensor
        ``[N]`` float64 on the CPU, 0 for an unchanged image.

    Examples
    --------
    >>> lpips(torch.zeros(3, 32, 32), torch.zeros(2, 3, 32, 32)).tolist()
    [0.0, 0.0]
    """
    return _lpips_out(ref, perturbed, lpips_model, False).flatten().double().cpu()


def lpips_map(ref: torch.Tensor, perturbed: torch.Tensor, *, lpips_model=None) -> torch.Tensor:
    """Spatial LPIPS map: where in the image the perceptual change is.

    Parameters
    ----------
    ref, perturbed, lpips_model
        As in :func:`lpips`, of which this is the map per pixel.

    Returns
    -------
    torch.Tensor
        ``[N, 1, H, W]`` float32 on the CPU.

    Examples
    --------
    >>> lpips_map(torch.zeros(3, 32, 32), torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 1, 32, 32])
    """
    return _lpips_out(ref, perturbed, lpips_model, True).float().cpu()


# -- site measures --------------------------------------------------------------------------------------------

def _energy(diff: torch.Tensor) -> torch.Tensor:
    """Squared change summed over RGB, ``[N, H, W]`` (float32, like the images)."""
    return diff.pow(2).sum(1)


def _site_columns(diff: torch.Tensor, sites: list[Site], factor: int, radius: int, wanted: set[str],
                  energy: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The site-dependent measures of ``diff`` ``[N, 3, H, W]`` (float64 columns ``[N]``, nan where undefined).

    One loop over the N images; per image a few dot products over the ``H * W`` pixels in float64."""
    n, _, hh, ww = diff.shape
    shape = (hh, ww)
    if energy is None:
        energy = _energy(diff)
    cols = {k: torch.full((n,), math.nan, dtype=torch.float64) for k in wanted}
    need_far = bool(wanted & (_SITE_MEASURES - {"radius90"}))
    need_shift = bool(wanted & set(_SHIFT_MEASURES))
    # far_dy is the dot product of the mean RGB shift with the BT.601 weights (data.images.luma sums the three
    # products in order, which differs from this dot in the last bit in about a third of cases)
    luma = torch.tensor(LUMA_WEIGHTS, dtype=torch.float64)
    for i, site in enumerate(sites):
        e = energy[i].flatten().double()
        total = float(e.sum())
        if need_far:
            far = far_mask(site, shape, factor, radius).to(diff.device).flatten().double()
            count = float(far.sum())
            far_energy = float(e @ far)
            if "far_fraction" in cols and total > 0:
                cols["far_fraction"][i] = far_energy / total
            if count and "far_l2" in cols:
                cols["far_l2"][i] = far_energy / (3 * count)
            if count and need_shift:
                shift = (diff[i].flatten(1).double() @ far).cpu() / count  # mean change per RGB channel
                for k, name in enumerate(_SHIFT_MEASURES[:3]):
                    if name in cols:
                        cols[name][i] = float(shift[k])
                if "far_dy" in cols:
                    cols["far_dy"][i] = float(shift @ luma)
        if "radius90" in cols and total > 0:
            dist = cell_distance(site, shape, factor).to(diff.device)
            cum = ring_sums(e, dist).cumsum(0)  # energy within each Chebyshev distance
            reached = cum >= ENERGY_SHARE * cum[-1] * (1.0 - _REL_TOL)
            cols["radius90"][i] = float(reached.to(torch.int8).argmax())
    return cols


def _check_radius(radius: int) -> None:
    if isinstance(radius, bool) or not isinstance(radius, int) or radius < 0:
        raise MeasureError(f"radius must be an int >= 0 (latent cells), got {radius!r}")


def _site_measures(names: Sequence[str], ref, perturbed, sites, factor,
                   radius: int = DEFAULT_RADIUS) -> dict[str, torch.Tensor]:
    """The site measures ``names`` of the public functions below, after checking their inputs."""
    _check_radius(radius)
    ref, perturbed = _images(ref, perturbed)
    sites = _sites(sites, perturbed.shape[0], tuple(ref.shape[-2:]), factor)
    return _site_columns(perturbed - ref, sites, factor, radius, set(names))


def far_l2(ref: torch.Tensor, perturbed: torch.Tensor, sites: Sequence[Site], factor: int, *,
           radius: int = DEFAULT_RADIUS) -> torch.Tensor:
    """Mean squared change over each site's far field.

    Parameters
    ----------
    ref, perturbed, sites, factor, radius
        As in :func:`measure`.

    Returns
    -------
    torch.Tensor
        ``[N]`` float64 (nan for an empty far field).

    Examples
    --------
    >>> ref = torch.zeros(3, 32, 32)
    >>> far_l2(ref, torch.full((1, 3, 32, 32), 0.5), [Site(0, 0)], 8, radius=2).tolist()
    [0.25]
    """
    return _site_measures(["far_l2"], ref, perturbed, sites, factor, radius)["far_l2"]


def far_fraction(ref: torch.Tensor, perturbed: torch.Tensor, sites: Sequence[Site], factor: int, *,
                 radius: int = DEFAULT_RADIUS) -> torch.Tensor:
    """Share of each image's change energy (sum of squared change) that lies in its site's far field.

    Parameters
    ----------
    ref, perturbed, sites, factor, radius
        As in :func:`measure`; ``radius`` sets the far field whose share is taken.

    Returns
    -------
    torch.Tensor
        ``[N]`` float64 in [0, 1] (nan if the image did not change).

    Examples
    --------
    >>> ref = torch.zeros(3, 32, 32)
    >>> far_fraction(ref, torch.full((1, 3, 32, 32), 0.5), [Site(0, 0)], 8, radius=2).tolist()  # 448 of 1024 px
    [0.4375]
    """
    return _site_measures(["far_fraction"], ref, perturbed, sites, factor, radius)["far_fraction"]


def radius90(ref: torch.Tensor, perturbed: torch.Tensor, sites: Sequence[Site], factor: int) -> torch.Tensor:
    """Smallest radius R (latent cells, Chebyshev distance from the site) such that the pixels within R hold at
    least 90% (:data:`ENERGY_SHARE`) of the change energy.

    Parameters
    ----------
    ref, perturbed, sites, factor
        As in :func:`measure` (``radius`` plays no part).

    Returns
    -------
    torch.Tensor
        ``[N]`` float64 holding integers (nan if the image did not change).

    Examples
    --------
    >>> ref = torch.zeros(3, 32, 32)
    >>> radius90(ref, torch.full((1, 3, 32, 32), 0.5), [Site(0, 0)], 8).tolist()  # 4x4 cells: 16/16 at R = 3
    [3.0]
    """
    return _site_measures(["radius90"], ref, perturbed, sites, factor)["radius90"]


def far_colour_shift(ref: torch.Tensor, perturbed: torch.Tensor, sites: Sequence[Site], factor: int, *,
                     radius: int = DEFAULT_RADIUS) -> torch.Tensor:
    """Mean change (perturbed - reference) over each site's far field, per RGB channel and in BT.601 luma.

    Parameters
    ----------
    ref, perturbed, sites, factor, radius
        As in :func:`measure`, which reports these as ``far_dr``, ``far_dg``, ``far_db`` and ``far_dy``.

    Returns
    -------
    torch.Tensor
        ``[N, 4]`` float64 with columns R, G, B and luma; nan for an empty far field.

    Examples
    --------
    >>> shift = torch.tensor([0.1, 0.0, -0.1]).reshape(1, 3, 1, 1).expand(1, 3, 32, 32)
    >>> out = far_colour_shift(torch.zeros(3, 32, 32), shift, [Site(0, 0)], 8, radius=2)
    >>> [round(v, 4) for v in out[0].tolist()]
    [0.1, 0.0, -0.1, 0.0185]
    """
    cols = _site_measures(_SHIFT_MEASURES, ref, perturbed, sites, factor, radius)
    return torch.stack([cols[k] for k in _SHIFT_MEASURES], 1)


def global_effect_ratio(far_l2_values: Sequence[float] | np.ndarray | torch.Tensor) -> np.ndarray:
    """Each position's ``far_l2`` divided by the median ``far_l2`` over all the given positions (one image).

    NaN entries are ignored for the median and stay NaN; a zero median gives ``inf`` (or nan for 0 / 0).

    Parameters
    ----------
    far_l2_values : sequence of float, numpy.ndarray or torch.Tensor
        The ``far_l2`` of each position (flattened).

    Returns
    -------
    numpy.ndarray
        1-D float64, one ratio per position (empty for no positions).

    Examples
    --------
    >>> global_effect_ratio([1.0, 2.0, 4.0, 8.0, 100.0]).tolist()
    [0.25, 0.5, 1.0, 2.0, 25.0]
    >>> global_effect_ratio(torch.tensor([0.0, 0.0, 1.0])).tolist()
    [nan, nan, inf]
    """
    if isinstance(far_l2_values, torch.Tensor):
        far_l2_values = far_l2_values.detach().cpu().numpy()
    values = np.asarray(far_l2_values, dtype=np.float64).reshape(-1)
    if values.size == 0:
        return values
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        return values / np.nanmedian(values)


# -- everything at once ---------------------------------------------------------------------------------------

def measure(ref: torch.Tensor, perturbed: torch.Tensor, sites: Sequence[Site], factor: int, *,
            radius: int = DEFAULT_RADIUS, measures: Sequence[str] = DEFAULT_MEASURES,
            lpips_model=None) -> list[dict[str, float]]:
    """One dict ``{measure: float}`` per perturbed image (keys in the order of ``measures``).

    See the module docstring for the measures.

    Parameters
    ----------
    ref : torch.Tensor
        The reference (unperturbed) decode ``[3, H, W]`` or ``[1, 3, H, W]``, roughly in [-1, 1].
    perturbed : torch.Tensor
        The decodes ``[N, 3, H, W]`` of the perturbed latents (a single ``[3, H, W]`` is N = 1), moved to
        ``ref``'s device.
    sites : sequence of Site or (int, int)
        ``sites[i]`` is the site perturbed for image ``i``.
    factor : int
        The VAE's downsampling: pixel ``(y, x)`` belongs to latent cell ``(y // factor, x // factor)``.
    radius : int, keyword-only
        The far field is the pixels whose cell is more than ``radius`` cells (Chebyshev) from every site cell.
    measures : str or sequence of str, keyword-only
        Names from :data:`ALL_MEASURES` (default :data:`DEFAULT_MEASURES`; duplicates are dropped).
    lpips_model : vaeprobe.probes.metrics.LPIPS, keyword-only
        The network for ``lpips``; default :func:`vaeprobe.probes.metrics.get_lpips` on the images' device.

    Returns
    -------
    list of dict of str to float
        One dict per perturbed image.

    Raises
    ------
    MeasureError
        For an unknown measure, mismatched shapes, not one site per image, a site outside the image, or a bad
        ``factor`` or ``radius``.

    Examples
    --------
    >>> ref = torch.zeros(3, 32, 32)
    >>> out = torch.zeros(1, 3, 32, 32)
    >>> out[0, :, 8:16, 8:16] = 0.5  # change exactly the pixels of latent cell (1, 1)
    >>> measure(ref, out, [Site(1, 1)], factor=8, measures=("l2", "far_fraction", "radius90"))
    [{'l2': 0.015625, 'far_fraction': 0.0, 'radius90': 0.0}]
    >>> measure(ref, out, [Site(0, 0)], 8, radius=0, measures="far_fraction")  # seen from cell (0, 0)
    [{'far_fraction': 1.0}]
    """
    names = _check_measures(measures)
    ref, perturbed = _images(ref, perturbed)
    n = perturbed.shape[0]
    sites = _sites(sites, n, tuple(ref.shape[-2:]), factor)
    _check_radius(radius)
    diff = perturbed - ref
    energy = _energy(diff)
    cols: dict[str, torch.Tensor] = {}
    if {"l2", "psnr"} & set(names):
        cols["l2"] = energy.flatten(1).double().sum(1).cpu() / diff[0].numel()
        cols["psnr"] = _psnr_from_l2(cols["l2"])
    if "l1" in names:
        cols["l1"] = diff.abs().flatten(1).double().mean(1).cpu()
    wanted = _SITE_MEASURES & set(names)
    if wanted:
        cols.update(_site_columns(diff, sites, factor, radius, wanted, energy))
    if "ssim" in names:
        cols["ssim"] = ssim(ref, perturbed)
    if "lpips" in names:
        cols["lpips"] = lpips(ref, perturbed, lpips_model=lpips_model)
    table = {k: cols[k].tolist() for k in names}
    return [{k: float(table[k][i]) for k in names} for i in range(n)]
