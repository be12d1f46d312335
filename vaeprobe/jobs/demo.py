"""``vaeprobe demo``: the main job end to end on builtin models and held-out builtin photos.

For the model under test (``builtin:mini-kl-f8``), a real autoencoder trained elsewhere (``builtin:taef2``, the
published taef2 weights) and one planted-spot control (``builtin:planted-groupnorm``, whose answer is known): latent
diagnostics, a two-stage perturbation scan (the matched controls and frozen share for the :data:`DEMO_EVIDENCE` most
unusual cells per image), pathway attribution at the largest-norm cell, then one report over all nine runs; on the
first :data:`DEMO_LIMIT` images by default. Everything runs offline; the report path is printed at the end. Files: see docs/outputs.md, section
demo.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Sequence


DEMO_EVIDENCE = 2
"""Cells per image that get the verdicts' matched controls and frozen-pathway share in the demo's scans (the scan's
default is 4). Those are evidence shown beside a verdict, not read by its rule (``vaeprobe.schema.DECIDING_COLUMNS``),
so the verdicts are the same."""

DEMO_LIMIT = 4
"""How many of the images the demo runs on by default: the first 4 of the 7 held-out photos. With
:data:`DEMO_EVIDENCE` it keeps ``vaeprobe demo`` under a minute on 2 cores (benchmarks/profile_bench.py,
docs/scan.md "Where the time goes"); ``limit=None`` (``--limit 0``) runs them all."""


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", spec).strip("-") or "model"


def run_demo(*, out: str | Path = "runs/demo", vae_spec: str = "builtin:mini-kl-f8",
             control: str | None = "builtin:planted-groupnorm", size: int = 128,
             images: str = "builtin:photos-heldout", progress: bool = True, log=print,
             extra: Sequence[str] = ("builtin:taef2",), limit: int | None = DEMO_LIMIT) -> dict:
    """Run the main job end to end on ``vae_spec``, the ``extra`` models and the ``control``, then one report.

    For each model: latent diagnostics, a two-stage perturbation scan and pathway attribution at the
    largest-norm cell, each into ``out/MODEL/JOB`` (earlier demo results there are replaced); then the report
    over all the runs in ``out/report``.

    Parameters
    ----------
    out : str or pathlib.Path, optional
        The demo's folder.
    vae_spec : str, optional
        The model under test (any :func:`~vaeprobe.models.loading.load_vae` spec).
    control : str or None, optional
        A planted-spot control run alongside (``None``: none).
    size : int, optional
        Image side in pixels.
    images : str, optional
        The images: a builtin set, a folder, a file or a list (see :func:`vaeprobe.data.images.iter_images`).
    progress : bool, optional
        Show progress bars.
    log : callable, optional
        Called with one line before each job (default ``print``).
    extra : sequence of str, optional
        More models run beside ``vae_spec``.
    limit : int or None, optional
        Run on the first ``limit`` images only (``None``: all).

    Returns
    -------
    dict
        ``{"report": path of report.html, "runs": [run directories], "seconds": wall time, "headlines": the
        report's headline figures}``.

    Examples
    --------
    >>> import tempfile
    >>> res = run_demo(out=tempfile.mkdtemp(), vae_spec="builtin:tiny-random", control=None, size=64,
    ...                progress=False, log=lambda *a: None, extra=())
    >>> res["report"].name, len(res["runs"])
    ('report.html', 3)
    """
    from vaeprobe.jobs.latents import run_latents
    from vaeprobe.jobs.mechanism import run_mechanism
    from vaeprobe.reports.report import build_report
    from vaeprobe.jobs.scan import run_scan
    from vaeprobe.models.loading import load_vae

    t0 = time.perf_counter()
    out = Path(out)
    runs = []
    specs = [vae_spec, *(e for e in extra if e != vae_spec)] + ([control] if control else [])
    for spec in specs:
        vae = load_vae(spec)
        base = out / _slug(spec)
        common = dict(size=size, overwrite=True, progress=progress, limit=limit)
        log(f"{spec}: latent diagnostics")
        runs.append(run_latents(vae, images, base / "latents", **common).path)
        log(f"{spec}: two-stage perturbation scan")
        runs.append(run_scan(vae, images, base / "scan", mode="two-stage", evidence=DEMO_EVIDENCE, **common).path)
        log(f"{spec}: pathway attribution at the largest-norm cell")
        runs.append(run_mechanism(vae, images, base / "mechanism", positions="top:1", figures=False, **common).path)
    title = f"vaeprobe demo: {', '.join([vae_spec, *extra])}" + (f" and the control {control}" if control else "")
    report = build_report(runs, out=out / "report", title=title)
    return {"report": report["html"], "runs": runs, "seconds": time.perf_counter() - t0,
            "headlines": report["headlines"]}
