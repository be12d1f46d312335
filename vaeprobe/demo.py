"""``vaeprobe demo``: the main job end to end on builtin models and held-out builtin photos.

It grows with the toolkit; today: load the VAE, encode the held-out photos, measure reconstruction (PSNR, SSIM,
LPIPS) and the encoder-side spot signal (max/median latent norm, positions at the log-variance clamp), and write
a run directory with a parquet table and a JSON summary.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import pandas as pd
import torch

from ._io import atomic_path, write_text_atomic


def run_demo(out: str | Path = "runs/demo", vae_spec: str = "builtin:mini-kl-f8", size: int = 128,
             images: str = "builtin:photos-heldout") -> Path:
    from .images import load_images
    from .metrics import compare_images
    from .vae import load_vae

    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vae = load_vae(vae_spec)
    batch = load_images(images, factor=vae.factor, size=size)
    rows = []
    for img in batch:
        x = img.tensor()
        post = vae.encode(x)
        rec = vae.decode(post.mean)
        rec_np = ((rec[0].clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
        norms = post.mean[0].norm(dim=0)
        flat = int(torch.argmax(norms))
        rows.append({
            "image": img.name, **compare_images(img.array, rec_np),
            "norm_ratio": float(norms.max() / norms.median()),
            "max_norm_row": flat // norms.shape[1], "max_norm_col": flat % norms.shape[1],
            "clamp_hits": int(post.at_clamp_floor()[0].any(dim=0).sum()),
        })
        print(f"  {img.name:20s} PSNR {rows[-1]['psnr']:6.2f}  LPIPS {rows[-1]['lpips']:.4f}  "
              f"norm ratio {rows[-1]['norm_ratio']:.2f}")
    table = pd.DataFrame(rows)
    with atomic_path(out / "reconstruction.parquet") as tmp:
        table.to_parquet(tmp, index=False)
    summary = {
        "vae": vae.info(), "images": images, "size": size, "n_images": len(batch),
        "skipped": [str(s) for s in batch.skipped],
        "mean": {k: float(table[k].mean()) for k in ("psnr", "ssim", "lpips", "norm_ratio")} if rows else {},
        "seconds": round(time.time() - t0, 2), "python": platform.python_version(), "torch": torch.__version__,
    }
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1))
    return out
