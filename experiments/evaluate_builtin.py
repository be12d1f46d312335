"""Evaluate the builtin models on the held-out builtin photos and write the model card's numbers.

    python experiments/evaluate_builtin.py            # writes vaeprobe/builtin/mini-kl-f8/eval.json and MODEL_CARD.md

Reconstruction (posterior mean) at 256 px against a bicubic down-by-8-and-up baseline; the spot report of the
clean model (norm ratio, clamp hits, far-field effect of zeroing cells, with an exact scan of every cell at
128 px); each planted control's reconstruction and zeroing test at its declared spot.
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

from vaeprobe import load_images, load_vae  # noqa: E402
from vaeprobe._io import write_text_atomic  # noqa: E402
from vaeprobe.controls import CONTROLS  # noqa: E402
from vaeprobe.metrics import compare_images  # noqa: E402
from vaeprobe.spotcheck import zeroed_far_field, zeroing_test  # noqa: E402

CARD_DIR = Path(__file__).resolve().parents[1] / "vaeprobe" / "builtin" / "mini-kl-f8"
HELDOUT = "builtin:photos-heldout"
RECON_SIZE = 256
SPOT_SIZE = 128


def to_np(t: torch.Tensor) -> np.ndarray:
    return ((t.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()


def bicubic(arr: np.ndarray, factor: int = 8) -> np.ndarray:
    img = Image.fromarray((arr * 255 + 0.5).astype(np.uint8))
    w, h = img.size
    small = img.resize((w // factor, h // factor), Image.Resampling.BICUBIC)
    return np.asarray(small.resize((w, h), Image.Resampling.BICUBIC), np.float32) / 255.0


def reconstruction(vae, size: int = RECON_SIZE) -> dict:
    rows = {}
    for img in load_images(HELDOUT, factor=vae.factor, size=size):
        rec = to_np(vae.reconstruct(img.tensor())[0])
        rows[img.name] = compare_images(img.array, rec)
    return rows


def baseline(size: int = RECON_SIZE) -> dict:
    return {img.name: compare_images(img.array, bicubic(img.array)) for img in load_images(HELDOUT, size=size)}


def spot_report(vae, full_scan: bool) -> dict:
    """Per held-out image at 128 px: norm ratio, clamp hits, zeroing test at the strongest-norm cell, and
    (full_scan) the largest far-field energy over every cell against 20 random cells."""
    out = {}
    for img in load_images(HELDOUT, factor=vae.factor, size=SPOT_SIZE):
        x = img.tensor()
        post = vae.encode(x)
        norm = post.mean[0].norm(dim=0)
        flat = int(norm.argmax())
        r, c = divmod(flat, norm.shape[1])
        res = zeroing_test(vae, x, r, c, z=post.mean)
        entry = {"norm_ratio": float(norm.max() / norm.median()),
                 "clamp_hits": int(post.at_clamp_floor()[0].any(0).sum()),
                 "strongest": [r, c], "strongest_far_vs_median": res.ratio_to_median,
                 "strongest_passes_10x": res.ratio >= 10}
        if full_scan:
            cells = [(i, j) for i in range(norm.shape[0]) for j in range(norm.shape[1])]
            energies = zeroed_far_field(vae, post.mean, cells)
            best = int(np.argmax(energies))
            ratio = zeroing_test(vae, x, *cells[best], z=post.mean).ratio
            entry.update(max_far_cell=list(cells[best]), max_far_vs_random_max=ratio,
                         any_cell_passes_10x=bool(ratio >= 10))
        out[img.name] = entry
        print(f"  {img.name}: {json.dumps(entry)}", flush=True)
    return out


def control_report(name: str) -> dict:
    vae = load_vae(f"builtin:{name}")
    recon = reconstruction(vae)
    tests = {}
    for img in load_images(HELDOUT, factor=vae.factor, size=SPOT_SIZE):
        x = img.tensor()
        gt = vae.ground_truth(x)[0]
        res = zeroing_test(vae, x, gt["row"], gt["col"])
        tests[img.name] = {"spot": [gt["row"], gt["col"]], "ratio": res.ratio, "passes_10x": res.ratio >= 10}
    return {"mechanism": vae.ground_truth(torch.zeros(1, 3, 64, 64))[0]["mechanism"], "reconstruction": recon,
            "zeroing": tests}


def mean_std(rows: dict, key: str) -> str:
    v = np.array([r[key] for r in rows.values()])
    return f"{v.mean():.4f} +- {v.std():.4f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-full-scan", action="store_true", help="skip the every-cell scan of the clean model")
    ap.add_argument("--out", default=str(CARD_DIR))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.time()
    vae = load_vae("builtin:mini-kl-f8")
    result = {"heldout": HELDOUT, "recon_size": RECON_SIZE, "spot_size": SPOT_SIZE,
              "mini": reconstruction(vae), "bicubic": baseline()}
    print("reconstruction done", flush=True)
    result["spot"] = spot_report(vae, full_scan=not args.no_full_scan)
    result["controls"] = {}
    for name in CONTROLS:
        result["controls"][name] = control_report(name)
        print(f"control {name} done", flush=True)
    result["seconds"] = round(time.time() - t0, 1)
    out = Path(args.out)
    write_text_atomic(out / "eval.json", json.dumps(result, indent=1))
    write_text_atomic(out / "MODEL_CARD.md", render_card(result, out))
    print(f"wrote {out / 'eval.json'} and MODEL_CARD.md in {result['seconds']} s")
    return 0


BLOB_SECTION = [
    "## A real, unplanted finding: a decoder-made droplet at the bottom-left corner", "",
    "The faithful-mini issue reports a small bright blob near the bottom-left corner of every reconstruction. `experiments/corner_blob.py` "
    "(results for these weights: `experiments/results/corner_blob_mini_step3691.json`) finds that it is a "
    "GroupNorm droplet that the *decoder* writes at its border: the worst-reconstructed 8x8 cell is the corner "
    "cell (31, 0) on 11 of 13 test images at 256 px (greys, synthetic colour fields, held-out photos), also when the "
    "latent is spatially constant (13/13) or flipped left-right (10/13), so it is anchored to the border, not to "
    "the content or the encoder. In 15-24 of the decoder's 30 GroupNorm layers the position that dominates a "
    "group's variance sits in that cell (up to 61 % of a group's variance from one position). The decoder reads it "
    "globally: leaving only that cell's pixels out of the GroupNorm statistics changes the image beyond 3 cells by "
    "an RMS of 0.09-0.58 (in [-1, 1]) on those 11 images. vaeprobe's latent spot detector does not see it (the "
    "latent norm ratio at the cell is 0.6-6.1, an ordinary cell), but `vaeprobe mechanism`'s GroupNorm droplet "
    "table (`groupnorm.parquet`) locates it, and a perturbation scan feels it: on the 6 held-out photos whose worst cell is the corner, zeroing "
    "the latent at the corner cell moves the image beyond 3 cells 9-1856x more than the median of 16 cells on a "
    "grid (every 8th cell; rocket: 1856x, beyond the global-effect threshold of 1000), because disturbing the "
    "corner's latent disturbs the droplet. So the clean model has a 'global' cell that is neither a large latent "
    "nor an encoder artefact. Details: `docs/mini-corner-blob.md`.",
]


def render_card(r: dict, folder: Path) -> str:
    training = json.loads((folder / "training.json").read_text()) if (folder / "training.json").exists() else {}
    cfg = training.get("config", {})
    lines = ["# builtin:mini-kl-f8 — model card", "",
             "A diffusers `AutoencoderKL` with Stable Diffusion's layout (four resolution levels, factor 8, 4 latent",
             "channels, GroupNorm, self-attention in the encoder and decoder mid-blocks) at reduced width, trained",
             "on CPU by `experiments/train_mini_vae.py`. Weights: `diffusion_pytorch_model.safetensors` (fp16).", "",
             "## Training", "",
             f"- config: `experiments/configs/mini_kl_f8.json` (model {json.dumps(cfg.get('model', {}).get('block_out_channels'))}"
             f" widths, layers_per_block {cfg.get('model', {}).get('layers_per_block')})",
             f"- data: `builtin:photos-train` (scikit-image) + the 12 nature photos of Debian's `mate-backgrounds`;"
             f" random {cfg.get('data', {}).get('crop')} px crops at random scales, horizontal flips",
             f"- loss: L1 + LPIPS (summed over pixels, LDM convention) + {cfg.get('train', {}).get('kl_weight')} x KL;"
             f" Adam lr {cfg.get('train', {}).get('lr')}, batch {cfg.get('train', {}).get('batch_size')},"
             f" bf16 autocast on CPU, seed {cfg.get('seed')}",
             f"- steps: {training.get('steps')}; wall time: {training.get('wall_minutes')} min on 2 CPU cores",
             f"- final logged losses: `{json.dumps(training.get('final_log', [])[-1:])}`", "",
             "Retrain (the same command; `--smoke` runs 3 steps):", "", "```bash",
             "apt-get download mate-backgrounds && dpkg-deb -x mate-backgrounds_*.deb /tmp/mate",
             "python experiments/train_mini_vae.py --config experiments/configs/mini_kl_f8.json "
             "--out runs/train-mini-kl-f8 --export vaeprobe/builtin/mini-kl-f8",
             "python experiments/evaluate_builtin.py", "```", "",
             f"## Reconstruction on held-out images ({r['heldout']}, {r['recon_size']} px, posterior mean)", "",
             "| model | PSNR | SSIM | LPIPS |", "|---|---|---|---|",
             f"| mini-kl-f8 | {mean_std(r['mini'], 'psnr')} | {mean_std(r['mini'], 'ssim')} | {mean_std(r['mini'], 'lpips')} |",
             f"| bicubic down-8-up | {mean_std(r['bicubic'], 'psnr')} | {mean_std(r['bicubic'], 'ssim')} | "
             f"{mean_std(r['bicubic'], 'lpips')} |"]
    for name, c in r["controls"].items():
        rec = c["reconstruction"]
        lines.append(f"| {name} | {mean_std(rec, 'psnr')} | {mean_std(rec, 'ssim')} | {mean_std(rec, 'lpips')} |")
    lines += ["", f"Per image: `eval.json`. SSIM is scikit-image's on RGB.", "",
              f"## Did an SD-like spot emerge? ({r['spot_size']} px, held-out images)", "",
              "| image | max/median norm | cells at logvar clamp | strongest cell | its far-field effect / median "
              "random cell | every-cell scan: max far-field / max of 20 random |", "|---|---|---|---|---|---|"]
    for name, s in r["spot"].items():
        lines.append(f"| {name} | {s['norm_ratio']:.2f} | {s['clamp_hits']} | {tuple(s['strongest'])} | "
                     f"{s['strongest_far_vs_median']:.2f} | {s.get('max_far_vs_random_max', float('nan')):.2f} |")
    n_pass = sum(s.get("any_cell_passes_10x", False) for s in r["spot"].values())
    lines += ["", f"Zeroing test (a cell whose zeroing moves pixels more than 3 cells away >= 10x more than any of "
              f"20 random cells): some cell passes on {n_pass} of {len(r['spot'])} held-out images.", "",
              *BLOB_SECTION, "",
              "## Planted-spot controls (`vaeprobe/controls.py`)", "",
              "| control | mechanism | zeroing test passed at the declared spot |", "|---|---|---|"]
    for name, c in r["controls"].items():
        z = c["zeroing"]
        ok = sum(v["passes_10x"] for v in z.values())
        worst = min(v["ratio"] for v in z.values())
        lines.append(f"| {name} | {c['mechanism']} | {ok}/{len(z)} (lowest ratio {worst:.1f}) |")
    lines += ["", f"Evaluation took {r['seconds']} s (`python experiments/evaluate_builtin.py`).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
