"""Latent diagnostics: per-image posterior maps, streamed dataset statistics and spot localisation.

The encoder-side signature of SD's global-information spot is one latent position with a huge norm whose
log-variance sits at (or below) the -30 floor that diffusers clamps to, while every other position has an
ordinary norm and log-variance. This module measures exactly that:

- :func:`latent_maps` turns a :class:`~vaeprobe.models.adapter.Posterior` into per-position maps (norm, robust outlier
  scores, raw and clamped log-variance, KL to N(0, I), positions at the clamp floor);
- :class:`LatentStats` accumulates dataset statistics while streaming (memory flat in the number of images):
  per-channel mean, std, excess kurtosis, the suggested ``shift_factor``/``scaling_factor``, the spot rate, a
  location histogram and the distribution of the max/median norm ratio;
- :func:`find_spots` returns candidate positions with a score and a verdict as a pandas table, and
  :func:`score_localisation` scores it against ground truth (planted controls).

The detector (see ``docs/latents.md`` for the data behind the defaults): a position is a spot when its norm is at
least ``threshold`` (default :data:`DEFAULT_THRESHOLD` = 10) times the image's median position norm, or when its
log-variance, averaged over channels, is at or below the clamp floor (the whole position is pinned, as SD's spot)
while at most :data:`MAX_CLAMP_SHARE` of the image's positions are (an isolated clamp hit; a model whose posterior
sits at the floor everywhere has no spot in that sense). A single channel touching the floor is not enough: the
trained mini model does that at ordinary positions of some images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from vaeprobe.models.adapter import LOGVAR_CLAMP, Posterior
from vaeprobe.probes.geometry import cell_gap
from vaeprobe.probes.stats import _MAD_SCALE, DEFAULT_THRESHOLD, robust_channel_stats  # noqa: F401 (public here too)

MAX_CLAMP_SHARE = 0.05
"""The clamp rule only fires when at most this share of an image's positions are at the log-variance floor."""

CLAMP_FLOOR = LOGVAR_CLAMP[0]

_RATIO_BINS = np.round(np.arange(0.0, 4.0001, 0.05), 2)  # log10(max/median norm ratio), overflow in the last bin


@dataclass
class LatentMaps:
    """Per-position maps of one image's posterior (tensors ``[h, w]`` unless noted; float32 on the CPU).

    Made by :func:`latent_maps`. The logvar maps and ``kl`` are ``None`` for a deterministic encoder.

    Attributes
    ----------
    norm : torch.Tensor
        L2 norm over channels of the posterior mean.
    norm_ratio : torch.Tensor
        ``norm`` / median norm.
    mad_z : torch.Tensor
        Robust z-score (norm - median) / (1.4826 MAD).
    channel_mean : torch.Tensor
        ``[C]``: mean of each channel over positions.
    raw_logvar, logvar : torch.Tensor or None
        Log-variance averaged over channels, before / after the clamp.
    raw_logvar_min : torch.Tensor or None
        Minimum over channels of the log-variance before the clamp.
    kl : torch.Tensor or None
        KL(N(mean, exp(logvar)) || N(0, I)) summed over channels (clamped logvar, as diffusers computes it).
    clamp_channels : torch.Tensor or None
        int16: how many channels are at or below the floor.
    name : str
        The image's name.

    Examples
    --------
    >>> m = latent_maps(Posterior(torch.ones(1, 4, 2, 3), None, None), names=["flat"])[0]
    >>> m.name, m.shape, m.kl is None, int(m.at_clamp.sum())
    ('flat', (2, 3), True, 0)
    """

    norm: torch.Tensor
    norm_ratio: torch.Tensor
    mad_z: torch.Tensor
    channel_mean: torch.Tensor
    raw_logvar: torch.Tensor | None = None
    logvar: torch.Tensor | None = None
    raw_logvar_min: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    clamp_channels: torch.Tensor | None = None
    name: str = ""

    @property
    def shape(self) -> tuple[int, int]:
        """The latent grid ``(h, w)``."""
        return tuple(self.norm.shape)

    @property
    def at_clamp(self) -> torch.Tensor:
        """Boolean ``[h, w]``: some channel's raw log-variance is at or below the floor."""
        if self.clamp_channels is None:
            return torch.zeros(self.shape, dtype=torch.bool)
        return self.clamp_channels > 0

    @property
    def pinned(self) -> torch.Tensor:
        """Boolean ``[h, w]``: the raw log-variance averaged over channels is at or below the floor."""
        if self.raw_logvar is None:
            return torch.zeros(self.shape, dtype=torch.bool)
        return self.raw_logvar <= CLAMP_FLOOR + 1e-3

    def table(self) -> pd.DataFrame:
        """One row per position, in row-major order.

        Returns
        -------
        pandas.DataFrame
            Columns ``image, row, col, norm, norm_ratio, mad_z, raw_logvar, logvar, raw_logvar_min, kl,
            clamp_channels`` (nan for the logvar columns and ``kl`` of a deterministic encoder, 0 clamp channels).

        Examples
        --------
        >>> m = latent_maps(Posterior(torch.ones(1, 4, 2, 3), None, None))[0]
        >>> t = m.table()
        >>> len(t), int(t.row[5]), int(t.col[5]), float(t.norm[5]), bool(t.kl.isna().all())
        (6, 1, 2, 2.0, True)
        """
        h, w = self.shape
        rows, cols = np.divmod(np.arange(h * w), w)
        data = {"image": self.name, "row": rows.astype(np.int32), "col": cols.astype(np.int32)}
        for key in ("norm", "norm_ratio", "mad_z", "raw_logvar", "logvar", "raw_logvar_min", "kl"):
            value = getattr(self, key)
            data[key] = value.flatten().numpy().astype(np.float32) if value is not None else np.nan
        cc = self.clamp_channels
        data["clamp_channels"] = cc.flatten().numpy().astype(np.int16) if cc is not None else np.int16(0)
        return pd.DataFrame(data)

    def summary(self) -> dict:
        """Per-image scalars: median/max norm, max ratio and where, clamp hits, median logvar, total KL.

        Returns
        -------
        dict
            ``image, h, w, norm_median, norm_max, norm_ratio_max, mad_z_max, max_row, max_col,
            clamp_positions, pinned_positions, raw_logvar_median, raw_logvar_min, kl_total`` and ``mean_c0``,
            ``mean_c1``, ... (each channel's mean); what :meth:`LatentStats.add_summary` reads.

        Examples
        --------
        >>> mean = torch.ones(1, 4, 8, 8); mean[0, :, 2, 5] = 30.0
        >>> s = latent_maps(Posterior(mean, None, None))[0].summary()
        >>> s["norm_ratio_max"], (s["max_row"], s["max_col"]), s["kl_total"]
        (30.0, (2, 5), nan)
        """
        flat = int(torch.argmax(self.norm))
        h, w = self.shape
        out = {"image": self.name, "h": h, "w": w, "norm_median": float(self.norm.median()),
               "norm_max": float(self.norm.max()), "norm_ratio_max": float(self.norm_ratio.max()),
               "mad_z_max": float(self.mad_z.max()), "max_row": flat // w, "max_col": flat % w,
               "clamp_positions": int(self.at_clamp.sum()), "pinned_positions": int(self.pinned.sum()),
               "raw_logvar_median": float(self.raw_logvar.median()) if self.raw_logvar is not None else math.nan,
               "raw_logvar_min": float(self.raw_logvar_min.min()) if self.raw_logvar_min is not None else math.nan,
               "kl_total": float(self.kl.sum()) if self.kl is not None else math.nan}
        for c, m in enumerate(self.channel_mean.tolist()):
            out[f"mean_c{c}"] = m
        return out


def latent_maps(posterior: Posterior, *, names: Sequence[str] | None = None) -> list[LatentMaps]:
    """Per-image maps of a batch posterior (see :class:`LatentMaps`).

    Parameters
    ----------
    posterior : Posterior
        A batch posterior: ``mean`` ``[N, C, h, w]`` and, for a stochastic encoder, ``raw_logvar`` (before the
        clamp); any device and dtype.
    names : sequence of str, keyword-only
        One name per image (default ``"0"``, ``"1"``, ...).

    Returns
    -------
    list of LatentMaps
        One per image, float32 on the CPU.

    Examples
    --------
    >>> mean = torch.ones(1, 4, 8, 8); mean[0, :, 2, 5] = 30.0
    >>> raw = torch.full_like(mean, -20.0); raw[0, :, 2, 5] = -35.0
    >>> m = latent_maps(Posterior(mean, raw.clamp(-30, 20), raw))[0]
    >>> float(m.norm_ratio[2, 5]), int(m.clamp_channels[2, 5]), int(m.at_clamp.sum())
    (30.0, 4, 1)

    From a VAE:

    >>> from vaeprobe.models.loading import load_vae
    >>> vae = load_vae("builtin:tiny-random")
    >>> [(m.name, m.shape) for m in latent_maps(vae.encode(torch.zeros(2, 3, 32, 16)), names=["a", "b"])]
    [('a', (4, 2)), ('b', (4, 2))]
    """
    mean = posterior.mean.detach().float().cpu()
    raw = posterior.raw_logvar.detach().float().cpu() if posterior.raw_logvar is not None else None
    out = []
    for i in range(mean.shape[0]):
        mu = mean[i]
        norm = mu.norm(dim=0)
        med = norm.median()
        ratio = norm / med.clamp_min(1e-12)
        mad = (norm - med).abs().median()
        mad_z = (norm - med) / (_MAD_SCALE * mad).clamp_min(1e-12)
        maps = LatentMaps(norm=norm, norm_ratio=ratio, mad_z=mad_z, channel_mean=mu.mean(dim=(1, 2)),
                          name=names[i] if names is not None else str(i))
        if raw is not None:
            r = raw[i]
            lv = r.clamp(*LOGVAR_CLAMP)
            maps.raw_logvar = r.mean(0)
            maps.logvar = lv.mean(0)
            maps.raw_logvar_min = r.min(0).values
            maps.kl = 0.5 * (mu.pow(2) + lv.exp() - 1.0 - lv).sum(0)
            maps.clamp_channels = (r <= CLAMP_FLOOR + 1e-3).sum(0).to(torch.int16)
        out.append(maps)
    return out


# -- spot detection ------------------------------------------------------------------------------------------

SPOT_COLUMNS = ["image", "row", "col", "rank", "norm", "norm_ratio", "mad_z", "raw_logvar_min", "clamp_channels",
                "score", "by_norm", "by_clamp", "is_spot"]


def find_spots(maps: LatentMaps | Posterior | Iterable[LatentMaps], *, threshold: float = DEFAULT_THRESHOLD,
               top_k: int = 3, clamp_rule: bool = True, max_clamp_share: float = MAX_CLAMP_SHARE) -> pd.DataFrame:
    """Candidate spot positions per image with a score and a verdict, as a pandas table.

    Candidates are each image's ``top_k`` positions by norm ratio plus every pinned position (mean raw
    log-variance at the floor). ``score`` is the norm / median-norm ratio; ``by_norm`` is ``score >= threshold``;
    ``by_clamp`` marks an isolated pinned position (see the module docstring); ``is_spot = by_norm or by_clamp``.

    Parameters
    ----------
    maps : LatentMaps, Posterior or iterable of LatentMaps
        The images to search (a posterior goes through :func:`latent_maps` first, names ``"0"``, ``"1"``, ...).
    threshold : float, keyword-only
        Norm / median-norm ratio at or above which a position is a spot (:data:`DEFAULT_THRESHOLD`).
    top_k : int, keyword-only
        Candidates per image by norm ratio.
    clamp_rule : bool, keyword-only
        Whether an isolated pinned position is a spot (``by_clamp``); ``False`` leaves only the norm rule.
    max_clamp_share : float, keyword-only
        The clamp rule fires only when at most this share of the image's positions are pinned
        (:data:`MAX_CLAMP_SHARE`).

    Returns
    -------
    pandas.DataFrame
        One row per candidate, columns :data:`SPOT_COLUMNS` (``rank`` 1 is the image's highest score); empty, with
        those columns, when there are no images.

    Examples
    --------
    >>> mean = torch.ones(2, 4, 8, 8); mean[0, :, 2, 5] = 30.0
    >>> df = find_spots(Posterior(mean, None, None), top_k=1)
    >>> df[["image", "row", "col", "score", "is_spot"]].values.tolist()
    [['0', 2, 5, 30.0, True], ['1', 0, 0, 1.0, False]]
    >>> find_spots(Posterior(mean, None, None), threshold=50.0, top_k=1)["is_spot"].tolist()
    [False, False]
    """
    if isinstance(maps, Posterior):
        maps = latent_maps(maps)
    elif isinstance(maps, LatentMaps):
        maps = [maps]
    frames = []
    for m in maps:
        h, w = m.shape
        ratio = m.norm_ratio.flatten()
        k = min(top_k, h * w)
        cand = set(torch.topk(ratio, k).indices.tolist())
        clamp = m.pinned.flatten()
        clamp_ok = clamp_rule and float(clamp.float().mean()) <= max_clamp_share
        if clamp.any():
            cand |= set(torch.nonzero(clamp).flatten().tolist())
        idx = sorted(cand, key=lambda j: -float(ratio[j]))
        rows = []
        for rank, j in enumerate(idx, 1):
            score = float(ratio[j])
            by_norm = score >= threshold
            by_clamp = bool(clamp_ok and clamp[j])
            rows.append({"image": m.name, "row": j // w, "col": j % w, "rank": rank,
                         "norm": float(m.norm.flatten()[j]), "norm_ratio": score,
                         "mad_z": float(m.mad_z.flatten()[j]),
                         "raw_logvar_min": float(m.raw_logvar_min.flatten()[j]) if m.raw_logvar_min is not None
                         else math.nan,
                         "clamp_channels": int(m.clamp_channels.flatten()[j]) if m.clamp_channels is not None else 0,
                         "score": score, "by_norm": by_norm, "by_clamp": by_clamp, "is_spot": by_norm or by_clamp})
        frames.append(pd.DataFrame(rows, columns=SPOT_COLUMNS))
    if not frames:
        return pd.DataFrame(columns=SPOT_COLUMNS)
    return pd.concat(frames, ignore_index=True)


@dataclass
class LocalisationScore:
    """Detector accuracy against ground truth, from :func:`score_localisation`.

    Attributes
    ----------
    recall : float
        Found true spots / true spots (nan without true spots).
    precision : float
        Correct flagged positions / flagged positions (1.0 when nothing is flagged).
    image_fpr : float
        Share of images without a true spot where something is flagged (nan without such images).
    position_fpr : float
        Flagged non-spot positions / all non-spot positions.
    n_images, n_true, n_flagged : int
        Images scored, true spots, flagged positions.
    misses : list of str
        Images with a true spot that was not found.

    Examples
    --------
    >>> df = pd.DataFrame({"image": ["a"], "row": [2], "col": [5], "is_spot": [True]})
    >>> s = score_localisation(df, {"a": [(2, 5)]}, {"a": (8, 8)})
    >>> s.recall, s.precision, s.image_fpr, s.position_fpr, s.n_flagged, s.misses
    (1.0, 1.0, nan, 0.0, 1, [])
    """

    recall: float
    precision: float
    image_fpr: float
    position_fpr: float
    n_images: int
    n_true: int
    n_flagged: int
    misses: list[str] = field(default_factory=list)


def score_localisation(spots: pd.DataFrame, truth: dict[str, list[tuple[int, int]]],
                       shapes: dict[str, tuple[int, int]], *, tolerance: int = 0) -> LocalisationScore:
    """Score :func:`find_spots` output against ``truth`` (image -> true spot cells; empty for clean images).

    A flagged position matches a true spot within Chebyshev distance ``tolerance`` cells.

    Parameters
    ----------
    spots : pandas.DataFrame
        :func:`find_spots` output (columns ``image``, ``row``, ``col``, ``is_spot`` are read).
    truth : dict of str to list of (int, int)
        Each scored image's true spot cells (empty for a clean image); images not in ``truth`` are ignored.
    shapes : dict of str to (int, int)
        Each image's latent ``(h, w)`` (for the per-position false-positive rate).
    tolerance : int, keyword-only
        Chebyshev distance in cells within which a flagged position matches a true spot.

    Returns
    -------
    LocalisationScore

    Examples
    --------
    >>> df = pd.DataFrame({"image": ["a", "b"], "row": [2, 1], "col": [5, 1], "is_spot": [True, True]})
    >>> s = score_localisation(df, {"a": [(2, 5)], "b": []}, {"a": (8, 8), "b": (8, 8)})
    >>> s.recall, s.precision, s.image_fpr
    (1.0, 0.5, 1.0)
    >>> near = pd.DataFrame({"image": ["a"], "row": [3], "col": [5], "is_spot": [True]})
    >>> [score_localisation(near, {"a": [(2, 5)]}, {"a": (8, 8)}, tolerance=t).recall for t in (0, 1)]
    [0.0, 1.0]
    """
    flagged = spots[spots["is_spot"].astype(bool)]
    found = n_true = n_flag = correct = fp_pos = neg_pos = 0
    clean_images = clean_hit = 0
    misses = []
    for image, cells in truth.items():
        mine = flagged[flagged["image"] == image]
        pts = list(zip(mine["row"].astype(int), mine["col"].astype(int)))
        near = lambda a, b: cell_gap(a, b) <= tolerance  # noqa: E731
        n_true += len(cells)
        hit = [any(near(t, p) for p in pts) for t in cells]
        found += sum(hit)
        if not all(hit):
            misses.append(image)
        good = [any(near(t, p) for t in cells) for p in pts]
        n_flag += len(pts)
        correct += sum(good)
        fp_pos += len(pts) - sum(good)
        h, w = shapes[image]
        neg_pos += h * w - len(cells)
        if not cells:
            clean_images += 1
            clean_hit += bool(pts)
    return LocalisationScore(recall=found / n_true if n_true else math.nan,
                             precision=correct / n_flag if n_flag else 1.0,
                             image_fpr=clean_hit / clean_images if clean_images else math.nan,
                             position_fpr=fp_pos / neg_pos if neg_pos else math.nan,
                             n_images=len(truth), n_true=n_true, n_flagged=n_flag, misses=misses)


# -- streamed dataset statistics -----------------------------------------------------------------------------

@dataclass
class Moments:
    """Count, mean and central moment sums M2..M4 (float64 arrays, one entry per channel), mergeable exactly
    (pairwise update of Chan et al. / Pébay), so statistics stream with flat memory.

    Attributes
    ----------
    n : numpy.ndarray
        Count of values per channel.
    mean : numpy.ndarray
        Mean per channel.
    m2, m3, m4 : numpy.ndarray
        Sums of the 2nd, 3rd and 4th powers of the deviations from the mean, per channel.

    Examples
    --------
    >>> a, b = np.random.default_rng(0).normal(size=(2, 1, 500))
    >>> m = Moments.of(a).merge(Moments.of(b))
    >>> import scipy.stats
    >>> bool(np.allclose(m.kurtosis, scipy.stats.kurtosis(np.concatenate([a, b], 1), axis=1)))
    True
    """

    n: np.ndarray
    mean: np.ndarray
    m2: np.ndarray
    m3: np.ndarray
    m4: np.ndarray

    @classmethod
    def empty(cls, channels: int) -> "Moments":
        """No values yet, for ``channels`` channels (the identity of :meth:`merge`)."""
        z = np.zeros(channels)
        return cls(z.copy(), z.copy(), z.copy(), z.copy(), z.copy())

    @classmethod
    def of(cls, values: np.ndarray) -> "Moments":
        """Moments of ``values`` ``[C, N]`` per row."""
        v = np.asarray(values, np.float64)
        n = np.full(v.shape[0], v.shape[1], np.float64)
        mean = v.mean(1)
        d = v - mean[:, None]
        return cls(n, mean, (d ** 2).sum(1), (d ** 3).sum(1), (d ** 4).sum(1))

    def merge(self, o: "Moments") -> "Moments":
        """The moments of both sets of values together (a new object; neither input changes)."""
        na, nb = self.n, o.n
        n = na + nb
        safe = np.where(n > 0, n, 1.0)
        delta = o.mean - self.mean
        mean = self.mean + delta * nb / safe
        m2 = self.m2 + o.m2 + delta ** 2 * na * nb / safe
        m3 = (self.m3 + o.m3 + delta ** 3 * na * nb * (na - nb) / safe ** 2
              + 3 * delta * (na * o.m2 - nb * self.m2) / safe)
        m4 = (self.m4 + o.m4 + delta ** 4 * na * nb * (na ** 2 - na * nb + nb ** 2) / safe ** 3
              + 6 * delta ** 2 * (na ** 2 * o.m2 + nb ** 2 * self.m2) / safe ** 2
              + 4 * delta * (na * o.m3 - nb * self.m3) / safe)
        return Moments(n, mean, m2, m3, m4)

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation per channel (``ddof=0``)."""
        return np.sqrt(self.m2 / np.where(self.n > 0, self.n, 1.0))

    @property
    def kurtosis(self) -> np.ndarray:
        """Excess kurtosis (0 for a normal distribution; Fisher's definition, as ``scipy.stats.kurtosis``)."""
        return self.n * self.m4 / np.where(self.m2 > 0, self.m2 ** 2, np.nan) - 3.0

    def to_dict(self) -> dict:
        """JSON-able lists ``{n, mean, m2, m3, m4}`` (:meth:`from_dict` reads them back)."""
        return {k: getattr(self, k).tolist() for k in ("n", "mean", "m2", "m3", "m4")}

    @classmethod
    def from_dict(cls, d: dict) -> "Moments":
        """The inverse of :meth:`to_dict`."""
        return cls(*(np.asarray(d[k], np.float64) for k in ("n", "mean", "m2", "m3", "m4")))


def image_moments(mean: torch.Tensor, *, exclude: Sequence[tuple[int, int]] = ()) -> dict:
    """Per-channel and pooled moments of one latent ``[C, h, w]``, with and without the ``exclude`` cells.

    Parameters
    ----------
    mean : torch.Tensor
        One posterior mean ``[C, h, w]``.
    exclude : sequence of (int, int), keyword-only
        Cells ``(row, col)`` left out of the ``*_ordinary`` moments (the image's spots).

    Returns
    -------
    dict
        :meth:`Moments.to_dict` of each of ``channel``, ``pooled`` (all channels as one), ``channel_ordinary`` and
        ``pooled_ordinary`` (without the ``exclude`` cells); what :meth:`LatentStats.add_summary` takes.

    Examples
    --------
    >>> z = torch.ones(4, 3, 3); z[:, 1, 1] = 10.0
    >>> m = image_moments(z, exclude=[(1, 1)])
    >>> m["pooled"]["n"], m["pooled_ordinary"]["n"], m["pooled_ordinary"]["mean"]
    ([36.0], [32.0], [1.0])
    """
    v = mean.detach().double().cpu().flatten(1).numpy()
    keep = np.ones(v.shape[1], bool)
    w = mean.shape[-1]
    for r, c in exclude:
        keep[r * w + c] = False
    return {"channel": Moments.of(v).to_dict(), "pooled": Moments.of(v.reshape(1, -1)).to_dict(),
            "channel_ordinary": Moments.of(v[:, keep]).to_dict(),
            "pooled_ordinary": Moments.of(v[:, keep].reshape(1, -1)).to_dict()}


class LatentStats:
    """Dataset statistics accumulated one image at a time (memory flat in the number of images).

    Suggested diffusion scaling (SD3/FLUX convention, diffusion latents are ``(z - shift) * scale``):
    ``shift_factor`` = mean of all latent values, ``scaling_factor`` = 1 / their standard deviation, both over
    posterior means pooled across channels and positions. The same over "ordinary" positions (spots excluded) is
    reported too, because one huge spot inflates the std.

    Attributes
    ----------
    n_images, n_spot_images : int
        Images added, and those with at least one spot.
    moments : dict of str to Moments
        The merged :func:`image_moments` (``channel``, ``pooled``, ``channel_ordinary``, ``pooled_ordinary``).
    locations : dict of str to numpy.ndarray
        Spot counts per cell, one ``[h, w]`` histogram per latent size (key ``"{h}x{w}"``).
    location_fraction : numpy.ndarray
        ``[8, 8]`` spot counts in normalised coordinates (all sizes together).
    ratio_hist : numpy.ndarray
        Histogram of log10 of each image's max/median norm ratio (bins of 0.05, overflow in the last).
    ratio_min, ratio_max : float
        Smallest and largest per-image max/median norm ratio.

    Examples
    --------
    >>> stats = LatentStats()
    >>> signs = torch.tensor([1.0, -1.0]).repeat(96).reshape(3, 4, 4, 4)   # values 3 and -1: mean 1, std 2
    >>> post = Posterior(signs * 2 + 1, None, None)
    >>> for m in latent_maps(post):
    ...     _ = stats.add(m, post.mean[int(m.name)], spots=[])
    >>> s = stats.summary()
    >>> s["n_images"], round(s["shift_factor"], 3), round(s["scaling_factor"], 3)
    (3, 1.0, 0.5)
    """

    def __init__(self):
        self.n_images = 0
        self.n_spot_images = 0
        self.moments: dict[str, Moments] = {}
        self.locations: dict[str, np.ndarray] = {}
        self.location_fraction = np.zeros((8, 8), np.int64)  # spot locations in normalised coordinates
        self.ratio_hist = np.zeros(len(_RATIO_BINS), np.int64)
        self.ratio_min = math.inf
        self.ratio_max = 0.0

    def add(self, maps: LatentMaps, mean: torch.Tensor | None = None, *, spots: Sequence[tuple[int, int]] = (),
            moments: dict | None = None) -> dict:
        """Add one image: its maps, its posterior mean (or precomputed ``moments``) and its detected spot cells.

        Parameters
        ----------
        maps : LatentMaps
            The image's maps (:func:`latent_maps`).
        mean : torch.Tensor, optional
            Its posterior mean ``[C, h, w]``; not needed with ``moments``.
        spots : sequence of (int, int), keyword-only
            Its detected spot cells ``(row, col)``.
        moments : dict, keyword-only
            Precomputed :func:`image_moments` (e.g. when resuming) instead of ``mean``.

        Returns
        -------
        dict
            The image's moments (:func:`image_moments`).

        Examples
        --------
        >>> mean = torch.ones(1, 4, 8, 8); mean[0, :, 2, 5] = 30.0
        >>> stats = LatentStats()
        >>> _ = stats.add(latent_maps(Posterior(mean, None, None))[0], mean[0], spots=[(2, 5)])
        >>> stats.n_spot_images, stats.summary()["spot_locations"]["8x8"][2][5]
        (1, 1)
        """
        if moments is None:
            moments = image_moments(mean, exclude=spots)
        self.add_summary(maps.summary(), moments, spots)
        return moments

    def add_summary(self, summary: dict, moments: dict, spots: Sequence[tuple[int, int]]) -> None:
        """Add one image from its :meth:`LatentMaps.summary` and :func:`image_moments` (what a run stores).

        Parameters
        ----------
        summary : dict
            :meth:`LatentMaps.summary` of the image (``h``, ``w`` and ``norm_ratio_max`` are read).
        moments : dict
            :func:`image_moments` of the image.
        spots : sequence of (int, int)
            Its detected spot cells ``(row, col)``.

        Examples
        --------
        >>> stats = LatentStats()
        >>> stats.add_summary({"h": 4, "w": 4, "norm_ratio_max": 2.0}, image_moments(torch.ones(4, 4, 4)), [])
        >>> stats.summary()["norm_ratio"]["max"]
        2.0
        """
        for key, d in moments.items():
            m = Moments.from_dict(d)
            self.moments[key] = self.moments[key].merge(m) if key in self.moments else m
        self.n_images += 1
        h, w = int(summary["h"]), int(summary["w"])
        if spots:
            self.n_spot_images += 1
            hist = self.locations.setdefault(f"{h}x{w}", np.zeros((h, w), np.int64))
            for r, c in spots:
                hist[r, c] += 1
                self.location_fraction[min(7, r * 8 // h), min(7, c * 8 // w)] += 1
        ratio = float(summary["norm_ratio_max"])
        self.ratio_min, self.ratio_max = min(self.ratio_min, ratio), max(self.ratio_max, ratio)
        b = int(np.clip(np.searchsorted(_RATIO_BINS, math.log10(max(ratio, 1.0)), side="right") - 1, 0,
                        len(_RATIO_BINS) - 1))
        self.ratio_hist[b] += 1

    def ratio_quantile(self, q: float) -> float:
        """Approximate quantile of the per-image max/median norm ratio (histogram bin upper edge, 0.05 in log10).

        Parameters
        ----------
        q : float
            The quantile, in [0, 1].

        Returns
        -------
        float
            At most the largest ratio seen; nan before any image.

        Examples
        --------
        >>> LatentStats().ratio_quantile(0.5)
        nan
        """
        if self.n_images == 0:
            return math.nan
        cum = np.cumsum(self.ratio_hist) / self.ratio_hist.sum()
        b = int(np.searchsorted(cum, q))
        return float(min(10 ** (_RATIO_BINS[min(b, len(_RATIO_BINS) - 1)] + 0.05), self.ratio_max))

    def summary(self) -> dict:
        """JSON-able dataset statistics.

        Returns
        -------
        dict
            ``n_images``, ``n_spot_images``, ``spot_rate``; with moments, ``channel_mean``, ``channel_std``,
            ``channel_kurtosis`` (and ``_ordinary``), ``shift_factor``, ``scaling_factor``, ``pooled_kurtosis``
            (each also ``_ordinary``); ``norm_ratio`` (min, max, median, q95 and the histogram),
            ``spot_locations`` (per latent size) and ``spot_locations_8x8``.

        Examples
        --------
        >>> LatentStats().summary()["n_images"]
        0
        """
        out: dict = {"n_images": self.n_images, "n_spot_images": self.n_spot_images,
                     "spot_rate": self.n_spot_images / self.n_images if self.n_images else math.nan}
        if "channel" in self.moments:
            ch = self.moments["channel"]
            out["channel_mean"] = ch.mean.tolist()
            out["channel_std"] = ch.std.tolist()
            out["channel_kurtosis"] = ch.kurtosis.tolist()
            for tag, key in (("", "pooled"), ("_ordinary", "pooled_ordinary")):
                p = self.moments[key]
                out[f"shift_factor{tag}"] = float(p.mean[0])
                out[f"scaling_factor{tag}"] = float(1.0 / p.std[0]) if p.std[0] > 0 else math.nan
                out[f"pooled_kurtosis{tag}"] = float(p.kurtosis[0])
            out["channel_kurtosis_ordinary"] = self.moments["channel_ordinary"].kurtosis.tolist()
        out["norm_ratio"] = {"min": self.ratio_min if self.n_images else math.nan, "max": self.ratio_max,
                             "median": self.ratio_quantile(0.5), "q95": self.ratio_quantile(0.95),
                             "log10_bins": _RATIO_BINS.tolist(), "counts": self.ratio_hist.tolist()}
        out["spot_locations"] = {k: v.tolist() for k, v in self.locations.items()}
        out["spot_locations_8x8"] = self.location_fraction.tolist()
        return out
