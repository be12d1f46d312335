"""How strong the ``internal`` verdict control is: its weight ``alpha``, chosen on the calibration set alone.

    python experiments/internal_alpha.py measure     # internal at each alpha, calibration set, 64-512 px
    python experiments/internal_alpha.py choose      # refit the gate per alpha; the smallest alpha that passes

``internal`` (``vaeprobe.models.controls.InternalControl``) gives one ordinary latent cell the weight ``alpha``
in the statistics of the mini decoder's last GroupNorm. The global-effect issue asks for an effect size *near*
the thresholds. With ``alpha = 0.25`` (the weight before this sweep, picked so that the weakest images sit at
the clean models' largest ``band_rel``) the weakest calibration image at 64 px scored 1.06x the threshold of the
gate of that time: a control at the threshold is missed on about half of the images like its weakest.

The rule, fixed before this sweep was run: ``alpha`` is the smallest value of ``GRID`` for which, with the
ordinary-norm gate refitted on the calibration set (``verdict_calibration.joint_gate``, the rows of the other
controls and of the clean models unchanged, ``internal``'s rows those of that ``alpha``), every planted
``internal`` cell at every size has a far-effect score at least ``FACTOR`` times the fitted ``far_score`` and a
``far_excess`` at least ``FACTOR`` times the fitted floor. Only the calibration set (the wallpapers' train split)
is read. Rows go to ``experiments/results/verdicts/alpha/``, the table to ``alpha.md`` there.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

import verdict_calibration as vc  # noqa: E402

from vaeprobe._io import write_text_atomic  # noqa: E402
from vaeprobe.models.controls import INTERNAL_ALPHA  # noqa: E402

GRID = (0.25, 0.3, 0.35, 0.4, 0.5)
FACTOR = 1.5
OUT = vc.OUT / "alpha"


def build(alpha: float):
    def make(name: str):
        from vaeprobe.models.controls import InternalControl
        from vaeprobe.models.folders import folder_model

        assert name == "internal"
        return InternalControl(folder_model("mini-kl-f8"), alpha=alpha).eval()
    return make


def label(alpha: float) -> str:
    return f"-a{alpha:g}"


def rows(alpha: float) -> pd.DataFrame:
    files = sorted(OUT.glob(f"calibration-*-internal{label(alpha)}-{vc.weights_tag()}.parquet"))
    if len(files) != len(vc.SIZES["calibration"]):
        raise SystemExit(f"alpha {alpha}: {len(files)} of {len(vc.SIZES['calibration'])} sizes measured; "
                         "run the measure step first")
    return vc.with_far_abs(pd.concat([pd.read_parquet(f) for f in files], ignore_index=True))


def choose() -> dict:
    base = vc.load("calibration")
    base = base[base.model != "internal"]
    cols = ["far_abs", "far_excess"]  # the shipped gate's size and shape (verdict_calibration.fit)
    lines = ["| alpha | gate errors | margin (log) | w | far_score | floor | internal: min score / far_score "
             "(64, 128, 256, 512 px) | internal: min far_excess / floor | passes |",
             "|---|---|---|---|---|---|---|---|---|"]
    result, chosen = {}, None
    for alpha in GRID:
        internal = rows(alpha)
        df = pd.concat([base, internal], ignore_index=True)
        clean, far = vc.ordinary_norm_groups(df)
        gate = vc.joint_gate(clean[cols].to_numpy(), far[cols].to_numpy())
        w, t, f = gate["weight"]["threshold"], gate["score"]["threshold"], gate["excess"]["threshold"]
        score = internal.far_abs ** w * internal.far_excess ** (1 - w) / t
        excess = internal.far_excess / f
        by_size = {int(s): (float(score[internal["size"] == s].min()), float(excess[internal["size"] == s].min()))
                   for s in sorted(internal["size"].unique())}
        ok = all(a >= FACTOR and b >= FACTOR for a, b in by_size.values())
        if ok and chosen is None:
            chosen = alpha
        result[str(alpha)] = {"errors": gate["score"]["errors"], "margin_log": gate["score"]["margin_log"],
                              "far_weight": w, "far_score": t, "far_excess": f, "min_ratios": by_size,
                              "passes": ok}
        lines.append(f"| {alpha:g} | {gate['score']['errors']} | {gate['score']['margin_log']:.3f} | {w:g} | "
                     f"{t:.4g} | {f:.4g} | " + ", ".join(f"{a:.2f}" for a, _ in by_size.values()) + " | "
                     + ", ".join(f"{b:.2f}" for _, b in by_size.values()) + f" | {'yes' if ok else 'no'} |")
    lines += ["", f"Rule: the smallest alpha whose internal cells all reach {FACTOR}x the refitted score "
              f"threshold and floor. Chosen: {chosen}."]
    text = "\n".join(lines)
    write_text_atomic(OUT / "alpha.md", text + "\n")
    write_text_atomic(OUT / "alpha.json", json.dumps({"grid": list(GRID), "factor": FACTOR, "chosen": chosen,
                                                      "alphas": result}, indent=2) + "\n")
    print(text)
    return {"chosen": chosen, "alphas": result}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("step", choices=["measure", "choose"])
    ap.add_argument("--alphas", default=None, help="comma-separated subset of the grid (default: all)")
    ap.add_argument("--sizes", default=None, help="comma-separated sizes (default: 64,128,256,512)")
    a = ap.parse_args(argv)
    if a.step == "measure":
        alphas = [float(x) for x in a.alphas.split(",")] if a.alphas else GRID
        sizes = [int(s) for s in a.sizes.split(",")] if a.sizes else vc.SIZES["calibration"]
        for alpha in alphas:
            if alpha == INTERNAL_ALPHA:  # the shipped weight: the calibration rows already hold it
                src = sorted((vc.OUT / "parts").glob(f"calibration-*-internal-{vc.weights_tag()}.parquet"))
                OUT.mkdir(parents=True, exist_ok=True)
                for p in src:
                    dst = OUT / p.name.replace("-internal-", f"-internal{label(alpha)}-")
                    if not dst.exists():
                        dst.write_bytes(p.read_bytes())
                continue
            vc.measure("calibration", sizes, ["internal"], False, parts=OUT, build=build(alpha), label=label(alpha))
    else:
        choose()


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
