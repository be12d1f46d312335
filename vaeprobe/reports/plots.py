"""Figures (matplotlib, Agg backend), each written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from vaeprobe._io import atomic_path
from vaeprobe.data.images import to_unit


class Figures:
    """The few pyplot calls used here, on :class:`matplotlib.figure.Figure` objects: no backend is chosen and no
    pyplot state is touched, so a notebook's inline figures keep working after vaeprobe writes its own."""

    @staticmethod
    def subplots(nrows: int = 1, ncols: int = 1, *, figsize=None, squeeze: bool = True):
        from matplotlib.figure import Figure

        fig = Figure(figsize=figsize)
        return fig, fig.subplots(nrows, ncols, squeeze=squeeze)

    @staticmethod
    def close(fig) -> None:
        """Nothing to release: the figure is not registered with pyplot."""

    @staticmethod
    def Circle(*args, **kwargs):  # noqa: N802 (pyplot's name)
        from matplotlib.patches import Circle

        return Circle(*args, **kwargs)


def figure(ncols: int, width: float = 3.2):
    """``(Figures, fig, axes)``: a row of ``ncols`` axes."""
    fig, axes = Figures.subplots(1, ncols, figsize=(width * ncols, width + 0.4), squeeze=False)
    return Figures, fig, axes[0]


def save_latent_maps(path: str | Path, image: np.ndarray, maps, spots: Sequence[tuple[int, int]] = ()) -> Path:
    """Save a PNG: the image, log10 norm ratio, mean raw log-variance and KL maps; ``spots`` circled in red."""
    panels = [("image", None), ("log10 norm / median", np.log10(np.maximum(maps.norm_ratio.numpy(), 1e-6)))]
    if maps.raw_logvar is not None:
        panels += [("raw logvar (mean over channels)", maps.raw_logvar.numpy()), ("log10(1 + KL to N(0, I))", np.log10(1 + maps.kl.numpy()))]
    plt, fig, axes = figure(len(panels))
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
    fig.subplots_adjust(left=0.01, right=0.96, bottom=0.03, top=0.84, wspace=0.35)  # fixed margins: faster than tight_layout
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    return path


def save_png(path: str | Path, image: np.ndarray) -> Path:
    """Write an ``[H, W, 3]`` float image in [0, 1] (clipped) as an 8-bit PNG, atomically."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (np.clip(np.asarray(image, dtype=np.float64), 0, 1) * 255 + 0.5).astype(np.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG", compress_level=1)  # lossless; level 6 took ~4x longer
    return path


def tensor_to_unit(x) -> np.ndarray:
    """A decoded image tensor ``[3, H, W]`` (or ``[1, 3, H, W]``) in [-1, 1] to a float32 ``[H, W, 3]`` array in
    [0, 1] (:func:`vaeprobe.data.images.to_unit`, clamped).

    >>> import torch
    >>> tensor_to_unit(torch.tensor([[[-1.0]], [[0.0]], [[2.0]]])).tolist()
    [[[0.0, 0.5, 1.0]]]
    """
    x = x.detach().float().cpu()
    if x.dim() == 4:
        x = x[0]
    return to_unit(x).permute(1, 2, 0).numpy()


def signed_difference(after, before) -> tuple[np.ndarray, float]:
    """``(image, gain)``: mid-grey where nothing changed, brighter/darker per channel where ``after`` is
    above/below ``before``; the difference is multiplied by ``gain`` so that its largest magnitude fills the range."""
    d = (after.detach().float().cpu() - before.detach().float().cpu())
    if d.dim() == 4:
        d = d[0]
    peak = float(d.abs().max())
    gain = 1.0 / peak if peak > 0 else 1.0
    return (0.5 + 0.5 * d * gain).clamp(0, 1).permute(1, 2, 0).numpy(), gain


def save_figure(fig, plt, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    return path


def save_heatmap(path: str | Path, data: np.ndarray, title: str) -> Path:
    """Save a PNG heatmap of a 2-D array (one colour bar, the cell grid as pixels)."""
    plt, fig, axes = figure(1, width=3.6)
    im = axes[0].imshow(data, cmap="magma", interpolation="nearest")
    fig.colorbar(im, ax=axes[0], fraction=0.046, pad=0.04)
    axes[0].set_title(title, fontsize=7)
    axes[0].set_xticks([])
    axes[0].set_yticks([])
    fig.tight_layout()
    return save_figure(fig, plt, path)


def save_bars(path: str | Path, labels: Sequence[str], series: dict, title: str) -> Path:
    """Save a PNG of grouped bars: one group per label, one bar per series."""
    plt, fig, axes = figure(1, width=max(3.6, 0.5 * len(labels) + 2))
    ax = axes[0]
    x = np.arange(len(labels))
    width = 0.8 / max(1, len(series))
    for k, (name, values) in enumerate(series.items()):
        ax.bar(x + (k - (len(series) - 1) / 2) * width, np.nan_to_num(np.asarray(values, float)), width, label=name)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=45, fontsize=7)
    ax.axhline(0, color="black", lw=0.5)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return save_figure(fig, plt, path)


def save_lines(path: str | Path, series: dict, title: str, xlabel: str = "", log: bool = False, *,
               x=None, marks: dict | None = None) -> Path:
    """Save a PNG line plot of one or more series against their index (or against ``x``, shared by all series);
    ``marks`` maps labels to x positions drawn as dashed vertical lines."""
    plt, fig, axes = figure(1, width=4.5)
    ax = axes[0]
    for name, values in series.items():
        values = np.asarray(values, float)
        ax.plot(np.arange(len(values)) if x is None else np.asarray(x, float), values,
                marker="." if x is None else None, label=name)
    for label, pos in (marks or {}).items():
        ax.axvline(pos, color="grey", linestyle="--", linewidth=0.8)
        ax.annotate(label, (pos, 1.0), xycoords=("data", "axes fraction"), fontsize=6, ha="left", va="top")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel, fontsize=8)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return save_figure(fig, plt, path)
