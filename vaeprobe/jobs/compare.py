"""Evaluate and compare replacement VAEs: reconstruction, the spot, and latent compatibility, with a verdict.

``compare_vaes(["builtin:mini-kl-f8", "builtin:mini-kl-f8-ft-mse"], "builtin:photos-heldout", "runs/compare")``
treats the first VAE as the reference and each other one as a candidate. Per VAE, on the same images:

- reconstruction in the model-card format (sd-vae-ft-mse reports rFID, PSNR, SSIM, PSIM as mean ± std): PSNR,
  SSIM and LPIPS mean ± std, and rFID when Inception-v3 weights are on disk (:func:`find_inception_weights`;
  nothing is downloaded) — otherwise the summary says why it is missing;
- spot diagnostics: spot rate and norm ratio (:func:`~vaeprobe.probes.latents.find_spots`), positions at the logvar
  clamp, the largest global-effect ratio of a two-stage scan and the share of images with a cell whose verdict
  (:mod:`vaeprobe.probes.verdict`, among the two-stage scan's cells) is ``global`` or ``global-information``, and
  the dominant pathway at the largest-norm cell (:func:`~vaeprobe.probes.mechanism.attribute_pathways`);
- latent compatibility with the reference: latent shape and factor; whether the encoders are identical, judged
  by their outputs on every image (and by their weights where both expose an ``encoder``); for identical encoders
  (a decoder-only fine-tune such as ft-EMA/ft-MSE) the two decoders are compared on the same latents; otherwise
  the difference in latent statistics and the shift/scale each VAE would need.

Incompatible parts (another latent shape or factor) are compared where meaningful and named, not crashed on.
The verdict per candidate says in plain words: spot removed or not, at what reconstruction cost, latent-compatible
or not. Files: ``reconstruction.parquet``, ``models.parquet``, ``compatibility.parquet``, ``summary.json``,
``comparison.html``, ``comparison.md``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from vaeprobe._io import write_text_atomic
from vaeprobe.errors import VaeprobeError, one_line

ENCODER_TOL = 1e-5        # max |difference| of the latent means below which two encoders count as identical
SPOT_PRESENT = 0.5        # a VAE "has the spot" when the spot rate or the global rate reaches this share of images
INCEPTION_FILES = ("pt_inception-2015-12-05-6726825d.pth", "inception_v3_google-0cc3c7bd.pth",
                   "inception_v3_google-1a9a5a14.pth")


class CompareError(VaeprobeError, ValueError):
    """A comparison that cannot run (the message says what to change)."""


# -- Frechet distance / rFID ---------------------------------------------------------------------------------------

def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ``||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))``.

    >>> round(frechet_distance(np.zeros(2), np.eye(2), np.ones(2), 4 * np.eye(2)), 6)   # 2 + (1 + 4 - 4) * 2
    4.0
    """
    import scipy.linalg

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    with warnings.catch_warnings():  # singular covariances (fewer samples than dimensions) are expected here
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():  # near-singular product: regularise, as is customary for FID
            eps = np.eye(s1.shape[0]) * 1e-6
            covmean = scipy.linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def feature_fid(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance of two feature sets ``[N, D]`` (their means and sample covariances)."""
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def find_inception_weights() -> Path | None:
    """A local Inception-v3 checkpoint (``$VAEPROBE_INCEPTION``, or torch hub's checkpoint cache), else ``None``."""
    env = os.environ.get("VAEPROBE_INCEPTION")
    if env:
        return Path(env) if Path(env).exists() else None
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    for name in INCEPTION_FILES:
        if (hub / name).exists():
            return hub / name
    return None


class InceptionFeatures:
    """Pool features (2048-d) of torchvision's Inception-v3 with weights from a local file (``weights_only``)."""

    def __init__(self, path: Path):
        from torchvision.models import inception_v3

        net = inception_v3(weights=None, aux_logits=True, init_weights=False)
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing, unexpected = net.load_state_dict(state, strict=False)
        if len(missing) > 10:
            raise CompareError(f"{path} is not a torchvision Inception-v3 state dict ({len(missing)} keys missing); "
                               f"pass one with VAEPROBE_INCEPTION or drop it to skip rFID")
        net.fc = torch.nn.Identity()
        self.net = net.eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        """``images`` ``[B, 3, H, W]`` in [-1, 1] -> ``[B, 2048]``."""
        x = torch.nn.functional.interpolate((images.float().clamp(-1, 1) + 1) / 2, size=(299, 299),
                                            mode="bilinear", align_corners=False)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        return self.net((x - mean) / std).numpy()


# -- compatibility -------------------------------------------------------------------------------------------------

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


def _verdict(ref: dict, cand: dict, compat: dict) -> str:
    def has_spot(m):
        return (m["spot_rate"] >= SPOT_PRESENT) or (m["global_rate"] >= SPOT_PRESENT)

    def rates(m):
        return f"spot rate {m['spot_rate']:.0%}, global-cell rate {m['global_rate']:.0%}"

    both = f"reference: {rates(ref)}; candidate: {rates(cand)}"
    if has_spot(cand):
        spot = f"spot present ({both}; candidate's dominant pathway {cand['dominant']})"
    elif has_spot(ref):
        spot = f"spot removed ({both})"
    else:
        spot = f"no spot in either ({both}; a spot needs a rate of at least {SPOT_PRESENT:.0%})"
    dp, dl = cand["psnr_mean"] - ref["psnr_mean"], cand["lpips_mean"] - ref["lpips_mean"]
    cost = (f"reconstruction {'better' if dp > 0 and dl < 0 else 'worse' if dp < 0 and dl > 0 else 'mixed'}: "
            f"PSNR {cand['psnr_mean']:.2f} vs {ref['psnr_mean']:.2f} dB ({dp:+.2f}), LPIPS {cand['lpips_mean']:.4f} "
            f"vs {ref['lpips_mean']:.4f} ({dl:+.4f}) against the reference")
    if compat["encoder_identical"]:
        lat = "latent-compatible (identical encoder: a drop-in decoder replacement)"
    elif not compat["same_latent_shape"]:
        lat = f"not latent-compatible ({compat['shape_note']})"
    else:
        lat = (f"not latent-compatible (same latent shape, different encoder output: max |dz| "
               f"{compat['max_latent_diff']:.3g} on {compat['differing_positions']:.1%} of positions; the diffusion "
               f"model was trained on the reference's latents)")
    return f"{spot}; {cost}; {lat}."


def _compat_row(ref, cand, lat_ref: Sequence[torch.Tensor], lat_cand: Sequence[torch.Tensor]) -> dict:
    """Latent compatibility of ``cand`` with ``ref`` from their encodings of the same images (see
    :func:`latent_compatibility`)."""
    from vaeprobe.probes.metrics import compare_images
    from vaeprobe.reports.plots import tensor_to_unit

    same_shape = all(a.shape == b.shape for a, b in zip(lat_ref, lat_cand))
    row = {"model": cand.spec, "reference": ref.spec, "same_factor": cand.factor == ref.factor,
           "same_channels": cand.latent_channels == ref.latent_channels, "same_latent_shape": same_shape,
           "shape_note": "" if same_shape else
           (f"latent {ref.latent_channels} ch x /{ref.factor} vs {cand.latent_channels} ch x /{cand.factor}"),
           "encoder_weights_identical": _encoder_weights_identical(ref, cand),
           "encoder_identical": False, "max_latent_diff": math.nan, "differing_positions": math.nan,
           "decoder_psnr_on_shared_latents": math.nan, "decoder_lpips_on_shared_latents": math.nan}
    if same_shape:
        diffs = [(a - b).abs() for a, b in zip(lat_ref, lat_cand)]
        row["max_latent_diff"] = float(max(float(d.max()) for d in diffs))
        row["differing_positions"] = float(np.mean([float((d.amax(1) > ENCODER_TOL).float().mean()) for d in diffs]))
        row["encoder_identical"] = row["max_latent_diff"] <= ENCODER_TOL
    if row["encoder_identical"]:
        pairs = [compare_images(tensor_to_unit(ref.decode(z)), tensor_to_unit(cand.decode(z))) for z in lat_ref]
        row["decoder_psnr_on_shared_latents"] = float(np.mean([p["psnr"] for p in pairs]))
        row["decoder_lpips_on_shared_latents"] = float(np.mean([p["lpips"] for p in pairs]))
    if row["encoder_identical"]:
        row["compatibility"] = "latent-compatible (identical encoder: a drop-in decoder replacement)"
    elif not same_shape:
        row["compatibility"] = f"not latent-compatible ({row['shape_note']})"
    else:
        row["compatibility"] = (f"not latent-compatible (same latent shape, different encoder output: max |dz| "
                                f"{row['max_latent_diff']:.3g} on {row['differing_positions']:.1%} of positions)")
    return row


def latent_compatibility(ref, cand, images="builtin:photos-heldout", size: int | None = 64) -> dict:
    """Whether ``cand`` decodes ``ref``'s latent space: both encode the same ``images`` (default: the builtin
    held-out photos at ``size`` px) and the encoders count as identical when every latent agrees within
    ``ENCODER_TOL`` (max |dz|). Returns the row of ``compatibility.parquet``: ``encoder_identical`` (the verdict),
    ``compatibility`` (one sentence), ``max_latent_diff``, ``differing_positions``, shape facts and, for identical
    encoders, the two decoders compared on the shared latents.

    >>> from vaeprobe.models.adapter import load_vae
    >>> row = latent_compatibility(load_vae("builtin:tiny-random"), load_vae("builtin:tiny-random"), size=32)
    >>> row["encoder_identical"], row["compatibility"].split(" (")[0]
    (True, 'latent-compatible')
    """
    from vaeprobe.data.images import load_images

    factor = int(np.lcm(ref.factor, cand.factor))
    batch = load_images(images, factor=factor, size=size)
    if not len(batch):
        raise CompareError(f"{images}: no readable image for the compatibility check")
    lat_ref = [ref.encode(img.tensor()).mean for img in batch]
    lat_cand = [cand.encode(img.tensor()).mean for img in batch]
    return _compat_row(ref, cand, lat_ref, lat_cand)


# -- the job -------------------------------------------------------------------------------------------------------

def compare_vaes(specs: Sequence, images, out, size: int | None = 128, fit: str = "crop", scan: bool = True,
                 mechanism: bool = True, rfid: bool = True, progress: bool = True) -> dict:
    """Compare ``specs[1:]`` against the reference ``specs[0]`` on ``images`` and write ``out``.

    Returns the summary dict (also ``summary.json``): per model the reconstruction means ± std, rFID or the reason
    it is missing, the spot diagnostics; per candidate the compatibility and the verdict.
    """
    from tqdm import tqdm

    from vaeprobe.data.images import load_images
    from vaeprobe.probes.latents import find_spots, latent_maps
    from vaeprobe.probes.mechanism import attribute_pathways
    from vaeprobe.probes.metrics import compare_images
    from vaeprobe.probes.perturb import Site
    from vaeprobe.reports.plots import tensor_to_unit
    from vaeprobe.probes.scan import two_stage_scan
    from vaeprobe.models.loading import load_vae

    if len(specs) < 2:
        raise CompareError("give at least two VAEs: the reference first, then the candidates")
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vaes = [s if hasattr(s, "encode") and hasattr(s, "factor") else load_vae(s) for s in specs]
    factors = {v.factor for v in vaes}
    batch = load_images(images, factor=int(np.lcm.reduce(sorted(factors))), size=size, policy=fit)
    if not len(batch):
        raise CompareError(f"{images}: no readable image")
    weights = find_inception_weights() if rfid else None
    inception = InceptionFeatures(weights) if weights is not None else None
    rfid_note = (f"computed with {weights}" + (f"; from only {len(batch)} images the 2048-d covariances are "
                                                f"singular, so treat it as a rough indication (FID wants thousands)"
                                                if len(batch) < 2048 else "")) if inception else (
        "not computed: rfid disabled" if not rfid else
        "not computed: no Inception-v3 weights on disk (set VAEPROBE_INCEPTION to a torchvision inception_v3 "
        "state dict, or put it in torch hub's checkpoints folder); with only a few images it would be unreliable "
        "anyway")
    rec_rows, models, latents, failed = [], [], [], []
    real_feats = inception(torch.cat([img.tensor() for img in batch])) if inception else None
    bar = tqdm(total=len(vaes) * len(batch), desc="compare", unit="img", disable=not progress)
    for k, vae in enumerate(vaes):
        means, recons = [], []
        spot_images = clamp_hits = global_images = 0
        ratios, top_ratios, dominant = [], [], []
        for img in batch:
            try:
                x = img.tensor()
                post = vae.encode(x)
                z = post.mean
                rec = vae.decode(z)
                rec_row = {"model": vae.spec, "image": img.name, **compare_images(img.array, tensor_to_unit(rec))}
                m = latent_maps(post, [img.name])[0]
                top = dom = None
                glob = False
                if scan:
                    from vaeprobe.probes.latents import robust_channel_stats
                    from vaeprobe.probes.verdict import attach_verdicts, receptive_field

                    field = receptive_field(vae, z, rec, exclude=robust_channel_stats(z)["excluded"])
                    cells = two_stage_scan(vae, z, "zero", ref=rec, field=field)
                    cells = attach_verdicts(vae, z, rec, cells, field, evidence=0)
                    top = float(cells.global_ratio.max())
                    glob = bool(cells.is_global.any())
                if mechanism:
                    r, c = divmod(int(z[0].norm(dim=0).argmax()), z.shape[-1])
                    dom = str(attribute_pathways(vae, z, [Site(r, c)]).dominant[0])
                # the image counts only once all of it worked
                means.append(z)
                recons.append(rec)
                rec_rows.append(rec_row)
                spot_images += bool(find_spots(m).is_spot.any())
                ratios.append(float(m.norm_ratio.max()))
                clamp_hits += int(m.at_clamp.sum()) if m.clamp_channels is not None else 0
                if top is not None:
                    top_ratios.append(top)
                    global_images += glob
                if dom is not None:
                    dominant.append(dom)
            except Exception as exc:  # one bad image must not lose the comparison
                error = one_line(exc)
                failed.append({"model": vae.spec, "image": img.name, "error": error})
                tqdm.write(f"vaeprobe: {vae.spec} on {img.name}: failed ({error}); going on", file=sys.stderr)
                means.append(None)
            bar.update(1)
        latents.append(means)
        rec_df = pd.DataFrame([r for r in rec_rows if r["model"] == vae.spec])
        n = len(rec_df)
        if n == 0:
            raise CompareError(f"{vae.spec}: every image failed; the first, {failed[-1]['image']}: "
                               f"{failed[-1]['error']}")
        zs = torch.cat([z.flatten() for z in means if z is not None])
        row = {"model": vae.spec, "role": "reference" if k == 0 else "candidate", "channels": vae.latent_channels,
               "factor": vae.factor, "n_images": n,
               **{f"{m}_{s}": float(getattr(rec_df[m], s)()) for m in ("psnr", "ssim", "lpips") for s in ("mean", "std")},
               "rfid": math.nan, "spot_rate": spot_images / n, "median_norm_ratio": float(np.median(ratios)),
               "max_norm_ratio": float(np.max(ratios)), "clamp_hits_per_image": clamp_hits / n,
               "global_rate": global_images / n if scan else math.nan,
               "median_top_global_ratio": float(np.median(top_ratios)) if top_ratios else math.nan,
               "dominant": (pd.Series(dominant).value_counts().idxmax() if dominant else "not run"),
               "latent_mean": float(zs.mean()), "latent_std": float(zs.std()),
               "suggested_shift_factor": float(zs.mean()), "suggested_scaling_factor": float(1 / zs.std()),
               "configured_scaling_factor": vae.scaling_factor}
        if inception is not None:
            row["rfid"] = feature_fid(real_feats, inception(torch.cat(recons)))
        models.append(row)
    bar.close()
    ref = vaes[0]
    compat_rows = []
    for k in range(1, len(vaes)):
        cand = vaes[k]
        both = [(a, b) for a, b in zip(latents[0], latents[k]) if a is not None and b is not None]
        row = _compat_row(ref, cand, [a for a, _ in both], [b for _, b in both])
        row["verdict"] = _verdict(models[0], models[k], row)
        compat_rows.append(row)
    rec_table, model_table, compat_table = pd.DataFrame(rec_rows), pd.DataFrame(models), pd.DataFrame(compat_rows)
    for name, table in (("reconstruction.parquet", rec_table), ("models.parquet", model_table),
                        ("compatibility.parquet", compat_table)):
        from vaeprobe._io import atomic_path

        with atomic_path(out / name) as tmp:
            table.to_parquet(tmp, index=False)
    summary = {"reference": ref.spec, "images": str(images), "n_images": len(batch), "size": size,
               "skipped": [str(s) for s in batch.skipped], "failed": failed, "rfid": rfid_note,
               "models": model_table.to_dict("records"), "candidates": compat_table.to_dict("records"),
               "seconds": round(time.perf_counter() - t0, 1)}
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1, default=str))
    from vaeprobe.reports.report import build_comparison_report

    build_comparison_report(out, summary)
    return summary
