"""Test oracles: small reference implementations written independently of the code they check.

Nothing here imports :mod:`vaeprobe.probes.geometry` or :mod:`vaeprobe.probes.response`; the geometry is spelled
out with plain Python loops (the ``brute_*`` functions, for unit tests on small grids) or with numpy (the zeroing
test, fast enough for the integration tests). Conventions, restated from first principles:

- pixel ``(y, x)`` belongs to latent cell ``(y // factor, x // factor)``; an ``H x W`` image has a
  ``ceil(H / factor) x ceil(W / factor)`` grid;
- a site ``(row, col, size)`` covers rows ``row - (size - 1) // 2 .. row + size // 2`` (and the same for columns),
  clipped to the grid;
- the distance from a pixel to a set of cells is the smallest distance from its cell to any of them, Chebyshev
  ``max(|dr|, |dc|)`` or Euclidean ``sqrt(dr^2 + dc^2)``; the far field at ``radius`` is where it exceeds
  ``radius``.

The zeroing test (:func:`zeroing_test`) is the check that certifies the builtin models and controls: zero one
latent cell of the posterior mean, decode, and compare the far-field energy (mean squared change beyond
``radius`` cells, Chebyshev) with that of zeroing ``n_random`` random other cells.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


# -- brute-force geometry (per-pixel loops) ----------------------------------------------------------------------

def grid_of(shape: tuple[int, int], factor: int) -> tuple[int, int]:
    """``(h, w)``: the latent grid of an ``H x W`` image, partial cells included.

    >>> grid_of((37, 50), 8)
    (5, 7)
    """
    h = shape[0] // factor + (1 if shape[0] % factor else 0)
    w = shape[1] // factor + (1 if shape[1] % factor else 0)
    return h, w


def patch_cells(row: int, col: int, size: int, h: int, w: int) -> list[tuple[int, int]]:
    """The cells of a ``size x size`` site around ``(row, col)`` on an ``h x w`` grid, row by row.

    >>> patch_cells(0, 0, 3, 4, 4)
    [(0, 0), (0, 1), (1, 0), (1, 1)]
    """
    below, above = (size - 1) // 2, size // 2
    out = []
    for r in range(row - below, row + above + 1):
        for c in range(col - below, col + above + 1):
            if 0 <= r < h and 0 <= c < w:
                out.append((r, c))
    return out


def block_cells(rows: tuple[int, int], cols: tuple[int, int], h: int, w: int) -> list[tuple[int, int]]:
    """The cells ``rows[0] <= r < rows[1]``, ``cols[0] <= c < cols[1]`` that lie on an ``h x w`` grid."""
    return [(r, c) for r in range(rows[0], rows[1]) for c in range(cols[0], cols[1]) if r < h and c < w]


def gap(a: tuple[int, int], b: tuple[int, int], metric: str = "chebyshev") -> float:
    """Distance between two cells.

    >>> gap((0, 0), (3, 4)), gap((0, 0), (3, 4), "euclidean")
    (4, 5.0)
    """
    dr, dc = abs(a[0] - b[0]), abs(a[1] - b[1])
    if metric == "chebyshev":
        return max(dr, dc)
    if metric == "euclidean":
        return math.sqrt(dr * dr + dc * dc)
    raise ValueError(metric)


def brute_cell_distance(cells: list[tuple[int, int]], shape: tuple[int, int], factor: int,
                        metric: str = "chebyshev") -> np.ndarray:
    """``[H, W]`` float64: for each pixel, the smallest distance from its cell to any of ``cells`` (one loop per
    pixel and cell).

    >>> brute_cell_distance([(0, 1)], (2, 6), 2).astype(int).tolist()
    [[1, 1, 0, 0, 1, 1], [1, 1, 0, 0, 1, 1]]
    """
    out = np.zeros(shape, dtype=np.float64)
    for y in range(shape[0]):
        for x in range(shape[1]):
            here = (y // factor, x // factor)
            out[y, x] = min(gap(here, cell, metric) for cell in cells)
    return out


def brute_ring_profile(values: np.ndarray, dist: np.ndarray) -> list[float]:
    """Mean of ``values`` at each distance rounded half to even (as ``torch.round``) to 0, 1, ..., max (nan for an
    empty ring), one pixel at a time."""
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    for v, d in zip(np.asarray(values, np.float64).ravel(), np.asarray(dist, np.float64).ravel()):
        k = int(np.round(d))
        sums[k] = sums.get(k, 0.0) + float(v)
        counts[k] = counts.get(k, 0) + 1
    return [sums[k] / counts[k] if k in counts else math.nan for k in range(max(counts) + 1)]


def brute_sample(h: int, w: int, n: int, avoid=(), radius: float = 0, allowed=None, metric: str = "chebyshev",
                 seed: int = 0) -> list[tuple[int, int]]:
    """The documented draw of a control sampler: the pool is every cell in row-major order that ``allowed`` permits
    (a nested list or array of bools) and that lies more than ``radius`` from every avoided cell (an avoided
    cell itself is never in it); then ``pool[torch.randperm(len(pool), generator)[:n]]``."""
    pool = []
    for r in range(h):
        for c in range(w):
            if allowed is not None and not bool(allowed[r][c]):
                continue
            if any((r, c) == tuple(a) or gap((r, c), tuple(a), metric) <= radius for a in avoid):
                continue
            pool.append((r, c))
    g = torch.Generator().manual_seed(seed)
    return [pool[i] for i in torch.randperm(len(pool), generator=g)[:n].tolist()]


# -- the zeroing test (numpy) ---------------------------------------------------------------------------------------

def far_field_mask(shape: tuple[int, int], row: int, col: int, factor: int, radius: int) -> torch.Tensor:
    """Boolean ``[H, W]`` mask of the pixels whose latent cell is more than ``radius`` cells (Chebyshev) from
    ``(row, col)``.

    >>> int(far_field_mask((32, 32), 0, 0, 8, 2).sum())  # cells 3.. in either direction: 1024 - 3*3*64
    448
    """
    ry = np.arange(shape[0]) // factor
    cx = np.arange(shape[1]) // factor
    mask = (np.abs(ry - row)[:, None] > radius) | (np.abs(cx - col)[None, :] > radius)
    return torch.from_numpy(mask)


def far_field_energy(diff: torch.Tensor, row: int, col: int, factor: int, radius: int) -> float:
    """Mean squared change over the far field of ``(row, col)`` (float64); ``diff`` is ``[3, H, W]``; nan for an
    empty far field.

    >>> far_field_energy(torch.full((3, 32, 32), 0.5), 0, 0, 8, 2)
    0.25
    """
    d = diff.detach().double().cpu().numpy()
    mask = far_field_mask(d.shape[-2:], row, col, factor, radius).numpy()
    if not mask.any():
        return math.nan
    return float((d ** 2).mean(0)[mask].mean())


@dataclass
class ZeroingResult:
    row: int
    col: int
    spot_energy: float            # far-field energy when the tested cell is zeroed
    random_energies: list[float]  # the same for each random other cell (its own far field)
    radius: int

    @property
    def ratio(self) -> float:
        """Spot far-field energy over the largest random one (the test passes at >= 10)."""
        return self.spot_energy / max(max(self.random_energies), 1e-20)

    @property
    def ratio_to_median(self) -> float:
        return self.spot_energy / max(float(np.median(self.random_energies)), 1e-20)


def zeroed_far_field(vae, z: torch.Tensor, cells: list[tuple[int, int]], radius: int = 3, batch: int = 8,
                     ref: torch.Tensor | None = None) -> list[float]:
    """Far-field energy of zeroing each cell of ``cells`` (one at a time) in latent ``z`` ``[1, C, h, w]``, decoded
    ``batch`` perturbations at a time."""
    if ref is None:
        ref = vae.decode(z)[0]
    out: list[float] = []
    for start in range(0, len(cells), batch):
        chunk = cells[start:start + batch]
        zz = z.repeat(len(chunk), 1, 1, 1)
        for i, (r, c) in enumerate(chunk):
            zz[i, :, r, c] = 0.0
        dec = vae.decode(zz)
        out += [far_field_energy(dec[i] - ref, r, c, vae.factor, radius) for i, (r, c) in enumerate(chunk)]
    return out


def zeroing_test(vae, x: torch.Tensor, row: int, col: int, n_random: int = 20, radius: int = 3,
                 seed: int = 0, z: torch.Tensor | None = None) -> ZeroingResult:
    """Zero cell ``(row, col)`` of the posterior mean of image ``x`` ``[1, 3, H, W]`` and ``n_random`` random other
    cells (``torch.randperm`` of the other cells in row-major order, seeded), one at a time, decode, and compare
    far-field energies."""
    if z is None:
        z = vae.encode(x).mean
    h, w = z.shape[-2:]
    ref = vae.decode(z)[0]
    others = [(r, c) for r in range(h) for c in range(w) if (r, c) != (row, col)]
    g = torch.Generator().manual_seed(seed)
    chosen = [others[i] for i in torch.randperm(len(others), generator=g)[:n_random].tolist()]
    energies = zeroed_far_field(vae, z, [(row, col)] + chosen, radius, ref=ref)
    return ZeroingResult(row, col, energies[0], energies[1:], radius)
