"""Evaluate and compare replacement VAEs: reconstruction, the spot, and latent compatibility, with a verdict.

``compare_vaes(["builtin:mini-kl-f8", "builtin:mini-kl-f8-ft-mse"], "builtin:photos-heldout", "runs/compare")``
treats the first VAE as the reference and each other one as a candidate. Per VAE, on the same images:

- reconstruction in the model-card format (sd-vae-ft-mse reports rFID, PSNR, SSIM, PSIM as mean ± std): PSNR,
  SSIM and LPIPS mean ± std, and rFID with the standard FID Inception network and preprocessing when its weights
  file is on disk (:mod:`vaeprobe.probes.fid`; nothing is downloaded) — otherwise the summary says why it is
  missing;
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
or not. Like every job it writes a run directory with one part per image, so a killed comparison resumes with
``resume=True``. Files: see docs/outputs.md, section compare.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from vaeprobe.errors import VaeprobeError, one_line
from vaeprobe.jobs.runner import Job, RunDir, coerce_vae, run_job, vae_config
from vaeprobe.jobs.spec import Input, JobSpec, Param, image_params
from vaeprobe.probes.compatibility import compatibility_row, image_compatibility

SPOT_PRESENT = 0.5        # a VAE "has the spot" when the spot rate or the global rate reaches this share of images


class CompareError(VaeprobeError, ValueError):
    """A comparison that cannot run (the message says what to change)."""


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


# -- the job -------------------------------------------------------------------------------------------------------

def _latent_names() -> list[str]:
    """The latent measures of ``vaeprobe evaluate`` that compare adds (its own spot columns stay)."""
    from vaeprobe.probes.evaluation import LATENT_METRICS

    return [m for m in LATENT_METRICS if m not in ("spot_rate", "norm_ratio_max")]


SPEC = JobSpec("compare", "compare replacement VAEs with a reference: reconstruction, the spot, latent "
                          "compatibility, an assessment each", entry="compare_vaes", rank=40,
               inputs=(Input("specs", "the reference VAE spec (e.g. the VAE a diffusion model was trained with), "
                                      "then the candidate VAE specs", positional=True, nargs="+", metavar="SPEC"),
                       Input("images", "folder, glob, image file or builtin:photos[-train|-heldout]"),
                       Input("out", "output folder")),
               params=(Param("size", 128, "square crop size in pixels (default {default})", type=int),
                       image_params()[1],
                       Param("scan", True, "skip the two-stage scans and their verdicts (global-cell rate)",
                             negate=True),
                       Param("mechanism", True, "skip the pathway attribution", negate=True),
                       Param("rfid", True, "skip rFID even when the FID Inception weights are on disk", negate=True,
                             config=False),
                       Param("inception", None, "the standard FID Inception weights "
                                                "(pt_inception-2015-12-05-6726825d.pth; default: $VAEPROBE_INCEPTION, "
                                                "then torch hub's checkpoints folder); nothing is downloaded",
                             metavar="PATH", config=False)))
"""The compare job's parameters: its CLI options, API defaults and ``config.json`` (:mod:`vaeprobe.jobs.spec`;
the weights actually used go to ``config.json`` as ``fid_weights``)."""


def cli_line(summary: dict, options: dict, out) -> str:
    """What ``vaeprobe compare`` prints when it finishes."""
    lines = [f"{c['model']}: {c['verdict']}" for c in summary["candidates"]]
    lines += [f"rFID: {summary['rfid']}", f"comparison: {out / 'comparison.html'} (and comparison.md, parquet tables)"]
    return "\n".join(lines)


class CompareJob(Job):
    """Per image: every VAE's reconstruction, spot facts, scan verdicts, pathway and latent moments, and each
    candidate's latent compatibility with the reference (see :func:`compare_vaes`)."""

    name = desc = "compare"

    def __init__(self, vaes, images, *, size, fit, scan, mechanism, fid, fid_reason=""):
        self.vaes, self.images, self.size, self.fit = vaes, images, size, fit
        self.device = vaes[0].device
        self.factor = int(np.lcm.reduce(sorted({v.factor for v in vaes})))
        self.scan, self.mechanism, self.fid, self.fid_reason = scan, mechanism, fid, fid_reason

    def config(self) -> dict:
        return {"job": "compare", "vaes": [vae_config(v) for v in self.vaes], "images": str(self.images),
                "size": self.size, "fit": self.fit, "scan": self.scan, "mechanism": self.mechanism,
                "fid_weights": str(self.fid.weights_path) if self.fid is not None else None}

    def _model_image(self, vae, img) -> tuple[dict, dict, torch.Tensor, torch.Tensor]:
        """One VAE on one image: its reconstruction row, its facts and its latent and decode."""
        from vaeprobe.reports.plots import tensor_to_unit
        from vaeprobe.probes.latents import find_spots, latent_maps
        from vaeprobe.probes.metrics import compare_images

        post = vae.encode(img.tensor())
        z = post.mean
        rec = vae.decode(z)
        rec_row = {"model": vae.spec, "image": img.name, **compare_images(img.array, tensor_to_unit(rec))}
        m = latent_maps(post, names=[img.name])[0]
        facts = {"spot": bool(find_spots(m).is_spot.any()), "ratio": float(m.norm_ratio.max()),
                 "clamp_hits": int(m.at_clamp.sum()) if m.clamp_channels is not None else 0,
                 "top": None, "global": None, "dominant": None, "z_sum": float(z.double().sum()),
                 "z_sumsq": float(z.double().pow(2).sum()), "z_n": int(z.numel())}
        if self.scan:
            from vaeprobe.probes.latents import robust_channel_stats
            from vaeprobe.probes.scan import two_stage_scan
            from vaeprobe.probes.verdict import attach_verdicts, receptive_field

            field = receptive_field(vae, z, rec, exclude=robust_channel_stats(z)["excluded"])
            cells = attach_verdicts(vae, z, rec, two_stage_scan(vae, z, field.removal, ref=rec, field=field).table,
                                    field, evidence=0)
            facts["top"], facts["global"] = float(cells.global_ratio.max()), bool(cells.is_global.any())
        if self.mechanism:
            from vaeprobe.probes.mechanism import attribute_pathways
            from vaeprobe.probes.perturb import Site

            r, c = divmod(int(z[0].norm(dim=0).argmax()), z.shape[-1])
            facts["dominant"] = str(attribute_pathways(vae, z, [Site(r, c)]).table.dominant[0])
        from vaeprobe.probes.evaluation import latent_measures   # the latent measures of vaeprobe evaluate

        facts["latent"] = latent_measures(vae, img.tensor(), post, rec=rec)
        return rec_row, facts, z, rec

    def process(self, run: RunDir, key: str, img) -> None:
        rows, facts, latents, features = [], [], [], {}
        for k, vae in enumerate(self.vaes):
            try:
                rec_row, fact, z, rec = self._model_image(vae, img)
            except VaeprobeError:
                raise
            except Exception as exc:  # name the model that failed; the runner records the image and goes on
                raise CompareError(f"{vae.spec}: {one_line(exc)}") from exc
            rows.append(rec_row)
            facts.append(fact)
            latents.append(z)
            if self.fid is not None:
                features[str(k)] = self.fid(rec)[0].tolist()   # by index: two models may share a spec
        if self.fid is not None:
            features["real"] = self.fid(img.tensor())[0].tolist()
        compat = [image_compatibility(self.vaes[0], cand, latents[0], z) for cand, z in zip(self.vaes[1:], latents[1:])]
        run.write_part(key, pd.DataFrame(rows), {"image": img.name, "facts": facts, "compat": compat,
                                                 "features": features})

    def _model_row(self, k: int, vae, rec: pd.DataFrame, metas: list[dict]) -> dict:
        facts = [m["facts"][k] for m in metas]
        n = len(facts)
        total = sum(f["z_n"] for f in facts)
        mean = sum(f["z_sum"] for f in facts) / total
        var = sum(f["z_sumsq"] for f in facts) / total - mean ** 2
        std = math.sqrt(max(var, 0.0) * total / max(total - 1, 1))   # unbiased, as torch.std of all latents
        tops = [f["top"] for f in facts if f["top"] is not None]
        dominant = [f["dominant"] for f in facts if f["dominant"] is not None]
        row = {"model": vae.spec, "role": "reference" if k == 0 else "candidate", "channels": vae.latent_channels,
               "factor": vae.factor, "n_images": n,
               **{f"{m}_{s}": float(getattr(rec[m], s)()) for m in ("psnr", "ssim", "lpips") for s in ("mean", "std")},
               "rfid": math.nan, "spot_rate": sum(f["spot"] for f in facts) / n,
               "median_norm_ratio": float(np.median([f["ratio"] for f in facts])),
               "max_norm_ratio": float(np.max([f["ratio"] for f in facts])),
               "clamp_hits_per_image": sum(f["clamp_hits"] for f in facts) / n,
               "global_rate": sum(bool(f["global"]) for f in facts) / n if self.scan else math.nan,
               "median_top_global_ratio": float(np.median(tops)) if tops else math.nan,
               "dominant": pd.Series(dominant).value_counts().idxmax() if dominant else "not run",
               "latent_mean": mean, "latent_std": std, "suggested_shift_factor": mean,
               "suggested_scaling_factor": 1 / std if std > 0 else math.nan,
               "configured_scaling_factor": vae.scaling_factor}
        for m in _latent_names():   # evaluate's names; latent_std (raw units, all latents) is taken: eval_latent_std
            vals = [f["latent"][m] for f in facts if not np.isnan(f["latent"].get(m, math.nan))]
            row["eval_latent_std" if m == "latent_std" else m] = float(np.mean(vals)) if vals else math.nan
        if self.fid is not None:
            from vaeprobe.probes.fid import frechet_distance as fid_distance

            row["rfid"] = fid_distance(np.array([m["features"]["real"] for m in metas]),
                                       np.array([m["features"][str(k)] for m in metas]))
        return row

    def summarise(self, run: RunDir, keys: list[str]) -> dict:
        rec = run.concat("reconstruction.parquet", keys)
        metas = [run.meta(k) for k in keys]
        models = [self._model_row(k, vae, rec[rec.model == vae.spec], metas) for k, vae in enumerate(self.vaes)]
        compat = []
        for k, cand in enumerate(self.vaes[1:], start=1):
            row = compatibility_row(self.vaes[0], cand, [m["compat"][k - 1] for m in metas])
            row["verdict"] = _verdict(models[0], models[k], row)
            compat.append(row)
        model_table, compat_table = pd.DataFrame(models), pd.DataFrame(compat)
        run.write_table("models.parquet", model_table)
        run.write_table("compatibility.parquet", compat_table)
        return {"reference": self.vaes[0].spec, "images": str(self.images), "n_images": len(metas),
                "size": self.size, "rfid": self._fid_note(len(metas)), "models": model_table.to_dict("records"),
                "candidates": compat_table.to_dict("records"),
                "latent_measures": ["eval_latent_std" if m == "latent_std" else m for m in _latent_names()]}

    def _fid_note(self, n: int) -> str:
        if self.fid is None:
            return self.fid_reason
        return f"computed with {self.fid.weights_path}" + (
            f"; from only {n} images the 2048-d covariances are singular, so treat it as a rough indication (FID "
            f"wants thousands)" if n < 2048 else "")

    def after(self, run: RunDir, summary: dict) -> None:
        from vaeprobe.reports.report import build_comparison_report

        build_comparison_report(run.path, summary)


def compare_vaes(specs: Sequence, images, out, *, resume: bool = False, overwrite: bool = False,
                 progress: bool = True, device=None, dtype=None, **options) -> RunDir:
    """Compare ``specs[1:]`` against the reference ``specs[0]`` on ``images`` and write the run directory ``out``.

    The keyword options (``size``, ``fit``, ``scan``, ``mechanism``, ``rfid``, ``inception``) and their defaults
    are declared once, in :data:`SPEC`.

    Parameters
    ----------
    specs : sequence
        VAE adapters or specs of :func:`~vaeprobe.models.loading.load_vae`, the reference first.
    images : str, path or sequence
        What :func:`~vaeprobe.data.images.iter_images` reads.
    out : path
        The run directory (resumable: ``resume=True`` skips the images a killed run finished).
    size, fit : int or None, str
        Image size in pixels and how sides become multiples of every VAE's factor.
    scan, mechanism : bool
        Run the two-stage scan with verdicts (global-cell rate) and the pathway attribution per image and VAE.
    rfid, inception : bool, path or None
        Compute rFID with the standard FID Inception weights from ``inception`` (or ``$VAEPROBE_INCEPTION`` or
        torch hub's cache; :func:`~vaeprobe.probes.fid.find_fid_weights`); nothing is downloaded, and the summary
        says why rFID is missing.
    device, dtype :
        Where and in what precision the VAEs run.

    Returns
    -------
    RunDir
        ``summary`` holds ``summary.json``: per model the reconstruction means ± std, rFID or the reason it is
        missing, the spot diagnostics; per candidate the compatibility and the verdict. Files: see
        docs/outputs.md, section compare.
    """
    opts = SPEC.resolve(options)
    rfid, inception = opts["rfid"], opts["inception"]
    if len(specs) < 2:
        raise CompareError("give at least two VAEs: the reference first, then the candidates")
    vaes = [coerce_vae(s, device=device, dtype=dtype) for s in specs]
    fid, reason = None, "not computed: rfid disabled"
    if rfid:
        from vaeprobe.probes.fid import FIDFeatures, find_fid_weights, missing_fid_weights_reason

        path = find_fid_weights(inception)
        if path is None:
            reason = missing_fid_weights_reason(inception)
        else:
            fid = FIDFeatures(path, device=vaes[0].device)
    job = CompareJob(vaes, images, size=opts["size"], fit=opts["fit"], scan=opts["scan"], mechanism=opts["mechanism"],
                     fid=fid, fid_reason=reason)
    return run_job(job, out, resume=resume, overwrite=overwrite, progress=progress)
