"""Robust per-channel statistics of one latent, and the spot threshold they leave out: the ground floor of the
probes (only torch), read by the operators (:mod:`vaeprobe.probes.perturb`) and the latent diagnostics
(:mod:`vaeprobe.probes.latents`, which re-exports both names)."""

from __future__ import annotations

import torch

DEFAULT_THRESHOLD = 10.0
"""Norm / median-norm ratio above which a position is a spot. On clean models the largest ratio of any position
was 4.14 (trained ``mini-kl-f8``, current weights, 15 photos at 256 px; 6.35 with its stage-1 weights) and 8.09
(random-init ``tiny-random``); planted spots sit far above (see docs/latents.md)."""

_MAD_SCALE = 1.4826  # MAD of a normal distribution times this is its std


def robust_channel_stats(z: torch.Tensor, *, threshold: float = DEFAULT_THRESHOLD) -> dict:
    """Per-channel centre and spread of one latent for the ``mean`` and ``noise`` operators, robust to a spot.

    Positions whose norm is at least ``threshold`` times the median norm (the spot detector's rule) are left
    out; over the rest, ``mean`` is each channel's median and ``std`` is 1.4826 x its median absolute deviation
    (the std of a normal distribution), or the plain std where the MAD is 0. A plain mean and std include the
    spot: on ``builtin:planted-direct`` at 128 px the pooled std with the spots is 3.7x the std without them.

    Parameters
    ----------
    z : torch.Tensor
        One latent, ``[C, h, w]`` or ``[1, C, h, w]``.
    threshold : float, keyword-only
        Norm ratio at or above which a position is excluded.

    Returns
    -------
    dict
        ``mean`` and ``std`` (``[C]`` tensors) and ``excluded``, the ``(row, col)`` cells left out.

    Examples
    --------
    >>> z = torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(0))
    >>> z[:, 3, 5] = 200.0
    >>> s = robust_channel_stats(z)
    >>> s["excluded"], bool((s["std"] < 1.5).all()), bool((z.std(dim=(1, 2)) > 10).all())
    ([(3, 5)], True, True)
    """
    if z.dim() == 4:
        z = z[0]
    z = z.detach().float()
    norm = z.norm(dim=0)
    keep = norm < threshold * norm.median().clamp_min(1e-12)
    if not keep.any():
        keep = torch.ones_like(keep)
    v = z[:, keep]  # [C, kept positions]
    med = v.median(dim=1).values
    mad = (v - med[:, None]).abs().median(dim=1).values * _MAD_SCALE
    std = torch.where(mad > 0, mad, v.std(dim=1) if v.shape[1] > 1 else torch.zeros_like(mad))
    w = z.shape[-1]
    excluded = [divmod(int(i), w) for i in torch.nonzero(~keep.flatten()).flatten()]
    return {"mean": med, "std": std, "excluded": excluded}
