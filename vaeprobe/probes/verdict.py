"""Verdicts: is a latent cell's effect ordinary, a magnitude effect, wide but local, or global?

A perturbed cell's far-field energy mixes three things: the size of the perturbation, the decoder's receptive
field, and a genuinely global pathway. This module separates them with measures that do not depend on the
resolution, and turns them into one verdict per cell.

Per image, :func:`receptive_field` first zeroes a few *ordinary* cells (seeded, interior, away from latent-norm
outliers) and measures how the change energy falls with distance: the effective receptive field ``erf`` is the
distance (latent cells, Euclidean from the cell) that holds ``ERF_SHARE`` of their change energy (median over the
cells), and ``tail0`` is the share they leave beyond it. Then, per perturbed cell (:func:`profile_columns`):

================ ===============================================================================================
``norm_ratio``   the cell's latent norm over the image's median norm (question a: is it unusual in the latent?)
``dz2``          ``||dz||^2``, the size of the perturbation
``far_rel``      mean change energy per pixel beyond ``erf`` over the clean decode's own variance (question b)
``far_abs``      the same energy not divided by that variance: in the decoder's output units (``[-1, 1]``,
                 summed over RGB), so that a faint change on a low-contrast image stays faint
``band_rel``     the same in the band just beyond ``erf`` (``erf < d <= erf + max(erf, BAND_MIN)``): a local
                 effect of a given width in cells gives the same value at any image size, where ``far_rel``
                 dilutes it over a far field that grows with the image
``far_per_unit`` the same per unit of perturbation, ``far_rel / dz2``
``tail_share``   share of the change energy beyond ``erf``
``far_excess``   energy beyond ``erf`` over what an ordinary cell would put there: the ordinary cells' distance
                 profile (each normalised by its own near field, distance <= 1) scaled by this cell's near field
                 and summed over this cell's own pixels (so a border cell is compared with a border-shaped
                 profile). About 1 for an effect shaped like an ordinary cell's, however large
``flatness``     mean energy in the outer half of the distances beyond ``erf`` over the inner half: about 1 for an
                 effect that stays flat with distance, well below 1 for one that decays (question c)
================ ===============================================================================================

For cells whose effect reaches beyond the receptive field, :func:`swap_information` asks question (d): the cell's
vector is replaced by its counterpart in each of a few donor latents (of the donor's cell at the same position and
its most similar vector, by cosine similarity minus the log norm ratio, the one whose zeroing changes the donor's
far field more), and the far-field mean colour change of the decode is regressed on the donor image's colour minus
the recipient's. ``swap_corr`` is the Pearson correlation over (donor, channel) pairs and ``swap_slope`` the
least-squares slope through the origin: a cell that carries the image's colour moves the far field towards the
donor's (slope near 1).

:class:`VerdictRules` turns the measures into one of :data:`VERDICTS`:

- ``global`` when the far effect is significant and flat (``flatness`` over its threshold). Significant: the
  score ``far_abs ** w * far_excess ** (1 - w)`` (size against shape, :meth:`VerdictRules.score`; for a latent
  outlier ``band_rel`` is the size) over its threshold, and ``far_excess`` over a floor, so that an effect of
  an ordinary cell's shape never counts however large it is; ``global-information`` when, in addition, ``swap_corr`` and ``swap_slope``
  are over theirs;
- ``wide-local`` when the far effect is significant but decays;
- otherwise ``high-norm`` when ``norm_ratio`` is at least the spot threshold, else ``ordinary``.

The rules compare a cell with the same image's ordinary cells and the image's own variance, never with the
other scanned cells, so a verdict does not depend on which positions were scanned. The thresholds and how they
were calibrated are in docs/verdicts.md.

Parameters named alike mean the same in every function and method here: ``vae`` is the model (a
:class:`~vaeprobe.models.adapter.VAE`), ``z`` one latent ``[1, C, h, w]``, ``ref`` its clean decode
``[1, 3, H, W]``, ``site`` the cell under test (a :class:`~vaeprobe.probes.perturb.Site`) and ``field`` the image's
reference for ordinary cells, a :class:`ReceptiveField` (:func:`receptive_field`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from vaeprobe.probes.geometry import cell_distance, ring_profile, sample_cells
from vaeprobe.probes.latents import DEFAULT_THRESHOLD
from vaeprobe.probes.perturb import Site

VERDICTS = ("ordinary", "high-norm", "wide-local", "global", "global-information")
GLOBAL_VERDICTS = ("global", "global-information")
ERF_SHARE = 0.95  # the effective receptive field holds this share of an ordinary cell's change energy
BAND_MIN = 2.0     # the near band beyond the receptive field is at least this many cells wide
PROFILE_COLUMNS = ("norm_ratio", "dz2", "far_rel", "far_abs", "band_rel", "far_per_unit", "tail_share",
                   "far_excess", "flatness")
EVIDENCE_COLUMNS = ("swap_corr", "swap_slope", "matched_ratio", "transplant_ratio", "frozen_removed")


def _energy(diff: torch.Tensor) -> torch.Tensor:
    return diff.double().pow(2).sum(-3)  # [..., H, W]


def _erf_of(e: torch.Tensor, dist: torch.Tensor, share: float) -> float:
    """Smallest distance whose disc holds ``share`` of the energy ``e`` (both ``[H, W]``); nan if no change."""
    d = dist.flatten()
    order = torch.argsort(d)
    cum = e.flatten()[order].cumsum(0)
    if float(cum[-1]) <= 0:
        return math.nan
    k = int(torch.searchsorted(cum, share * cum[-1]))
    return float(d[order][min(k, len(d) - 1)])


@dataclass
class ReceptiveField:
    """An image's reference for ordinary cells (see the module docstring), as :func:`receptive_field` measures it.

    Attributes
    ----------
    erf : float
        The effective receptive field in latent cells (Euclidean), the median over the reference cells.
    tail0 : float
        Share of an ordinary cell's change energy beyond ``erf`` (median).
    variance : float
        The clean decode's variance per pixel, summed over RGB.
    cells : list of (int, int)
        The ordinary reference cells that were zeroed.
    profile : list of float
        Median over the cells of the mean energy at integer distance d, d = 0, 1, ...
    dz2 : float
        Median ``||dz||^2`` of the reference cells.
    shape : list of float
        Median profile, each cell's normalised by its near field (distance <= 1).
    shapes : list of list of float
        Those normalised profiles, one per reference cell.
    excess : list of float
        Each reference cell's own ``far_excess`` against the median.
    band : list of float
        Each reference cell's own ``band_rel``.

    Examples
    --------
    >>> rf = ReceptiveField(erf=1.0, tail0=0.05, variance=1.0, cells=[], profile=[], dz2=1.0, shape=[1.0, 0.5])
    >>> rf.expected(torch.tensor([0.0, 1.0, 3.0])).tolist()   # past the profile: its last value
    [1.0, 0.5, 0.5]
    """

    erf: float                   # latent cells
    tail0: float                 # share of an ordinary cell's change energy beyond ``erf`` (median)
    variance: float              # the clean decode's variance per pixel, summed over RGB
    cells: list[tuple[int, int]]
    profile: list[float]         # median over the cells of the mean energy at integer distance d, d = 0, 1, ...
    dz2: float                   # median ||dz||^2 of the ordinary cells
    shape: list[float] = field(default_factory=list)  # median profile, each cell's normalised by its near field
    shapes: list[list[float]] = field(default_factory=list)  # those normalised profiles, one per cell
    excess: list[float] = field(default_factory=list)   # each reference cell's own far_excess against the median
    band: list[float] = field(default_factory=list)     # each reference cell's own band_rel

    def expected(self, dist: torch.Tensor) -> torch.Tensor:
        """An ordinary cell's energy at each distance in ``dist``, per unit of near-field energy.

        Parameters
        ----------
        dist : torch.Tensor
            Distances in latent cells (rounded to the nearest integer); distances past the measured profile take
            its last finite value.

        Returns
        -------
        torch.Tensor
            float64, the shape of ``dist`` (all nan when the profile has no finite value).
        """
        prof = np.asarray(self.shape, dtype=np.float64)
        finite = np.isfinite(prof)
        if not finite.any():
            return torch.full_like(dist, math.nan, dtype=torch.float64)
        prof = np.where(finite, prof, np.nan)
        last = prof[np.nonzero(finite)[0][-1]]
        prof = np.nan_to_num(prof, nan=last)
        idx = torch.round(dist).long().clamp(max=len(prof) - 1)
        return torch.from_numpy(prof)[idx]

    def to_dict(self) -> dict:
        """The fields as a plain dict (for JSON and ``DataFrame.attrs``)."""
        return asdict(self)


def ordinary_cells(z: torch.Tensor, n: int, *, seed: int = 0, exclude: Sequence[tuple[int, int]] = (),
                   threshold: float = DEFAULT_THRESHOLD) -> list[tuple[int, int]]:
    """``n`` seeded ordinary cells of ``z``: interior, not latent-norm outliers, away from ``exclude``.

    The allowed cells have a norm ratio (norm over the median norm) under half of ``threshold`` and a norm
    under the 90th percentile, are not in ``exclude`` and are interior (not on the border when the latent is at
    least 4 cells wide); they are drawn by :func:`vaeprobe.probes.geometry.sample_cells` with those cells as the
    allowed mask. When no cell qualifies, any cell of the latent may be drawn (``exclude`` included).

    Parameters
    ----------
    z
        As in the module docstring.
    n : int
        How many cells (fewer come back when fewer qualify).
    seed : int, keyword-only
        Seed of the draw.
    exclude : sequence of (int, int), keyword-only
        Cells never drawn (e.g. the cells under test).
    threshold : float, keyword-only
        The spot threshold of the norm ratio (:data:`vaeprobe.probes.latents.DEFAULT_THRESHOLD`).

    Returns
    -------
    list of (int, int)
        The cells, in the order drawn.

    Examples
    --------
    >>> z = torch.ones(1, 4, 6, 6)
    >>> z[0, :, 2, 2] = 50.0   # a latent-norm outlier
    >>> cells = ordinary_cells(z, 20, exclude=[(3, 3)])
    >>> len(cells), (2, 2) in cells, (3, 3) in cells, min(min(rc) for rc in cells), max(max(rc) for rc in cells)
    (14, False, False, 1, 4)
    """
    norm = z[0].detach().float().norm(dim=0)
    h, w = norm.shape
    ratio = norm / norm.median().clamp_min(1e-12)
    ok = (ratio < threshold / 2) & (norm <= torch.quantile(norm.flatten(), 0.9))
    if h >= 4 and w >= 4:
        ok[0, :] = ok[-1, :] = False
        ok[:, 0] = ok[:, -1] = False
    for r, c in exclude:
        ok[r, c] = False
    return sample_cells(h, w, n, allowed=ok if bool(ok.any()) else None, seed=seed)


def receptive_field(vae, z: torch.Tensor, ref: torch.Tensor | None = None, *, n: int = 12, seed: int = 0,
                    share: float = ERF_SHARE, exclude: Sequence[tuple[int, int]] = ()) -> ReceptiveField:
    """Measure the effective receptive field of ``vae``'s decoder on latent ``z`` by zeroing ordinary cells.

    ``n`` cells of :func:`ordinary_cells` are zeroed (decoded 6 at a time) and their change energy profiled by
    distance (see the module docstring).

    Parameters
    ----------
    vae, z
        As in the module docstring.
    ref : torch.Tensor, optional
        The clean decode of ``z`` (decoded when not given).
    n : int, keyword-only
        How many reference cells.
    seed : int, keyword-only
        Seed of the cells' draw.
    share : float, keyword-only
        The share of the change energy the receptive field holds.
    exclude : sequence of (int, int), keyword-only
        Cells never used as reference (latent-norm outliers, the cells under test).

    Returns
    -------
    ReceptiveField

    Examples
    --------
    >>> from vaeprobe.models.loading import load_vae
    >>> vae = load_vae("builtin:tiny-random")
    >>> z = vae.encode(torch.rand(1, 3, 64, 64) * 2 - 1).mean
    >>> rf = receptive_field(vae, z, n=3)
    >>> rf.erf >= 0, 0 <= rf.tail0 <= 1, len(rf.cells)
    (True, True, 3)
    """
    if ref is None:
        ref = vae.decode(z)
    cells = ordinary_cells(z, n, seed=seed, exclude=exclude)
    zz = z.repeat(len(cells), 1, 1, 1)
    for i, (r, c) in enumerate(cells):
        zz[i, :, r, c] = 0
    dec = torch.cat([vae.decode(zz[k:k + 6]).float() for k in range(0, len(cells), 6)])
    diff = dec - ref.float()
    shape = tuple(ref.shape[-2:])
    erfs, profiles = [], []
    for i, (r, c) in enumerate(cells):
        e = _energy(diff[i])
        dist = cell_distance((r, c), shape, vae.factor, metric="euclidean")
        erfs.append(_erf_of(e, dist, share))
        profiles.append(ring_profile(e, dist))
    erf = float(np.nanmedian(erfs)) if not all(math.isnan(v) for v in erfs) else math.nan
    tails, shapes = [], []
    for i, (r, c) in enumerate(cells):
        e = _energy(diff[i])
        dist = cell_distance((r, c), shape, vae.factor, metric="euclidean")
        total = float(e.sum())
        tails.append(float(e[dist > erf].sum()) / total if total > 0 else math.nan)
        near = float(e[dist <= 1].mean())
        shapes.append([v / near if near > 0 else math.nan for v in profiles[i]])
    length = max(len(p) for p in profiles)
    padded = np.array([p + [math.nan] * (length - len(p)) for p in profiles])
    padded_shape = np.array([p + [math.nan] * (length - len(p)) for p in shapes])
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            profile = np.nanmedian(padded, axis=0).tolist()
            shape_profile = np.nanmedian(padded_shape, axis=0).tolist()
            tail0 = float(np.nanmedian(tails)) if tails else math.nan
    variance = float(ref.float()[0].var(dim=(1, 2)).sum()) if ref.dim() == 4 else float(ref.float().var(dim=(1, 2)).sum())
    dz2 = float(np.median([float(z[0, :, r, c].float().pow(2).sum()) for r, c in cells]))
    rf = ReceptiveField(erf=erf, tail0=tail0, variance=variance, cells=cells, profile=profile, dz2=dz2,
                        shape=shape_profile, shapes=[[float(v) for v in p] for p in shapes])
    own = profile_columns(diff, [Site(r, c) for r, c in cells], vae.factor, rf, [1.0] * len(cells),
                          [1.0] * len(cells))
    rf.excess = [float(o["far_excess"]) for o in own]
    rf.band = [float(o["band_rel"]) for o in own]
    return rf


def profile_columns(diff: torch.Tensor, sites: Sequence[Site], factor: int, field: ReceptiveField,
                    dz2: Sequence[float], norm_ratio: Sequence[float]) -> list[dict[str, float]]:
    """The measures of the module docstring for each perturbed decode.

    Parameters
    ----------
    diff : torch.Tensor
        ``[N, 3, H, W]``: perturbed minus clean decodes.
    sites : sequence of Site
        The perturbed site of each decode.
    factor : int
        The VAE's downsampling factor.
    field
        As in the module docstring.
    dz2 : sequence of float
        ``dz2[i]``: the squared norm of decode ``i``'s latent perturbation.
    norm_ratio : sequence of float
        ``norm_ratio[i]``: the norm ratio of decode ``i``'s cell.

    Returns
    -------
    list of dict
        One dict per decode with the keys of :data:`PROFILE_COLUMNS` (nan where a measure is undefined).

    Examples
    --------
    >>> rf = ReceptiveField(erf=1.0, tail0=0.05, variance=1.0, cells=[], profile=[], dz2=1.0,
    ...                     shape=[1.0, 1.0, 0.01, 0.001])   # ordinary cells: energy falls 100x past 1 cell
    >>> flat = torch.full((1, 3, 64, 64), 0.1)          # a uniform change: flat, far beyond that
    >>> cols = profile_columns(flat, [Site(3, 3)], 8, rf, [4.0], [1.0])[0]
    >>> round(cols["flatness"], 3), round(cols["far_excess"]), round(cols["far_per_unit"], 4)
    (1.0, 14, 0.0075)
    """
    shape = tuple(diff.shape[-2:])
    out = []
    for i, site in enumerate(sites):
        e = _energy(diff[i])
        dist = cell_distance(site, shape, factor, metric="euclidean")
        total = float(e.sum())
        row = {k: math.nan for k in PROFILE_COLUMNS}
        row["norm_ratio"] = float(norm_ratio[i])
        row["dz2"] = float(dz2[i])
        far = dist > field.erf
        if total > 0 and bool(far.any()):
            far_e = e[far]
            row["tail_share"] = float(far_e.sum()) / total
            near = float(e[dist <= 1].mean())
            expected = float((near * field.expected(dist[far])).sum())
            row["far_excess"] = float(far_e.sum()) / expected if expected > 0 else math.inf
            row["far_abs"] = float(far_e.mean())
            row["far_rel"] = row["far_abs"] / field.variance if field.variance > 0 else math.nan
            band = far & (dist <= field.erf + max(field.erf, BAND_MIN))
            row["band_rel"] = float(e[band].mean()) / field.variance if field.variance > 0 else math.nan
            row["far_per_unit"] = row["far_rel"] / row["dz2"] if row["dz2"] > 0 else math.nan
            dmax = float(dist.max())
            mid = field.erf + (dmax - field.erf) / 2
            inner = far & (dist <= mid)
            outer = dist > mid
            if bool(inner.any()) and bool(outer.any()):
                ei = float(e[inner].mean())
                row["flatness"] = float(e[outer].mean()) / ei if ei > 0 else math.nan
        elif total == 0:
            row.update(far_rel=0.0, far_abs=0.0, band_rel=0.0, far_per_unit=0.0, tail_share=0.0, far_excess=0.0)
        out.append(row)
    return out


def _calibrated() -> dict:
    """The thresholds written by ``experiments/verdict_calibration.py fit`` (``vaeprobe/probes/verdict_rules.json``)."""
    import json
    from pathlib import Path

    path = Path(__file__).with_name("verdict_rules.json")
    try:
        return json.loads(path.read_text())["rules"]
    except (OSError, ValueError, KeyError):  # pragma: no cover - the file ships with the package
        return {}


_CAL = _calibrated()


@dataclass(frozen=True, kw_only=True)
class VerdictRules:
    """Thresholds of the verdict (keyword-only).

    The defaults are the calibrated ones of ``vaeprobe/probes/verdict_rules.json`` (written by
    ``experiments/verdict_calibration.py fit``; docs/verdicts.md has the data).

    Attributes
    ----------
    far_score : float
        Threshold of the score ``far_abs ** far_weight * far_excess ** (1 - far_weight)`` (:meth:`score`) of a
        cell of ordinary norm.
    far_weight : float
        The share of the size (``far_abs``) in that score.
    far_excess : float
        The floor of ``far_excess``, the excess over an ordinary cell's shape.
    outlier_score, outlier_weight, outlier_excess : float
        The same gate for a latent outlier (``norm_ratio`` at least ``norm_ratio``), fitted on outlier cells
        alone, with ``band_rel`` as the size: a vector the decoder drops still moves pixels near it, with a
        noisy shape, and what tells is the size of its effect just beyond the receptive field.
    flatness : float
        Threshold of ``flatness``, outer over inner far-field energy: a global effect stays flat.
    swap_corr, swap_slope : float
        Thresholds of the swap test (far colour change against donor colour difference) for
        ``global-information``.
    norm_ratio : float
        The spot threshold of the norm ratio for ``high-norm``.

    Examples
    --------
    >>> VerdictRules(flatness=0.5).flatness, VerdictRules().norm_ratio == DEFAULT_THRESHOLD
    (0.5, True)
    """

    far_score: float = _CAL.get("far_score", 0.07)      # far_abs ** far_weight * far_excess ** (1 - far_weight)
    far_weight: float = _CAL.get("far_weight", 0.65)    # the share of the size (far_abs) in that score
    far_excess: float = _CAL.get("far_excess", 2.0)     # and at least this excess over an ordinary cell's shape
    flatness: float = _CAL.get("flatness", 0.3)         # outer over inner far-field energy
    outlier_score: float = _CAL.get("outlier_score", 0.6)    # the same gate for latent outliers
    outlier_weight: float = _CAL.get("outlier_weight", 0.4)
    outlier_excess: float = _CAL.get("outlier_excess", 1.1)
    swap_corr: float = _CAL.get("swap_corr", 0.85)      # far colour change vs donor colour difference
    swap_slope: float = _CAL.get("swap_slope", 0.75)
    norm_ratio: float = DEFAULT_THRESHOLD

    def shape(self, row: dict) -> str:
        """The shape of a cell's far effect from its profile measures (nan counts as not over).

        Parameters
        ----------
        row : dict
            The measures of :data:`PROFILE_COLUMNS` (a dict or a table row).

        Returns
        -------
        str
            ``local``, ``wide-local`` or ``global``. A far effect needs ``far_excess`` over its floor and the
            score (:meth:`score`) over its threshold: ``far_excess``, ``far_score`` and ``far_weight`` for an
            ordinary-norm cell, the ``outlier_*`` ones for a latent outlier (``norm_ratio`` at the spot threshold).

        Examples
        --------
        >>> VerdictRules().shape({"far_abs": 0.5, "far_excess": 500.0, "flatness": 0.05})
        'wide-local'
        """
        def over(key: str, limit: float) -> bool:
            v = row.get(key, math.nan)
            return v is not None and not (isinstance(v, float) and math.isnan(v)) and v >= limit

        # a latent outlier (norm ratio at the spot threshold) has its own gate: the shape of its far effect is
        # noisy (a large vector the decoder drops still moves pixels a little), its size is what tells
        if self.is_outlier(row):
            floor, limit = self.outlier_excess, self.outlier_score
        else:
            floor, limit = self.far_excess, self.far_score
        if not (over("far_excess", floor) and self.score(row) >= limit):
            return "local"
        return "global" if over("flatness", self.flatness) else "wide-local"

    def is_outlier(self, row: dict) -> bool:
        """Whether a row is a latent outlier (``norm_ratio`` at the spot threshold), judged by the outlier gate."""
        nr = row.get("norm_ratio", math.nan)
        return nr is not None and not (isinstance(nr, float) and math.isnan(nr)) and nr >= self.norm_ratio

    def score(self, row: dict) -> float:
        """The far-effect score ``size ** w * far_excess ** (1 - w)``: for a cell of ordinary norm ``far_abs`` and
        ``w = far_weight``; for a latent outlier (:meth:`is_outlier`) ``band_rel`` and ``w = outlier_weight``.

        The evidence of a far effect weighs its size against its excess over an ordinary cell's shape, a
        straight boundary in log space.

        Parameters
        ----------
        row : dict
            ``far_excess``, ``norm_ratio`` and the size (``far_abs``, or ``band_rel`` for an outlier).

        Returns
        -------
        float
            The score; nan (never over) when the size or the excess is missing or not positive, inf for an
            infinite excess.

        Examples
        --------
        >>> VerdictRules(far_weight=0.5).score({"norm_ratio": 1.0, "far_abs": 0.04, "far_excess": 25.0})
        1.0
        >>> VerdictRules(outlier_weight=0.5).score({"norm_ratio": 50.0, "band_rel": 0.01, "far_excess": 100.0})
        1.0
        """
        outlier = self.is_outlier(row)
        size = row.get("band_rel" if outlier else "far_abs", math.nan)
        excess = row.get("far_excess", math.nan)
        if size is None or excess is None or not (size > 0 and excess > 0):
            return math.nan
        if math.isinf(excess):
            return math.inf
        w = self.outlier_weight if outlier else self.far_weight
        return float(size ** w * excess ** (1 - w))

    def classify(self, row: dict) -> str:
        """The verdict of one cell from its measures.

        Parameters
        ----------
        row : dict
            The measures of :data:`PROFILE_COLUMNS` and, for ``global-information``, ``swap_corr`` and
            ``swap_slope`` (a dict or a table row).

        Returns
        -------
        str
            One of :data:`VERDICTS`.

        Examples
        --------
        >>> rules = VerdictRules()
        >>> rules.classify({"norm_ratio": 40.0, "band_rel": 1e-6, "far_excess": 1.0})
        'high-norm'
        >>> rules.classify({"norm_ratio": 1.0, "far_abs": 0.5, "far_excess": 500.0, "flatness": 0.9,
        ...                 "swap_corr": 0.95, "swap_slope": 0.8})
        'global-information'
        """
        row = dict(row)
        shape = self.shape(row)
        if shape == "global":
            corr, slope = row.get("swap_corr", math.nan), row.get("swap_slope", math.nan)
            if corr is not None and slope is not None and corr >= self.swap_corr and slope >= self.swap_slope:
                return "global-information"
            return "global"
        if shape == "wide-local":
            return "wide-local"
        return "high-norm" if row.get("norm_ratio", 0.0) >= self.norm_ratio else "ordinary"

    def to_dict(self) -> dict:
        """The thresholds as a plain dict."""
        return asdict(self)


# -- evidence beyond the profile ----------------------------------------------------------------------------------

@dataclass
class Donors:
    """Latents and clean-decode mean colours of a few donor images, at one latent size (:func:`make_donors`).

    Attributes
    ----------
    latents : torch.Tensor
        ``[K, C, h, w]``.
    colours : torch.Tensor
        ``[K, 3]``: the mean colour of each donor's clean decode.
    names : list of str
        The donors' names.
    decodes : torch.Tensor or None
        ``[K, 3, H, W]``: the clean decodes (to find each donor's counterpart cell, :func:`counterpart_cells`).
    """

    latents: torch.Tensor                  # [K, C, h, w]
    colours: torch.Tensor                  # [K, 3] mean colour of each donor's clean decode
    names: list[str] = field(default_factory=list)
    decodes: torch.Tensor | None = None    # [K, 3, H, W] the clean decodes (to find each donor's counterpart cell)


def make_donors(vae, images: Sequence[torch.Tensor], *, names: Sequence[str] = ()) -> Donors:
    """Encode and decode donor images for the swap test.

    A donor the model cannot encode (a ``ValueError``, such as a planted control that cannot be built on it) is
    left out; its name is not in ``names``.

    Parameters
    ----------
    vae
        As in the module docstring.
    images : sequence of torch.Tensor
        ``[1, 3, H, W]`` each, in [-1, 1], all of one size.
    names : sequence of str, keyword-only
        One name per image (default: ``donor 0``, ``donor 1``, ...).

    Returns
    -------
    Donors

    Raises
    ------
    ValueError
        When no image could be encoded (each raised ``ValueError``).

    Examples
    --------
    >>> from vaeprobe.models.loading import load_vae
    >>> donors = make_donors(load_vae("builtin:tiny-random"), [torch.zeros(1, 3, 32, 32)], names=["grey"])
    >>> tuple(donors.latents.shape), donors.names, tuple(donors.colours.shape)
    ((1, 4, 4, 4), ['grey'], (1, 3))
    """
    names = list(names) or [f"donor {i}" for i in range(len(images))]
    zs, kept = [], []
    for x, name in zip(images, names):
        try:
            zs.append(vae.encode(x).mean)
            kept.append(name)
        except ValueError:
            continue
    if not zs:
        raise ValueError("no donor image could be encoded")
    z = torch.cat(zs)
    dec = torch.cat([vae.decode(zi[None]).float() for zi in z])
    return Donors(latents=z, colours=dec.mean(dim=(2, 3)), names=kept, decodes=dec)


def donor_cell(v: torch.Tensor, u: torch.Tensor) -> tuple[int, int]:
    """The cell of latent ``u`` most like vector ``v``: the largest cosine similarity minus the absolute log ratio
    of the norms.

    Parameters
    ----------
    v : torch.Tensor
        ``[C]``: a cell's vector.
    u : torch.Tensor
        ``[C, h, w]``: a latent.

    Returns
    -------
    (int, int)
        ``(row, col)`` in ``u``.

    Examples
    --------
    >>> u = torch.ones(2, 3, 3)
    >>> u[:, 1, 2] = torch.tensor([2.0, -2.0])
    >>> donor_cell(torch.tensor([1.0, -1.0]), u)
    (1, 2)
    """
    flat = u.flatten(1).float()
    vn = v.float().norm().clamp_min(1e-12)
    un = flat.norm(dim=0).clamp_min(1e-12)
    score = (v.float() @ flat) / (vn * un) - (un / vn).log().abs()
    i = int(score.argmax())
    return divmod(i, u.shape[-1])


def counterpart_cells(vae, v: torch.Tensor, site: Site, donors: Donors, far: float) -> list[tuple[int, int]]:
    """Each donor's counterpart of a cell with vector ``v`` at ``site``.

    Of the donor's cell at the same position and its most similar vector (:func:`donor_cell`), the counterpart
    is the one whose zeroing changes the donor's decode more beyond ``far`` cells (a global code may sit at a
    fixed place, or wherever its vector is). Costs up to two decodes per donor (none where both cells coincide
    or the donors have no decodes).

    Parameters
    ----------
    vae
        As in the module docstring.
    v : torch.Tensor
        ``[C]``: the cell's vector.
    site : Site
        Where the cell is.
    donors : Donors
        The donors (:func:`make_donors`).
    far : float
        The far field starts beyond this many cells (Euclidean).

    Returns
    -------
    list of (int, int)
        One cell per donor.
    """
    out = []
    cands = []
    for j in range(donors.latents.shape[0]):
        same = (site.row, site.col)
        alike = donor_cell(v, donors.latents[j])
        if alike == same or donors.decodes is None:
            out.append(alike)
            continue
        out.append(None)
        cands += [(j, same), (j, alike)]
    if cands:
        zz = torch.stack([donors.latents[j] for j, _ in cands]).clone()
        for i, (_, (r, c)) in enumerate(cands):
            zz[i, :, r, c] = 0
        energies = []
        for start in range(0, len(cands), 8):
            dec = vae.decode(zz[start:start + 8]).float()
            for i, (j, rc) in enumerate(cands[start:start + 8]):
                e = _energy(dec[i] - donors.decodes[j].float())
                dist = cell_distance(rc, tuple(e.shape), vae.factor, metric="euclidean")
                mask = dist > far
                energies.append(float(e[mask].mean()) if bool(mask.any()) else float(e.mean()))
        for k in range(0, len(cands), 2):
            j = cands[k][0]
            out[j] = cands[k][1] if energies[k] >= energies[k + 1] else cands[k + 1][1]
    return out


def swap_information(vae, z: torch.Tensor, ref: torch.Tensor, site: Site, donors: Donors,
                     field: ReceptiveField) -> dict[str, float]:
    """Question (d): does the far field move towards the donor's colour when the cell takes a donor's vector?

    The cell's vector is replaced by each donor's counterpart vector (:func:`counterpart_cells`; see the module
    docstring) and the far-field mean colour change is regressed on the donor's colour minus the recipient's.

    Parameters
    ----------
    vae, z, ref, site
        As in the module docstring; ``z`` and ``ref`` are the recipient's.
    donors : Donors
        The donors, at ``z``'s latent size (other sizes give nan).
    field : ReceptiveField
        The recipient's reference (its ``erf`` bounds the far field).

    Returns
    -------
    dict
        ``swap_corr`` and ``swap_slope``; nan when there are no donors or no far field.
    """
    k = donors.latents.shape[0]
    if k == 0 or donors.latents.shape[-2:] != z.shape[-2:]:
        return {"swap_corr": math.nan, "swap_slope": math.nan}
    r, c = site.row, site.col
    v = z[0, :, r, c]
    zz = z.repeat(k, 1, 1, 1)
    far_cells = field.erf if math.isfinite(field.erf) else 1.0
    for j, (dr, dc) in enumerate(counterpart_cells(vae, v, site, donors, far_cells)):
        zz[j, :, r:r + site.size, c:c + site.size] = donors.latents[j, :, dr, dc][:, None, None]
    dec = vae.decode(zz).float()
    ref = ref.float()
    dist = cell_distance(site, tuple(ref.shape[-2:]), vae.factor, metric="euclidean")
    far = dist > field.erf
    if not bool(far.any()):
        far = dist > 1
    if not bool(far.any()):
        return {"swap_corr": math.nan, "swap_slope": math.nan}
    moved = (dec[:, :, far] - ref[:, :, far]).mean(-1).double()        # [K, 3]
    target = (donors.colours - ref.mean(dim=(2, 3))).double()          # [K, 3]
    a, b = moved.flatten(), target.flatten()
    denom = float(b.pow(2).sum())
    slope = float((a * b).sum()) / denom if denom > 0 else math.nan
    if float(a.std()) == 0 or float(b.std()) == 0:
        corr = 0.0
    else:
        corr = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    return {"swap_corr": corr, "swap_slope": slope}


def matched_controls(vae, z: torch.Tensor, ref: torch.Tensor, site: Site, field: ReceptiveField, *,
                     k: int = 3) -> dict[str, float]:
    """Question (b) against controls: is the far effect of zeroing the cell its own, or the change's size?

    The far-field energy of zeroing the cell over the median far-field energy of (1) ``matched_ratio``: a
    perturbation of the same norm at ``k`` ordinary cells, along minus each cell's own vector, and (2)
    ``transplant_ratio``: the cell's vector written at those cells. Near 1: the same change anywhere does the
    same; far above 1: the effect belongs to this cell. Costs ``1 + 2 k`` decodes.

    Parameters
    ----------
    vae, z, ref, site
        As in the module docstring.
    field : ReceptiveField
        The image's reference; its first ``k`` cells (other than the site) are the controls.
    k : int, keyword-only
        How many control cells.

    Returns
    -------
    dict
        ``matched_ratio``, ``transplant_ratio`` (nan without control cells) and ``profile``, the zeroed cell's
        mean change energy per pixel at distance 0, 1, ... cells.
    """
    r, c = site.row, site.col
    v = z[0, :, r, c].clone()
    mag = float(v.norm())
    cells = [rc for rc in field.cells if rc != (r, c)][:k]
    if not cells:
        return {"matched_ratio": math.nan, "transplant_ratio": math.nan, "profile": []}
    zz = z.repeat(1 + 2 * len(cells), 1, 1, 1)
    zz[0, :, r, c] = 0
    for i, (rr, cc) in enumerate(cells):
        u = z[0, :, rr, cc]
        zz[1 + i, :, rr, cc] = u - mag * u / u.norm().clamp_min(1e-12)
        zz[1 + len(cells) + i, :, rr, cc] = v
    dec = vae.decode(zz).float()
    diff = dec - ref.float()
    shape = tuple(ref.shape[-2:])

    def far_energy(i: int, rc: tuple[int, int]) -> float:
        dist = cell_distance(rc, shape, vae.factor, metric="euclidean")
        far = dist > field.erf
        return float(_energy(diff[i])[far].mean()) if bool(far.any()) else math.nan

    own = far_energy(0, (r, c))
    own_profile = ring_profile(_energy(diff[0]), cell_distance((r, c), shape, vae.factor, metric="euclidean"))
    matched = [far_energy(1 + i, rc) for i, rc in enumerate(cells)]
    planted = [far_energy(1 + len(cells) + i, rc) for i, rc in enumerate(cells)]

    def ratio(values):
        m = float(np.nanmedian(values)) if not all(math.isnan(x) for x in values) else math.nan
        return own / m if m and m > 0 else math.nan

    return {"matched_ratio": ratio(matched), "transplant_ratio": ratio(planted), "profile": own_profile}


def frozen_removed(vae, z: torch.Tensor, site: Site, field: ReceptiveField) -> float:
    """Share of the far-field energy of zeroing the cell that freezing the decoder's pathways removes.

    ``(E_live - E_frozen) / E_live`` with the GroupNorm statistics and the attention context frozen (the
    mechanism module's ``1 - share_residual``, :func:`vaeprobe.probes.mechanism.attribute_pathways` with the far
    field beyond ``floor(field.erf)`` cells).

    Parameters
    ----------
    vae, z, site, field
        As in the module docstring.

    Returns
    -------
    float
        In [0, 1] up to rounding; nan for a decoder with neither GroupNorm nor attention, or no far effect.

    Raises
    ------
    vaeprobe.probes.mechanism.MechanismError
        For a decoder the hooks cannot freeze.
    """
    from vaeprobe.probes.mechanism import attribute_pathways, pathway_layers

    layers = pathway_layers(vae)
    if not (layers.get("groupnorm") or layers.get("attention")):
        return math.nan
    radius = max(0, int(math.floor(field.erf)))
    df = attribute_pathways(vae, z, [site], "zero", radius=radius).table
    if "share_residual" not in df or df["share_residual"].isna().all():
        return math.nan
    return float(1.0 - df["share_residual"].iloc[0])


# -- the estimator ------------------------------------------------------------------------------------------------

class CellVerdict:
    """Verdicts for chosen cells of one latent (zero ablation).

    Parameters
    ----------
    vae
        As in the module docstring.
    rules : VerdictRules, keyword-only
        Thresholds (default: the calibrated ones).
    donors : Donors, keyword-only
        Donor latents for the swap test; without them no cell can be ``global-information``.
    evidence : bool, keyword-only
        Also compute the matched controls and the frozen-pathway share for cells that are not ``ordinary``.
    keep_profiles : bool, keyword-only
        Add a ``profile`` column: each cell's mean change energy per pixel at distance 0, 1, ... cells.
    swap : {"auto", "always"}, keyword-only
        ``auto`` runs the swap test only for cells whose profile is global (the only ones it can change the
        verdict of); ``always`` for every cell (calibration).
    n_reference : int, keyword-only
        How many ordinary cells :func:`receptive_field` zeroes for the image's reference.
    seed : int, keyword-only
        Seed of the reference cells' draw.

    Examples
    --------
    >>> from vaeprobe.models.loading import load_vae
    >>> vae = load_vae("builtin:tiny-random")
    >>> z = vae.encode(torch.rand(1, 3, 64, 64) * 2 - 1).mean
    >>> df = CellVerdict(vae).classify(z, [(2, 3), (5, 5)])
    >>> list(df.columns[:3]), set(df.verdict) <= set(VERDICTS)
    (['row', 'col', 'verdict'], True)
    """

    def __init__(self, vae, *, rules: VerdictRules | None = None, donors: Donors | None = None,
                 evidence: bool = True, swap: str = "auto", n_reference: int = 12, seed: int = 0,
                 keep_profiles: bool = False):
        if swap not in ("auto", "always"):
            raise ValueError(f"swap must be 'auto' or 'always', got {swap!r}")
        self.vae, self.rules, self.donors = vae, rules or VerdictRules(), donors
        self.evidence, self.swap, self.n_reference, self.seed = evidence, swap, n_reference, seed
        self.keep_profiles = keep_profiles

    def reference(self, z: torch.Tensor, ref: torch.Tensor | None = None, *,
                  exclude: Sequence[tuple[int, int]] = ()) -> ReceptiveField:
        """The image's :class:`ReceptiveField` (:func:`receptive_field` with ``n_reference`` and ``seed``).

        Parameters
        ----------
        z
            As in the module docstring.
        ref : torch.Tensor, optional
            Its clean decode (decoded when not given).
        exclude : sequence of (int, int), keyword-only
            Cells never used as reference.

        Returns
        -------
        ReceptiveField
        """
        return receptive_field(self.vae, z, ref, n=self.n_reference, seed=self.seed, exclude=exclude)

    def classify(self, z: torch.Tensor, cells: Sequence[tuple[int, int]], *, ref: torch.Tensor | None = None,
                 field: ReceptiveField | None = None) -> pd.DataFrame:
        """The verdict of each cell, from zeroing it.

        Parameters
        ----------
        z
            As in the module docstring.
        cells : sequence of (int, int)
            The cells to classify.
        ref : torch.Tensor, keyword-only
            The clean decode of ``z`` (decoded when not given).
        field : ReceptiveField, keyword-only
            The image's reference (measured with the cells excluded when not given).

        Returns
        -------
        pandas.DataFrame
            One row per cell: ``row, col, verdict``, the measures and evidence of the module docstring,
            ``far_score``, ``is_global`` and ``erf``; ``attrs["field"]`` holds the reference as a dict.
        """
        if ref is None:
            ref = self.vae.decode(z)
        cells = [tuple(int(v) for v in rc) for rc in cells]
        if field is None:
            field = self.reference(z, ref, exclude=cells)
        norm = z[0].float().norm(dim=0)
        med = float(norm.median().clamp_min(1e-12))
        sites = [Site(r, c) for r, c in cells]
        rows = []
        for start in range(0, len(sites), 8):
            chunk = sites[start:start + 8]
            zz = z.repeat(len(chunk), 1, 1, 1)
            for i, s in enumerate(chunk):
                zz[i, :, s.row, s.col] = 0
            diff = self.vae.decode(zz).float() - ref.float()
            dz2 = [float(z[0, :, s.row, s.col].float().pow(2).sum()) for s in chunk]
            ratio = [float(norm[s.row, s.col]) / med for s in chunk]
            got = profile_columns(diff, chunk, self.vae.factor, field, dz2, ratio)
            if self.keep_profiles:  # mean energy per pixel at distance 0, 1, ... cells (for offline analysis)
                for i, s in enumerate(chunk):
                    got[i]["profile"] = ring_profile(
                        _energy(diff[i]), cell_distance(s, tuple(diff.shape[-2:]), self.vae.factor, metric="euclidean"))
            rows += got
        out = []
        for s, row in zip(sites, rows):
            row = {"row": s.row, "col": s.col, **row, **{k: math.nan for k in EVIDENCE_COLUMNS}}
            row.update(self.evidence_for(z, ref, s, field, row))
            row["far_score"] = self.rules.score(row)
            row["verdict"] = self.rules.classify(row)
            out.append(row)
        df = pd.DataFrame(out)
        cols = ["row", "col", "verdict"] + [c for c in df.columns if c not in ("row", "col", "verdict")]
        df = df[cols]
        df["is_global"] = df["verdict"].isin(GLOBAL_VERDICTS)
        df["erf"] = field.erf
        df.attrs["field"] = field.to_dict()
        return df

    def evidence_for(self, z, ref, site: Site, field: ReceptiveField, row: dict) -> dict:
        """The evidence beyond the profile for one cell.

        The swap test for cells whose shape is global (every cell with ``swap="always"``; only with donors);
        the matched controls and the frozen share for every cell whose shape or norm is unusual (when
        ``evidence``).

        Parameters
        ----------
        z, ref, site, field
            As in the module docstring.
        row : dict
            The cell's profile measures (:func:`profile_columns`).

        Returns
        -------
        dict
            Some of :data:`EVIDENCE_COLUMNS` (those that ran).
        """
        from vaeprobe.probes.mechanism import MechanismError

        got: dict = {}
        shape = self.rules.shape(row)
        if (shape == "global" or self.swap == "always") and self.donors is not None:
            got.update(swap_information(self.vae, z, ref, site, self.donors, field))
        if self.evidence and (shape != "local" or row.get("norm_ratio", 0.0) >= self.rules.norm_ratio):
            got.update({k: v for k, v in matched_controls(self.vae, z, ref, site, field).items() if k != "profile"})
            try:
                got["frozen_removed"] = frozen_removed(self.vae, z, site, field)
            except MechanismError:  # a decoder the hooks cannot freeze has no frozen share
                got["frozen_removed"] = math.nan
        return got


def evidence_rows(records: Sequence[dict], rules: VerdictRules, n: int) -> list[int]:
    """The rows that get the matched controls and the frozen share: the ``n`` unusual ones (profile not local, or
    a latent-norm outlier) with the largest ``far_rel``, in that order.

    Parameters
    ----------
    records : sequence of dict
        The rows' :data:`PROFILE_COLUMNS`.
    rules : VerdictRules
        The thresholds.
    n : int
        How many.

    Returns
    -------
    list of int
        Row indices.

    Examples
    --------
    >>> rows = [{"norm_ratio": 1.0, "far_rel": 0.1, "band_rel": 1e-6, "far_excess": 1.0},
    ...         {"norm_ratio": 40.0, "far_rel": 0.01, "band_rel": 1e-6, "far_excess": 1.0}]
    >>> evidence_rows(rows, VerdictRules(), 2)
    [1]
    """
    unusual = [i for i, r in enumerate(records) if rules.shape(r) != "local" or r["norm_ratio"] >= rules.norm_ratio]
    unusual.sort(key=lambda i: -np.nan_to_num(records[i]["far_rel"], nan=-1.0))
    return unusual[:max(0, n)]


def attach_verdicts(vae, z: torch.Tensor, ref: torch.Tensor, df: pd.DataFrame, field: ReceptiveField, *,
                    rules: VerdictRules | None = None, donors: Donors | None = None,
                    evidence: int = 4) -> pd.DataFrame:
    """Add the verdict columns to a scan table ``df`` of latent ``z``.

    Rows that lack the profile measures (a scan with another operator than ``zero``, patches or one channel)
    get them from zeroing the cell ``(row, col)``, which costs one decode per row. The swap test runs for every
    row whose profile is global (``len(donors)`` decodes each, and up to twice that to find each donor's
    counterpart cell); the matched controls and the frozen-pathway share for the ``evidence`` unusual rows
    (profile not local, or a latent-norm outlier) with the largest ``far_rel``.

    Parameters
    ----------
    vae, z, ref
        As in the module docstring; ``z`` is the scanned latent.
    df : pandas.DataFrame
        The scan table (columns ``row``, ``col``; the profile measures when the scan zeroed single cells).
    field
        As in the module docstring.
    rules : VerdictRules, keyword-only
        Thresholds (default: the calibrated ones).
    donors : Donors, keyword-only
        Donors for the swap test; without them no row can be ``global-information``.
    evidence : int, keyword-only
        How many unusual rows get the matched controls and the frozen-pathway share.

    Returns
    -------
    pandas.DataFrame
        A copy of ``df`` with ``verdict``, ``is_global`` (True exactly for ``global`` and
        ``global-information``), ``far_score`` (:meth:`VerdictRules.score`), ``erf`` and the columns of
        :data:`EVIDENCE_COLUMNS`; ``attrs["profiles"]`` holds the distance profiles (mean energy per pixel at
        distance 0, 1, ... cells) of the reference cells and of the evidence rows, and ``attrs["decodes"]`` the
        number of images these extra measurements decoded.

    Examples
    --------
    >>> from vaeprobe.models.loading import load_vae
    >>> vae = load_vae("builtin:tiny-random")
    >>> z = vae.encode(torch.rand(1, 3, 64, 64) * 2 - 1).mean
    >>> ref = vae.decode(z)
    >>> rf = receptive_field(vae, z, ref, n=3)
    >>> out = attach_verdicts(vae, z, ref, pd.DataFrame({"row": [2, 5], "col": [3, 5]}), rf, evidence=0)
    >>> len(out), set(out.verdict) <= set(VERDICTS), out.attrs["decodes"]   # one decode per row for the profile
    (2, True, 2)
    """
    from vaeprobe.probes.mechanism import MechanismError

    rules = rules or VerdictRules()
    df = df.copy()
    start = vae.decoded
    if not set(PROFILE_COLUMNS) <= set(df.columns) or df[list(PROFILE_COLUMNS[2:])].isna().all().all():
        prof = CellVerdict(vae, rules=rules, evidence=False).classify(z, list(zip(df.row, df.col)), ref=ref,
                                                                       field=field)
        for c in PROFILE_COLUMNS:
            df[c] = prof[c].to_numpy()
    for c in EVIDENCE_COLUMNS:
        df[c] = math.nan
    records = df[list(PROFILE_COLUMNS)].to_dict("records")
    shapes = [rules.shape(r) for r in records]
    if donors is not None:
        for i, shp in enumerate(shapes):
            if shp == "global":
                got = swap_information(vae, z, ref, Site(int(df.row.iloc[i]), int(df.col.iloc[i])), donors, field)
                for k, v in got.items():
                    df.iloc[i, df.columns.get_loc(k)] = v
    profiles = {"reference": field.profile, "cells": {}}
    for i in evidence_rows(records, rules, evidence):
        site = Site(int(df.row.iloc[i]), int(df.col.iloc[i]))
        got = matched_controls(vae, z, ref, site, field)
        profiles["cells"][f"{site.row},{site.col}"] = got.pop("profile")
        try:
            got["frozen_removed"] = frozen_removed(vae, z, site, field)
        except MechanismError:  # a decoder the hooks cannot freeze has no frozen share
            pass
        for k, v in got.items():
            df.iloc[i, df.columns.get_loc(k)] = v
    df["far_score"] = [rules.score(r) for r in df.to_dict("records")]
    df["verdict"] = [rules.classify(r) for r in df.to_dict("records")]
    df["is_global"] = df["verdict"].isin(GLOBAL_VERDICTS)
    df["erf"] = field.erf
    df.attrs["profiles"] = profiles
    df.attrs["decodes"] = vae.decoded - start
    return df
