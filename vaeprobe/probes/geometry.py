"""Latent-grid geometry: how far each pixel lies from a site, far fields, distance rings, control cells.

Pixel ``(y, x)`` of an image decoded at downsampling ``factor`` belongs to latent cell ``(y // factor, x // factor)``,
so an ``H x W`` image has a ``ceil(H / factor) x ceil(W / factor)`` latent grid (:func:`latent_grid`). A *region*
of that grid is one of

- a :class:`~vaeprobe.probes.perturb.Site` (its patch of cells, :meth:`~vaeprobe.probes.perturb.Site.bounds`);
- a cell ``(row, col)`` (the same as ``Site(row, col)``);
- a :class:`Block`, the rectangle of rows ``r0 <= r < r1`` and columns ``c0 <= c < c1``.

:func:`cell_distance` gives, for every pixel, the distance in latent cells from its cell to the *nearest* cell of
the region: ``metric="chebyshev"`` (``max(|dr|, |dc|)``, an int64 tensor) or ``metric="euclidean"``
(``sqrt(dr^2 + dc^2)``, float32). :func:`far_mask` is the far field, the pixels more than ``radius`` cells away
(with the Chebyshev metric, the intersection of the far fields of the region's cells); :func:`cell_gap` is the
distance between two cells. :func:`ring_sums` and :func:`ring_profile` bin a per-pixel quantity by distance
rounded to an integer, and :func:`sample_cells` draws seeded random cells (controls, reference cells) from what is
left once given cells, a radius around them and a mask of allowed cells are taken out.

This module is the one place that defines these; :mod:`~vaeprobe.probes.response`, :mod:`~vaeprobe.probes.linear`,
:mod:`~vaeprobe.probes.verdict`, :mod:`~vaeprobe.probes.scan` and :mod:`~vaeprobe.probes.latents` call it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

import torch

from vaeprobe.errors import VaeprobeError
from vaeprobe.probes.perturb import Site

METRICS = ("chebyshev", "euclidean")
"""The distances :func:`cell_distance` knows."""


class GeometryError(VaeprobeError, ValueError):
    """A region, metric or sample request that does not fit the latent grid (the message says what to change)."""


@dataclass(frozen=True)
class Block:
    """The rectangle of latent cells ``rows[0] <= r < rows[1]``, ``cols[0] <= c < cols[1]`` (half-open, like
    slices).

    Attributes
    ----------
    rows : (int, int)
        ``(r0, r1)`` with ``0 <= r0 < r1``.
    cols : (int, int)
        ``(c0, c1)`` with ``0 <= c0 < c1``.

    Raises
    ------
    GeometryError
        When ``r1 <= r0``, ``c1 <= c0`` or a bound is negative.

    Examples
    --------
    >>> Block((0, 2), (1, 4)).bounds(8, 8)
    (0, 2, 1, 4)
    """

    rows: tuple[int, int]
    cols: tuple[int, int]

    def __post_init__(self):
        rows = tuple(int(v) for v in self.rows)
        cols = tuple(int(v) for v in self.cols)
        if len(rows) != 2 or len(cols) != 2 or not (0 <= rows[0] < rows[1]) or not (0 <= cols[0] < cols[1]):
            raise GeometryError(f"a Block needs rows (r0, r1) and cols (c0, c1) with 0 <= r0 < r1 and 0 <= c0 < c1, "
                                f"got rows={self.rows!r}, cols={self.cols!r}")
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "cols", cols)

    def bounds(self, h: int, w: int) -> tuple[int, int, int, int]:
        """``(r0, r1, c0, c1)`` clipped to an ``h x w`` grid.

        Parameters
        ----------
        h, w : int
            The latent grid.

        Returns
        -------
        tuple of int
            Rows ``r0 .. r1 - 1`` and columns ``c0 .. c1 - 1``.

        Raises
        ------
        GeometryError
            When the block starts past the grid (``r0 >= h`` or ``c0 >= w``).

        Examples
        --------
        >>> Block((2, 9), (0, 1)).bounds(4, 4)
        (2, 4, 0, 1)
        """
        r0, r1 = self.rows
        c0, c1 = self.cols
        if r0 >= h or c0 >= w:
            raise GeometryError(f"block rows {r0}..{r1 - 1}, columns {c0}..{c1 - 1} lies outside the {h}x{w} grid")
        return r0, min(r1, h), c0, min(c1, w)


Region = Union[Site, Block, "tuple[int, int]"]


def latent_grid(shape: tuple[int, int], factor: int) -> tuple[int, int]:
    """The ``(h, w)`` latent grid of an image of ``shape = (H, W)`` pixels (partial cells count).

    Parameters
    ----------
    shape : (int, int)
        The image size ``(H, W)`` in pixels.
    factor : int
        The VAE's downsampling.

    Returns
    -------
    (int, int)
        ``(ceil(H / factor), ceil(W / factor))``.

    Examples
    --------
    >>> latent_grid((48, 40), 8), latent_grid((33, 8), 8)
    ((6, 5), (5, 1))
    """
    return -(-int(shape[0]) // factor), -(-int(shape[1]) // factor)


def region_bounds(region: Region, grid: tuple[int, int]) -> tuple[int, int, int, int]:
    """``(r0, r1, c0, c1)``: the rows ``r0 .. r1 - 1`` and columns ``c0 .. c1 - 1`` of ``region`` on a grid,
    clipped to it.

    Parameters
    ----------
    region : Site, Block or (row, col)
        The cells (see the module docstring).
    grid : (int, int)
        The ``(h, w)`` latent grid.

    Returns
    -------
    tuple of int

    Raises
    ------
    GeometryError
        When ``region`` is none of these, or a block lies outside the grid.
    vaeprobe.probes.perturb.PerturbError
        When a site or cell lies outside the grid.

    Examples
    --------
    >>> region_bounds(Site(0, 0, size=3), (4, 4)), region_bounds((2, 3), (4, 4))
    ((0, 2, 0, 2), (2, 3, 3, 4))
    >>> region_bounds(Block((1, 3), (0, 9)), (4, 4))
    (1, 3, 0, 4)
    """
    h, w = grid
    if isinstance(region, (Site, Block)):
        return region.bounds(h, w)
    try:
        row, col = region
    except (TypeError, ValueError):
        raise GeometryError(f"expected a Site, a Block or a cell (row, col), got {region!r}") from None
    return Site(row, col).bounds(h, w)


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise GeometryError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")


def cell_distance(region: Region, shape: tuple[int, int], factor: int, *, metric: str = "chebyshev") -> torch.Tensor:
    """Distance, in latent cells, from each pixel's cell to the nearest cell of ``region``; ``[H, W]``, 0 on the
    region itself.

    Parameters
    ----------
    region : Site, Block or (row, col)
        The cells to measure from (see the module docstring).
    shape : (int, int)
        The image size ``(H, W)`` in pixels.
    factor : int
        The VAE's downsampling: pixel ``(y, x)`` belongs to cell ``(y // factor, x // factor)``.
    metric : {"chebyshev", "euclidean"}, keyword-only
        ``max(|dr|, |dc|)`` as an int64 tensor, or ``sqrt(dr^2 + dc^2)`` as float32, where ``dr`` (``dc``) is the
        gap in rows (columns) between the pixel's cell and the region.

    Returns
    -------
    torch.Tensor
        ``[H, W]``, int64 (Chebyshev) or float32 (Euclidean), on the CPU.

    Examples
    --------
    >>> cell_distance(Site(0, 1), (2, 6), 2)
    tensor([[1, 1, 0, 0, 1, 1],
            [1, 1, 0, 0, 1, 1]])
    >>> cell_distance((0, 0), (16, 16), 8, metric="euclidean").unique().tolist()
    [0.0, 1.0, 1.4142135381698608]
    >>> cell_distance(Block((0, 1), (1, 3)), (3, 4), 1)  # a 1x2 block on a 3x4 grid (factor 1: pixels are cells)
    tensor([[1, 0, 0, 1],
            [1, 1, 1, 1],
            [2, 2, 2, 2]])
    """
    _check_metric(metric)
    r0, r1, c0, c1 = region_bounds(region, latent_grid(shape, factor))
    rows = torch.arange(shape[0]) // factor
    cols = torch.arange(shape[1]) // factor
    # the gap from a pixel's cell row (column) to the region's row (column) range; 0 inside it
    dr = (r0 - rows).clamp(min=0) + (rows - (r1 - 1)).clamp(min=0)
    dc = (c0 - cols).clamp(min=0) + (cols - (c1 - 1)).clamp(min=0)
    if metric == "chebyshev":
        return torch.maximum(dr[:, None], dc[None, :])
    dy, dx = dr.float(), dc.float()
    return torch.sqrt(dy[:, None] ** 2 + dx[None, :] ** 2)


def cell_gap(a: tuple[int, int], b: tuple[int, int], *, metric: str = "chebyshev") -> float:
    """Distance in latent cells between cells ``a`` and ``b``.

    Parameters
    ----------
    a, b : (int, int)
        ``(row, col)`` each.
    metric : {"chebyshev", "euclidean"}, keyword-only
        ``max(|dr|, |dc|)`` or ``sqrt(dr^2 + dc^2)``.

    Returns
    -------
    int or float
        An int for Chebyshev, a float for Euclidean.

    Examples
    --------
    >>> cell_gap((2, 5), (4, 4)), cell_gap((0, 0), (3, 4), metric="euclidean")
    (2, 5.0)
    """
    _check_metric(metric)
    dr, dc = abs(int(a[0]) - int(b[0])), abs(int(a[1]) - int(b[1]))
    return max(dr, dc) if metric == "chebyshev" else math.hypot(dr, dc)


def far_mask(region: Region, shape: tuple[int, int], factor: int, radius: float, *,
             metric: str = "chebyshev") -> torch.Tensor:
    """Boolean ``[H, W]`` far field of ``region``: the pixels whose cell is more than ``radius`` cells from every
    cell of the region (``cell_distance(region, shape, factor, metric=metric) > radius``).

    Parameters
    ----------
    region : Site, Block or (row, col)
        The cells whose far field this is.
    shape : (int, int)
        The image size ``(H, W)`` in pixels.
    factor : int
        The VAE's downsampling.
    radius : float
        In latent cells; a pixel at exactly ``radius`` is near.
    metric : {"chebyshev", "euclidean"}, keyword-only
        See :func:`cell_distance`.

    Examples
    --------
    >>> int(far_mask((0, 0), (32, 32), 8, 2).sum())  # cells 3.. in either direction: 1024 - 3*3*64
    448
    >>> int(far_mask(Site(0, 0, size=2), (32, 32), 8, 1).sum())  # the same far field from a 2x2 site
    448
    >>> int(far_mask(Block((0, 2), (0, 2)), (32, 32), 8, 1).sum())  # and from the 2x2 block
    448
    >>> int(far_mask((0, 0), (32, 32), 8, 2, metric="euclidean").sum())  # 16 cells - 6 within 2: 10 * 64
    640
    """
    return cell_distance(region, shape, factor, metric=metric) > radius


def _ring_index(dist: torch.Tensor) -> torch.Tensor:
    d = torch.round(dist) if dist.is_floating_point() else dist
    return d.long().flatten()


def ring_sums(values: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """Sum of ``values`` over the pixels at each integer distance 0, 1, ..., ``max(dist)``.

    Parameters
    ----------
    values : torch.Tensor
        ``[H, W]``, a per-pixel quantity.
    dist : torch.Tensor
        ``[H, W]`` on the same device, from :func:`cell_distance` (Euclidean distances are rounded to the nearest
        integer).

    Returns
    -------
    torch.Tensor
        1-D, ``max(dist) + 1`` entries (float64 for float64 values).

    Examples
    --------
    >>> d = cell_distance((0, 0), (3, 3), 1)
    >>> ring_sums(torch.ones(3, 3, dtype=torch.float64), d).tolist()  # 1 cell at distance 0, 3 at 1, 5 at 2
    [1.0, 3.0, 5.0]
    """
    d = _ring_index(dist)
    return torch.bincount(d, weights=values.flatten(), minlength=int(d.max()) + 1)


def ring_profile(values: torch.Tensor, dist: torch.Tensor) -> list[float]:
    """Mean of ``values`` per pixel at each integer distance 0, 1, ..., ``max(dist)``.

    Parameters
    ----------
    values, dist : torch.Tensor
        As for :func:`ring_sums`.

    Returns
    -------
    list of float
        ``max(dist) + 1`` means; nan where no pixel is at that distance.

    Examples
    --------
    >>> d = cell_distance((0, 0), (3, 3), 1)
    >>> rows = torch.arange(3, dtype=torch.float64)[:, None].expand(3, 3)
    >>> [round(v, 3) for v in ring_profile(rows, d)]  # the mean row index at distance 0, 1, 2
    [0.0, 0.667, 1.4]
    """
    d = _ring_index(dist)
    sums = torch.bincount(d, weights=values.flatten(), minlength=int(d.max()) + 1)
    counts = torch.bincount(d, minlength=int(d.max()) + 1).double()
    return [float(s / c) if c > 0 else math.nan for s, c in zip(sums, counts)]


def sample_cells(h: int, w: int, n: int, *, avoid: Sequence[tuple[int, int]] = (), radius: float = 0,
                 allowed: torch.Tensor | None = None, metric: str = "chebyshev",
                 seed: int | torch.Generator = 0) -> list[tuple[int, int]]:
    """``n`` distinct random cells of an ``h x w`` grid (seeded), in the order drawn.

    The pool is every cell, in row-major order, that ``allowed`` permits and that lies more than ``radius`` cells
    (``metric``, as :func:`cell_distance`) from every cell of ``avoid``; the draw is
    ``pool[torch.randperm(len(pool), generator)[:n]]``, so the same seed and pool give the same cells. Fewer
    than ``n`` come back when the pool is smaller (none when it is empty).

    Parameters
    ----------
    h, w : int
        The latent grid.
    n : int
        How many cells (``>= 0``).
    avoid : sequence of (row, col), keyword-only
        Cells that are never drawn, e.g. the cells under test.
    radius : float, keyword-only
        Also leave out every cell within ``radius`` cells of an avoided one (0: only the avoided cells).
    allowed : bool tensor ``[h, w]``, keyword-only
        Only cells marked True may be drawn (default: all).
    metric : {"chebyshev", "euclidean"}, keyword-only
        The distance for ``radius``.
    seed : int or torch.Generator, keyword-only
        The seed of a fresh CPU ``torch.Generator``, or a generator to draw from (advancing it).

    Returns
    -------
    list of (int, int)

    Examples
    --------
    >>> sample_cells(4, 4, 3, seed=0) == sample_cells(4, 4, 3, seed=0)
    True
    >>> cells = sample_cells(6, 6, 50, avoid=[(2, 2)], radius=1)   # all 36 - 9 cells beyond the 3x3 around (2, 2)
    >>> len(cells), any(max(abs(r - 2), abs(c - 2)) <= 1 for r, c in cells)
    (27, False)
    >>> sample_cells(3, 3, 2, allowed=torch.eye(3, dtype=torch.bool), seed=1)  # the diagonal only
    [(1, 1), (2, 2)]
    """
    _check_metric(metric)
    h, w, n = int(h), int(w), int(n)
    if h < 1 or w < 1:
        raise GeometryError(f"the grid must have at least one cell, got {h}x{w}")
    if n < 0:
        raise GeometryError(f"n must be >= 0, got {n}")
    if allowed is None:
        keep = torch.ones(h, w, dtype=torch.bool)
    else:
        if tuple(allowed.shape) != (h, w):
            raise GeometryError(f"allowed must be a [{h}, {w}] mask, got shape {tuple(allowed.shape)}")
        keep = allowed.detach().to("cpu", torch.bool).clone()
    for cell in avoid:
        r, c = (int(v) for v in cell)
        if not (0 <= r < h and 0 <= c < w):
            raise GeometryError(f"avoided cell {(r, c)} lies outside the {h}x{w} grid")
        if radius > 0:
            keep &= cell_distance((r, c), (h, w), 1, metric=metric) > radius
        else:
            keep[r, c] = False
    pool = torch.nonzero(keep.flatten()).flatten()
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
    pick = pool[torch.randperm(len(pool), generator=gen)[:n]]
    return [divmod(int(i), w) for i in pick]
