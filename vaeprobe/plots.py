"""Figures (matplotlib, Agg backend), each written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ._io import atomic_path


def _figure(ncols: int, width: float = 3.2):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, width + 0.4), squeeze=False)
    return plt, fig, axes[0]


def save_latent_maps(path: str | Path, image: np.ndarray, maps, spots: Sequence[tuple[int, int]] = ()) -> Path:
    """Save a PNG: the image, log10 norm ratio, mean raw log-variance and KL maps; ``spots`` circled in red."""
    panels = [("image", None), ("log10 norm / median", np.log10(np.maximum(maps.norm_ratio.numpy(), 1e-6)))]
    if maps.raw_logvar is not None:
        panels += [("raw logvar (mean over channels)", maps.raw_logvar.numpy()), ("log10(1 + KL to N(0, I))", np.log10(1 + maps.kl.numpy()))]
    plt, fig, axes = _figure(len(panels))
    h, w = maps.shape
    for ax, (title, data) in zip(axes, panels):
        if data is None:
            ax.imshow(np.clip(image, 0, 1), extent=(-0.5, w - 0.5, h - 0.5, -0.5))
        else:
            im = ax.imshow(data, cmap="magma", interpolation="nearest")
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        for r, c in spots:
            ax.add_patch(plt.Circle((c, r), max(1.0, 0.04 * max(h, w)), fill=False, color="red", lw=1.5))
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(maps.name, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    return path
