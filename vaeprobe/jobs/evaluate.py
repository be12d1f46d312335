"""The ``vaeprobe evaluate`` job: the latent-space measures that decide how well a VAE serves a diffusion model,
beside reconstruction and the spot, for several VAEs on the same images.

``evaluate_vaes(["builtin:mini-kl-f8", "builtin:taef2"], "builtin:photos-heldout", "runs/ev", size=256)`` gives,
per VAE and image, every metric of :data:`~vaeprobe.probes.evaluation.METRICS`: reconstruction (PSNR, SSIM,
LPIPS, as ``vaeprobe compare``), equivariance to rotations and down-scaling (EQ-VAE), the latent's and the
image's high-frequency power share (Skorokhodov et al. 2025), the decode's change under latent noise in diffusion
units, latent statistics (mean, std, outliers, effective rank, channel correlation, KL) and the spot. Definitions
and sources: docs/evaluate.md; files: docs/outputs.md, section evaluate.

Like every job it writes one part per image (resume after a kill, per-image failures reported and left out,
sharded under ``torchrun``).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd

from vaeprobe.errors import VaeprobeError, one_line
from vaeprobe.jobs.runner import Job, RunDir, coerce_vae, run_job, vae_config
from vaeprobe.jobs.spec import Input, JobSpec, Param, image_params

MIN_SIDE = 32   # pixels: the smallest image side evaluated (a scaled latent of at least 2 cells at factor 8)


class EvaluateError(VaeprobeError, ValueError):
    """An evaluation that cannot run (the message says what to change)."""


SPEC = JobSpec("evaluate", "latent-space measures for diffusion (equivariance, spectrum, noise robustness, latent "
                           "statistics) beside reconstruction, for several VAEs", entry="evaluate_vaes", rank=45,
               inputs=(Input("vaes", "VAE specs (hub id, folder, file, builtin:NAME, module:factory)", positional=True,
                             nargs="+", metavar="SPEC"),
                       Input("images", "folder, glob, image file or builtin:photos[-train|-heldout]"),
                       Input("out", "run directory")),
               params=(Param("size", 256, "square crop size in pixels, at least 32 (default {default})", type=int),
                       image_params()[1],
                       Param("seed", 0, "seed of the latent noise (default {default})", type=int)))
"""The evaluate job's parameters: its CLI options, API defaults and ``config.json`` (:mod:`vaeprobe.jobs.spec`)."""


def cli_line(summary: dict, options: dict, out) -> str:
    """What ``vaeprobe evaluate`` prints when it finishes."""
    lines = []
    for v in summary["vaes"]:
        m = {k: x["mean"] for k, x in v["metrics"].items()}
        lines.append(f"{v['vae']}: PSNR {m['psnr']:.2f} dB, eq_rot90 {m['eq_rot90_psnr']:.2f} dB, eq_scale0.5 "
                     f"{m['eq_scale0.5_psnr']:.2f} dB, latent_hf_share {m['latent_hf_share']:.3f} (image "
                     f"{m['image_hf_share']:.3f}), noise0.1_rms {m['noise0.1_rms']:.4f}, spot rate "
                     f"{m['spot_rate']:.2f}")
    lines.append(f"{summary['n_images']} images; report: {out / 'evaluate.html'} (and evaluate.md, metrics.parquet, "
                 f"summary.parquet)")
    return "\n".join(lines)


class EvaluateJob(Job):
    """Per image: every VAE's metrics, radial spectra and (first image) latent PCA maps (see
    :func:`evaluate_vaes`)."""

    name = desc = "evaluate"

    def __init__(self, vaes, images, **options):
        self.set_options(SPEC, options)
        self.vaes, self.images = vaes, images
        self.device = vaes[0].device
        self.factor = int(np.lcm.reduce(sorted({v.factor for v in vaes})))

    def config(self) -> dict:
        return {**SPEC.config(self.options), "vaes": [vae_config(v) for v in self.vaes], "images": str(self.images)}

    def _one(self, k: int, vae, img, key: str, rows: list, spec_rows: list, figures: dict) -> None:
        from vaeprobe.probes.evaluation import latent_measures
        from vaeprobe.probes.metrics import compare_images
        from vaeprobe.reports.plots import tensor_to_unit

        x = img.tensor()
        post = vae.encode(x)
        rec = vae.decode(post.mean)
        spectra: dict = {}
        values = {**compare_images(img.array, tensor_to_unit(rec)),
                  **latent_measures(vae, x, post, rec=rec, seed=self.seed, spectra=spectra)}
        rows += [{"vae": vae.spec, "image": img.name, "metric": m, "value": float(v), "vae_index": k}
                 for m, v in values.items()]
        for source in ("latent", "image"):
            freq, share = spectra[source]
            spec_rows += [{"vae": vae.spec, "image": img.name, "source": source, "freq": float(f),
                           "density": float(s), "vae_index": k} for f, s in zip(freq, share)]
        if key == "000000":
            maps, shares = spectra["pca"]
            figures[str(k)] = {"shares": [float(s) for s in shares],
                               "file": self._save_pca(k, maps, img.array)}

    def _save_pca(self, k: int, maps: np.ndarray, image: np.ndarray) -> str:
        """The first three principal components as an RGB picture (each scaled by its 1st-99th percentiles)."""
        from vaeprobe.reports.plots import save_png

        comps = list(maps[:3]) + [np.zeros_like(maps[0])] * (3 - min(3, len(maps)))
        rgb = []
        for c in comps:
            lo, hi = np.percentile(c, [1, 99])
            rgb.append(np.clip((c - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(c))
        save_png(self.run_path / "figures" / "pca-input.png", image)
        name = f"figures/pca-{k}.png"
        rep = max(1, 256 // max(maps.shape[-2:]))   # nearest-upsampled, so that each latent cell stays visible
        save_png(self.run_path / name, np.stack(rgb, -1).repeat(rep, 0).repeat(rep, 1))
        return name

    def process(self, run: RunDir, key: str, img) -> None:
        if min(img.array.shape[:2]) < MIN_SIDE:
            raise EvaluateError(f"{img.name} is {img.array.shape[1]}x{img.array.shape[0]} px; evaluate needs at "
                                f"least {MIN_SIDE} px a side (pass --size)")
        self.run_path = run.path
        rows, spec_rows, figures = [], [], {}
        for k, vae in enumerate(self.vaes):
            try:
                self._one(k, vae, img, key, rows, spec_rows, figures)
            except VaeprobeError:
                raise
            except Exception as exc:  # name the model that failed; the runner records the image and goes on
                raise EvaluateError(f"{vae.spec}: {one_line(exc)}") from exc
        run.write_part(key, pd.DataFrame(rows), {"image": img.name, "pca": figures},
                       extra={"spectra": pd.DataFrame(spec_rows)})

    def summarise(self, run: RunDir, keys: list[str]) -> dict:
        from vaeprobe.probes.evaluation import METRICS, NOISE_STDS, TRANSFORMS

        metrics = run.concat("metrics.parquet", keys)
        spectra = run.concat("spectra.parquet", keys, part="spectra")
        order = {m: i for i, m in enumerate(METRICS)}
        # nan (LPIPS of an image under 32 px) is left out of mean, std and n; inf (PSNR of identical images) is kept
        summary = (metrics.groupby(["vae_index", "vae", "metric"], sort=False).value
                   .agg(mean=lambda v: float(v.dropna().mean()) if v.notna().any() else math.nan,
                        std=lambda v: float(v.dropna().std()) if v.notna().sum() > 1 else math.nan,
                        n=lambda v: int(v.notna().sum()))
                   .reset_index())
        summary = summary.sort_values(["vae_index", "metric"], key=lambda c: c.map(order) if c.name == "metric"
                                      else c, kind="stable").reset_index(drop=True)
        summary = summary[["vae", "metric", "mean", "std", "n", "vae_index"]]
        run.write_table("summary.parquet", summary)
        pca = run.meta(keys[0]).get("pca", {}) if keys else {}
        vaes = []
        for k, vae in enumerate(self.vaes):
            rows = summary[summary.vae_index == k]
            sp = spectra[spectra.vae_index == k] if len(spectra) else spectra
            curves = {}
            for source in ("latent", "image"):
                mean = sp[sp.source == source].groupby("freq").density.mean() if len(sp) else pd.Series(dtype=float)
                curves[source] = {"freq": [float(f) for f in mean.index], "density": [float(s) for s in mean.values]}
            vaes.append({"vae": vae.spec, "index": k, "channels": vae.latent_channels, "factor": vae.factor,
                         "scaling_factor": vae.scaling_factor, "shift_factor": vae.shift_factor,
                         "metrics": {r.metric: {"mean": r.mean, "std": r.std, "n": int(r.n)}
                                     for r in rows.itertuples(index=False)},
                         "spectrum": curves, "pca": pca.get(str(k))})
        return {"images": str(self.images), "n_images": len(keys), "size": self.size, "seed": self.seed,
                "pca_image": run.meta(keys[0])["image"] if keys else None, "transforms": list(TRANSFORMS),
                "noise_stds": list(NOISE_STDS), "metrics": list(METRICS), "vaes": vaes}

    def after(self, run: RunDir, summary: dict) -> None:
        from vaeprobe.reports.evaluation import build_evaluation_report

        build_evaluation_report(run.path, summary)


def evaluate_vaes(specs: Sequence, images, out, *, resume: bool = False, overwrite: bool = False,
                  progress: bool = True, device=None, dtype=None, **options) -> RunDir:
    """Evaluate the latent space of each VAE of ``specs`` on ``images`` and write the run directory ``out``.

    The keyword options (``size``, ``fit``, ``seed``) and their defaults are declared once, in :data:`SPEC`.

    Parameters
    ----------
    specs : sequence
        VAE adapters or specs of :func:`~vaeprobe.models.loading.load_vae` (one or more).
    images : str, path or sequence
        What :func:`~vaeprobe.data.images.iter_images` reads.
    out : path
        The run directory (resumable: ``resume=True`` skips the images a killed run finished).
    size, fit : int or None, str
        Image size in pixels (at least 32) and how sides become multiples of every VAE's factor.
    seed : int
        Seed of the latent noise of the noise-robustness measures (the same draw for every image).
    resume, overwrite, progress : bool
        As for every job.
    device, dtype :
        Where and in what precision the VAEs run.

    Returns
    -------
    RunDir
        ``summary`` holds ``summary.json``: per VAE each metric's mean, std and n, the mean radial spectra of
        latent and image, the PCA figure. Files: ``metrics.parquet`` (long form: ``vae, image, metric, value``,
        then ``vae_index``), ``summary.parquet`` (``vae, metric, mean, std, n``, ``vae_index``),
        ``spectra.parquet``, ``evaluate.html``, ``evaluate.md``, ``figures/``; see docs/outputs.md.

    Raises
    ------
    EvaluateError
        Without a VAE, or with ``size`` under 32.

    Examples
    --------
    >>> import tempfile
    >>> run = evaluate_vaes(["builtin:tiny-random"], "builtin:photos-heldout", tempfile.mkdtemp(), size=32,
    ...                     progress=False)
    >>> run.summary["n_images"], sorted(p.name for p in run.path.glob("evaluate.*"))
    (7, ['evaluate.html', 'evaluate.md'])
    """
    opts = SPEC.resolve(options)
    size = opts["size"]
    if not specs:
        raise EvaluateError("give at least one VAE spec to evaluate")
    if size is not None and size < MIN_SIDE:
        raise EvaluateError(f"--size {size} is too small; evaluate needs at least {MIN_SIDE} px")
    vaes = [coerce_vae(s, device=device, dtype=dtype) for s in specs]
    job = EvaluateJob(vaes, images, **opts)
    return run_job(job, out, resume=resume, overwrite=overwrite, progress=progress)
