"""Data behind the scan defaults (far-field radius 3 cells, global-effect threshold 1000x the median).

    python experiments/scan_defaults.py [--size 128] [--positions grid:2] [--out experiments/results/scan_defaults.json]

On each model (clean mini-kl-f8 and the planted controls) and each builtin photo: an exact zeroing scan of a
fair sample of positions; per image the largest global-effect ratio and where, and the distribution of radius90
(the radius holding 90% of a position's change energy) over ordinary positions.
"""

import argparse
import json
import time

import numpy as np
import torch

from vaeprobe._io import write_text_atomic
from vaeprobe.data.images import load_images
from vaeprobe.probes.scan import exact_scan, select_sites
from vaeprobe.models.loading import load_vae

MODELS = ["mini-kl-f8", "planted-direct", "planted-groupnorm", "planted-attention", "planted-hidden"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--positions", default="grid:2")
    ap.add_argument("--images", default="builtin:photos")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--out", default="experiments/results/scan_defaults.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = {"size": args.size, "positions": args.positions, "models": {}}
    images = load_images(args.images, size=args.size)
    for spec in args.models.split(","):
        vae = load_vae(f"builtin:{spec}")
        rows = []
        r90 = []
        for img in images:
            t0 = time.time()
            x = img.tensor()
            z = vae.encode(x).mean
            sites = select_sites(args.positions, z.shape[-2:])
            gt = vae.ground_truth(x)[0] if vae.ground_truth else None
            if gt is not None and (gt["row"], gt["col"]) not in [(s.row, s.col) for s in sites]:
                sites += select_sites([(gt["row"], gt["col"])], z.shape[-2:])
            df = exact_scan(vae, z, sites, "zero", batch=16).table
            ordinary = df if gt is None else df[(df.row != gt["row"]) | (df.col != gt["col"])]
            r90 += ordinary.radius90.dropna().tolist()
            top = df.loc[df.global_ratio.idxmax()]
            rows.append({"image": img.name, "top": [int(top.row), int(top.col)], "top_ratio": float(top.global_ratio),
                         "top_far_fraction": float(top.far_fraction),
                         "truth": [gt["row"], gt["col"]] if gt else None,
                         "ordinary_max_ratio": float(ordinary.global_ratio.max()),
                         "seconds": round(time.time() - t0, 2)})
            print(spec, rows[-1], flush=True)
        r90 = np.array(r90)
        out["models"][spec] = {"images": rows, "radius90_median": float(np.median(r90)),
                               "radius90_q90": float(np.quantile(r90, 0.9)),
                               "radius90_q99": float(np.quantile(r90, 0.99)),
                               "max_ordinary_ratio": max(r["ordinary_max_ratio"] for r in rows),
                               "min_top_ratio": min(r["top_ratio"] for r in rows)}
        print(spec, {k: v for k, v in out["models"][spec].items() if k != "images"}, flush=True)
    write_text_atomic(args.out, json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
