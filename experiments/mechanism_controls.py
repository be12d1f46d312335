"""Pathway attribution on the planted controls and the clean mini model (data for docs/mechanism.md).

    python experiments/mechanism_controls.py [--size 128] [--images builtin:photos] [--ordinary 8]
        [--out experiments/results/mechanism_controls.json]

For each model and image: the far-field effect of zeroing the spot (the planted cell for a control, the largest
latent norm for the clean model) and of zeroing ``--ordinary`` random other cells, decoded live and with
GroupNorm statistics / attention context / both frozen. Reported per model: how often each pathway dominates at
the spot and at ordinary cells, the median shares, and the share of the far-field energy left with both frozen.
The planted-attention control is also run with ``attention="probs"`` (frozen probabilities only).
"""

import argparse
import json
import time

import numpy as np
import pandas as pd
import torch

from vaeprobe._io import write_text_atomic
from vaeprobe.data.images import load_images
from vaeprobe.probes.mechanism import PATHWAYS, attribute_pathways
from vaeprobe.probes.perturb import Site
from vaeprobe.models.loading import load_vae

MODELS = ["mini-kl-f8", "planted-direct", "planted-groupnorm", "planted-attention", "planted-hidden"]


def summarise(df: pd.DataFrame) -> dict:
    if df.empty:
        return {}
    return {"n": len(df), "dominant": df.dominant.value_counts().to_dict(),
            "median_shares": {p: round(float(df[f"share_{p}"].median()), 4) for p in PATHWAYS},
            "median_far_l2_live": float(df.far_l2_live.median()),
            "max_both_frozen_over_live": float((df.far_l2_both_frozen / df.far_l2_live).max()),
            "median_both_frozen_over_live": float((df.far_l2_both_frozen / df.far_l2_live).median())}


def run(spec: str, images, n_ordinary: int, attention: str) -> dict:
    vae = load_vae(f"builtin:{spec}")
    rng = np.random.default_rng(0)
    spots, ordinary = [], []
    for img in images:
        x = img.tensor()
        z = vae.encode(x).mean
        h, w = z.shape[-2:]
        if vae.ground_truth is not None:
            gt = vae.ground_truth(x)[0]
            spot = (gt["row"], gt["col"])
        else:
            spot = divmod(int(z[0].norm(dim=0).argmax()), w)
        cells = [c for c in ((int(i) // w, int(i) % w) for i in rng.permutation(h * w)) if c != spot][:n_ordinary]
        df = attribute_pathways(vae, z, [Site(*spot)] + [Site(*c) for c in cells], attention=attention).table
        df.insert(0, "image", img.name)
        spots.append(df.iloc[:1])
        ordinary.append(df.iloc[1:])
    return {"attention": attention, "spot": summarise(pd.concat(spots)), "ordinary": summarise(pd.concat(ordinary))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--images", default="builtin:photos")
    ap.add_argument("--ordinary", type=int, default=8)
    ap.add_argument("--out", default="experiments/results/mechanism_controls.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    images = load_images(args.images, size=args.size)
    out = {"size": args.size, "images": args.images, "n_images": len(images), "models": {}}
    t0 = time.time()
    for spec in MODELS:
        out["models"][spec] = run(spec, images, args.ordinary, "context")
        print(spec, json.dumps(out["models"][spec]), flush=True)
    out["models"]["planted-attention (probs)"] = run("planted-attention", images, 0, "probs")
    print("planted-attention (probs)", json.dumps(out["models"]["planted-attention (probs)"]), flush=True)
    out["seconds"] = round(time.time() - t0, 1)
    write_text_atomic(args.out, json.dumps(out, indent=1))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
