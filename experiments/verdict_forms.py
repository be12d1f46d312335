"""Other forms of the far-effect gate, tried offline on the stored calibration rows.

    python experiments/verdict_forms.py               # writes experiments/results/verdicts/forms.md
    python experiments/verdict_forms.py --alpha 0.25  # with the internal control's rows at alpha 0.25

The shipped gate (``vaeprobe.probes.verdict.VerdictRules``) for cells of ordinary norm is
``band_rel ** w * far_excess ** (1 - w) >= far_score`` and ``far_excess >= floor``. This script refits the same
kind of gate (``verdict_calibration.joint_gate``: fewest errors, then the largest margin in log units) with other
measures of size and of shape, computed from what each calibration row stores (the cell's ring profile and its
image's reference cells), and prints errors and margins. It reads the calibration set only (the wallpapers'
train split); it changes nothing that ships. The question it answers: does another measure separate the clean
models' cells from the planted ordinary-norm cells (``keyed``, ``planted-hidden``, ``internal``) with a wider
margin than the shipped one?

Sizes (each over the clean decode's variance):

- ``band_rel``, ``far_rel``: the shipped columns;
- ``band/near0``, ``far/near0``: the same over the reference cells' energy at their own cell (an ordinary
  cell's local effect) instead of the image's variance;
- ``band/refband``: ``band_rel`` over the median ``band_rel`` of the image's reference cells;
- ``band_abs``, ``far_abs``: the mean change energy per pixel in the band or beyond ``erf`` in the decoder's
  output units (``[-1, 1]``, summed over RGB), not divided by the image's variance (``far_abs`` is the column
  that ships since this comparison; for rows measured before it, ``far_rel`` times the image's variance).

Shapes:

- ``far_excess``: the shipped column (pixel sums beyond ``erf``);
- ``ring excess (d > erf)``, ``(d > 2 erf)``, ``(outer half)``: the cell's ring profile over the reference
  shape, both relative to their own ring 0, averaged over the rings beyond ``erf``, beyond twice ``erf``, or in
  the outer half of the distances beyond ``erf`` (``flatness``'s outer half). A flat effect's ratio grows
  there, where an ordinary cell's receptive-field tail has died.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

import verdict_calibration as vc  # noqa: E402

from vaeprobe._io import write_text_atomic  # noqa: E402


def ring_excess(row: dict, where: str) -> float:
    f = json.loads(row["field"])
    own = np.asarray(row["profile"], dtype=float)
    shape = np.asarray(f["shape"], dtype=float)
    if own.size == 0 or not np.isfinite(shape).any() or not own[0] > 0 or not shape[0] > 0:
        return np.nan
    if shape.size < own.size:  # past the reference profile: its last finite value (as VerdictRules does)
        shape = np.concatenate([shape, np.full(own.size - shape.size, shape[np.isfinite(shape)][-1])])
    shape = shape[:own.size]
    d, erf = np.arange(own.size), f["erf"]
    keep = {"erf": d > erf, "2erf": d > 2 * erf, "outer": d > erf + (d.max() - erf) / 2}[where]
    keep &= np.isfinite(own) & np.isfinite(shape)
    if not keep.any():
        return np.nan
    return float(np.mean(own[keep] / own[0]) / np.mean(shape[keep] / shape[0]))


def measures(df: pd.DataFrame) -> pd.DataFrame:
    fields = [json.loads(s) for s in df.field]
    near0 = np.array([f["profile"][0] if f["profile"] else np.nan for f in fields], dtype=float)
    refband = np.array([np.median(f["band"]) if f.get("band") else np.nan for f in fields], dtype=float)
    out = df.copy()
    out["band/near0"] = df.band_rel / near0
    out["far/near0"] = df.far_rel / near0
    out["band/refband"] = df.band_rel / refband
    out["band_abs"] = df.band_rel * np.array([f["variance"] for f in fields], dtype=float)
    out = vc.with_far_abs(out)
    rows = df.to_dict("records")
    for where, name in (("erf", "ring excess (d > erf)"), ("2erf", "ring excess (d > 2 erf)"),
                        ("outer", "ring excess (outer half)")):
        out[name] = [ring_excess(r, where) for r in rows]
    return out


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--alpha", type=float, default=None,
                    help="use the internal control's rows of this alpha (internal_alpha.py measure) instead of "
                         "the shipped one's; writes forms-aALPHA.md")
    a = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    df = vc.load("calibration")
    name = "forms.md"
    if a.alpha is not None:
        import internal_alpha

        df = pd.concat([df[df.model != "internal"], internal_alpha.rows(a.alpha)], ignore_index=True)
        name = f"forms-a{a.alpha:g}.md"
    df = measures(df)
    clean, planted = vc.ordinary_norm_groups(df)
    sizes = ["band_rel", "far_rel", "band/near0", "far/near0", "band/refband", "band_abs", "far_abs"]
    shapes = ["far_excess", "ring excess (d > erf)", "ring excess (d > 2 erf)", "ring excess (outer half)"]
    lines = [f"Far-effect gates on the calibration set: {len(clean)} clean cells against {len(planted)} planted "
             "cells of ordinary norm (`python experiments/verdict_forms.py`).", "",
             "| size | shape | errors | margin (log) | w | score | floor |", "|---|---|---|---|---|---|---|"]
    best = None
    for size in sizes:
        for shape in shapes:
            g = vc.joint_gate(clean[[size, shape]].to_numpy(), planted[[size, shape]].to_numpy())
            key = (g["score"]["errors"], -g["score"]["margin_log"])
            if best is None or key < best[0]:
                best = (key, size, shape)
            lines.append(f"| {size} | {shape} | {g['score']['errors']} | {g['score']['margin_log']:.3f} | "
                         f"{g['weight']['threshold']:g} | {g['score']['threshold']:.4g} | "
                         f"{g['excess']['threshold']:.4g} |")
    lines += ["", f"Fewest errors, then the largest margin: size `{best[1]}`, shape `{best[2]}` ({best[0][0]} errors, "
              f"margin {-best[0][1]:.3f})."]
    text = "\n".join(lines)
    write_text_atomic(vc.OUT / name, text + "\n")
    print(text)


if __name__ == "__main__":
    main()
