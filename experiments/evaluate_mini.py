"""The faithful-mini model card's numbers for any weights: held-out sources, colour fidelity, latents, the droplet.

    python experiments/evaluate_mini.py --vae runs/train-colour/export --log runs/train-colour/log.json \\
        --out experiments/results/mini_colour --compare builtin:mini-kl-f8

For each VAE (``--vae`` and every ``--compare``) and each held-out source (the builtin held-out photos and the
``heldout`` split of the Debian wallpaper set, which holds whole packages the training never saw) at 128 and
256 px: PSNR, SSIM, LPIPS (mean ± std), the mean absolute error of the per-channel image means in [-1, 1] (colour
fidelity), the largest latent norm over the median per image and the spot rate of vaeprobe's detector; and, at
256 px, on how many images the decoder's strongest GroupNorm droplet sits in the bottom-left latent cell (the
corner blob of ``docs/mini-corner-blob.md``). Writes ``results.json``, ``colour_error.png`` (one bar per channel,
source and VAE) and, with ``--log``, ``training_curve.png`` (L1 and LPIPS over the steps of the training log).
The ``reserved-eval`` split is never read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from evaluate_taef2 import reconstruction  # noqa: E402
from vaeprobe import find_spots, groupnorm_droplets, latent_maps, load_images, load_vae  # noqa: E402
from vaeprobe._io import cache_dir, write_text_atomic# noqa: E402
from vaeprobe.probes.mechanism import droplet_layers# noqa: E402
from vaeprobe.reports.plots import save_bars, save_lines# noqa: E402

SIZES = (128, 256)


def sources(wallpapers: Path) -> dict[str, str]:
    out = {"photos-heldout": "builtin:photos-heldout"}
    if (wallpapers / "heldout").is_dir():
        out["wallpapers-heldout"] = str(wallpapers / "heldout" / "*" / "*.png")
    else:
        print(f"note: {wallpapers}/heldout missing (run experiments/fetch_wallpapers.py); photos only",
              file=sys.stderr)
    return out


def latents_and_droplet(vae, images: str, size: int, droplet: bool) -> dict:
    ratios, spots, corner, means, clamp = [], 0, 0, [], 0
    raw_min = float("inf")
    imgs = load_images(images, factor=vae.factor, size=size)
    for img in imgs:
        post = vae.encode(img.tensor())
        means.append(post.mean[0].flatten(1).float())
        if post.raw_logvar is not None:
            raw_min = min(raw_min, float(post.raw_logvar.min()))
            clamp += int(post.at_clamp_floor()[0].any(0).sum())
        m = latent_maps(post, names=[img.name])[0]
        ratios.append(float(m.norm_ratio.max()))
        spots += bool(find_spots(m).is_spot.any())
        if droplet:
            d = droplet_layers(groupnorm_droplets(vae, post.mean))
            if len(d) == 0:  # no GroupNorm in this decoder (e.g. taef2)
                droplet = False
                continue
            top = d.loc[d.max_share.idxmax()]
            corner += int(top.lat_row) == post.mean.shape[-2] - 1 and int(top.lat_col) == 0
    out = {"n": len(imgs), "spot_rate": spots / max(len(imgs), 1), "norm_ratio_median": float(np.median(ratios)),
           "norm_ratio_max": float(np.max(ratios))}
    allz = torch.cat(means, dim=1)  # [C, positions of all images]
    out.update(channel_mean=allz.mean(1).tolist(), channel_std=allz.std(1).tolist(), std_all=float(allz.std()),
               scaling_factor_1_over_std=float(1 / allz.std()),
               raw_logvar_min=None if raw_min == float("inf") else raw_min,
               cells_at_logvar_clamp=clamp)
    out["strongest_droplet_in_corner_cell"] = corner if droplet else None
    return out


def running_mean(values, width: int) -> np.ndarray:
    """Centred running mean over ``width`` entries; at the ends, over the entries that exist (no zero padding)."""
    v = np.asarray(values, float)
    k = np.ones(max(1, min(width, len(v))))  # a stage with fewer logged steps than width (stage 1 kept only 5)
    return np.convolve(v, k, "same") / np.convolve(np.ones_like(v), k, "same")


def training_stages(path: Path) -> list[dict]:
    """The training log of a run, oldest stage first: ``path`` is a ``log.json`` (one stage) or an exported
    ``training.json``, whose ``init_from_training`` chain gives the earlier stages."""
    data = json.loads(path.read_text())
    if isinstance(data, list):
        return [{"steps": data[-1]["step"], "minutes": data[-1]["minutes"], "log": data, "logged": len(data),
                 "last": data[-1]}]
    stages = []
    while data:
        log = data.get("log") or data.get("final_log", [])
        stages.append({"steps": data["steps"], "minutes": data["wall_minutes"], "log": log, "logged": len(log),
                       "last": log[-1] if log else None})
        data = data.get("init_from_training")
    return stages[::-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vae", required=True)
    ap.add_argument("--compare", action="append", default=[], help="other VAEs evaluated the same way")
    ap.add_argument("--log", help="the training run's log.json, or an exported training.json (with the stages it "
                                  "continued), for the training curve")
    ap.add_argument("--wallpapers", default=None, help="the set of fetch_wallpapers.py (default: the cache)")
    ap.add_argument("--out", required=True, help="folder for results.json and the figures")
    args = ap.parse_args()
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    srcs = sources(Path(args.wallpapers) if args.wallpapers else cache_dir() / "wallpapers")
    res = {"command": " ".join(["python", *sys.argv]), "sources": srcs, "models": {}}
    for spec in [args.vae, *args.compare]:
        vae = load_vae(spec)
        res["models"][spec] = {name: {str(s): {"reconstruction": reconstruction(vae, images, s),
                                               "latents": latents_and_droplet(vae, images, s, droplet=s == 256)}
                                      for s in SIZES} for name, images in srcs.items()}
        print(spec, json.dumps({n: {s: round(v[s]["reconstruction"]["psnr"]["mean"], 2) for s in v}
                                for n, v in res["models"][spec].items()}))
    labels, series = [], {}
    for spec, per_src in res["models"].items():
        for name, per_size in per_src.items():
            labels.append(f"{spec.split('/')[-1]}\n{name} 256")
            for ch, v in zip("RGB", per_size["256"]["reconstruction"]["mean_abs_colour_error_rgb"]):
                series.setdefault(ch, []).append(v)
    save_bars(out / "colour_error.png", labels, series, "mean |colour error| of the image means, [-1, 1], 256 px")
    if args.log:
        stages = training_stages(Path(args.log))
        steps, l1, lp, marks, offset = [], [], [], {}, 0
        smooth = max(1, sum(len(st["log"]) for st in stages) // 40)  # single batches of 4 crops are noisy
        for i, st in enumerate(stages):
            marks[f"stage {i + 1}"] = offset
            steps += [offset + e["step"] for e in st["log"]]
            l1 += list(running_mean([e["l1"] for e in st["log"]], smooth))  # within a stage only
            lp += list(running_mean([e["lpips"] for e in st["log"]], smooth))
            offset += st["steps"]
        save_lines(out / "training_curve.png", {"L1": l1, "LPIPS": lp},
                   f"training loss per pixel (running mean of {smooth} logged steps)", xlabel="step", x=steps,
                   marks=marks)
        res["training"] = {"stages": [{k: st[k] for k in ("steps", "minutes", "logged", "last")} for st in stages],
                           "steps": offset, "minutes": round(sum(st["minutes"] for st in stages), 1)}
    write_text_atomic(out / "results.json", json.dumps(res, indent=1))
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
