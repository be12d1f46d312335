"""Decoder-only fine-tune of ``builtin:mini-kl-f8`` with the ft-MSE recipe (MSE + 0.1 LPIPS, encoder frozen).

    python experiments/finetune_decoder.py [--steps 400] [--export vaeprobe/models/builtin/mini-kl-f8-ft-mse]

Stability's sd-vae-ft-mse fine-tuned only the decoder of SD's VAE, on a loss of MSE + 0.1 x LPIPS, so its latent
space is the original one: a drop-in replacement. This script does the same to the project's mini VAE: the
encoder and ``quant_conv`` stay frozen (their weights are byte-identical afterwards), the decoder and
``post_quant_conv`` train on random 128 px crops of the builtin training photos and the training split of the Debian
wallpaper set (the same sampler as the mini VAE's training, seeded; ``--wallpapers none`` for photos only). The exported folder is ``builtin:mini-kl-f8-ft-mse``, the replacement-VAE example of
``vaeprobe compare``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_mini_vae import load_pool, sample_batch  # noqa: E402

from vaeprobe._io import write_text_atomic# noqa: E402
from vaeprobe.probes.metrics import LPIPS# noqa: E402
from vaeprobe.models.loading import load_vae# noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--lpips-weight", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base", default="builtin:mini-kl-f8", help="the VAE whose decoder is fine-tuned")
    ap.add_argument("--wallpapers", default="train",
                    help="also train on this split of experiments/fetch_wallpapers.py's set ('none': photos only)")
    ap.add_argument("--export", default=None, help="write the fine-tuned model here (diffusers folder, fp16)")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = load_vae(args.base).model.float()
    for p in list(model.encoder.parameters()) + list(model.quant_conv.parameters()):
        p.requires_grad_(False)
    params = list(model.decoder.parameters()) + list(model.post_quant_conv.parameters())
    opt = torch.optim.Adam(params, lr=args.lr, betas=(0.9, 0.99))
    lpips = LPIPS()
    data = {"base_short_side": 512}
    if args.wallpapers != "none":
        data["wallpapers"] = {"split": args.wallpapers}
    pool = load_pool({"data": data}, smoke=False)
    log = []
    t0 = time.time()
    model.train()
    for step in range(1, args.steps + 1):
        x = sample_batch(pool, rng, args.batch, args.crop, min_scale=0.35)
        with torch.no_grad():
            z = model.encode(x).latent_dist.sample()        # as ft-MSE: decode posterior samples
        rec = model.decode(z).sample
        mse = (rec - x).pow(2).mean()
        p = lpips(rec, x).mean()
        loss = mse + args.lpips_weight * p
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == 1:
            log.append({"step": step, "mse": mse.item(), "lpips": p.item(), "seconds": round(time.time() - t0, 1)})
            print(json.dumps(log[-1]), flush=True)
    model.eval()
    if args.export:
        out = Path(args.export)
        model.half().save_pretrained(out, safe_serialization=True)
        write_text_atomic(out / "training.json", json.dumps({
            "recipe": f"decoder-only fine-tune of {args.base} (encoder and quant_conv frozen)",
            "loss": f"MSE + {args.lpips_weight} * LPIPS", "steps": args.steps, "batch": args.batch,
            "crop": args.crop, "lr": args.lr, "seed": args.seed,
            "data": "builtin:photos-train" + ("" if args.wallpapers == "none" else f" + wallpapers {args.wallpapers} split")
                    + ", random crops",
            "seconds": round(time.time() - t0, 1), "log": log,
            "command": "python experiments/finetune_decoder.py " + " ".join(argv or sys.argv[1:])}, indent=1))
        card = evaluate(out)
        write_text_atomic(out / "MODEL_CARD.md", card)
        print(f"exported {out}")
    return 0


def evaluate(folder: Path) -> str:
    """Held-out reconstruction of the base and the fine-tune at 128 px; returns the model card text."""
    from vaeprobe.data.images import load_images
    from vaeprobe.probes.metrics import compare_images
    from vaeprobe.reports.plots import tensor_to_unit
    from vaeprobe.models.loading import load_vae

    images = load_images("builtin:photos-heldout", size=128)
    rows = {}
    for spec in ("builtin:mini-kl-f8", str(folder)):
        vae = load_vae(spec)
        vals = [compare_images(img.array, tensor_to_unit(vae.reconstruct(img.tensor()))) for img in images]
        rows[spec] = {k: (float(np.mean([v[k] for v in vals])), float(np.std([v[k] for v in vals])))
                      for k in ("psnr", "ssim", "lpips")}
    write_text_atomic(folder / "eval.json", json.dumps({"images": "builtin:photos-heldout", "size": 128,
                                                        "metrics": rows}, indent=1))
    table = "\n".join(f"| {name} | {m['psnr'][0]:.2f} ± {m['psnr'][1]:.2f} | {m['ssim'][0]:.3f} ± {m['ssim'][1]:.3f} "
                      f"| {m['lpips'][0]:.3f} ± {m['lpips'][1]:.3f} |"
                      for name, m in zip(("mini-kl-f8 (base)", "mini-kl-f8-ft-mse"), rows.values()))
    return f"""# builtin:mini-kl-f8-ft-mse

A decoder-only fine-tune of `builtin:mini-kl-f8`, made by `experiments/finetune_decoder.py` (settings and loss log
in `training.json`). The encoder and `quant_conv` are frozen, so the latent space is the base model's: a drop-in
decoder replacement, as Stability's sd-vae-ft-mse is for SD's VAE. Loss: MSE + 0.1 LPIPS on posterior samples of
random 128 px crops of the builtin training photos and the training split of the Debian wallpaper set
(`experiments/fetch_wallpapers.py`). It exists to exercise `vaeprobe compare`; it is not a good VAE.

Held-out reconstruction (7 builtin held-out photos, 128 px, posterior mean; `eval.json`). The base model's
card has its numbers on more held-out sources and sizes.

| model | PSNR (dB) | SSIM | LPIPS |
|---|---|---|---|
{table}
"""


if __name__ == "__main__":
    raise SystemExit(main())
