"""Largest latent norm / median norm ratios on clean models (data behind the spot detector threshold).

    python experiments/latent_norm_ratios.py [--out experiments/results/latent_norm_ratios.json]

For each model and size: the largest per-image ratio of a position's latent norm to the image's median norm
(sorted over the images), the 99.9th percentile over all positions and the lowest raw log-variance.
"""

import argparse
import json

import numpy as np
import torch

from vaeprobe._io import write_text_atomic
from vaeprobe.data.images import load_images
from vaeprobe.models.loading import load_vae


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="builtin:mini-kl-f8,builtin:tiny-random")
    ap.add_argument("--images", default="builtin:photos")
    ap.add_argument("--sizes", default="128,256")
    ap.add_argument("--out", default=None, help="also write the results here (JSON)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    res = {"images": args.images, "models": {}}
    for spec in args.models.split(","):
        vae = load_vae(spec)
        res["models"][spec] = {}
        for size in [int(s) for s in args.sizes.split(",")]:
            mx, allr, lv = [], [], []
            for img in load_images(args.images, factor=vae.factor, size=size):
                p = vae.encode(img.tensor())
                n = p.mean[0].norm(dim=0)
                r = n / n.median()
                mx.append(float(r.max()))
                allr.append(r.flatten().numpy())
                if p.raw_logvar is not None:
                    lv.append(float(p.raw_logvar.min()))
            entry = {"max_per_image": sorted(round(v, 3) for v in mx), "largest": max(mx),
                     "q999_all_positions": float(np.quantile(np.concatenate(allr), 0.999)),
                     "min_raw_logvar": min(lv) if lv else None}
            res["models"][spec][str(size)] = entry
            print(spec, size, "largest", round(entry["largest"], 2), "q99.9", round(entry["q999_all_positions"], 2),
                  "min raw logvar", entry["min_raw_logvar"] and round(entry["min_raw_logvar"], 1), flush=True)
    if args.out:
        write_text_atomic(args.out, json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
