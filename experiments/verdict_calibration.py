"""Calibrate and evaluate the cell verdicts (``vaeprobe.probes.verdict``) at 64, 128, 256 and 512 px.

    python experiments/verdict_calibration.py measure --set calibration   # wallpapers (train split), 4 sizes
    python experiments/verdict_calibration.py fit                         # thresholds from the calibration rows
    python experiments/verdict_calibration.py measure --set heldout       # builtin:photos-heldout, 64-256 px
    python experiments/verdict_calibration.py report                      # verdict rates per control and size
    python experiments/verdict_calibration.py measure --set check         # wallpapers (heldout split), 64-256 px
    python experiments/verdict_calibration.py report --set check

``measure`` records, per (size, model, image), the verdict measures of

- every control's planted cell (its declared verdict is in the ground truth), with the swap test always run;
- cells of the clean models (``mini-kl-f8``, ``taef2``): every cell when the latent has at most 64 cells
  (64 px), else the 8 largest latent norms and 24 seeded random cells.

It writes one parquet per (set, size, model) under ``experiments/results/verdicts/parts/``, named with the first
12 hex digits of the mini weights' SHA-256 (atomically; a rerun skips those present for the current weights, so a
killed run continues, and new weights are measured afresh). ``experiments/rebuild_mini.py`` runs all four steps. The calibration set is the training split of the Debian wallpaper
set of ``experiments/fetch_wallpapers.py``: images the test suite never reads (it has no copy of them). Donors for
the swap test are 4 other images of the same split (calibration) or the first 4 of ``builtin:photos-train``
(held-out evaluation). The ``check`` set is the heldout split of the same wallpapers (first 8/8/6 files at
64/128/256 px), measured once after the rules were chosen, as a second held-out evaluation that no choice saw.

``fit`` writes the thresholds to ``vaeprobe/probes/verdict_rules.json``, the defaults of ``VerdictRules``. It sets each
threshold of :class:`vaeprobe.probes.verdict.VerdictRules` at the geometric mean of the gap between the
two groups it separates, pooled over the four sizes (no threshold is per size):

- ``far_score``, ``far_weight`` and ``far_excess`` (is there a far effect at all?) jointly, for cells of
  ordinary norm: the clean models' cells, which must not have one, against the planted cells of ordinary norm
  (all declared ``wide-local``, ``global`` or ``global-information``), on a log grid: fewest errors, then the
  largest margin (:func:`joint_gate`);
- ``outlier_score``, ``outlier_weight`` and ``outlier_excess``, the same gate for latent outliers (norm ratio
  at the spot threshold): the planted cells declared ``high-norm`` against the other planted outliers;
- ``flatness`` (global or decaying?): planted cells declared ``global``/``global-information`` against those
  declared ``wide-local``;
- ``swap_corr`` and ``swap_slope`` (content?): ``global-information`` against ``global`` planted cells.

Where the groups overlap it says so and takes the midpoint of the overlap (in log space). Writes
``thresholds.json`` and ``calibration.md`` (per-size ranges of each measure and group).
"""

from __future__ import annotations

import argparse
import csv
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

from vaeprobe._io import atomic_path, cache_dir, write_text_atomic# noqa: E402
from vaeprobe.models.controls import EXPECTED_VERDICTS# noqa: E402
from vaeprobe.data.images import iter_images# noqa: E402
from vaeprobe.models.loading import load_vae# noqa: E402
from vaeprobe.probes.verdict import CellVerdict, VerdictRules, make_donors# noqa: E402

OUT = ROOT / "experiments" / "results" / "verdicts"
CLEAN = ("mini-kl-f8", "taef2")
CONTROLS = tuple(EXPECTED_VERDICTS)
SIZES = {"calibration": (64, 128, 256, 512), "heldout": (64, 128, 256), "check": (64, 128, 256)}
N_IMAGES = {"calibration": {64: 8, 128: 8, 256: 6, 512: 4}, "heldout": {64: 7, 128: 7, 256: 7},
            "check": {64: 8, 128: 8, 256: 6}}


def wallpapers(split: str = "train") -> list[Path]:
    root = cache_dir() / "wallpapers"
    manifest = root / "manifest.csv"
    if not manifest.exists():
        raise SystemExit(f"{manifest} missing: run python experiments/fetch_wallpapers.py first")
    with manifest.open() as fh:
        files = [root / r["file"] for r in csv.DictReader(fh) if r["split"] == split]
    if split == "reserved-eval":
        raise SystemExit("the reserved-eval split is never used here")
    return files


def image_sets(which: str, size: int):
    """(images, donors) as lists of LoadedImage at ``size``."""
    if which in ("calibration", "check"):
        files = wallpapers("train")
        rng = np.random.default_rng(0)
        order = rng.permutation(len(files))
        pick = [files[i] for i in order[:N_IMAGES[which][size]]]
        donor_files = [files[i] for i in order[-4:]]
        if which == "check":  # the wallpapers' heldout split, first in file order (the donors stay the same)
            pick = wallpapers("heldout")[:N_IMAGES[which][size]]
        imgs = list(iter_images([str(f) for f in pick], factor=8, size=size, report=lambda s: None))
        donors = list(iter_images([str(f) for f in donor_files], factor=8, size=size, report=lambda s: None))
    else:
        imgs = list(iter_images("builtin:photos-heldout", factor=8, size=size, report=lambda s: None))
        donors = list(iter_images("builtin:photos-train", factor=8, size=size, report=lambda s: None))[:4]
    return imgs[:N_IMAGES[which][size]], donors


def clean_cells(z: torch.Tensor, seed: int) -> list[tuple[int, int]]:
    h, w = z.shape[-2:]
    if h * w <= 64:
        return [(r, c) for r in range(h) for c in range(w)]
    norm = z[0].norm(dim=0).flatten()
    top = torch.topk(norm, 8).indices.tolist()
    g = torch.Generator().manual_seed(seed)
    n_random = 24 if h * w <= 1024 else 16  # 512 px: 16 random cells (time)
    rest = [i for i in torch.randperm(h * w, generator=g).tolist() if i not in top][:n_random]
    return [divmod(i, w) for i in top + rest]


def weights_tag() -> str:
    """First 12 hex digits of the SHA-256 of the mini weights every model here (but taef2) is built on: parts
    measured on other weights are ignored."""
    import hashlib

    path = ROOT / "vaeprobe" / "models" / "builtin" / "mini-kl-f8" / "diffusion_pytorch_model.safetensors"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12] + MEASURES


MEASURES = "-m2"  # the version of the recorded measures (m2: band_rel, profiles, counterpart swap, internal)


def measure(which: str, sizes, models, force: bool, *, parts: Path | None = None, build=None,
            label: str = "") -> None:
    """Measure and write the rows (module docstring). ``build(name)``, when given, makes the model instead of
    ``builtin:NAME`` (a variant of a control, ``internal_alpha.py``), ``label`` goes into the file names and
    ``parts`` is the folder they go to."""
    parts = parts or OUT / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    tag = weights_tag()
    for size in sizes:
        imgs, donor_imgs = image_sets(which, size)
        for name in models:
            path = parts / f"{which}-{size}-{name}{label}-{tag}.parquet"
            if path.exists() and not force:
                continue
            t0 = time.time()
            vae = load_vae(build(name) if build else f"builtin:{name}")
            donors = make_donors(vae, [d.tensor() for d in donor_imgs], names=[d.name for d in donor_imgs])
            planted = name not in CLEAN
            cv = CellVerdict(vae, donors=donors, evidence=False, swap="always" if planted else "auto",
                             keep_profiles=True)
            frames = []
            for k, img in enumerate(imgs):
                x = img.tensor()
                try:
                    with torch.no_grad():
                        z = vae.encode(x).mean
                except ValueError as exc:  # a control that cannot be built on this image (planted-groupnorm's
                    print(f"note: {name} at {size} px on {img.name}: {exc}; left out", flush=True)  # sigma_t)
                    continue
                if planted:
                    gt = vae.ground_truth(x)[0]
                    cells, expected = [(gt["row"], gt["col"])], gt["expected_verdict"]
                else:
                    cells, expected = clean_cells(z, k), "local"
                with torch.no_grad():
                    df = cv.classify(z, cells)
                df["field"] = json.dumps(df.attrs["field"])  # the reference cells (offline analysis)
                df.insert(0, "image", img.name)
                df.insert(0, "model", name)
                df.insert(0, "size", size)
                df["role"] = "planted" if planted else "clean"
                df["expected"] = expected
                frames.append(df)
            if not frames:
                print(f"note: {name} at {size} px could not be built on any image; no part written", flush=True)
                continue
            out = pd.concat(frames, ignore_index=True)
            with atomic_path(path) as tmp:
                out.to_parquet(tmp, index=False)
            print(f"{which} {size} px {name}: {len(out)} cells, {time.time() - t0:.0f} s; verdicts "
                  f"{out.verdict.value_counts().to_dict()}", flush=True)


def load(which: str) -> pd.DataFrame:
    files = sorted((OUT / "parts").glob(f"{which}-*-{weights_tag()}.parquet"))
    if not files:
        raise SystemExit(f"no {which} rows for the current mini weights: run the measure step first")
    return with_far_abs(pd.concat([pd.read_parquet(f) for f in files], ignore_index=True))


def with_far_abs(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with ``far_abs`` filled where missing: rows measured before it was a column get ``far_rel`` times
    the image's variance (what ``profile_columns`` computes, up to rounding)."""
    variance = np.array([json.loads(f)["variance"] for f in df.field], dtype=float)
    derived = pd.Series(df.far_rel.to_numpy() * variance, index=df.index)
    df["far_abs"] = derived if "far_abs" not in df else df["far_abs"].fillna(derived)
    return df


def ordinary_norm_groups(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The two groups the ordinary-norm far-effect gate separates: the clean models' cells and the planted cells
    with a far effect (declared ``wide-local``, ``global`` or ``global-information``), both under the spot
    threshold of the norm ratio."""
    ordinary = df[df.norm_ratio < VerdictRules().norm_ratio]
    clean = ordinary[ordinary.role == "clean"]
    planted = ordinary[(ordinary.role == "planted") & (ordinary.expected != "high-norm")]
    return clean, planted


def _gap(neg: np.ndarray, pos: np.ndarray) -> dict:
    """Threshold at the geometric mean of max(neg) and min(pos) (positives above)."""
    neg, pos = neg[np.isfinite(neg)], pos[np.isfinite(pos)]
    hi, lo = float(np.max(neg)), float(np.min(pos))
    out = {"negatives_max": hi, "positives_min": lo, "n_neg": int(len(neg)), "n_pos": int(len(pos)),
           "separated": lo > hi}
    if hi > 0 and lo > 0:
        out["threshold"] = float(math.sqrt(hi * lo))
    else:
        out["threshold"] = float((hi + lo) / 2)
    out["margin"] = float(lo / hi) if hi > 0 else math.inf
    return out


def joint_gate(neg: np.ndarray, pos: np.ndarray) -> dict:
    """A far-effect gate of :class:`VerdictRules` from ``(size, far_excess)`` rows of cells that must not pass
    (``neg``) and cells that must (``pos``): ``size ** w * far_excess ** (1 - w) >= far_score`` and
    ``far_excess >= far_excess``. Over a grid of ``w`` (0 to 1 by 0.05), of the score threshold (log grid) and of
    the excess floor (log grid, 1 to 100), the settings with the fewest errors (negatives passing, positives
    failing), and among those the one whose closest point is farthest from the boundary (in log units). ``w = 0``
    and ``w = 1`` are the gates on one measure; an AND gate of two thresholds is the corner the floor makes with
    the score line."""
    neg = np.log(np.clip(neg[np.isfinite(neg).all(1)], 1e-30, None))
    pos = np.log(np.clip(pos[np.isfinite(pos).all(1)], 1e-30, None))
    floors = np.log(np.logspace(0, 2, 41))
    best = None
    for w in np.round(np.linspace(0, 1, 21), 2):
        sn, sp = w * neg[:, 0] + (1 - w) * neg[:, 1], w * pos[:, 0] + (1 - w) * pos[:, 1]
        lo, hi = min(sn.min(), sp.min()), max(sn.max(), sp.max())
        ts = np.linspace(lo, hi, 400)
        T, F = np.meshgrid(ts, floors, indexing="ij")
        pos_margin = np.minimum(sp[None, None] - T[..., None], pos[:, 1][None, None] - F[..., None])
        neg_margin = np.maximum(T[..., None] - sn[None, None], F[..., None] - neg[:, 1][None, None])
        errors = (pos_margin < 0).sum(-1) + (neg_margin <= 0).sum(-1)
        margin = np.minimum(np.where(pos_margin >= 0, pos_margin, np.inf).min(-1),
                            np.where(neg_margin > 0, neg_margin, np.inf).min(-1))
        e = errors.min()
        score = np.where(errors == e, margin, -np.inf)
        i, j = np.unravel_index(np.argmax(score), score.shape)
        key = (int(e), -float(score[i, j]))
        if best is None or key < best[0]:
            best = (key, float(w), float(np.exp(T[i, j])), float(np.exp(F[i, j])))
    (errors, minus_margin), w, t, floor = best
    # the margin rarely depends on the floor; take the geometric middle of the floors that keep the fewest errors
    # at this (w, t), so that an effect of ordinary shape needs as much excess as the data allow
    sn, sp = w * neg[:, 0] + (1 - w) * neg[:, 1], w * pos[:, 0] + (1 - w) * pos[:, 1]
    lt = math.log(t)
    ok = [f for f in floors if int(((sp < lt) | (pos[:, 1] < f)).sum() + ((sn >= lt) & (neg[:, 1] >= f)).sum())
          == errors]
    if ok:
        floor = float(np.exp((min(ok) + max(ok)) / 2))
    common = {"errors": errors, "margin_log": -minus_margin, "n_neg": int(len(neg)), "n_pos": int(len(pos)),
              "separated": errors == 0, "rule": "size ** w * far_excess ** (1 - w) >= score and "
              "far_excess >= floor (joint fit)"}
    return {"score": {"threshold": t, **common}, "weight": {"threshold": w, **common},
            "excess": {"threshold": floor, **common}}


def fit() -> dict:
    df = load("calibration")
    clean = df[df.role == "clean"]
    planted = df[df.role == "planted"]
    glob = planted[planted.expected.isin(["global", "global-information"])]
    wide = planted[planted.expected == "wide-local"]
    info = planted[planted.expected == "global-information"]
    noinfo = planted[planted.expected == "global"]
    # two gates, each fitted on the cells it applies to: ordinary-norm cells (the clean models' against the
    # controls' planted cells of ordinary norm) and latent outliers (planted high-norm cells against the other
    # planted outliers)
    spot = VerdictRules().norm_ratio
    # sizes: far_abs for the ordinary-norm gate (experiments/verdict_forms.py: the widest margin of the forms
    # tried), band_rel for the outlier gate
    cols, out_cols = ["far_abs", "far_excess"], ["band_rel", "far_excess"]
    far = planted[planted.expected != "high-norm"]
    outlier_neg = pd.concat([clean, planted[planted.expected == "high-norm"]])
    outlier_neg = outlier_neg[outlier_neg.norm_ratio >= spot]
    gate = joint_gate(*(g[cols].to_numpy() for g in ordinary_norm_groups(df)))
    out = joint_gate(outlier_neg[out_cols].to_numpy(), far[far.norm_ratio >= spot][out_cols].to_numpy())
    gaps = {
        "far_score": gate["score"],
        "far_weight": gate["weight"],
        "far_excess": gate["excess"],
        "outlier_score": out["score"],
        "outlier_weight": out["weight"],
        "outlier_excess": out["excess"],
        "flatness": _gap(wide.flatness.to_numpy(), glob.flatness.to_numpy()),
        "swap_corr": _gap(noinfo.swap_corr.fillna(0).to_numpy(), info.swap_corr.to_numpy()),
        "swap_slope": _gap(noinfo.swap_slope.fillna(0).to_numpy(), info.swap_slope.to_numpy()),
    }
    # swap_corr can be negative for the negatives: a linear midpoint there
    for key in ("swap_corr", "swap_slope"):
        g = gaps[key]
        g["threshold"] = float((max(g["negatives_max"], 0.0) + g["positives_min"]) / 2)
    rules = VerdictRules(**{k: round(g["threshold"], 6) for k, g in gaps.items()})
    result = {"rules": rules.to_dict(), "gaps": gaps, "n_rows": int(len(df)),
              "sizes": sorted(int(s) for s in df["size"].unique()),
              "images": {int(s): sorted(df[df["size"] == s].image.unique().tolist()) for s in df["size"].unique()}}
    write_text_atomic(OUT / "thresholds.json", json.dumps(result, indent=2) + "\n")
    shipped = {"rules": result["rules"], "source": "experiments/verdict_calibration.py fit on the calibration set "
               f"(sizes {result['sizes']}, mini weights {weights_tag()}); data in experiments/results/verdicts/"}
    write_text_atomic(ROOT / "vaeprobe" / "probes" / "verdict_rules.json", json.dumps(shipped, indent=2) + "\n")
    write_text_atomic(OUT / "calibration.md", calibration_table(df, rules) + "\n")
    print(json.dumps(result["rules"], indent=2))
    for k, g in gaps.items():
        print(f"{k}: threshold {g['threshold']:.4g}, separated {g['separated']}"
              + (f", errors {g['errors']}" if "errors" in g else
                 f", negatives max {g['negatives_max']:.4g}, positives min {g['positives_min']:.4g}"))
    return result


def _rng(values: pd.Series) -> str:
    v = values.dropna()
    return "–" if v.empty else f"{v.min():.3g}–{v.max():.3g}"


def calibration_table(df: pd.DataFrame, rules: VerdictRules) -> str:
    lines = ["| size | group | cells | far_abs | band_rel | far_rel | far_excess | flatness | swap_corr | swap_slope |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for size in sorted(df["size"].unique()):
        d = df[df["size"] == size]
        groups = [("clean cells", d[d.role == "clean"])]
        for exp in ("high-norm", "wide-local", "global", "global-information"):
            groups.append((f"planted, {exp}", d[(d.role == "planted") & (d.expected == exp)]))
        for label, g in groups:
            lines.append(f"| {size} | {label} | {len(g)} | {_rng(g.far_abs)} | {_rng(g.band_rel)} | {_rng(g.far_rel)} | {_rng(g.far_excess)} | "
                         f"{_rng(g.flatness)} | {_rng(g.swap_corr)} | {_rng(g.swap_slope)} |")
    return "\n".join(lines)


def report(which: str) -> str:
    df = load(which)
    rules = VerdictRules(**json.loads((OUT / "thresholds.json").read_text())["rules"])  # the fitted ones
    df["verdict"] = [rules.classify(r) for r in df.to_dict("records")]
    df["is_global"] = df.verdict.isin(["global", "global-information"])
    lines = [f"Verdicts on the {which} set with the fitted thresholds.", "",
             "| model | declared | " + " | ".join(f"{s} px" for s in sorted(df["size"].unique())) + " |",
             "|---|---|" + "---|" * df["size"].nunique()]
    for name in [m for m in (*CONTROLS, *CLEAN) if m in set(df.model)]:
        d = df[df.model == name]
        exp = d.expected.iloc[0]
        cells = []
        for size in sorted(df["size"].unique()):
            s = d[d["size"] == size]
            if s.empty:
                cells.append("–")
            elif exp == "local":
                cells.append(f"{int(s.is_global.sum())} global of {len(s)} cells; "
                             f"{int((s.verdict == 'wide-local').sum())} wide-local")
            else:
                cells.append(f"{int((s.verdict == exp).sum())}/{len(s)}"
                             + ("" if (s.verdict == exp).all() else f" (else {s[s.verdict != exp].verdict.value_counts().to_dict()})"))
        lines.append(f"| {name} | {'not global' if exp == 'local' else exp} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    write_text_atomic(OUT / f"{which}_verdicts.md", text + "\n")
    print(text)
    return text


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("step", choices=["measure", "fit", "report"])
    ap.add_argument("--set", default="calibration", choices=["calibration", "heldout", "check"])
    ap.add_argument("--sizes", default=None, help="comma-separated sizes (default: all of the set)")
    ap.add_argument("--models", default=None, help="comma-separated builtin names (default: controls + clean)")
    ap.add_argument("--force", action="store_true", help="recompute parts that exist")
    a = ap.parse_args(argv)
    if a.step == "measure":
        sizes = [int(s) for s in a.sizes.split(",")] if a.sizes else SIZES[a.set]
        models = a.models.split(",") if a.models else [*CONTROLS, *CLEAN]
        measure(a.set, sizes, models, a.force)
    elif a.step == "fit":
        fit()
    else:
        report(a.set)


if __name__ == "__main__":
    main()
