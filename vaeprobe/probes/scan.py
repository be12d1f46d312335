"""Perturbation scans: perturb latent positions, decode, measure how far the change spreads.

Three modes, all returning a pandas table with one row per scanned position:

- :func:`exact_scan`: one decode per position (batched), every measure of :mod:`vaeprobe.probes.response`, and the
  global-effect ratio (the position's far-field energy over the median scanned position's);
- :func:`linear_scan`: the sensitivity of every position from randomised vector-Jacobian products
  (:mod:`vaeprobe.probes.linear`); its cost does not grow with the number of positions;
- :func:`two_stage_scan`: candidates from the latent statistics and the linearised far-field map, exact ablation
  of those plus a random control sample whose median is the reference for the global-effect ratio.

:func:`run_scan` runs one of them over a stream of images into a resumable run directory
(``vaeprobe scan``).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field as dataclass_field
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from vaeprobe.errors import VaeprobeError
from vaeprobe.probes.geometry import sample_cells
from vaeprobe.probes.engine import DECODE_BATCH, Engine
from vaeprobe.probes.perturb import Operator, Site, parse_operator
from vaeprobe.probes.response import DEFAULT_MEASURES, DEFAULT_RADIUS, global_effect_ratio, measure

DEFAULT_GLOBAL_THRESHOLD = 1000.0
"""The ``global_ratio`` (far-field energy over the median scanned position's) at which ``n_ratio_over`` counts a
position in ``images.parquet``: a descriptive count only. Whether a cell is global is the verdict's
(:mod:`vaeprobe.probes.verdict`), measured in 8-bit levels, never this ratio (docs/scan.md, docs/verdicts.md)."""

MODES = ("exact", "linear", "two-stage")


class ScanError(VaeprobeError, ValueError):
    """A scan that cannot run as asked (bad positions; the message says what to change)."""


# -- choosing positions ------------------------------------------------------------------------------------------

def select_sites(spec: str | Sequence[tuple[int, int]], shape: tuple[int, int], *,
                 norm: torch.Tensor | None = None, size: int = 1, channel: int | None = None) -> list[Site]:
    """Positions to scan on an ``h x w`` latent, as :class:`~vaeprobe.probes.perturb.Site` objects.

    Parameters
    ----------
    spec : str or sequence of (int, int)
        ``"all"``, ``"grid:S"`` (every S-th row and column, starting at S // 2), ``"top:K"`` (the K largest latent
        norms; needs ``norm``), ``"list:R,C;R,C"`` or a list of ``(row, col)`` pairs (case and surrounding spaces
        of a string are ignored).
    shape : (int, int)
        The latent grid ``(h, w)``.
    norm : torch.Tensor, keyword-only
        The latent norm map ``[h, w]``, for ``top:K``.
    size : int, keyword-only
        Side of each site's patch in cells (:class:`~vaeprobe.probes.perturb.Site`).
    channel : int or None, keyword-only
        The one channel each site changes, or ``None`` for all.

    Returns
    -------
    list of Site
        In row-major order for ``all`` and ``grid``, largest norm first for ``top``, as given for a list.

    Raises
    ------
    ScanError
        For an unknown spec, a bad grid step or list, ``top:K`` without ``norm``, or a position outside the grid.

    Examples
    --------
    >>> [(s.row, s.col) for s in select_sites("grid:2", (4, 4))]
    [(1, 1), (1, 3), (3, 1), (3, 3)]
    >>> [(s.row, s.col) for s in select_sites("list:0,1;2,2", (4, 4))]
    [(0, 1), (2, 2)]
    >>> norm = torch.zeros(4, 4); norm[2, 3] = 5.0
    >>> select_sites("top:1", (4, 4), norm=norm, size=3, channel=0)
    [Site(row=2, col=3, size=3, channel=0)]
    """
    h, w = shape
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s == "all":
            cells = [(r, c) for r in range(h) for c in range(w)]
        elif (m := re.fullmatch(r"grid:(\d+)", s)):
            step = int(m.group(1))
            if step < 1:
                raise ScanError(f"grid step must be >= 1, got {step}")
            cells = [(r, c) for r in range(step // 2, h, step) for c in range(step // 2, w, step)]
        elif (m := re.fullmatch(r"top:(\d+)", s)):
            if norm is None:
                raise ScanError("top:K needs the latent norm map")
            k = min(int(m.group(1)), h * w)
            idx = torch.topk(norm.flatten(), k).indices.tolist()
            cells = [(i // w, i % w) for i in idx]
        elif s.startswith("list:"):
            try:
                cells = [tuple(int(v) for v in part.split(",")) for part in s[5:].split(";") if part]
            except ValueError:
                raise ScanError(f"bad position list {spec!r}; write list:ROW,COL;ROW,COL") from None
        else:
            raise ScanError(f"unknown positions {spec!r}; use all, grid:S, top:K or list:R,C;R,C")
    else:
        cells = [tuple(int(v) for v in p) for p in spec]
    for cell in cells:
        if len(cell) != 2 or not (0 <= cell[0] < h and 0 <= cell[1] < w):
            raise ScanError(f"position {cell} is outside the {h}x{w} latent")
    return [Site(r, c, size=size, channel=channel) for r, c in cells]


# -- exact -------------------------------------------------------------------------------------------------------

class KeptDecodes:
    """The ``k`` perturbed decodes with the largest score (far-field energy) seen so far, for figures and reports.

    Parameters
    ----------
    k : int
        How many to keep (0 or less: none).

    Examples
    --------
    >>> keep = KeptDecodes(2)
    >>> for score, cell in ((1.0, (0, 0)), (3.0, (0, 1)), (2.0, (1, 1))):
    ...     keep.offer(score, cell, torch.zeros(3, 8, 8))
    >>> [cell for cell, _ in keep.items()]
    [(0, 1), (1, 1)]
    """

    def __init__(self, k: int):
        self.k = k
        self._items: list[tuple[float, tuple[int, int], torch.Tensor]] = []

    def offer(self, score: float, cell: tuple[int, int], image: torch.Tensor) -> None:
        """Keep ``image`` (a float32 CPU copy) if its ``score`` is among the ``k`` largest; a non-finite score is
        never kept.

        Parameters
        ----------
        score : float
            The ranking score (the scans use ``far_l2``).
        cell : (int, int)
            The perturbed cell, returned with the image.
        image : torch.Tensor
            The perturbed decode ``[3, H, W]``.
        """
        if self.k <= 0 or not math.isfinite(score):
            return
        self._items.append((float(score), cell, image.detach().float().cpu().clone()))
        self._items.sort(key=lambda t: -t[0])
        del self._items[self.k:]

    def items(self) -> list[tuple[tuple[int, int], torch.Tensor]]:
        """``[(cell, image [3, H, W]), ...]``, the largest score first."""
        return [(cell, img) for _, cell, img in self._items]


@dataclass
class ScanResult:
    """What a scan returns: its table and what it cost.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per scanned position (the columns are described by each scan function).
    decodes : int
        Perturbed images decoded (the reference decode not included).
    decode_calls : int
        Batched decoder calls.
    backward : int
        Backward passes (the linearised map).
    seconds : float
        Wall time of the scan.
    kept : list of ((int, int), torch.Tensor)
        The ``keep`` perturbed decodes ``[3, H, W]`` with the largest far-field energy, largest first, with their
        cells (exact and two-stage scans with ``keep > 0``).
    removed : dict of Site to torch.Tensor
        Every perturbed decode, when the scan was asked to keep them (``keep_all=True``; two-stage scans do): the
        verdicts' evidence reuses them (:func:`vaeprobe.probes.verdict.attach_verdicts`, ``known``).
    """

    table: pd.DataFrame
    decodes: int = 0
    decode_calls: int = 0
    backward: int = 0
    seconds: float = 0.0
    kept: list = dataclass_field(default_factory=list)
    removed: dict = dataclass_field(default_factory=dict, repr=False)


def exact_scan(vae, z: torch.Tensor, sites: Sequence[Site], op: Operator | str = "zero", *,
               measures: Sequence[str] = DEFAULT_MEASURES, radius: int = DEFAULT_RADIUS, batch: int = DECODE_BATCH,
               ref: torch.Tensor | None = None, lpips_model=None, progress: bool = False, keep: int = 0,
               field=None, known=None, keep_all: bool = False) -> ScanResult:
    """Perturb each site of latent ``z`` with ``op``, decode ``batch`` at a time, measure.

    Decoding runs in the VAE's dtype; differences are taken in float32.

    Parameters
    ----------
    vae : VAE
        The model (:func:`vaeprobe.models.loading.load_vae`).
    z : torch.Tensor
        The latent ``[1, C, h, w]``.
    sites : sequence of Site
        The positions to perturb (:func:`select_sites`).
    op : Operator or str
        The perturbation (:func:`vaeprobe.probes.perturb.parse_operator` syntax, e.g. ``"zero"``, ``"noise:0.5"``).
    measures, radius : keyword-only
        The response measures (:func:`vaeprobe.probes.response.measure`) and the far-field radius in latent cells.
    batch : int, keyword-only
        Perturbed latents per decoder call.
    ref, lpips_model, progress : keyword-only
        The unperturbed decode of ``z`` (decoded here when not given), the network for the ``lpips`` measure
        (:class:`vaeprobe.probes.metrics.LPIPS`) and whether to show a progress bar on stderr.
    keep : int, keyword-only
        Keep that many perturbed decodes, those with the largest far field (:attr:`ScanResult.kept`).
    field : vaeprobe.probes.verdict.ReceptiveField, keyword-only
        The receptive field of this latent: with its removal operator (``field.removal``) on single whole cells, the
        rows also get the verdict measures of :func:`vaeprobe.probes.verdict.profile_columns`.
    known, keep_all : keyword-only
        Decodes of ``z`` perturbed by ``op`` already made at some sites, not decoded again nor counted in ``decodes``
        (:meth:`vaeprobe.probes.engine.Engine.batches`); keep every decode in :attr:`ScanResult.removed` (few sites).

    Returns
    -------
    ScanResult
        Its table has one row per site: ``row, col, size, channel, op`` (channel -1: all), every measure, and
        ``global_ratio`` (``far_l2`` over the median ``far_l2`` of the scanned sites; meaningful when the sites
        are a fair sample, e.g. ``all``).

    Examples
    --------
    >>> from vaeprobe.models.loading import load_vae
    >>> vae = load_vae("builtin:tiny-random")
    >>> z = vae.encode(torch.zeros(1, 3, 64, 64)).mean   # an 8 x 8 latent
    >>> res = exact_scan(vae, z, select_sites("grid:2", (8, 8)), keep=2)
    >>> len(res.table), bool((res.table.far_fraction >= 0).all()), res.decodes, len(res.kept)
    (16, True, 16, 2)
    >>> res = exact_scan(vae, z, select_sites("grid:4", (8, 8)), "noise:0.5", measures=("l2",), batch=2)
    >>> list(res.table.columns), res.decode_calls
    (['row', 'col', 'size', 'channel', 'op', 'l2'], 2)
    """
    op = parse_operator(op) if isinstance(op, str) else op
    t0 = time.perf_counter()
    ref = (vae.decode(z) if ref is None else ref).float()
    kept, removed = KeptDecodes(keep), {}
    profiles = (field is not None and op.name == field.removal
                and all(s.size == 1 and s.channel is None for s in sites))
    if profiles:
        from vaeprobe.probes.verdict import removal_columns

    def values(b):
        out = measure(ref, b.decodes, b.sites, vae.factor, radius=radius, measures=measures, lpips_model=lpips_model)
        if profiles:
            out = [{**v, **x} for v, x in zip(out, removal_columns(z, b, ref, vae.factor, field))]
        return out

    def keep_some(b, vals):
        for k, (site, v) in enumerate(zip(b.sites, vals)):
            kept.offer(v.get("far_l2", v.get("l2", 0.0)), (site.row, site.col), b.decodes[k])
            if keep_all:
                removed[site] = b.decodes[k]

    engine = Engine(vae, batch=batch, progress=progress)
    df = engine.table(z, sites, op, values, on_batch=keep_some, known=known)
    if "far_l2" in df and len(df):
        df["global_ratio"] = global_effect_ratio(df["far_l2"].to_numpy())
    return ScanResult(table=df, decodes=engine.decodes, decode_calls=engine.calls, kept=kept.items(),
                      seconds=time.perf_counter() - t0, removed=removed)


# -- linearised --------------------------------------------------------------------------------------------------

def linear_scan(vae, z: torch.Tensor, *, n_probes: int = 32, radius: int | None = DEFAULT_RADIUS,
                blocks: tuple[int, int] = (2, 2), far_probes: int = 8, seed: int = 0,
                shrink: bool = True) -> ScanResult:
    """Per-position sensitivity maps from randomised vector-Jacobian products.

    ``sensitivity`` is the whole image's map (``n_probes`` probes) and, when ``radius`` is given,
    ``far_sensitivity`` the far field's relative to each position's block (``far_probes`` probes per block; see
    :func:`vaeprobe.probes.linear.sensitivity_map`). 32 probes keep the whole-image map within the 40-decode budget
    of the benchmark (one backward pass costs about one decode there); docs/scan.md has its agreement with exact
    Jacobian norms.

    Parameters
    ----------
    vae : VAE
        The model; its decoder must be differentiable
        (:class:`~vaeprobe.probes.linear.NotDifferentiableError` otherwise).
    z : torch.Tensor
        The latent ``[1, C, h, w]``.
    n_probes : int, keyword-only
        Probes for the whole-image map; 0 skips it.
    radius : int or None, keyword-only
        The far-field radius in latent cells; ``None`` skips the far-field map.
    blocks : (int, int), keyword-only
        The block size in cells for the far-field map.
    far_probes : int, keyword-only
        Probes per block for the far-field map; 0 skips it.
    seed : int, keyword-only
        Seeds the probes (the far-field map uses ``seed + 1``).
    shrink : bool, keyword-only
        Pass the whole-image map through :func:`vaeprobe.probes.linear.shrink_map` (with at least 2 probes and a
        positive map).

    Returns
    -------
    ScanResult
        Its table has one row per position (``row``, ``col``, row-major): ``sensitivity`` (shrunk unless
        ``shrink=False``), ``sensitivity_raw`` (the unbiased map), ``sensitivity_rel_se`` (its relative standard
        error per cell), ``far_sensitivity`` and ``far_ratio`` (far sensitivity over its median); ``backward``
        counts the backward passes.

    Examples
    --------
    >>> from vaeprobe.models.loading import load_vae
    >>> vae = load_vae("builtin:tiny-random")
    >>> z = vae.encode(torch.zeros(1, 3, 64, 64)).mean   # an 8 x 8 latent
    >>> res = linear_scan(vae, z, n_probes=2, far_probes=1)
    >>> len(res.table), bool((res.table.sensitivity > 0).all()), bool(res.table.far_ratio.notna().all())
    (64, True, True)
    """
    from vaeprobe.probes.linear import sensitivity_map, shrink_map

    t0 = time.perf_counter()
    h, w = z.shape[-2:]
    rows, cols = np.divmod(np.arange(h * w), w)
    df = pd.DataFrame({"row": rows, "col": cols})
    n_back = 0
    if n_probes:
        total = sensitivity_map(vae, z, n_probes=n_probes, radius=None, seed=seed)
        df["sensitivity_raw"] = total.map.flatten().numpy()
        df["sensitivity_rel_se"] = total.rel_se.flatten().numpy()
        if shrink and n_probes >= 2 and bool((total.map > 0).all()):
            total = shrink_map(total)
        df["sensitivity"] = total.map.flatten().numpy()
        n_back += total.n_backward
    if radius is not None and far_probes:
        far = sensitivity_map(vae, z, n_probes=far_probes, radius=radius, blocks=blocks, seed=seed + 1)
        df["far_sensitivity"] = far.map.flatten().numpy()
        med = float(np.median(df["far_sensitivity"]))
        df["far_ratio"] = df["far_sensitivity"] / med if med > 0 else np.nan
        n_back += far.n_backward
    return ScanResult(table=df, backward=n_back, seconds=time.perf_counter() - t0)


# -- two-stage ---------------------------------------------------------------------------------------------------

def _two_stage_candidates(vae, z, norm, *, n_norm, n_linear, n_control, radius, blocks, n_probes, seed,
                          reference=()):
    """Stage one of :func:`two_stage_scan`: ``{flat index: stage}`` of the candidates (largest norms, largest
    linearised far field) and the controls (the ``reference`` cells that are not candidates, or ``n_control``
    random cells without them), the linear scan (or ``None``) and the reason it fell back to norms only (or
    ``None``). On the fallback the controls are ``2 n_control``: the reference cells and random ones."""
    from vaeprobe.probes.linear import NotDifferentiableError

    h, w = z.shape[-2:]
    by_lin: list[int] = []
    fallback, lin = None, None
    if n_linear:
        try:
            lin = linear_scan(vae, z, n_probes=0, radius=radius, blocks=blocks, far_probes=n_probes, seed=seed)
            by_lin = lin.table["far_sensitivity"].nlargest(min(n_linear, h * w)).index.tolist()
        except NotDifferentiableError as exc:
            fallback = str(exc)
            n_norm, n_control = n_norm + n_linear, 2 * n_control
    by_norm = torch.topk(norm.flatten(), min(n_norm, h * w)).indices.tolist() if n_norm else []
    stage = {}
    for i in by_norm:
        stage[i] = "norm"
    for i in by_lin:
        stage[i] = "norm+linear" if stage.get(i) == "norm" else "linear"
    controls = [rc for rc in reference if rc[0] * w + rc[1] not in stage]
    if not reference or fallback is not None:  # the fallback tops the reference cells up to n_control with random ones
        controls += sample_cells(h, w, n_control - len(controls), avoid=[divmod(i, w) for i in stage] + list(reference),
                                 seed=seed)
    for r, c in controls:
        stage[r * w + c] = "control"
    return stage, lin, fallback


def two_stage_scan(vae, z: torch.Tensor, op: Operator | str = "zero", *, norm: torch.Tensor | None = None,
                   n_norm: int = 4, n_linear: int = 4, n_control: int = 16, n_probes: int = 2,
                   radius: int = DEFAULT_RADIUS, blocks: tuple[int, int] = (2, 2), seed: int = 0,
                   measures: Sequence[str] = DEFAULT_MEASURES, batch: int = DECODE_BATCH, ref: torch.Tensor | None = None,
                   lpips_model=None, keep: int = 0, field=None) -> ScanResult:
    """Exact ablation of a few candidates and a control sample.

    Candidates: the ``n_norm`` largest latent norms and the ``n_linear`` largest linearised far-field
    sensitivities. Controls: with a ``field`` whose removal is ``op`` (the scan job's default), the field's
    reference cells that are not candidates, whose decodes the field already made
    (:attr:`~vaeprobe.probes.verdict.ReceptiveField.decodes`; no new decode); otherwise ``n_control`` other
    positions drawn at random (seeded; :func:`vaeprobe.probes.geometry.sample_cells`). ``global_ratio`` is each
    position's far-field energy over the median of the controls.

    A decoder that autograd cannot go through (:class:`~vaeprobe.probes.linear.NotDifferentiableError`) has no
    linear map: the scan then takes ``n_norm + n_linear`` latent-norm candidates and twice ``n_control`` controls
    (with a shared field, its reference cells are among them and the rest are random), and the table's
    ``attrs["linear_fallback"]`` holds the reason (absent otherwise).

    Parameters
    ----------
    vae, z, op
        The model, the latent ``[1, C, h, w]`` and the perturbation, as for :func:`exact_scan`.
    norm : torch.Tensor, keyword-only
        The latent norm map ``[h, w]`` (computed from ``z`` if not given).
    n_norm, n_linear : int, keyword-only
        Candidates by latent norm, and by linearised far-field sensitivity (0 skips the linear map).
    n_control : int, keyword-only
        Random control positions (when the field's reference cells are not the controls).
    n_probes : int, keyword-only
        Probes per block for the linear map.
    radius : int, keyword-only
        The far-field radius in latent cells (the linear map's and the measures').
    blocks : (int, int), keyword-only
        The block size for the linear map.
    seed : int, keyword-only
        Seeds the linear map and the controls.
    measures, batch, ref, lpips_model, keep, field : keyword-only
        As for :func:`exact_scan`.

    Returns
    -------
    ScanResult
        The :func:`exact_scan` table plus column ``stage`` (``norm``, ``linear``, ``norm+linear`` or ``control``),
        with ``global_ratio`` relative to the controls; its costs are the linear map's and the exact ablations'
        together.

    Examples
    --------
    >>> from vaeprobe.models.loading import load_vae
    >>> vae = load_vae("builtin:tiny-random")
    >>> z = vae.encode(torch.zeros(1, 3, 64, 64)).mean   # an 8 x 8 latent
    >>> res = two_stage_scan(vae, z, n_norm=2, n_linear=2, n_control=4, n_probes=1)
    >>> sorted(set(res.table.stage) - {"norm", "linear", "norm+linear"}), res.decodes == len(res.table) <= 8
    (['control'], True)
    """
    h, w = z.shape[-2:]
    op = parse_operator(op) if isinstance(op, str) else op
    known = field.decodes_for(op) if field is not None else {}
    stage, lin, fallback = _two_stage_candidates(vae, z, z[0].norm(dim=0) if norm is None else norm,
                                                 n_norm=n_norm, n_linear=n_linear, n_control=n_control,
                                                 radius=radius, blocks=blocks, n_probes=n_probes, seed=seed,
                                                 reference=[(s.row, s.col) for s in known])
    order = list(stage)
    sites = [Site(i // w, i % w) for i in order]
    result = exact_scan(vae, z, sites, op, measures=measures, radius=radius, batch=batch, ref=ref,
                        lpips_model=lpips_model, keep=keep, field=field, known=known, keep_all=True)
    if lin is not None:
        result.backward += lin.backward
        result.seconds += lin.seconds
    df = result.table
    df["stage"] = [stage[i] for i in order]
    ctrl = df.loc[df.stage == "control", "far_l2"].to_numpy()
    med = float(np.nanmedian(ctrl)) if len(ctrl) else float("nan")
    df["global_ratio"] = df["far_l2"] / med if med > 0 else np.nan
    if fallback is not None:
        df.attrs["linear_fallback"] = fallback
    return result
