"""The ``vaeprobe mechanism`` job: pathway attribution, attention mass and GroupNorm droplets per image."""

from __future__ import annotations
import re
import time
import numpy as np
import pandas as pd
from vaeprobe.jobs.runner import Job, RunDir, check_positions, coerce_vae, run_job, vae_config
from vaeprobe.jobs.spec import JobSpec, Param, image_params
from vaeprobe.probes.engine import DECODE_BATCH
from vaeprobe.probes.perturb import check_operator, parse_operator
from vaeprobe.probes.response import DEFAULT_RADIUS
from vaeprobe.probes.mechanism import (ATTENTION_MODES, AttentionMass, MechanismError, PATHWAYS, attention_mass,
                                       attribute_pathways, droplet_layers, groupnorm_droplets, pathway_layers,
                                       record_pathways)


# -- the `vaeprobe mechanism` job --------------------------------------------------------------------------------

def _mechanism_spec() -> JobSpec:
    from vaeprobe.probes.perturb import OPERATORS

    return JobSpec("mechanism", "attribute each position's far-field effect to GroupNorm, attention or the residual "
                                "(frozen-pathway decodes)", entry="run_mechanism", rank=30, params=(
        Param("positions", "top:1", "all, grid:S, top:K (largest latent norms) or list:R,C;R,C (default {default})"),
        Param("op", "zero", f"perturbation: {', '.join(o for o in OPERATORS if o != 'swap')} (default {{default}}; "
                            f"swap needs a second image, which mechanism does not provide)"),
        Param("attention", "context", "freeze attention by its clean keys and values (context, default) or only "
                                      "its clean probabilities (probs; values still travel)", choices=ATTENTION_MODES),
        *image_params(),
        Param("radius", DEFAULT_RADIUS, "far-field radius in latent cells (default {default})", type=int),
        Param("batch", DECODE_BATCH, "perturbed latents per decoder call (default {default})", type=int,
              config=False),
        Param("seed", 0, "seed of random operators (default 0)", type=int),
        Param("figures", True, "skip the PNG figures", negate=True, config=False),
    ))


def cli_line(summary: dict, options: dict, out) -> str:
    """What ``vaeprobe mechanism`` prints when it finishes."""
    dom = ", ".join(f"{k} {v}" for k, v in sorted(summary["dominant"].items())) or "none"
    return (f"{summary['n_images']} images, {summary['positions']} positions attributed ({options['op']}, "
            f"attention frozen by {options['attention']}); dominant pathway: {dom}; {summary['decodes']} decodes in "
            f"{summary['seconds']:.1f} s"
            f"; results in {out}")


SPEC = _mechanism_spec()
"""The mechanism job's parameters: its CLI options, API defaults and ``config.json`` (:mod:`vaeprobe.jobs.spec`)."""


class MechanismJob(Job):
    """Per image: pathway attribution, attention mass and GroupNorm droplets (see :func:`run_mechanism`)."""

    name = desc = "mechanism"

    def __init__(self, vae, images, **options):
        self.set_options(SPEC, options)
        self.vae, self.images, self.factor = vae, images, vae.factor
        self.layers = pathway_layers(vae)

    def config(self) -> dict:
        return {**SPEC.config(self.options), "vae": vae_config(self.vae), "images": str(self.images),
                "layers": {k: len(v) for k, v in self.layers.items()}}

    def _attention_rows(self, run: RunDir, key: str, img, x, z, top, record) -> list[dict]:
        rows = []
        for part, arg in (("decoder", z), ("encoder", x)):
            for m in attention_mass(self.vae, arg, part=part, record=record if part == "decoder" else None):
                h, w = m.mass.shape
                cell = (min(h - 1, top[0] * h // z.shape[-2]), min(w - 1, top[1] * w // z.shape[-1]))
                am = m.argmax()
                rows.append({"part": part, "layer": m.layer, "call": m.call, "top_norm_row": top[0],
                             "top_norm_col": top[1], "sink_score": m.sink_score(cell), "max_mass": float(m.mass.max()),
                             "max_row": am[0], "max_col": am[1], "max_over_median": m.sink_score(am)})
                if self.figures:
                    _save_mass(run.path / "figures" / f"{key}_attention_{part}_{m.call}_{_slug(m.layer)}.png", m,
                               img.name)
        return rows

    def process(self, run: RunDir, key: str, img) -> None:
        from vaeprobe.probes.scan import select_sites

        t0 = time.perf_counter()
        x = img.tensor()
        z = self.vae.encode(x).mean
        norm = z[0].norm(dim=0)
        top = divmod(int(norm.argmax()), z.shape[-1])
        operator = parse_operator(self.op, seed=self.seed)
        sites = select_sites(self.positions, z.shape[-2:], norm=norm)
        recorded = record_pathways(self.vae, z, droplets=True)  # one clean decode for all three measurements
        res = attribute_pathways(self.vae, z, sites, operator, radius=self.radius, attention=self.attention,
                                 batch=self.batch, recorded=recorded)
        df = res.table
        df.insert(0, "image", img.name)
        att_rows = self._attention_rows(run, key, img, x, z, top, recorded[1])
        drops = droplet_layers(groupnorm_droplets(self.vae, z, record=recorded[1]))
        if self.figures:
            _save_shares(run.path / "figures" / f"{key}_shares.png", df, img.name)
            _save_droplets(run.path / "figures" / f"{key}_groupnorm.png", drops, img.name)
        meta = {"image": img.name, "source": img.source, "h": int(z.shape[-2]), "w": int(z.shape[-1]),
                "top_norm": list(top), "positions": len(df), "decodes": res.decodes + 1,
                "dominant": df.dominant.value_counts().to_dict() if len(df) else {},
                "attention": att_rows, "groupnorm": drops.to_dict("records"),
                "seconds": round(time.perf_counter() - t0, 3)}
        run.write_part(key, df, meta)

    def summarise(self, run: RunDir, keys: list[str]) -> dict:
        table = run.concat("mechanism.parquet", keys)
        metas = [run.meta(k) for k in keys]
        att = pd.DataFrame([{"image": m["image"], **r} for m in metas for r in m["attention"]])
        gn = pd.DataFrame([{"image": m["image"], **r} for m in metas for r in m["groupnorm"]])
        run.write_table("attention.parquet", att)
        run.write_table("groupnorm.parquet", gn)
        counts: dict[str, int] = {}
        for m in metas:
            for k, v in m["dominant"].items():
                counts[k] = counts.get(k, 0) + int(v)
        return {"n_images": len(metas), "positions": int(sum(m["positions"] for m in metas)),
                "dominant": counts, "attention": self.attention, "op": self.op, "radius": self.radius,
                "decodes": int(sum(m["decodes"] for m in metas)), "seconds": float(sum(m["seconds"] for m in metas)),
                "median_shares": ({p: float(table[f"share_{p}"].median()) for p in PATHWAYS}
                                  if table is not None and len(table) else {}),
                "attention_layers": ([] if att.empty else att.groupby(["part", "layer"]).agg(
                    median_sink_score=("sink_score", "median"), median_max_over_median=("max_over_median", "median"))
                    .reset_index().to_dict("records")),
                "groupnorm_layers": ([] if gn.empty else gn.groupby(["order", "layer"]).agg(
                    median_max_share=("max_share", "median")).reset_index().to_dict("records")),
                "vae": vae_config(self.vae)}


def run_mechanism(vae, images, out, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
                  device=None, dtype=None, **options) -> RunDir:
    """Attribute the pathways for the chosen positions of every image and write a run directory ``out``.

    The keyword options and their defaults are declared once, in :data:`SPEC` (which also makes ``vaeprobe
    mechanism``'s options and ``config.json``); an unknown keyword is refused in one line.

    Per image: the pathway attribution of :func:`attribute_pathways`, the attention mass of every attention call
    of decoder and encoder (sink score at the image's largest-norm cell) and the GroupNorm droplet shares of the
    decoder; ``figures`` also saves them as PNG files. One part per image is written atomically, so
    ``resume=True`` skips the images a killed run finished. Files: see docs/outputs.md, section mechanism.

    Parameters
    ----------
    vae, images, out
        As for :func:`~vaeprobe.jobs.scan.run_scan`.
    positions : str, keyword-only
        Which cells: ``all``, ``grid:S``, ``top:K`` (largest latent norm) or ``list:R,C;R,C``.
    op : str, keyword-only
        The perturbation (:func:`~vaeprobe.probes.perturb.parse_operator`).
    attention : {"context", "probs"}, keyword-only
        How attention is frozen (:mod:`vaeprobe.probes.mechanism`).
    size, fit, radius : keyword-only
        As for :func:`~vaeprobe.jobs.scan.run_scan`.
    batch : int, keyword-only
        Sites decoded at once.
    seed : int, keyword-only
        Seed of random operators.
    figures : bool, keyword-only
        Save the per-image figures.
    resume, overwrite, progress : bool, keyword-only
        As for :func:`~vaeprobe.jobs.runner.run_job`.
    device, dtype : keyword-only
        As for :func:`~vaeprobe.jobs.scan.run_scan`.

    Returns
    -------
    RunDir
        ``summary`` holds ``summary.json``: the dominant pathways, the median shares, the attention and GroupNorm
        layers.

    Raises
    ------
    MechanismError
        For an unknown ``attention`` or ``positions``, or a model the hooks cannot freeze.

    Examples
    --------
    >>> import tempfile
    >>> run = run_mechanism("builtin:tiny-random", "builtin:photos-heldout", tempfile.mkdtemp(), size=32,
    ...                     figures=False, progress=False)  # doctest: +SKIP
    >>> run.summary["n_images"], sorted(run.summary["median_shares"])  # doctest: +SKIP
    (7, ['attention', 'groupnorm', 'residual'])
    """
    opts = SPEC.resolve(options)
    if opts["attention"] not in ATTENTION_MODES:
        raise MechanismError(f"unknown attention freezing {opts['attention']!r}; use one of "
                             f"{', '.join(ATTENTION_MODES)}")
    check_positions(opts["positions"], MechanismError)
    check_operator(opts["op"], command="mechanism")
    vae = coerce_vae(vae, device=device, dtype=dtype)
    job = MechanismJob(vae, images, **opts)
    return run_job(job, out, resume=resume, overwrite=overwrite, progress=progress)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-") or "layer"


def _save_mass(path, m: AttentionMass, title: str) -> None:
    from vaeprobe.reports.plots import save_heatmap

    save_heatmap(path, np.log10(np.maximum(m.mass.numpy() * m.mass.numel(), 1e-6)),
                 f"{title}: {m.layer} (call {m.call})\nlog10(attention received x N)")


def _save_shares(path, df: pd.DataFrame, title: str) -> None:
    from vaeprobe.reports.plots import save_bars

    labels = [f"({r},{c})" for r, c in zip(df.row, df.col)]
    save_bars(path, labels, {p: df[f"share_{p}"].to_numpy() for p in PATHWAYS},
              f"{title}: share of the far-field effect per pathway")


def _save_droplets(path, drops: pd.DataFrame, title: str) -> None:
    from vaeprobe.reports.plots import save_lines

    save_lines(path, {"strongest group": drops.max_share.to_numpy(), "median group": drops.median_share.to_numpy()},
               f"{title}: GroupNorm droplet share per layer (decode order)", xlabel="GroupNorm call", log=True)
