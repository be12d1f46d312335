"""The published claims about SD's VAE spot, as one experiment runnable on any VAE spec.

    python experiments/claims.py experiments/configs/claims/builtin.json     # the builtin models (CPU, minutes)
    python experiments/claims.py experiments/configs/claims/sd_vaes.json     # SD 1.5 / ft-MSE / SDXL (weights, GPU)

For every model of the config and every image, at the latent cell with the largest norm (the spot when there is
one; the "candidate") and at ``ordinary`` seeded cells of ordinary norm (:func:`vaeprobe.probes.verdict.ordinary_cells`):

(a) the seed investigation, as reported: the raw log-variance (before diffusers' clamp, mean over channels) at the
    candidate against the ordinary cells (the "black hole"); the smudge ablation (the candidate replaced by the
    mean of the ring around it) and the far field's mean colour and luma shift, against the same ablation of the
    ordinary cells;
(b) the rebuttal, as reported: the raw log-variance of ordinary cells (reported around -17 to -23) and of the
    spot (the -30 clamp); a perturbation of the candidate by its own posterior sigma (a draw of the posterior at
    that cell) against zeroing it, in far-field energy; the candidate's change ``||dz||`` over an ordinary
    cell's, and the verdict module's magnitude-matched controls (``matched_ratio``: the same ``||dz||`` applied at
    ordinary cells; ``transplant_ratio``: the candidate's vector written there);
(c) the toolkit's verdict of the candidate (and of the ordinary cells), with its measures.

The config names the models, the images, the size, the device and, per claim, the published expectation (quoted
into the results). Writes ``experiments/results/claims/NAME.json`` (per model: medians and counts, plus the
expectations) and ``NAME.parquet`` (one row per model, image and cell, with distance profiles), ``NAME.md`` (the summary as a
table) and two figures (:func:`figures`), atomically, one model at a time (a rerun
skips the models already written for the same config, so a killed run goes on).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vaeprobe._io import atomic_path, write_text_atomic  # noqa: E402
from vaeprobe.data.images import load_images  # noqa: E402
from vaeprobe.models.loading import load_vae  # noqa: E402
from vaeprobe.probes.latents import DEFAULT_THRESHOLD  # noqa: E402
from vaeprobe.probes.perturb import Site, apply_batch, parse_operator  # noqa: E402
from vaeprobe.probes.response import measure  # noqa: E402
from vaeprobe.probes.verdict import CellVerdict, make_donors, ordinary_cells  # noqa: E402

MEASURES = ("far_l2", "far_dr", "far_dg", "far_db", "far_dy")


def _cell_logvar(raw: torch.Tensor | None, r: int, c: int) -> float:
    return math.nan if raw is None else float(raw[0, :, r, c].mean())


def image_rows(vae, x: torch.Tensor, *, n_ordinary: int, radius: int, seed: int, cv: CellVerdict) -> list[dict]:
    """The rows of one image: the candidate cell, a control's planted cell when it is another one (``keyed``,
    ``internal``, ``planted-hidden`` plant at ordinary norms), and ``n_ordinary`` ordinary cells."""
    post = vae.encode(x)
    z, raw = post.mean, post.raw_logvar
    norm = z[0].norm(dim=0)
    h, w = norm.shape
    flat = int(norm.argmax())
    cand = divmod(flat, w)
    truth = vae.ground_truth(x) if vae.ground_truth is not None else []
    planted = (truth[0]["row"], truth[0]["col"]) if truth else None
    extra = [planted] if planted is not None and planted != cand else []
    cells = [cand] + extra + [c for c in ordinary_cells(z, n_ordinary, seed=seed, exclude=[cand] + extra)]
    kinds = ["candidate"] + ["planted"] * len(extra) + ["ordinary"] * (len(cells) - 1 - len(extra))
    ref = vae.decode(z)
    sites = [Site(r, c) for r, c in cells]
    smudge = parse_operator("smudge")
    zero = parse_operator("zero")
    smudged = measure(ref, vae.decode(apply_batch(z, sites, smudge)), sites, vae.factor, radius=radius,
                      measures=MEASURES)
    zeroed = measure(ref, vae.decode(apply_batch(z, sites, zero)), sites, vae.factor, radius=radius,
                     measures=("far_l2",))
    # a posterior draw at each cell: z + sigma * eps there only (sigma from the clamped log-variance, as sampled)
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(len(cells), z.shape[1], generator=g)
    zs = z.repeat(len(cells), 1, 1, 1)
    for i, (r, c) in enumerate(cells):
        zs[i, :, r, c] = z[0, :, r, c] + post.std[0, :, r, c] * eps[i].to(z)
    sigma = measure(ref, vae.decode(zs), sites, vae.factor, radius=radius, measures=("far_l2",))
    verdicts = cv.classify(z, cells, ref=ref)
    field = verdicts.attrs["field"]
    median_norm = float(norm.median())
    rows = []
    for i, (r, c) in enumerate(cells):
        v = verdicts.iloc[i]
        rows.append({
            "cell": kinds[i], "is_planted": (r, c) == planted, "row": r, "col": c,
            "norm_ratio": float(norm[r, c] / median_norm), "is_spot": bool(norm[r, c] / median_norm >= DEFAULT_THRESHOLD),
            "raw_logvar": _cell_logvar(raw, r, c),
            "raw_logvar_min": math.nan if raw is None else float(raw[0, :, r, c].min()),
            "dz_norm_over_median": float(norm[r, c] / median_norm),
            "smudge_far_l2": smudged[i]["far_l2"],
            "smudge_far_colour_shift": float(np.linalg.norm([smudged[i][k] for k in ("far_dr", "far_dg", "far_db")])),
            "smudge_far_dy": smudged[i]["far_dy"],
            "zero_far_l2": zeroed[i]["far_l2"], "sigma_far_l2": sigma[i]["far_l2"],
            "sigma_over_zero": (sigma[i]["far_l2"] / zeroed[i]["far_l2"]
                                if zeroed[i]["far_l2"] > 0 and not post.deterministic else math.nan),
            "posterior_sigma": float(post.std[0, :, r, c].mean()),
            "profile": json.dumps([float(e) for e in v["profile"]]),
            "reference_profile": json.dumps([float(e) for e in field["profile"]]), "erf": float(field["erf"]),
            "logvar_map": json.dumps(raw[0].mean(0).tolist()) if raw is not None and i == 0 else None,
            "verdict": v["verdict"], **{k: float(v.get(k, math.nan)) for k in (
                "far_plateau", "far_plateau_lo", "decay_exponent", "far_excess", "swap_corr", "matched_ratio", "transplant_ratio")},
        })
    return rows


def summarise(df: pd.DataFrame) -> dict:
    cand, ordi = df[df.cell == "candidate"], df[df.cell == "ordinary"]
    med = lambda s: float(s.median()) if s.notna().any() else None  # noqa: E731

    def q(s, p):
        return float(s.quantile(p)) if s.notna().any() else None

    return {
        "images": int(len(cand)), "spot_rate": float(cand.is_spot.mean()),
        "candidate_norm_ratio_median": med(cand.norm_ratio),
        "a_raw_logvar_candidate_median": med(cand.raw_logvar),
        "a_raw_logvar_candidate_min_median": med(cand.raw_logvar_min),
        "a_candidate_at_clamp": int((cand.raw_logvar_min <= -30 + 1e-3).sum()),
        "a_smudge_colour_shift_candidate_median": med(cand.smudge_far_colour_shift),
        "a_smudge_colour_shift_ordinary_median": med(ordi.smudge_far_colour_shift),
        "a_smudge_dy_candidate_median": med(cand.smudge_far_dy.abs()),
        "a_smudge_dy_ordinary_median": med(ordi.smudge_far_dy.abs()),
        "b_raw_logvar_ordinary_p5_p50_p95": [q(ordi.raw_logvar, 0.05), q(ordi.raw_logvar, 0.5), q(ordi.raw_logvar, 0.95)],
        "b_sigma_over_zero_candidate_median": med(cand.sigma_over_zero),
        "b_sigma_over_zero_ordinary_median": med(ordi.sigma_over_zero),
        "b_matched_ratio_candidate_median": med(cand.matched_ratio),
        "b_transplant_ratio_candidate_median": med(cand.transplant_ratio),
        "c_candidate_verdicts": {str(k): int(v) for k, v in cand.verdict.value_counts().items()},
        "c_ordinary_verdicts": {str(k): int(v) for k, v in ordi.verdict.value_counts().items()},
        "c_planted_verdicts": {str(k): int(v) for k, v in df[df.is_planted].verdict.value_counts().items()},
    }


def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {n}" for k, n in sorted(v.items(), key=lambda kv: -kv[1])) or "–"
    if isinstance(v, list):
        return " / ".join(_fmt(x) for x in v)
    return str(v)


ROWS = [("spot rate (largest norm ≥ 10× median)", "spot_rate"),
        ("largest norm / median (median over images)", "candidate_norm_ratio_median"),
        ("(a) raw log-variance at that cell, mean over channels", "a_raw_logvar_candidate_median"),
        ("(a) images where it is at or below the -30 clamp", "a_candidate_at_clamp"),
        ("(a) smudge: far-field colour shift, that cell", "a_smudge_colour_shift_candidate_median"),
        ("(a) smudge: far-field colour shift, ordinary cells", "a_smudge_colour_shift_ordinary_median"),
        ("(a) smudge: far-field luma shift, that cell", "a_smudge_dy_candidate_median"),
        ("(a) smudge: far-field luma shift, ordinary cells", "a_smudge_dy_ordinary_median"),
        ("(b) raw log-variance of ordinary cells, p5 / p50 / p95", "b_raw_logvar_ordinary_p5_p50_p95"),
        ("(b) posterior-sigma draw / zeroing, far energy, that cell", "b_sigma_over_zero_candidate_median"),
        ("(b) the same, ordinary cells", "b_sigma_over_zero_ordinary_median"),
        ("(b) far energy / same ‖Δz‖ at ordinary cells (`matched_ratio`)", "b_matched_ratio_candidate_median"),
        ("(b) far energy / its vector written at ordinary cells (`transplant_ratio`)", "b_transplant_ratio_candidate_median"),
        ("(c) verdict of that cell (images)", "c_candidate_verdicts"),
        ("(c) verdicts of the ordinary cells", "c_ordinary_verdicts"),
        ("(c) verdict of the planted cell (controls)", "c_planted_verdicts")]


def markdown_table(done: dict) -> str:
    """The results as a Markdown table, one column per model (colour and luma shifts in [-1, 1] units)."""
    models = list(done["models"])
    lines = ["| | " + " | ".join(m.replace("builtin:", "") for m in models) + " |",
             "|---|" + "---|" * len(models)]
    for label, key in ROWS:
        lines.append(f"| {label} | " + " | ".join(_fmt(done["models"][m].get(key)) for m in models) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", help="a JSON config (experiments/configs/claims/)")
    ap.add_argument("--out", default=None, help="results base path (default experiments/results/claims/NAME)")
    a = ap.parse_args(argv)
    cfg = json.loads(Path(a.config).read_text())
    base = Path(a.out) if a.out else ROOT / "experiments" / "results" / "claims" / cfg["name"]
    base.parent.mkdir(parents=True, exist_ok=True)
    path_json, path_table = base.with_suffix(".json"), base.with_suffix(".parquet")
    done = json.loads(path_json.read_text()) if path_json.exists() else {}
    if done.get("config") != cfg:
        done = {"config": cfg, "models": {}}
    table = pd.read_parquet(path_table) if path_table.exists() and done["models"] else pd.DataFrame()
    images = load_images(cfg["images"], size=cfg["size"])[: cfg.get("n_images")]
    for spec in cfg["models"]:
        if spec in done["models"]:
            continue
        t0 = time.time()
        vae = load_vae(spec, device=cfg.get("device"))
        donors = make_donors(vae, [d.tensor() for d in load_images(cfg["donors"], size=cfg["size"])[:4]])
        cv = CellVerdict(vae, donors=donors, evidence=True, keep_profiles=True)
        rows = []
        with torch.no_grad():
            for img in images:
                for row in image_rows(vae, img.tensor().to(vae.device), n_ordinary=cfg["n_ordinary"],
                                      radius=cfg["radius"], seed=cfg["seed"], cv=cv):
                    rows.append({"model": spec, "image": img.name, **row})
        df = pd.DataFrame(rows)
        done["models"][spec] = {**summarise(df), "seconds": round(time.time() - t0, 1)}
        table = pd.concat([table, df], ignore_index=True)
        with atomic_path(path_table) as tmp:
            table.to_parquet(tmp, index=False)
        write_text_atomic(path_json, json.dumps(done, indent=1) + "\n")
        print(f"{spec}: {json.dumps(done['models'][spec])}", flush=True)
    write_text_atomic(base.with_suffix(".md"), markdown_table(done))
    figures(table, base)
    return done


def figures(df: pd.DataFrame, base: Path) -> None:
    """``NAME-logvar.png``: each model's raw log-variance map of the first image (mean over channels; the spot
    shows as a black hole); ``NAME-profiles.png``: per model, the energy of zeroing the largest cell against
    distance (over its value at the cell, median over images) beside the image's ordinary cells' profile."""
    import matplotlib

    from vaeprobe.reports.plots import Figures

    matplotlib.rcParams.update({"font.size": 7})
    models = list(dict.fromkeys(df.model))
    maps = [(m, df[(df.model == m) & df.logvar_map.notna()]) for m in models]
    maps = [(m, g) for m, g in maps if len(g)]
    fig, axes = Figures.subplots(1, max(1, len(maps)), figsize=(1.9 * max(1, len(maps)), 2.1), squeeze=False)
    for ax, (m, g) in zip(axes[0], maps):
        im = ax.imshow(np.array(json.loads(g.logvar_map.iloc[0])), cmap="viridis", vmin=-35, vmax=-5)
        ax.set_title(f"{m.replace('builtin:', '')}\n{g.image.iloc[0]}")
        ax.axis("off")
    if maps:
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.7, label="raw log-variance")
    with atomic_path(base.parent / f"{base.name}-logvar.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    fig, axes = Figures.subplots(1, len(models), figsize=(1.9 * len(models), 2.0), squeeze=False)
    for ax, m in zip(axes[0], models):
        g = df[df.model == m]

        def curve(rows, col):
            prof = [np.array(json.loads(p)) for p in rows[col]]
            n = min(len(p) for p in prof)
            return np.median([p[:n] / p[0] for p in prof if p[0] > 0], axis=0)

        cand = g[g.cell == "candidate"]
        ax.semilogy(curve(cand, "reference_profile"), color="grey", label="ordinary cells")
        ax.semilogy(curve(cand, "profile"), color="C3", label="largest cell")
        if (g.cell == "planted").any():
            ax.semilogy(curve(g[g.cell == "planted"], "profile"), color="C0", label="planted cell")
            ax.legend(fontsize=5)
        ax.axvline(float(cand.erf.median()), color="grey", ls=":", lw=0.8)
        ax.set_title(f"{m.replace('builtin:', '')}\n{cand.verdict.mode().iloc[0]}")
        ax.set_xlabel("distance (cells)")
    axes[0][0].set_ylabel("energy / energy at the cell")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    with atomic_path(base.parent / f"{base.name}-profiles.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)


if __name__ == "__main__":
    main()
