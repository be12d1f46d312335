"""Latent compatibility: does a candidate VAE decode a reference VAE's latent space? (:func:`latent_compatibility`,
used by ``vaeprobe compare`` and ``vaeprobe pipeline``.)

Both VAEs encode the same images; the encoders count as identical when every latent agrees within
:data:`ENCODER_TOL` (max |dz|), and then the two decoders are compared on the shared latents.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from vaeprobe.data.images import to_unit
from vaeprobe.errors import VaeprobeError

ENCODER_TOL = 1e-5
"""Max |difference| of the latent means below which two encoders count as identical."""


class CompatibilityError(VaeprobeError, ValueError):
    """A compatibility check that cannot run (the message says what to change)."""


def _encoder_weights_identical(a, b) -> bool | None:
    ea, eb = getattr(a.model, "encoder", None), getattr(b.model, "encoder", None)
    if ea is None or eb is None:
        return None
    sa, sb = ea.state_dict(), eb.state_dict()
    if sa.keys() != sb.keys():
        return False
    qa, qb = getattr(a.model, "quant_conv", None), getattr(b.model, "quant_conv", None)
    pairs = list(zip(sa.values(), sb.values()))
    if qa is not None and qb is not None:
        pairs += list(zip(qa.state_dict().values(), qb.state_dict().values()))
    return all(x.shape == y.shape and torch.equal(x.float().cpu(), y.float().cpu()) for x, y in pairs)


def image_compatibility(ref, cand, z_ref: torch.Tensor, z_cand: torch.Tensor) -> dict:
    """One image's latent-compatibility facts: max |dz|, share of positions that differ and, when the latents agree
    within ``ENCODER_TOL``, the two decoders compared on the reference's latent."""
    from vaeprobe.probes.metrics import compare_images

    def tensor_to_unit(x):
        return to_unit(x.detach().float().cpu()[0]).permute(1, 2, 0).numpy()

    row = {"same_shape": tuple(z_ref.shape) == tuple(z_cand.shape), "max_diff": math.nan, "differing": math.nan,
           "psnr": math.nan, "lpips": math.nan}
    if row["same_shape"]:
        d = (z_ref - z_cand).abs()
        row["max_diff"] = float(d.max())
        row["differing"] = float((d.amax(1) > ENCODER_TOL).float().mean())
        if row["max_diff"] <= ENCODER_TOL:
            pair = compare_images(tensor_to_unit(ref.decode(z_ref)), tensor_to_unit(cand.decode(z_ref)))
            row["psnr"], row["lpips"] = float(pair["psnr"]), float(pair["lpips"])
    return row


def compatibility_row(ref, cand, images: Sequence[dict]) -> dict:
    """Latent compatibility of ``cand`` with ``ref`` from the per-image facts of :func:`image_compatibility` (see
    :func:`latent_compatibility`)."""
    same_shape = all(r["same_shape"] for r in images)
    row = {"model": cand.spec, "reference": ref.spec, "same_factor": cand.factor == ref.factor,
           "same_channels": cand.latent_channels == ref.latent_channels, "same_latent_shape": same_shape,
           "shape_note": "" if same_shape else
           (f"latent {ref.latent_channels} ch x /{ref.factor} vs {cand.latent_channels} ch x /{cand.factor}"),
           "encoder_weights_identical": _encoder_weights_identical(ref, cand),
           "encoder_identical": False, "max_latent_diff": math.nan, "differing_positions": math.nan,
           "decoder_psnr_on_shared_latents": math.nan, "decoder_lpips_on_shared_latents": math.nan}
    if same_shape and images:
        row["max_latent_diff"] = float(max(r["max_diff"] for r in images))
        row["differing_positions"] = float(np.mean([r["differing"] for r in images]))
        row["encoder_identical"] = row["max_latent_diff"] <= ENCODER_TOL
    if row["encoder_identical"]:
        row["decoder_psnr_on_shared_latents"] = float(np.mean([r["psnr"] for r in images]))
        row["decoder_lpips_on_shared_latents"] = float(np.mean([r["lpips"] for r in images]))
        row["compatibility"] = "latent-compatible (identical encoder: a drop-in decoder replacement)"
    elif not same_shape:
        row["compatibility"] = f"not latent-compatible ({row['shape_note']})"
    else:
        row["compatibility"] = (f"not latent-compatible (same latent shape, different encoder output: max |dz| "
                                f"{row['max_latent_diff']:.3g} on {row['differing_positions']:.1%} of positions)")
    return row


def latent_compatibility(ref, cand, images="builtin:photos-heldout", *, size: int | None = 64) -> dict:
    """Whether ``cand`` decodes ``ref``'s latent space.

    Both encode the same images, and the encoders count as identical when every latent agrees within
    ``ENCODER_TOL`` (max |dz|).

    Parameters
    ----------
    ref, cand : vaeprobe.models.adapter.VAE
        The reference and the candidate.
    images : str, path or sequence, optional
        What :func:`~vaeprobe.data.images.load_images` reads (default: the builtin held-out photos), at a
        multiple of both factors.
    size : int or None, keyword-only
        Image size in pixels (``None``: as they are).

    Returns
    -------
    dict
        The row of ``compatibility.parquet``: ``encoder_identical`` (the verdict), ``compatibility`` (one
        sentence), ``max_latent_diff``, ``differing_positions``, shape facts and, for identical encoders, the two
        decoders compared on the shared latents.

    Raises
    ------
    CompatibilityError
        When no image can be read.

    Examples
    --------
    >>> from vaeprobe.models.loading import load_vae
    >>> row = latent_compatibility(load_vae("builtin:tiny-random"), load_vae("builtin:tiny-random"), size=32)
    >>> row["encoder_identical"], row["compatibility"].split(" (")[0]
    (True, 'latent-compatible')
    """
    from vaeprobe.data.images import load_images

    factor = int(np.lcm(ref.factor, cand.factor))
    batch = load_images(images, factor=factor, size=size)
    if not len(batch):
        raise CompatibilityError(f"{images}: no readable image for the compatibility check")
    return compatibility_row(ref, cand, [image_compatibility(ref, cand, ref.encode(img.tensor()).mean,
                                                 cand.encode(img.tensor()).mean) for img in batch])
