"""The zeroing test: does erasing one latent cell move the far field more than erasing ordinary cells?

This is the small, exact check used to certify the builtin models and controls; the perturbation module builds
full scans on the same definitions. The far field of cell ``(r, c)`` is every pixel whose latent cell lies more
than ``radius`` cells away (Chebyshev distance) from it; its energy is the mean squared change there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def far_field_mask(shape: tuple[int, int], row: int, col: int, factor: int, radius: int) -> torch.Tensor:
    """Boolean ``[H, W]`` mask of pixels whose latent cell is more than ``radius`` cells from ``(row, col)``.

    >>> far_field_mask((32, 32), 0, 0, 8, 2).sum().item()  # cells 3.. in either direction: 1024 - 3*3*64
    448
    """
    h, w = shape
    rr = torch.arange(h) // factor
    cc = torch.arange(w) // factor
    return ((rr[:, None] - row).abs() > radius) | ((cc[None, :] - col).abs() > radius)


def far_field_energy(diff: torch.Tensor, row: int, col: int, factor: int, radius: int) -> float:
    """Mean squared change over the far field of ``(row, col)``; ``diff`` is ``[3, H, W]``."""
    mask = far_field_mask(tuple(diff.shape[-2:]), row, col, factor, radius)
    if not mask.any():
        return float("nan")
    return float(diff.pow(2).mean(0)[mask].mean())


@dataclass
class ZeroingResult:
    row: int
    col: int
    spot_energy: float          # far-field energy when the tested cell is zeroed
    random_energies: list[float]  # the same for each random other cell (its own far field)
    radius: int

    @property
    def ratio(self) -> float:
        """Spot far-field energy over the largest random one (the test passes at >= 10)."""
        return self.spot_energy / max(max(self.random_energies), 1e-20)

    @property
    def ratio_to_median(self) -> float:
        return self.spot_energy / max(float(np.median(self.random_energies)), 1e-20)


def zeroing_test(vae, x: torch.Tensor, row: int, col: int, n_random: int = 20, radius: int = 3,
                 seed: int = 0, z: torch.Tensor | None = None) -> ZeroingResult:
    """Zero cell ``(row, col)`` of the posterior mean of image ``x`` ``[1, 3, H, W]`` and ``n_random`` random
    other cells, one at a time, decode, and compare far-field energies."""
    if z is None:
        z = vae.encode(x).mean
    h, w = z.shape[-2:]
    ref = vae.decode(z)[0]
    g = torch.Generator().manual_seed(seed)
    cells = [(r, c) for r in range(h) for c in range(w) if (r, c) != (row, col)]
    pick = torch.randperm(len(cells), generator=g)[:n_random].tolist()

    targets = [(row, col)] + [cells[i] for i in pick]
    energies = zeroed_far_field(vae, z, targets, radius, ref=ref)
    return ZeroingResult(row, col, energies[0], energies[1:], radius)


def zeroed_far_field(vae, z: torch.Tensor, cells: list[tuple[int, int]], radius: int = 3, batch: int = 8,
                     ref: torch.Tensor | None = None) -> list[float]:
    """Far-field energy of zeroing each cell of ``cells`` (one at a time) in latent ``z`` ``[1, C, h, w]``,
    decoded ``batch`` perturbations at a time."""
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
