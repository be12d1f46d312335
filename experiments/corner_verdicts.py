"""The verdict measures of the clean mini VAE's corner cell, where its decoder writes a GroupNorm droplet
(docs/mini-corner-blob.md), on the held-out builtin photos.

    python experiments/corner_verdicts.py [--size 256] [--out experiments/results/corner_verdicts_mini.json]

Per photo: ``CellVerdict`` (no donors, no evidence) on the bottom-left cell ``(h - 1, 0)`` and, for comparison,
the other three corners; the measures (``far_plateau`` and its bounds, ``decay_exponent``, ``far_excess``)
and the verdict with the shipped thresholds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vaeprobe._io import write_text_atomic# noqa: E402
from vaeprobe.data.images import load_images# noqa: E402
from vaeprobe.models.loading import load_vae# noqa: E402
from vaeprobe.probes.verdict import CellVerdict, VerdictRules# noqa: E402

COLUMNS = ("row", "col", "verdict", "norm_ratio", "far_plateau", "far_plateau_lo", "far_plateau_hi", "decay_exponent",
           "decay_exponent_lo", "below_visibility", "far_excess", "erf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "corner_verdicts_mini.json"))
    a = ap.parse_args()
    vae = load_vae("builtin:mini-kl-f8")
    cv = CellVerdict(vae, evidence=False)
    rows = []
    with torch.no_grad():
        for img in load_images("builtin:photos-heldout", size=a.size):
            z = vae.encode(img.tensor()).mean
            h, w = z.shape[-2:]
            df = cv.classify(z, [(h - 1, 0), (0, 0), (0, w - 1), (h - 1, w - 1)])
            for rec in df[list(COLUMNS)].to_dict("records"):
                rows.append({"image": img.name, **{k: (v if isinstance(v, str) else float(v)) for k, v in rec.items()}})
                print(rows[-1], flush=True)
    out = {"size": a.size, "rules": VerdictRules().to_dict(), "cells": rows,
           "command": "python experiments/corner_verdicts.py " + " ".join(sys.argv[1:])}
    write_text_atomic(Path(a.out), json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
