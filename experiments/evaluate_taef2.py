"""What vaeprobe finds on taef2 (or any VAE given in the config): the numbers of its model card and docs/taef2.md.

    python experiments/evaluate_taef2.py experiments/configs/taef2.json   # writes experiments/results/taef2.json

1. Reconstruction (posterior mean) of every ``recon_images`` photo at each ``recon_sizes``: PSNR, SSIM, LPIPS
   (mean, std, min, max), the per-channel mean colour error (image means, in [-1, 1]), and a bicubic down-by-8-and-up
   baseline on the same crops.
2. Latent norms: the largest norm / median norm per image (vaeprobe's spot rule is >= 10).
3. Spread: zeroing every cell of ``spread_positions`` (an 8x8 grid at 256 px) on ``spread_n_images`` photos, the
   share of the change energy beyond ``radius`` cells (``far_fraction``), the radius holding 90 % of it, and how
   much of the far-field energy is kept when every GroupNorm uses the clean decode's statistics (taef2's GroupNorms
   are its pool branches) — with the Shapley GroupNorm share of :func:`vaeprobe.attribute_pathways`.
4. The same attribution at each image's largest-norm cell of ``top_images``.
5. For a TAESD model: the reconstruction PSNR of ``wiring_images`` at 128 px with the pool branch wired four ways
   (the key names do not say how), which is how :class:`vaeprobe.models.taesd.Block`'s wiring was chosen.

``--only wiring`` (or any section name) recomputes that section and keeps the others of an existing results file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vaeprobe import attribute_pathways, exact_scan, load_images, load_vae, select_sites  # noqa: E402
from vaeprobe._io import write_text_atomic# noqa: E402
from vaeprobe.probes.metrics import compare_images# noqa: E402
from vaeprobe.reports.plots import tensor_to_unit# noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def stats(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std()), "median": float(np.median(v)), "min": float(v.min()),
            "max": float(v.max()), "n": int(v.size)}


def bicubic(arr: np.ndarray, factor: int = 8) -> np.ndarray:
    h, w = arr.shape[:2]
    img = Image.fromarray((arr * 255).round().astype(np.uint8))
    small = img.resize((w // factor, h // factor), Image.BICUBIC)
    return np.asarray(small.resize((w, h), Image.BICUBIC), dtype=np.float32) / 255


def reconstruction(vae, images: str, size: int) -> dict:
    rows, base, orig_means, rec_means = [], [], [], []
    for img in load_images(images, factor=vae.factor, size=size):
        rec = tensor_to_unit(vae.reconstruct(img.tensor()))
        rows.append(compare_images(img.array, rec))
        base.append(compare_images(img.array, bicubic(img.array))["psnr"])
        orig_means.append(img.array.mean(axis=(0, 1)) * 2 - 1)  # image means per channel, in [-1, 1] units
        rec_means.append(rec.mean(axis=(0, 1)) * 2 - 1)
    out = {m: stats([r[m] for r in rows]) for m in ("psnr", "ssim", "lpips")}
    out["bicubic_x8_psnr"] = stats(base)
    o, r = np.array(orig_means), np.array(rec_means)
    out["mean_abs_colour_error_rgb"] = [float(c) for c in np.abs(r - o).mean(axis=0)]
    out["mean_colour_bias_rgb"] = [float(c) for c in (r - o).mean(axis=0)]
    # least-squares slope of the reconstructed image means on the original ones, per channel: 1 is faithful,
    # below 1 the reconstructions regress towards a common colour
    out["colour_slope_rgb"] = [float(np.polyfit(o[:, c], r[:, c], 1)[0]) if len(o) > 1 and o[:, c].std() > 0
                               else float("nan") for c in range(o.shape[1])]
    return out


def norm_ratios(vae, images: str, size: int) -> dict:
    ratios = []
    for img in load_images(images, factor=vae.factor, size=size):
        n = vae.encode(img.tensor()).mean[0].norm(dim=0)
        ratios.append(float(n.max() / n.median()))
    return stats(ratios)


def spread(vae, cfg: dict) -> dict:
    imgs = load_images(cfg["spread_images"], factor=vae.factor, size=cfg["spread_size"])[:cfg["spread_n_images"]]
    per_image = []
    for img in imgs:
        z = vae.encode(img.tensor()).mean
        sites = select_sites(cfg["spread_positions"], z.shape[-2:])
        ref = vae.decode(z)
        df = attribute_pathways(vae, z, sites, "zero", radius=cfg["radius"], batch=1).table
        scan = exact_scan(vae, z, sites, "zero", measures=("far_fraction", "radius90"), radius=cfg["radius"],
                          batch=1, ref=ref).table
        far, r90 = scan.far_fraction.to_numpy(), scan.radius90.to_numpy()
        kept = (df.far_l2_groupnorm_frozen / df.far_l2_live).to_numpy()
        per_image.append({"image": img.name, "cells": len(sites), "far_fraction": stats(far),
                          "radius90": stats(r90), "groupnorm_frozen_kept": stats(kept),
                          "kept_pooled": float(df.far_l2_groupnorm_frozen.sum() / df.far_l2_live.sum()),
                          "share_groupnorm": stats(df.share_groupnorm)})
    return {"images": per_image}


def top_cells(vae, cfg: dict) -> dict:
    rows = []
    for img in load_images(cfg["top_images"], factor=vae.factor, size=cfg["top_size"]):
        z = vae.encode(img.tensor()).mean
        n = z[0].norm(dim=0)
        site = select_sites("top:1", z.shape[-2:], norm=n)
        df = attribute_pathways(vae, z, site, "zero", radius=cfg["radius"], batch=1).table
        rows.append({"image": img.name, "row": site[0].row, "col": site[0].col,
                     "norm_ratio": float(n.max() / n.median()), "far_fraction": float(df.far_fraction_live[0]),
                     "share_groupnorm": float(df.share_groupnorm[0]),
                     "kept": float(df.far_l2_groupnorm_frozen[0] / df.far_l2_live[0])})
    return {"per_image": rows, "share_groupnorm": stats([r["share_groupnorm"] for r in rows]),
            "kept": stats([r["kept"] for r in rows]), "far_fraction": stats([r["far_fraction"] for r in rows])}


def wiring(vae, cfg: dict) -> dict:
    """Mean PSNR with the pool branch added to the block input (the shipped wiring), after the convolutions, into
    the convolutions only, or left out."""
    from vaeprobe.models.taesd import Block

    variants = {
        "input (shipped)": None,
        "after the convolutions": lambda b, x: b.fuse(b.conv(x) + b.skip(x) + b.pool(x)),
        "convolutions only": lambda b, x: b.fuse(b.conv(x + b.pool(x)) + b.skip(x)),
        "left out": lambda b, x: b.fuse(b.conv(x) + b.skip(x)),
    }
    imgs = load_images(cfg["wiring_images"], factor=vae.factor, size=128)[:cfg["wiring_n_images"]]
    shipped, out = Block.forward, {}
    try:
        for name, fn in variants.items():
            Block.forward = shipped if fn is None else (lambda b, x, fn=fn: fn(b, x) if b.pool is not None
                                                        else shipped(b, x))
            out[name] = float(np.mean([compare_images(i.array, tensor_to_unit(vae.reconstruct(i.tensor())))["psnr"]
                                       for i in imgs]))
    finally:
        Block.forward = shipped
    return {"images": [i.name for i in imgs], "mean_psnr_128": out}


SECTIONS = ("reconstruction", "norm_ratio", "spread", "top_cells", "wiring")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("--out", default=None, help="results file (default experiments/results/<config name>.json)")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="sections to (re)compute")
    args = ap.parse_args()
    cfg = json.loads(Path(args.config).read_text())
    out = Path(args.out) if args.out else RESULTS / f"{Path(args.config).stem}.json"
    torch.manual_seed(0)
    t0 = time.time()
    vae = load_vae(cfg["vae"])
    res = json.loads(out.read_text()) if out.exists() and set(args.only) != set(SECTIONS) else {}
    res.update({"config": cfg, "vae": vae.info()})
    res.pop("command", None)
    if "reconstruction" in args.only:
        res["reconstruction"] = {str(s): reconstruction(vae, cfg["recon_images"], s) for s in cfg["recon_sizes"]}
    if "norm_ratio" in args.only:
        res["norm_ratio"] = {str(s): norm_ratios(vae, cfg["recon_images"], s) for s in cfg["recon_sizes"]}
    if "spread" in args.only:
        res["spread"] = spread(vae, cfg)
    if "top_cells" in args.only:
        res["top_cells"] = top_cells(vae, cfg)
    if "wiring" in args.only and type(vae.model).__name__ == "TAESD" and vae.model.config["pool"]:
        res["wiring"] = wiring(vae, cfg)
    seconds = round(time.time() - t0, 1)
    res.setdefault("runs", []).append({"command": " ".join(["python", *sys.argv]), "sections": args.only,
                                       "seconds": seconds})
    write_text_atomic(out, json.dumps(res, indent=1))
    print(f"wrote {out} in {seconds} s")


if __name__ == "__main__":
    main()
