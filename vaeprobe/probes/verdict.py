"""Verdicts: how much does removing a latent cell change the image far away, does that change fade with distance,
through which pathway, and is it the cell's content?

Every measurement here is physical. A cell is *removed* by an operator that does not depend on the latent's
coordinates (:data:`REMOVAL`, ``smudge``: the cell takes the mean of its neighbours), the change of the decode is
measured in **8-bit levels** (the decoder's ``[-1, 1]`` output times 127.5, the RMS over the three channels), and
distances in latent cells (Euclidean, between the pixel's cell and the removed cell).

Per image, :func:`receptive_field` first removes a few *ordinary* cells (seeded, interior, away from latent-norm
outliers in standardised coordinates) and measures the decoder's kernel: the effective receptive field ``erf``
(the distance that holds ``ERF_SHARE`` of their change energy, median over the cells), their distance profile
normalised by each cell's near field (distance <= 1), its far floor (what the kernel keeps at large distances:
the ordinary cells' own plateau) and how much that floor scatters between cells. Then per cell
(:func:`profile_columns`), with ``e(p)`` the change energy of pixel ``p`` (summed over RGB):

=================== ============================================================================================
``norm_ratio``      the cell's norm over the image's median norm, in standardised coordinates (each channel
                    centred on the image's median and divided by its robust std, :func:`standardise`)
``dz2``             ``||dz||^2`` of the removal in the same standardised units
``near_levels``     RMS change per channel within one cell of the cell, in 8-bit levels
``far_levels``      RMS change per channel beyond ``erf``, in 8-bit levels (everything: kernel, wide, plateau)
``band_levels``     RMS per channel of the change beyond the kernel in the band just beyond ``erf``
                    (``erf < d <= erf + max(erf, 2)``), in 8-bit levels
``far_plateau``     the part of the change that does not decay: ``e`` minus the kernel's decaying part scaled to
                    this cell's near field, averaged over the outer half of the far field (the far pixels beyond
                    their median distance), as an RMS per channel in 8-bit levels. A flat shift of ``delta``
                    levels everywhere reads ``delta``
``far_plateau_lo``  a lower bound of the plateau (``_hi``: upper): the lower (upper) quartile of the plateaus of 8
                    angular sectors around the cell, widened by twice the scatter of the ordinary cells' far
                    floor scaled to this cell's near field; a plateau whose brightness varies with the image's
                    content keeps a lower bound well above 0 as long as most directions carry it
``decay_exponent``  ``alpha`` of ``energy ~ d^-alpha`` between the band and the outer half of the far field (the
                    energy beyond the kernel in each, at their mean distances): about 0 for a plateau, 2 or more
                    for an effect that fades (inf when nothing is left in the outer half)
``decay_exponent_lo`` the smallest ``alpha`` the data allow: the band's energy two standard errors lower and the
                    plateau's two higher (standard errors from the scatter over 8 angular sectors); a change whose
                    brightness varies with the image's content has a wide range
``far_excess``      energy beyond ``erf`` over what the kernel scaled to this cell's near field puts there
``excess_ratio``    ``far_excess`` over twice the largest ``far_excess`` of the image's reference cells (at least
                    2): over 1, the far effect is more than any ordinary cell's shape allows
``ordinary_plateau`` the largest ``far_plateau`` of the image's reference cells, in 8-bit levels
``tail_share``      share of the change energy beyond ``erf``
``far_abs``         mean change energy per pixel beyond ``erf`` (``[-1, 1]`` units, summed over RGB)
``far_rel``         ``far_abs`` over the clean decode's variance per pixel (summed over RGB)
=================== ============================================================================================

:class:`VerdictRules` turns them into one of :data:`VERDICTS` with thresholds that carry a unit:

- ``global`` when ``far_plateau_lo >= visible_levels`` (default 1: the smallest step an 8-bit image can show),
  ``far_plateau_lo`` is over ``ordinary_plateau`` (more than any of the image's ordinary cells keeps far away)
  and the change may not decay, ``decay_exponent_lo <= max_decay`` (default 1: energy falling by at most half
  per doubling of distance);
  ``global-information`` when, in addition, the swap test (:func:`swap_information`) moves the far field at least
  half-way towards a donor's far-field content (its mean colour or its coarse structure), with correlation 0.9;
- ``wide-local`` when the change beyond the kernel is visible just beyond the receptive field
  (``band_levels >= visible_levels``), more than twice what any of the image's ordinary cells puts there
  (``far_excess`` over twice the largest reference cell's own), and it fades (``decay_exponent > max_decay``);
- otherwise ``high-norm`` when ``norm_ratio`` is at least the spot threshold, else ``ordinary``.

``below_visibility`` marks a *global pathway below visibility*: a plateau significant against the ordinary cells
(``far_plateau_lo`` over the largest plateau of the reference cells) that does not decay, but is under
``visible_levels``. The rules compare a cell with the same image's ordinary cells, never with the other scanned
cells. What the thresholds mean and how they were chosen: docs/verdicts.md.

Every step commutes with a per-channel affine reparametrisation of the latent (``z' = a z + b`` with a decoder
that compensates): the removal, the standardised norms, the choice of reference and donor cells, the matched
controls (the same change ``dz`` elsewhere), so the same decoder in other latent coordinates gets the same
measurements and verdicts. ``removal="zero"`` remains available; zero is an arbitrary origin of the latent.

Parameters named alike mean the same in every function and method here: ``vae`` is the model (a
:class:`~vaeprobe.models.adapter.VAE`), ``z`` one latent ``[1, C, h, w]``, ``ref`` its clean decode
``[1, 3, H, W]``, ``site`` the cell under test (a :class:`~vaeprobe.probes.perturb.Site`) and ``field`` the image's
reference for ordinary cells, a :class:`ReceptiveField` (:func:`receptive_field`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from vaeprobe.probes.geometry import cell_distance, ring_profile, sample_cells
from vaeprobe.probes.latents import DEFAULT_THRESHOLD
from vaeprobe.probes.engine import DecodedBatch, Engine
from vaeprobe.schema import (EVIDENCE_COLUMNS, GLOBAL, GLOBAL_INFORMATION, GLOBAL_VERDICTS, HIGH_NORM, ORDINARY,
                             PROFILE_COLUMNS, VERDICTS, WIDE_LOCAL)
from vaeprobe.probes.perturb import Operator, Site, apply_batch, parse_operator

REMOVAL = "smudge"   # the verdicts' removal: the cell takes the mean of its neighbours (affine-invariant)
LEVELS = 127.5       # 8-bit levels per unit of the decoder's [-1, 1] output
ERF_SHARE = 0.95     # the effective receptive field holds this share of an ordinary cell's change energy
BAND_MIN = 2.0       # the band beyond the receptive field is at least this many cells wide
SECTORS = 8          # angular sectors of the plateau's standard error


def _energy(diff: torch.Tensor) -> torch.Tensor:
    return diff.double().pow(2).sum(-3)  # [..., H, W]


def levels(energy: float) -> float:
    """An energy per pixel (squared change summed over RGB, ``[-1, 1]`` units) as an RMS per channel in 8-bit levels.

    Negative energies (an estimate below zero) read 0; nan stays nan.

    Examples
    --------
    >>> round(levels(3 * (8 / 127.5) ** 2), 6), levels(-1.0)
    (8.0, 0.0)
    """
    if energy is None or math.isnan(energy):
        return math.nan
    return LEVELS * math.sqrt(max(energy, 0.0) / 3.0)


def channel_centre_scale(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel, the median over the positions and the robust std of a latent ``[1, C, h, w]`` or ``[C, h, w]``.

    The robust std is 1.4826 x the median absolute deviation (the std where that is 0, then 1); medians are
    midpoint quantiles, so both move with ``a z + b`` (``a`` times the scale for ``|a|``). Returns ``[..., C, 1]``
    tensors (float32) that broadcast against ``z.flatten(-2)``.
    """
    flat = z.detach().float().flatten(-2)
    med = torch.quantile(flat, 0.5, dim=-1, keepdim=True, interpolation="midpoint")
    mad = torch.quantile((flat - med).abs(), 0.5, dim=-1, keepdim=True, interpolation="midpoint") * 1.4826
    std = flat.std(dim=-1, keepdim=True) if flat.shape[-1] > 1 else torch.ones_like(mad)
    scale = torch.where(mad > 1e-12 * (1 + med.abs()), mad, torch.where(std > 0, std, torch.ones_like(std)))
    return med, scale


def standardise(z: torch.Tensor) -> torch.Tensor:
    """``z`` with each channel centred on its median over the positions and divided by its robust std.

    (:func:`channel_centre_scale`). The result is the same for ``a z + b`` (per channel, any ``a != 0``) up to the
    sign of each channel: norms and cosine similarities of standardised vectors do not depend on the latent's
    coordinates.

    Parameters
    ----------
    z : torch.Tensor
        ``[1, C, h, w]`` or ``[C, h, w]``.

    Returns
    -------
    torch.Tensor
        float32, the shape of ``z``.

    Examples
    --------
    >>> z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    >>> a, b = torch.tensor([2.0, 0.5, -3.0, 1.0]).view(1, 4, 1, 1), torch.tensor([5.0, -1.0, 0.0, 9.0]).view(1, 4, 1, 1)
    >>> bool(torch.allclose(standardise(a * z + b).abs(), standardise(z).abs(), atol=1e-5))
    True
    """
    med, scale = channel_centre_scale(z)
    return ((z.detach().float().flatten(-2) - med) / scale).reshape(z.shape)


def standard_norm(z: torch.Tensor) -> torch.Tensor:
    """``[h, w]``: each cell's norm in :func:`standardise`'d coordinates (of a ``[1, C, h, w]`` latent)."""
    return standardise(z)[0].norm(dim=0)


def _removal(op: Operator | str) -> Operator:
    return parse_operator(op) if isinstance(op, str) else op


def _erf_of(e: torch.Tensor, dist: torch.Tensor, share: float) -> float:
    """Smallest distance whose disc holds ``share`` of the energy ``e`` (both ``[H, W]``); nan if no change."""
    d = dist.flatten()
    order = torch.argsort(d)
    cum = e.flatten()[order].cumsum(0)
    if float(cum[-1]) <= 0:
        return math.nan
    k = int(torch.searchsorted(cum, share * cum[-1]))
    return float(d[order][min(k, len(d) - 1)])


def _nanmedian(values) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.median(vals)) if vals else math.nan


def output_range_problem(x: torch.Tensor, ref: torch.Tensor) -> str | None:
    """Whether a model's clean decode ``ref`` is not in about ``[-1, 1]`` like its input ``x`` (both ``[1, 3, H, W]``).

    The units of the verdict measures (8-bit levels = 127.5 x the change in ``[-1, 1]``) assume that range.
    Reported: more than 1 % of the decode's values beyond 1.5 in magnitude, or a decode that follows its input
    (least-squares fit ``decode = a x + b`` explaining at least half its variance) with a scale ``a`` outside
    [0.6, 1.6] or an offset ``|b| > 0.3``, as a model with outputs in ``[0, 1]`` gives (``a = 0.5, b = 0.5``). A
    decode that does not follow its input (an untrained model) is not judged by the fit.

    Returns
    -------
    str or None
        One line describing the problem, or None.

    Examples
    --------
    >>> x = torch.rand(1, 3, 16, 16) * 2 - 1
    >>> output_range_problem(x, x) is None, output_range_problem(x, (x + 1) / 2) is not None
    (True, True)
    >>> output_range_problem(x, 0.01 * torch.randn(1, 3, 16, 16)) is None   # unrelated to its input: no fit
    True
    """
    a_x, a_r = x.detach().double().flatten(), ref.detach().double().flatten()
    outside = float((a_r.abs() > 1.5).double().mean())
    if outside > 0.01:
        return (f"decodes are not in about [-1, 1] ({100 * outside:.1f}% of values beyond 1.5); the far-field "
                f"levels assume [-1, 1] outputs, so read them as relative, or wrap the model to return [-1, 1]")
    var_x, var_r = float(a_x.var()), float(a_r.var())
    if a_x.numel() != a_r.numel() or var_x <= 1e-8 or var_r <= 1e-12:
        return None
    cov = float(((a_x - a_x.mean()) * (a_r - a_r.mean())).mean())
    scale, r2 = cov / var_x, cov * cov / (var_x * var_r)
    offset = float(a_r.mean() - scale * a_x.mean())
    if r2 < 0.5 or (0.6 <= scale <= 1.6 and abs(offset) <= 0.3):
        return None
    return (f"decodes are not in about [-1, 1] like the input (fit decode = {scale:.2f} x input {offset:+.2f}); "
            f"the far-field levels assume [-1, 1] outputs, so read them as relative, or wrap the model to return "
            f"[-1, 1]")


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
        The ordinary reference cells that were removed.
    profile : list of float
        Median over the cells of the mean energy at integer distance d, d = 0, 1, ...
    dz2 : float
        Median standardised ``||dz||^2`` of the reference cells.
    shape : list of float
        Median profile, each cell's normalised by its near field (distance <= 1): the kernel.
    floor : float
        The kernel's far floor: median over the cells of their outer-far-field energy over their near field.
    floor_spread : float
        The std over the cells of that ratio (the kernel's uncertainty at large distances, per unit near field).
    kernel : list of float
        The kernel by exact distance: the median over the cells of the mean energy at squared cell gap
        ``dr^2 + dc^2 = k`` over their near field, for ``k`` up to ``(4 erf + 4)^2`` (nan where no pixel has it).
        Distances are gaps between integer cells, so this binning is exact where ``shape``'s rounding mixes
        distances whose energies differ, by a different mix for every cell near a border.
    excess : list of float
        Each reference cell's own ``far_excess`` against the kernel.
    plateaus : list of float
        Each reference cell's own ``far_plateau`` in 8-bit levels.
    removal : str
        The removal operator's name.
    decodes : dict of Site to torch.Tensor
        The reference cells' removed decodes ``[3, H, W]`` (float32), which a scan of the same latent with the same
        removal reuses instead of decoding them again (:func:`vaeprobe.probes.scan.two_stage_scan`, through
        :meth:`decodes_for`); not a field: :meth:`to_dict` leaves it out, and a field made otherwise has none.

    Examples
    --------
    >>> rf = ReceptiveField(erf=1.0, tail0=0.05, variance=1.0, cells=[], profile=[], dz2=1.0, shape=[1.0, 0.5])
    >>> rf.expected(torch.tensor([0.0, 1.0, 3.0])).tolist()   # past the profile: its last value
    [1.0, 0.5, 0.5]
    """

    erf: float
    tail0: float
    variance: float
    cells: list[tuple[int, int]]
    profile: list[float]
    dz2: float
    shape: list[float] = field(default_factory=list)
    floor: float = 0.0
    floor_spread: float = 0.0
    kernel: list[float] = field(default_factory=list)
    excess: list[float] = field(default_factory=list)
    plateaus: list[float] = field(default_factory=list)
    removal: str = REMOVAL

    def expected(self, dist: torch.Tensor) -> torch.Tensor:
        """The kernel: an ordinary cell's energy at each distance in ``dist``, per unit of near-field energy.

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
        last = prof[np.nonzero(finite)[0][-1]]
        prof = np.nan_to_num(np.where(finite, prof, np.nan), nan=last)
        idx = torch.round(dist).long().clamp(max=len(prof) - 1)
        return torch.from_numpy(prof)[idx]

    def decaying(self, dist: torch.Tensor) -> torch.Tensor:
        """The kernel's decaying part: :meth:`expected` less its far floor, never below 0 (nan kernel: 0)."""
        k = self.expected(dist)
        if self.kernel:
            exact = torch.tensor([math.nan if v is None else v for v in self.kernel], dtype=torch.float64)
            idx = torch.round(dist.double() ** 2).long()
            inside = idx < len(exact)
            vals = exact[idx.clamp(max=len(exact) - 1)]
            k = torch.where(inside & torch.isfinite(vals), vals, k)
        k = k - (self.floor if math.isfinite(self.floor) else 0.0)
        return torch.nan_to_num(k.clamp(min=0), nan=0.0)

    @property
    def excess_bound(self) -> float:
        """Twice the largest ``far_excess`` of a reference cell (at least 2): the wide-local bar."""
        vals = [v for v in self.excess if math.isfinite(v)]
        return 2.0 * max([1.0] + vals)

    @property
    def plateau_bound(self) -> float:
        """The largest ``far_plateau`` of a reference cell, in levels (0 without cells)."""
        vals = [v for v in self.plateaus if math.isfinite(v)]
        return max([0.0] + vals)

    decodes = MappingProxyType({})  # none by default; receptive_field sets the instance's own
    operator = None  # the removal operator that made ``decodes`` (receptive_field sets it)

    def decodes_for(self, op: Operator) -> dict:
        """:attr:`decodes` if ``op`` is the very operator that made them (its name alone is not enough: a random
        operator's seed is not in its name), else an empty dict."""
        try:
            same = self.operator is not None and bool(op == self.operator)
        except (RuntimeError, TypeError):  # operators holding tensors do not compare
            same = False
        return dict(self.decodes) if same else {}

    def to_dict(self) -> dict:
        """The fields as a plain dict (for JSON and ``DataFrame.attrs``; the decodes are left out)."""
        return asdict(self)


def ordinary_cells(z: torch.Tensor, n: int, *, seed: int = 0, exclude: Sequence[tuple[int, int]] = (),
                   threshold: float = DEFAULT_THRESHOLD) -> list[tuple[int, int]]:
    """``n`` seeded ordinary cells of ``z``: interior, not latent-norm outliers, away from ``exclude``.

    The allowed cells have a standardised norm ratio (:func:`standard_norm` over its median) under half of
    ``threshold`` and a standardised norm under the 90th percentile, are not in ``exclude`` and are interior (not
    on the border when the latent is at least 4 cells wide); they are drawn by
    :func:`vaeprobe.probes.geometry.sample_cells` with those cells as the allowed mask. When no cell qualifies,
    any cell of the latent may be drawn (``exclude`` included).

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
    >>> z = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    >>> z[0, :, 2, 2] = 50.0   # a latent-norm outlier
    >>> cells = ordinary_cells(z, 20, exclude=[(3, 3)])
    >>> (2, 2) in cells, (3, 3) in cells, min(min(rc) for rc in cells) >= 1, max(max(rc) for rc in cells) <= 4
    (False, False, True, True)
    """
    norm = standard_norm(z)
    h, w = norm.shape
    ratio = norm / norm.median().clamp_min(1e-12)
    ok = (ratio < threshold / 2) & (norm <= torch.quantile(norm.flatten(), 0.9))
    if h >= 4 and w >= 4:
        ok[0, :] = ok[-1, :] = False
        ok[:, 0] = ok[:, -1] = False
    for r, c in exclude:
        ok[r, c] = False
    return sample_cells(h, w, n, allowed=ok if bool(ok.any()) else None, seed=seed)


def _split(mask: torch.Tensor, dist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``mask`` split at its pixels' median distance: (up to the median, beyond it); beyond is never empty."""
    med = float(dist[mask].median())
    outer = mask & (dist > med)
    if not bool(outer.any()):
        return mask & torch.zeros_like(mask), mask
    return mask & (dist <= med), outer


def _sector_means(res: torch.Tensor, region: torch.Tensor, site: Site, factor: int) -> torch.Tensor:
    """Means of ``res`` over ``region`` in each of :data:`SECTORS` angular sectors around the site (sectors with at
    least a quarter of the average sector's pixels)."""
    ys, xs = torch.nonzero(region, as_tuple=True)
    cy, cx = (site.row + site.size / 2) * factor, (site.col + site.size / 2) * factor
    ang = torch.atan2(ys.double() + 0.5 - cy, xs.double() + 0.5 - cx)
    idx = ((ang + math.pi) / (2 * math.pi) * SECTORS).long().clamp(0, SECTORS - 1)
    vals = res[region]
    counts = torch.bincount(idx, minlength=SECTORS)
    sums = torch.bincount(idx, weights=vals, minlength=SECTORS)
    use = counts >= max(1.0, 0.25 * float(counts.sum()) / SECTORS)
    return (sums[use] / counts[use]).double()


def _sector_error(res: torch.Tensor, region: torch.Tensor, site: Site, factor: int) -> float:
    """Standard error of the mean of ``res`` over ``region`` from its scatter over the sectors of
    :func:`_sector_means` (``|mean|`` with fewer than 2)."""
    means = _sector_means(res, region, site, factor)
    if means.numel() < 2:
        return abs(float(res[region].mean()))
    return float(means.std()) / math.sqrt(means.numel())


def _cell_measures(e: torch.Tensor, dist: torch.Tensor, site: Site, factor: int, field: ReceptiveField) -> dict:
    """The distance measures of one cell's change energy ``e`` (see :func:`profile_columns`)."""
    erf = field.erf if math.isfinite(field.erf) else 1.0
    far = dist > erf
    total = float(e.sum())
    if total == 0:
        return {"near_levels": 0.0, "far_levels": 0.0, "band_levels": 0.0, "far_plateau": 0.0,
                "far_plateau_lo": 0.0, "far_plateau_hi": 0.0, "far_excess": 0.0, "tail_share": 0.0,
                "far_abs": 0.0, "far_rel": 0.0}
    near = float(e[dist <= 1].mean())
    row = {"near_levels": levels(near)}
    if not bool(far.any()):
        return row
    res = e - near * field.decaying(dist)
    far_e = e[far]
    expected = float((near * field.expected(dist[far])).sum())
    band = far & (dist <= erf + max(erf, BAND_MIN))
    inner, outer = _split(far, dist)
    plateau = float(res[outer].mean())
    # the plateau's range over directions: the lower and upper quartile of the 8 sectors' plateaus (a plateau
    # that one side of the image holds alone has a low lower quartile), widened by two standard errors of the
    # ordinary cells' kernel floor scaled to this cell's near field; with fewer than 2 usable sectors, no bound
    kse = near * field.floor_spread
    sectors = _sector_means(res, outer, site, factor)
    if sectors.numel() >= 2:
        q_lo, q_hi = (float(q) for q in torch.quantile(sectors, torch.tensor([0.25, 0.75], dtype=sectors.dtype)))
    else:
        q_lo, q_hi = 0.0, 2 * abs(plateau)
    p_lo, p_hi = min(plateau, q_lo) - 2 * kse, max(plateau, q_hi) + 2 * kse
    row.update(far_levels=levels(float(far_e.mean())), band_levels=levels(float(res[band].mean())),
               far_plateau=levels(plateau), far_plateau_lo=levels(p_lo), far_plateau_hi=levels(p_hi),
               far_excess=float(far_e.sum()) / expected if expected > 0 else math.inf,
               tail_share=float(far_e.sum()) / total, far_abs=float(far_e.mean()),
               far_rel=float(far_e.mean()) / field.variance if field.variance > 0 else math.nan)
    e1, d1, d2 = float(res[band].mean()), float(dist[band].mean()), float(dist[outer].mean())
    row["decay_exponent"] = _exponent(e1, plateau, d1, d2)
    se1 = _sector_error(res, band, site, factor)
    # the smallest decay the data allow: the band as low and the plateau as high as two standard errors let them
    row["decay_exponent_lo"] = _exponent(e1 - 2 * se1, p_hi, d1, d2)
    return row


def _exponent(near: float, far: float, d_near: float, d_far: float) -> float:
    """``alpha`` of ``energy ~ d^-alpha`` through two points; inf when only the near one is positive, -inf when it
    is not (nothing to decay from), nan when the distances do not grow."""
    if not d_far > d_near:
        return math.nan
    if near <= 0:
        return -math.inf
    if far <= 0:
        return math.inf
    return math.log(near / far) / math.log(d_far / d_near)


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
        ``dz2[i]``: the squared (standardised) norm of decode ``i``'s latent perturbation.
    norm_ratio : sequence of float
        ``norm_ratio[i]``: the (standardised) norm ratio of decode ``i``'s cell.

    Returns
    -------
    list of dict
        One dict per decode with the keys of :data:`PROFILE_COLUMNS` (nan where a measure is undefined).

    Examples
    --------
    A flat shift of 8 levels everywhere beyond a local bump reads 8 levels, and it does not decay (exponent about 0):

    >>> rf = ReceptiveField(erf=1.0, tail0=0.05, variance=1.0, cells=[], profile=[], dz2=1.0,
    ...                     shape=[1.0, 0.01, 0.001], floor=0.001)   # energy falls 100x past the cell
    >>> d = cell_distance(Site(3, 3), (128, 128), 8, metric="euclidean")
    >>> diff = (8 / 127.5 + 0.5 * (d <= 1).float()).expand(1, 3, 128, 128)
    >>> cols = profile_columns(diff, [Site(3, 3)], 8, rf, [4.0], [1.0])[0]
    >>> [round(cols[k], 2) for k in ("far_plateau", "far_plateau_lo", "far_plateau_hi", "decay_exponent")]
    [8.0, 8.0, 8.0, -0.08]
    """
    shape = tuple(diff.shape[-2:])
    out = []
    for i, site in enumerate(sites):
        row = {k: math.nan for k in PROFILE_COLUMNS}
        row.update(norm_ratio=float(norm_ratio[i]), dz2=float(dz2[i]))
        dist = cell_distance(site, shape, factor, metric="euclidean")
        row.update(_cell_measures(_energy(diff[i]), dist, site, factor, field))
        row["excess_ratio"] = row["far_excess"] / field.excess_bound
        row["ordinary_plateau"] = field.plateau_bound
        out.append(row)
    return out


def removal_columns(z: torch.Tensor, batch: DecodedBatch, ref: torch.Tensor, factor: int,
                    field: ReceptiveField) -> list[dict[str, float]]:
    """:func:`profile_columns` of one decoded batch of removals of latent ``z`` (the engine's
    :class:`~vaeprobe.probes.engine.DecodedBatch`): the one place that turns removals into verdict measures.

    Parameters
    ----------
    z : torch.Tensor
        The clean latent ``[1, C, h, w]``.
    batch : DecodedBatch
        Its perturbed latents and their decodes.
    ref : torch.Tensor
        The clean decode of ``z``.
    factor : int
        The VAE's downsampling factor.
    field : ReceptiveField
        The image's reference.

    Returns
    -------
    list of dict
        One dict per site, the keys of :data:`PROFILE_COLUMNS`.
    """
    _, scale = channel_centre_scale(z)
    dz2 = ((batch.latents.float() - z.float()).flatten(-2) / scale).pow(2).sum((1, 2)).tolist()
    norm = standard_norm(z)
    med = float(norm.median().clamp_min(1e-12))
    ratio = [float(norm[s.row, s.col]) / med for s in batch.sites]
    return profile_columns(batch.decodes - ref.float(), batch.sites, factor, field, dz2, ratio)


def _median_kernel(energies, dists, erf: float) -> np.ndarray:
    """The reference cells' median change energy at each exact squared distance 0, 1, 2, ... (up to
    ``(4 erf + 4)^2``), each cell's divided by its near field (distance <= 1)."""
    kmax = int(round((4 * (erf if math.isfinite(erf) else 1.0) + 4) ** 2))
    exact = []
    for e, d in zip(energies, dists):
        idx = torch.round(d.double() ** 2).long().flatten()
        keep = idx <= kmax
        sums = torch.bincount(idx[keep], weights=e.flatten()[keep], minlength=kmax + 1)
        counts = torch.bincount(idx[keep], minlength=kmax + 1).double()
        near = float(e[d <= 1].mean())
        exact.append(torch.where(counts > 0, sums / counts.clamp(min=1) / near if near > 0 else counts * math.nan,
                                 torch.full_like(sums, math.nan)).numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(np.stack(exact), axis=0) if exact else np.array([])


def receptive_field(vae, z: torch.Tensor, ref: torch.Tensor | None = None, *, n: int = 12, seed: int = 0,
                    share: float = ERF_SHARE, exclude: Sequence[tuple[int, int]] = (),
                    removal: Operator | str = REMOVAL) -> ReceptiveField:
    """Measure the decoder's kernel on latent ``z`` by removing ordinary cells.

    ``n`` cells of :func:`ordinary_cells` are removed (decoded through the :class:`~vaeprobe.probes.engine.Engine`) and their change energy
    profiled by distance (see the module docstring and :class:`ReceptiveField`).

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
    removal : Operator or str, keyword-only
        How a cell is removed (default :data:`REMOVAL`).

    Returns
    -------
    ReceptiveField

    Examples
    --------
    >>> from vaeprobe.models.loading import load_vae
    >>> vae = load_vae("builtin:tiny-random")
    >>> z = vae.encode(torch.rand(1, 3, 64, 64) * 2 - 1).mean
    >>> rf = receptive_field(vae, z, n=3)
    >>> rf.erf >= 0, 0 <= rf.tail0 <= 1, len(rf.cells), rf.removal
    (True, True, 3, 'smudge')
    """
    op = _removal(removal)
    if ref is None:
        ref = vae.decode(z)
    cells = ordinary_cells(z, n, seed=seed, exclude=exclude)
    sites = [Site(r, c) for r, c in cells]
    _, scale = channel_centre_scale(z)
    batches = list(Engine(vae).batches(z, sites, op))
    dec = torch.cat([b.decodes for b in batches]) if batches else torch.zeros(0, *ref.shape[1:])
    dz2 = [float(v) for b in batches
           for v in ((b.latents.float() - z.float()).flatten(-2) / scale).pow(2).sum((1, 2))]
    diff = dec - ref.float()
    shape = tuple(ref.shape[-2:])
    energies = [_energy(diff[i]) for i in range(len(cells))]
    dists = [cell_distance(rc, shape, vae.factor, metric="euclidean") for rc in cells]
    erf = _nanmedian([_erf_of(e, d, share) for e, d in zip(energies, dists)])
    profiles, shapes, tails, floors = [], [], [], []
    for e, d in zip(energies, dists):
        total, near = float(e.sum()), float(e[d <= 1].mean())
        prof = ring_profile(e, d)
        profiles.append(prof)
        shapes.append([v / near if near > 0 else math.nan for v in prof])
        tails.append(float(e[d > erf].sum()) / total if total > 0 else math.nan)
        far = d > (erf if math.isfinite(erf) else 1.0)
        floors.append(float(e[_split(far, d)[1]].mean()) / near if near > 0 and bool(far.any()) else math.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        length = max(len(p) for p in profiles)
        pad = lambda ps: np.array([p + [math.nan] * (length - len(p)) for p in ps])  # noqa: E731
        profile = np.nanmedian(pad(profiles), axis=0).tolist()
        shape_profile = np.nanmedian(pad(shapes), axis=0).tolist()
    good = [f for f in floors if math.isfinite(f)]
    kernel = _median_kernel(energies, dists, erf)
    rf = ReceptiveField(erf=erf, tail0=_nanmedian(tails), variance=float(ref.float()[0].var(dim=(1, 2)).sum()),
                        cells=cells, profile=profile, dz2=_nanmedian(dz2), shape=shape_profile,
                        floor=float(np.median(good)) if good else 0.0,
                        floor_spread=float(np.std(good, ddof=1)) if len(good) > 1 else 0.0,
                        kernel=[None if not np.isfinite(v) else float(v) for v in kernel], removal=op.name)
    own = [o for b in batches for o in removal_columns(z, b, ref, vae.factor, rf)]
    rf.excess = [float(o["far_excess"]) for o in own]
    rf.plateaus = [float(o["far_plateau"]) for o in own]
    rf.decodes, rf.operator = dict(zip(sites, dec)), op
    return rf


@dataclass(frozen=True, kw_only=True)
class VerdictRules:
    """Thresholds of the verdict (keyword-only), each with a unit; none is fitted (docs/verdicts.md).

    Attributes
    ----------
    visible_levels : float
        The smallest far change that counts, in 8-bit levels (1: the smallest step an 8-bit image can show).
    max_decay : float
        The largest ``decay_exponent`` of a change that "does not decay" (1: its energy falls at most by half
        per doubling of the distance).
    swap_corr, swap_slope : float
        The swap test of ``global-information``: the far field moves at least ``swap_slope`` of the way
        towards the donor's far-field content (mean colour or coarse structure), with at least ``swap_corr``
        correlation over donors and channels.
    norm_ratio : float
        The spot threshold of the (standardised) norm ratio for ``high-norm``.

    Examples
    --------
    >>> VerdictRules(visible_levels=2.0).visible_levels, VerdictRules().norm_ratio == DEFAULT_THRESHOLD
    (2.0, True)
    """

    visible_levels: float = 1.0
    max_decay: float = 1.0
    swap_corr: float = 0.9
    swap_slope: float = 0.5
    norm_ratio: float = DEFAULT_THRESHOLD

    @staticmethod
    def _value(row: dict, key: str) -> float:
        v = row.get(key, math.nan)
        try:
            return math.nan if v is None else float(v)
        except (TypeError, ValueError):
            return math.nan

    def _ordinary(self, row: dict) -> float:
        """``ordinary_plateau`` (0 where missing): what the image's ordinary cells put beyond their kernel."""
        bar = self._value(row, "ordinary_plateau")
        return bar if math.isfinite(bar) else 0.0

    def flat(self, row: dict) -> bool:
        """Whether the far change may not decay: ``decay_exponent_lo`` (``decay_exponent`` where that column is
        missing) at most ``max_decay``; nan: no."""
        lo = self._value(row, "decay_exponent_lo")
        return (lo if not math.isnan(lo) else self._value(row, "decay_exponent")) <= self.max_decay

    def decays(self, row: dict) -> bool:
        """Whether the far change fades: ``decay_exponent`` over ``max_decay`` (inf included; nan: no)."""
        return self._value(row, "decay_exponent") > self.max_decay

    def shape(self, row: dict) -> str:
        """``global``, ``wide-local`` or ``local``: the far change's shape and size (see the module docstring).

        Examples
        --------
        >>> VerdictRules().shape({"far_plateau_lo": 3.0, "decay_exponent": 0.1})
        'global'
        >>> VerdictRules().shape({"far_plateau_lo": 3.0, "decay_exponent": 4.0, "band_levels": 9.0, "excess_ratio": 5.0})
        'wide-local'
        """
        lo = self._value(row, "far_plateau_lo")
        if lo >= self.visible_levels and lo > self._ordinary(row) and self.flat(row):
            return GLOBAL
        if (self._value(row, "band_levels") >= self.visible_levels and self._value(row, "excess_ratio") > 1
                and self.decays(row)):
            return WIDE_LOCAL
        return "local"

    def below_visibility(self, row: dict) -> bool:
        """A global pathway below visibility: a plateau that does not decay, significant against the ordinary cells
        (``far_plateau_lo`` over ``ordinary_plateau``), that the verdict does not call global.

        Examples
        --------
        >>> VerdictRules().below_visibility({"far_plateau_lo": 0.4, "ordinary_plateau": 0.1, "decay_exponent": 0.2})
        True
        """
        lo = self._value(row, "far_plateau_lo")
        return self.shape(row) != GLOBAL and self.flat(row) and lo > 0 and lo > self._ordinary(row)

    def carries_information(self, row: dict) -> bool:
        """Whether the swap test moves the far field towards the donors' content (mean colour or structure)."""
        for corr, slope in (("swap_corr", "swap_slope"), ("swap_structure_corr", "swap_structure_slope")):
            if self._value(row, corr) >= self.swap_corr and self._value(row, slope) >= self.swap_slope:
                return True
        return False

    def classify(self, row: dict) -> str:
        """The verdict of one cell from its measures (a dict or a table row): one of :data:`VERDICTS`.

        Examples
        --------
        >>> rules = VerdictRules()
        >>> rules.classify({"norm_ratio": 40.0, "far_plateau_lo": 0.0, "band_levels": 0.1})
        'high-norm'
        >>> rules.classify({"norm_ratio": 1.0, "far_plateau_lo": 20.0, "decay_exponent": 0.0,
        ...                 "swap_corr": 0.95, "swap_slope": 0.8})
        'global-information'
        """
        row = dict(row)
        shape = self.shape(row)
        if shape == GLOBAL:
            return GLOBAL_INFORMATION if self.carries_information(row) else GLOBAL
        if shape == WIDE_LOCAL:
            return WIDE_LOCAL
        return HIGH_NORM if self._value(row, "norm_ratio") >= self.norm_ratio else ORDINARY

    def to_dict(self) -> dict:
        """The thresholds as a plain dict."""
        return asdict(self)


# -- evidence beyond the profile ----------------------------------------------------------------------------------

@dataclass
class Donors:
    """Latents and clean decodes of a few donor images, at one latent size (:func:`make_donors`).

    Attributes
    ----------
    latents : torch.Tensor
        ``[K, C, h, w]``.
    colours : torch.Tensor
        ``[K, 3]``: the mean colour of each donor's clean decode.
    names : list of str
        The donors' names.
    decodes : torch.Tensor or None
        ``[K, 3, H, W]``: the clean decodes (the swap test's structure target; to find each donor's counterpart
        cell, :func:`counterpart_cells`).
    removed : dict
        ``{(donor, (row, col), operator name): change energy map [H, W]}``: the donors' cells removed so far by
        :func:`counterpart_cells`, which a later swap test reuses instead of decoding the same removal again
        (neighbouring global cells often share their counterparts). The scan job clears it for every image, so that
        an image's decode count does not depend on which images the same process did before (sharded and resumed
        runs count the same).
    """

    latents: torch.Tensor
    colours: torch.Tensor
    names: list[str] = field(default_factory=list)
    decodes: torch.Tensor | None = None
    removed: dict = field(default_factory=dict, repr=False)


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
    dec = Engine(vae).decode(z)
    return Donors(latents=z, colours=dec.mean(dim=(2, 3)), names=kept, decodes=dec)


def donor_cell(v: torch.Tensor, u: torch.Tensor) -> tuple[int, int]:
    """The cell of latent ``u`` most like vector ``v``: the largest cosine similarity minus the absolute log ratio
    of the norms (pass both standardised by one common per-channel map for a choice that does not depend on the
    latent's coordinates).

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


def counterpart_cells(vae, z: torch.Tensor, site: Site, donors: Donors, far: float, *,
                      removal: Operator | str = REMOVAL) -> list[tuple[int, int]]:
    """Each donor's counterpart of the cell at ``site`` of latent ``z``.

    Of the donor's cell at the same position and its most similar vector (:func:`donor_cell`, both latents
    standardised with the recipient's per-channel centre and scale, :func:`channel_centre_scale`), the counterpart
    is the one whose removal changes the donor's decode more beyond ``far`` cells (a global code may sit at a fixed
    place, or wherever its vector is). Costs up to two decodes per donor (none where both cells coincide, where
    the donors have no decodes, or for a removal already in :attr:`Donors.removed`).

    Parameters
    ----------
    vae, z, site
        As in the module docstring.
    donors : Donors
        The donors (:func:`make_donors`).
    far : float
        The far field starts beyond this many cells (Euclidean).
    removal : Operator or str, keyword-only
        How a cell is removed.

    Returns
    -------
    list of (int, int)
        One cell per donor.
    """
    op = _removal(removal)
    med, scale = channel_centre_scale(z)   # one common map for both latents: the same in any coordinates
    v = ((z[0, :, site.row, site.col].float() - med[..., 0]) / scale[..., 0])
    out: list = []
    cands = []
    for j in range(donors.latents.shape[0]):
        same = (site.row, site.col)
        u = donors.latents[j].float()
        alike = donor_cell(v, ((u.flatten(-2) - med) / scale).reshape(u.shape))
        if alike == same or donors.decodes is None:
            out.append(alike)
            continue
        out.append(None)
        cands += [(j, same), (j, alike)]
    new = list(dict.fromkeys((j, rc) for j, rc in cands if (j, rc, op.name) not in donors.removed))
    for b in Engine(vae).batches([donors.latents[j][None] for j, _ in new], [Site(*rc) for _, rc in new], op):
        for i, (j, rc) in enumerate(new[b.start:b.start + len(b.sites)]):
            donors.removed[(j, rc, op.name)] = _energy(b.decodes[i] - donors.decodes[j].float())
    energies = []
    for j, rc in cands:
        e = donors.removed[(j, rc, op.name)]
        mask = cell_distance(rc, tuple(e.shape), vae.factor, metric="euclidean") > far
        energies.append(float(e[mask].mean()) if bool(mask.any()) else float(e.mean()))
    for k in range(0, len(cands), 2):
        out[cands[k][0]] = cands[k][1] if energies[k] >= energies[k + 1] else cands[k + 1][1]
    return out


def _fit_through_origin(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(Pearson correlation, least-squares slope through the origin) of ``a`` on ``b``; nan with fewer than 2."""
    a, b = a.flatten().double(), b.flatten().double()
    if a.numel() < 2:
        return math.nan, math.nan
    denom = float(b.pow(2).sum())
    slope = float((a * b).sum()) / denom if denom > 0 else math.nan
    corr = 0.0 if float(a.std()) == 0 or float(b.std()) == 0 else float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    return corr, slope


def _far_blocks(x: torch.Tensor, far: torch.Tensor, cells: int, factor: int) -> torch.Tensor:
    """``x`` ``[K, 3, H, W]`` averaged over blocks of ``cells`` x ``cells`` latent cells that lie wholly in the far
    field ``far`` ``[H, W]``, less each image's and channel's mean over those blocks: ``[K, 3, n_blocks]``."""
    k = cells * factor
    pooled = torch.nn.functional.avg_pool2d(x.double(), k, stride=k)
    inside = torch.nn.functional.avg_pool2d(far[None, None].double(), k, stride=k)[0, 0] >= 1 - 1e-9
    vals = pooled[:, :, inside]
    return vals - vals.mean(-1, keepdim=True)


def swap_information(vae, z: torch.Tensor, ref: torch.Tensor, site: Site, donors: Donors,
                     field: ReceptiveField, *, removal: Operator | str = REMOVAL) -> dict[str, float]:
    """Does the far field move towards the donor's content when the cell takes a donor's vector?

    The cell's vector is replaced by each donor's counterpart vector (:func:`counterpart_cells`). Two regressions
    through the origin, over donors and channels: ``swap_corr``/``swap_slope``, the far field's mean colour change
    on the donor's mean colour minus the recipient's; ``swap_structure_corr``/``swap_structure_slope``, the far
    field's change on the donor's decode minus the recipient's, both averaged over blocks of a quarter of the
    latent's side (at most 4 cells) wholly beyond the receptive field, each less its mean over those blocks: the
    content beyond the mean. A slope near 1 moves the far field all the way to the donor's.

    Parameters
    ----------
    vae, z, ref, site
        As in the module docstring; ``z`` and ``ref`` are the recipient's.
    donors : Donors
        The donors, at ``z``'s latent size (other sizes give nan).
    field : ReceptiveField
        The recipient's reference (its ``erf`` bounds the far field).
    removal : Operator or str, keyword-only
        How a cell is removed (to find the counterparts).

    Returns
    -------
    dict
        The four ``swap_*`` columns; nan when there are no donors or no far field.
    """
    nan = {k: math.nan for k in ("swap_corr", "swap_slope", "swap_structure_corr", "swap_structure_slope")}
    k = donors.latents.shape[0]
    if k == 0 or donors.latents.shape[-2:] != z.shape[-2:]:
        return nan
    r, c = site.row, site.col
    zz = z.repeat(k, 1, 1, 1)
    far_cells = field.erf if math.isfinite(field.erf) else 1.0
    for j, (dr, dc) in enumerate(counterpart_cells(vae, z, site, donors, far_cells, removal=removal)):
        zz[j, :, r:r + site.size, c:c + site.size] = donors.latents[j, :, dr, dc][:, None, None]
    dec = Engine(vae).decode(zz)
    ref = ref.float()
    dist = cell_distance(site, tuple(ref.shape[-2:]), vae.factor, metric="euclidean")
    far = dist > field.erf if bool((dist > field.erf).any()) else dist > 1
    if not bool(far.any()):
        return nan
    out = dict(nan)
    moved = (dec[:, :, far] - ref[:, :, far]).mean(-1)                  # [K, 3]
    target = donors.colours - ref.mean(dim=(2, 3))                       # [K, 3]
    out["swap_corr"], out["swap_slope"] = _fit_through_origin(moved, target)
    if donors.decodes is not None:
        cells = max(1, min(4, min(z.shape[-2:]) // 4))
        a = _far_blocks(dec - ref, far, cells, vae.factor)
        b = _far_blocks(donors.decodes.float() - ref, far, cells, vae.factor)
        if a.shape[-1] >= 2:
            out["swap_structure_corr"], out["swap_structure_slope"] = _fit_through_origin(a, b)
    return out


def matched_controls(vae, z: torch.Tensor, ref: torch.Tensor, site: Site, field: ReceptiveField, *,
                     k: int = 3, removal: Operator | str = REMOVAL, known=None) -> dict[str, float]:
    """Is the far effect of removing the cell its own, or the change's size?

    The far-field energy of removing the cell over the median far-field energy of (1) ``matched_ratio``: the
    same change ``dz`` added at ``k`` ordinary cells, and (2) ``transplant_ratio``: the cell's vector written at
    those cells. Near 1: the same change anywhere does the same; far above 1: the effect belongs to this cell.
    Both controls are the same in any latent coordinates. Costs ``1 + 2 k`` decodes (``2 k`` when the removal's
    decode is in ``known``); :func:`matched_controls_many` measures several cells in shared decoder batches.

    Parameters
    ----------
    vae, z, ref, site
        As in the module docstring.
    field : ReceptiveField
        The image's reference; its first ``k`` cells (other than the site) are the controls.
    k : int, keyword-only
        How many control cells.
    removal : Operator or str, keyword-only
        How a cell is removed.
    known : mapping of Site to torch.Tensor, keyword-only
        Removal decodes already made (:meth:`vaeprobe.probes.engine.Engine.batches`).

    Returns
    -------
    dict
        ``matched_ratio``, ``transplant_ratio`` (nan without control cells) and ``profile``, the removed cell's
        mean change energy per pixel at distance 0, 1, ... cells.
    """
    return matched_controls_many(vae, z, ref, [site], field, k=k, removal=removal, known=known)[0]


def matched_controls_many(vae, z: torch.Tensor, ref: torch.Tensor, sites: Sequence[Site], field: ReceptiveField,
                          *, k: int = 3, removal: Operator | str = REMOVAL, known=None) -> list[dict[str, float]]:
    """:func:`matched_controls` of each of ``sites``, their decodes made in shared batches.

    Returns
    -------
    list of dict
        One :func:`matched_controls` result per site, in order.
    """
    op = _removal(removal)
    known = known or {}
    shape = tuple(ref.shape[-2:])
    latents, plans = [], []
    for site in sites:
        r, c = site.row, site.col
        removed = apply_batch(z, [site], op)
        v = z[0, :, r, c].clone()
        dz = removed[0, :, r, c] - v
        cells = [rc for rc in field.cells if rc != (r, c)][:k]
        start = len(latents)
        if site not in known:
            latents.append(removed[0])
        for rr, cc in cells:
            zz = z[0].clone()
            zz[:, rr, cc] = z[0, :, rr, cc] + dz
            latents.append(zz)
        for rr, cc in cells:
            zz = z[0].clone()
            zz[:, rr, cc] = v
            latents.append(zz)
        plans.append((site, cells, start))
    dec = Engine(vae).decode(torch.stack(latents)) if latents else None
    ref = ref.float()

    def far_energy(d: torch.Tensor, rc: tuple[int, int]) -> float:
        far = cell_distance(rc, shape, vae.factor, metric="euclidean") > field.erf
        return float(_energy(d - ref[0])[far].mean()) if bool(far.any()) else math.nan

    out = []
    for site, cells, start in plans:
        if not cells:
            out.append({"matched_ratio": math.nan, "transplant_ratio": math.nan, "profile": []})
            continue
        rc = (site.row, site.col)
        if site in known:
            own_dec, first = known[site].to(ref.device).float(), start
        else:
            own_dec, first = dec[start], start + 1
        own = far_energy(own_dec, rc)
        own_profile = ring_profile(_energy(own_dec - ref[0]), cell_distance(rc, shape, vae.factor,
                                                                             metric="euclidean"))

        def ratio(values):
            m = _nanmedian(values)
            return own / m if m and m > 0 else math.nan

        n = len(cells)
        out.append({"matched_ratio": ratio([far_energy(dec[first + i], cc) for i, cc in enumerate(cells)]),
                    "transplant_ratio": ratio([far_energy(dec[first + n + i], cc) for i, cc in enumerate(cells)]),
                    "profile": own_profile})
    return out


def frozen_removed(vae, z: torch.Tensor, site: Site, field: ReceptiveField, *,
                   removal: Operator | str = REMOVAL) -> float:
    """Share of the far-field energy of removing the cell that freezing the decoder's pathways removes.

    ``(E_live - E_frozen) / E_live`` with the GroupNorm statistics and the attention context frozen (the
    mechanism module's ``1 - share_residual``, :func:`vaeprobe.probes.mechanism.attribute_pathways` with the far
    field beyond ``floor(field.erf)`` cells).

    Parameters
    ----------
    vae, z, site, field
        As in the module docstring.
    removal : Operator or str, keyword-only
        How a cell is removed.

    Returns
    -------
    float
        In [0, 1] up to rounding; nan for a decoder with neither GroupNorm nor attention, or no far effect.

    Raises
    ------
    vaeprobe.probes.mechanism.MechanismError
        For a decoder the hooks cannot freeze.
    """
    return frozen_removed_many(vae, z, [site], field, removal=removal)[0]


def frozen_removed_many(vae, z: torch.Tensor, sites: Sequence[Site], field: ReceptiveField, *,
                        removal: Operator | str = REMOVAL) -> list[float]:
    """:func:`frozen_removed` of each of ``sites`` from one attribution (one clean recorded decode for all, the
    frozen variants in shared batches)."""
    from vaeprobe.probes.mechanism import attribute_pathways, pathway_layers

    layers = pathway_layers(vae)
    if not sites or not (layers.get("groupnorm") or layers.get("attention")):
        return [math.nan] * len(sites)
    radius = max(0, int(math.floor(field.erf))) if math.isfinite(field.erf) else 1
    df = attribute_pathways(vae, z, list(sites), _removal(removal), radius=radius).table
    if "share_residual" not in df:
        return [math.nan] * len(sites)
    return [float(1.0 - v) if math.isfinite(v) else math.nan for v in df["share_residual"].astype(float)]


# -- the estimator ------------------------------------------------------------------------------------------------

def _evidence(vae, z, ref, sites: Sequence[Site], field: ReceptiveField, removal: Operator,
              known=None) -> list[dict]:
    """The matched controls (with the cell's profile) and the frozen share of each of ``sites``, in shared
    decoder batches."""
    from vaeprobe.probes.mechanism import MechanismError

    got = matched_controls_many(vae, z, ref, sites, field, removal=removal, known=known)
    try:
        frozen = frozen_removed_many(vae, z, sites, field, removal=removal)
    except MechanismError:  # a decoder the hooks cannot freeze has no frozen share
        frozen = [math.nan] * len(sites)
    for g, f in zip(got, frozen):
        g["frozen_removed"] = f
    return got


def _finish(df: pd.DataFrame, rules: VerdictRules, field: ReceptiveField) -> pd.DataFrame:
    """Add ``verdict``, ``is_global``, ``below_visibility`` and ``erf`` from the measures of each row."""
    records = df.to_dict("records")
    df["verdict"] = [rules.classify(r) for r in records]
    df["is_global"] = df["verdict"].isin(GLOBAL_VERDICTS)
    df["below_visibility"] = [rules.below_visibility(r) for r in records]
    df["erf"] = field.erf
    df.attrs["field"] = field.to_dict()
    return df


def evidence_rows(records: Sequence[dict], rules: VerdictRules, n: int) -> list[int]:
    """The rows that get the matched controls and the frozen share: the ``n`` unusual ones (far change global or
    wide, a global pathway below visibility, or a latent-norm outlier) with the largest ``far_levels``, in that
    order.

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
    >>> rows = [{"norm_ratio": 1.0, "far_levels": 0.5, "far_plateau_lo": 0.0},
    ...         {"norm_ratio": 40.0, "far_levels": 0.1, "far_plateau_lo": 0.0}]
    >>> evidence_rows(rows, VerdictRules(), 2)
    [1]
    """
    unusual = [i for i, r in enumerate(records)
               if rules.shape(r) != "local" or rules.below_visibility(r) or r["norm_ratio"] >= rules.norm_ratio]
    unusual.sort(key=lambda i: -np.nan_to_num(records[i].get("far_levels", math.nan), nan=-1.0))
    return unusual[:max(0, n)]


class CellVerdict:
    """Verdicts for chosen cells of one latent.

    Parameters
    ----------
    vae
        As in the module docstring.
    rules : VerdictRules, keyword-only
        Thresholds (default: :class:`VerdictRules`'s).
    donors : Donors, keyword-only
        Donor latents for the swap test; without them no cell can be ``global-information``.
    evidence : bool, keyword-only
        Also compute the matched controls and the frozen-pathway share for cells that are not ``ordinary``.
    keep_profiles : bool, keyword-only
        Add a ``profile`` column: each cell's mean change energy per pixel at distance 0, 1, ... cells.
    swap : {"auto", "always"}, keyword-only
        ``auto`` runs the swap test only for cells whose far change is global (the only ones it can change the
        verdict of); ``always`` for every cell.
    n_reference : int, keyword-only
        How many ordinary cells :func:`receptive_field` removes for the image's reference.
    seed : int, keyword-only
        Seed of the reference cells' draw.
    removal : Operator or str, keyword-only
        How a cell is removed (default :data:`REMOVAL`; ``"zero"`` for the coordinate-dependent zeroing).

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
                 keep_profiles: bool = False, removal: Operator | str = REMOVAL):
        if swap not in ("auto", "always"):
            raise ValueError(f"swap must be 'auto' or 'always', got {swap!r}")
        self.vae, self.rules, self.donors = vae, rules or VerdictRules(), donors
        self.evidence, self.swap, self.n_reference, self.seed = evidence, swap, n_reference, seed
        self.keep_profiles, self.removal = keep_profiles, _removal(removal)

    def reference(self, z: torch.Tensor, ref: torch.Tensor | None = None, *,
                  exclude: Sequence[tuple[int, int]] = ()) -> ReceptiveField:
        """The image's :class:`ReceptiveField` (:func:`receptive_field` with ``n_reference``, ``seed``, ``removal``)."""
        return receptive_field(self.vae, z, ref, n=self.n_reference, seed=self.seed, exclude=exclude,
                               removal=self.removal)

    def measure(self, z: torch.Tensor, cells: Sequence[tuple[int, int]], ref: torch.Tensor,
                field: ReceptiveField) -> list[dict]:
        """The profile measures (:func:`profile_columns`) of removing each cell, one dict per cell."""
        sites = [Site(int(r), int(c)) for r, c in cells]
        rows = []
        for b in Engine(self.vae).batches(z, sites, self.removal):
            got = removal_columns(z, b, ref, self.vae.factor, field)
            if self.keep_profiles:
                for i, s in enumerate(b.sites):
                    dist = cell_distance(s, tuple(ref.shape[-2:]), self.vae.factor, metric="euclidean")
                    got[i]["profile"] = ring_profile(_energy(b.decodes[i] - ref.float()), dist)
            rows += [{"row": s.row, "col": s.col, **g} for s, g in zip(b.sites, got)]
        return rows

    def classify(self, z: torch.Tensor, cells: Sequence[tuple[int, int]], *, ref: torch.Tensor | None = None,
                 field: ReceptiveField | None = None) -> pd.DataFrame:
        """The verdict of each cell, from removing it.

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
            ``is_global``, ``below_visibility`` and ``erf``; ``attrs["field"]`` holds the reference as a dict.
        """
        if ref is None:
            ref = self.vae.decode(z)
        cells = [tuple(int(v) for v in rc) for rc in cells]
        if field is None:
            field = self.reference(z, ref, exclude=cells)
        out = []
        for row in self.measure(z, cells, ref, field):
            row.update({k: math.nan for k in EVIDENCE_COLUMNS})
            site = Site(row["row"], row["col"])
            if (self.rules.shape(row) == GLOBAL or self.swap == "always") and self.donors is not None:
                row.update(swap_information(self.vae, z, ref, site, self.donors, field, removal=self.removal))
            if self.evidence and evidence_rows([row], self.rules, 1):
                row.update({k: v for k, v in _evidence(self.vae, z, ref, [site], field, self.removal)[0].items()
                            if k != "profile"})
            out.append(row)
        df = pd.DataFrame(out)
        df.insert(2, "verdict", None)
        return _finish(df, self.rules, field)


def attach_verdicts(vae, z: torch.Tensor, ref: torch.Tensor, df: pd.DataFrame, field: ReceptiveField, *,
                    rules: VerdictRules | None = None, donors: Donors | None = None,
                    evidence: int = 4, known=None) -> pd.DataFrame:
    """Add the verdict columns to a scan table ``df`` of latent ``z``.

    Rows that lack the profile measures (a scan with another operator than the field's removal, patches or one
    channel) get them from removing the cell ``(row, col)`` with ``field.removal``, one decode per row. The swap
    test runs for every row whose far change is global (``len(donors)`` decodes each, and up to twice that to find
    each donor's counterpart cell); the matched controls and the frozen-pathway share for the ``evidence``
    unusual rows (:func:`evidence_rows`).

    Parameters
    ----------
    vae, z, ref
        As in the module docstring; ``z`` is the scanned latent.
    df : pandas.DataFrame
        The scan table (columns ``row``, ``col``; the profile measures when the scan removed single cells).
    field
        As in the module docstring.
    rules : VerdictRules, keyword-only
        Thresholds (default: :class:`VerdictRules`'s).
    donors : Donors, keyword-only
        Donors for the swap test; without them no row can be ``global-information``.
    evidence : int, keyword-only
        How many unusual rows get the matched controls and the frozen-pathway share.
    known : mapping of Site to torch.Tensor, keyword-only
        Decodes of ``z`` with single cells removed by the field's removal that the scan already made
        (:attr:`vaeprobe.probes.scan.ScanResult.removed`): the matched controls do not decode them again.

    Returns
    -------
    pandas.DataFrame
        A copy of ``df`` with ``verdict``, ``is_global`` (True exactly for ``global`` and
        ``global-information``), ``below_visibility``, ``erf`` and the columns of :data:`EVIDENCE_COLUMNS`;
        ``attrs["profiles"]`` holds the distance profiles (mean energy per pixel at distance 0, 1, ... cells) of
        the reference cells and of the evidence rows, and ``attrs["decodes"]`` the number of images these extra
        measurements decoded.

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
    rules = rules or VerdictRules()
    removal = parse_operator(field.removal)
    df = df.copy()
    start = vae.decoded
    if not set(PROFILE_COLUMNS) <= set(df.columns) or df[list(PROFILE_COLUMNS[2:])].isna().all().all():
        measured = CellVerdict(vae, rules=rules, evidence=False, removal=removal).measure(
            z, list(zip(df.row, df.col)), ref, field)
        for c in PROFILE_COLUMNS:
            df[c] = [m[c] for m in measured]
    for c in EVIDENCE_COLUMNS:
        df[c] = math.nan
    records = df[list(PROFILE_COLUMNS)].to_dict("records")
    if donors is not None:
        for i, rec in enumerate(records):
            if rules.shape(rec) == GLOBAL:
                site = Site(int(df.row.iloc[i]), int(df.col.iloc[i]))
                for k, v in swap_information(vae, z, ref, site, donors, field, removal=removal).items():
                    df.iloc[i, df.columns.get_loc(k)] = v
    profiles = {"reference": field.profile, "cells": {}}
    chosen = evidence_rows(records, rules, evidence)
    sites = [Site(int(df.row.iloc[i]), int(df.col.iloc[i])) for i in chosen]
    for i, site, got in zip(chosen, sites, _evidence(vae, z, ref, sites, field, removal, known=known)):
        profiles["cells"][f"{site.row},{site.col}"] = got.pop("profile")
        for k, v in got.items():
            df.iloc[i, df.columns.get_loc(k)] = v
    df = _finish(df, rules, field)
    df.attrs["profiles"] = profiles
    df.attrs["decodes"] = vae.decoded - start
    return df
