"""The ``vaeprobe latents`` job: latent maps, spot table and dataset statistics over a folder of images."""

from __future__ import annotations

import pandas as pd

from vaeprobe.jobs.runner import Job, RunDir, coerce_vae, run_job, vae_config
from vaeprobe.jobs.spec import JobSpec, Param, image_params
from vaeprobe.probes.latents import DEFAULT_THRESHOLD, SPOT_COLUMNS, LatentStats, find_spots, image_moments, latent_maps


def safe_name(name: str) -> str:
    """``name`` with only letters, digits and ``-_.`` (others become ``_``), at most 80 characters, for file names.

    >>> safe_name("a photo/of a cat.png")
    'a_photo_of_a_cat.png'
    """
    keep = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
    return keep[:80] or "image"


SPEC = JobSpec("latents", "posterior maps, dataset statistics and spot candidates", entry="run_latents", rank=10,
               run_help={"dtype": "fp32, fp16 or bf16"}, params=(
    *image_params(),
    Param("threshold", DEFAULT_THRESHOLD, "norm / median-norm ratio that makes a spot (default {default}; see "
                                          "docs/latents.md)", type=float),
    Param("top_k", 3, "candidates listed per image (default {default})", type=int),
    Param("maps", True, "skip the PNG maps", negate=True),
    Param("positions_table", True, "skip positions.parquet (one row per latent position)", negate=True),
))
"""The latents job's parameters: its CLI options, API defaults and ``config.json`` (:mod:`vaeprobe.jobs.spec`)."""


def cli_line(summary: dict, options: dict, out) -> str:
    """What ``vaeprobe latents`` prints when it finishes."""
    return (f"{summary['n_images']} images, spot rate {summary['spot_rate']:.2f} (threshold "
            f"{options['threshold']:g}x median norm or an isolated logvar clamp hit), {len(summary['skipped'])} "
            f"skipped"
            f"; results in {out}")


class LatentsJob(Job):
    """Per image: the posterior's maps, spot candidates and moments (see :func:`run_latents`)."""

    name = desc = "latents"

    def __init__(self, vae, images, **options):
        self.set_options(SPEC, options)
        self.vae, self.images, self.factor = vae, images, vae.factor
        self.stats = LatentStats()

    def config(self) -> dict:
        return {**SPEC.config(self.options), "vae": vae_config(self.vae), "images": str(self.images)}

    def process(self, run: RunDir, key: str, img) -> None:
        post = self.vae.encode(img.tensor())
        m = latent_maps(post, names=[img.name])[0]
        spots = find_spots(m, threshold=self.threshold, top_k=self.top_k)
        cells = [(int(r), int(c)) for r, c in spots.loc[spots.is_spot, ["row", "col"]].values]
        summary = {**m.summary(), "n_spots": len(cells), "source": img.source}
        meta = {"image": img.name, "summary": summary, "moments": image_moments(post.mean[0], exclude=cells),
                "spots": cells, "spot_table": spots.to_dict(orient="list")}
        if self.maps:
            from vaeprobe.reports.plots import save_latent_maps

            save_latent_maps(run.path / "maps" / f"{key}-{safe_name(img.name)}.png", img.array, m, cells)
        run.write_part(key, m.table() if self.positions_table else None, meta)

    def collect(self, run: RunDir, key: str, meta: dict) -> None:
        self.stats.add_summary(meta["summary"], meta["moments"], [tuple(c) for c in meta["spots"]])
        run.bar.set_postfix(spots=self.stats.n_spot_images)

    def summarise(self, run: RunDir, keys: list[str]) -> dict:
        if self.positions_table:
            run.concat("positions.parquet", keys)
        metas = [run.meta(k) for k in keys]
        run.write_table("images.parquet", pd.DataFrame([m["summary"] for m in metas]))
        frames = [pd.DataFrame(m["spot_table"], columns=SPOT_COLUMNS) for m in metas]
        spot_table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=SPOT_COLUMNS)
        run.write_table("spots.parquet", spot_table.astype({"image": str}))
        return {**self.stats.summary(), "threshold": self.threshold, "vae": vae_config(self.vae),
                "images": str(self.images)}


def run_latents(vae, images, out, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
                device=None, dtype=None, **options) -> RunDir:
    """Encode ``images`` with ``vae``; write maps, spot candidates and dataset statistics to run directory ``out``.

    The keyword options and their defaults are declared once, in :data:`SPEC`; an unknown keyword is refused in
    one line.

    Parameters
    ----------
    vae : VAE or str
        An adapter or any spec of :func:`~vaeprobe.models.loading.load_vae` (loaded on ``device``/``dtype``).
    images : str, path or sequence
        What :func:`~vaeprobe.data.images.iter_images` reads (a folder, files, ``builtin:NAME``, a dataset).
    out : path
        The run directory.
    size, fit : int or None, str
        Resize to ``size`` px on the short side (``None``: native) and fit to the latent grid by ``fit``.
    threshold, top_k : float, int
        The spot rule of :func:`~vaeprobe.probes.latents.find_spots` and how many candidates per image.
    resume, overwrite : bool
        Skip the images a killed run finished; or discard an existing run in ``out``.
    maps, positions_table : bool
        Write the per-image map figures; write ``positions.parquet``.

    Returns
    -------
    RunDir
        The run directory; ``summary`` holds ``summary.json``. Files: see docs/outputs.md, section latents.

    Examples
    --------
    >>> import tempfile
    >>> run = run_latents("builtin:tiny-random", "builtin:photos-heldout", tempfile.mkdtemp(), size=32,
    ...                   maps=False, progress=False)
    >>> run.summary["n_images"], sorted(p.name for p in run.path.glob("*.parquet"))
    (7, ['images.parquet', 'positions.parquet', 'spots.parquet'])
    """
    opts = SPEC.resolve(options)
    vae = coerce_vae(vae, device=device, dtype=dtype)
    job = LatentsJob(vae, images, **opts)
    return run_job(job, out, resume=resume, overwrite=overwrite, progress=progress)
