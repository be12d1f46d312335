"""Where the mini VAE's corner blob comes from, measured with vaeprobe's own diagnostics.

    python experiments/corner_blob.py --vae builtin:mini-kl-f8 --out experiments/results/corner_blob.json

For each test image (the held-out builtin photos, uniform greys and synthetic colour fields) at ``--size`` px:

1. **Where the error is**: the latent cell (8x8 pixel block) with the largest mean absolute reconstruction error,
   and how often it is the same cell.
2. **Encoder or decoder**: the same for a spatially constant latent (each channel's median over the image), whose
   decode can only show a blob the decoder makes itself; and for the latent flipped left-right (a blob that stays
   put is anchored to the border, not to the content).
3. **A GroupNorm droplet?** :func:`vaeprobe.groupnorm_droplets`: per decoder GroupNorm, the strongest group's
   share of the variance coming from one position, and where that position is.
4. **Does the decoder read it globally?** Decode with every GroupNorm's statistics computed *without* the blob's
   latent cell (its pixels masked out of the mean and variance): the change beyond ``--radius`` cells of the blob
   is what the droplet does to the rest of the image through the normalisation statistics.
5. **Does vaeprobe's latent spot detector see it?** The latent norm ratio of the blob's cell.
6. **Does a perturbation scan see it?** Zeroing the latent at the blob's cell against zeroing each cell of a
   ``--grid`` grid: its far-field energy over the grid's median, and its global-effect ratio in that sample.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from vaeprobe import exact_scan, groupnorm_droplets, load_images, load_vae, select_sites  # noqa: E402
from vaeprobe._io import write_text_atomic# noqa: E402
from vaeprobe.probes.mechanism import droplet_layers# noqa: E402


def worst_cell(err: torch.Tensor, factor: int) -> tuple[tuple[int, int], float, float]:
    """The cell with the largest mean of ``err`` ``[H, W]``, that mean, and the median cell's."""
    h, w = err.shape[0] // factor, err.shape[1] // factor
    cells = err.reshape(h, factor, w, factor).mean((1, 3))
    r, c = divmod(int(cells.argmax()), w)
    return (r, c), float(cells.max()), float(cells.median())


def decode_without_cell(vae, z: torch.Tensor, cell: tuple[int, int], h: int, w: int) -> torch.Tensor:
    """Decode with every GroupNorm's mean and variance taken over all positions but those of latent ``cell``."""

    def hook(mod: nn.GroupNorm, args, out):
        x = args[0]
        if x.dim() != 4:
            return None
        fh, fw = x.shape[-2] // h, x.shape[-1] // w
        keep = torch.ones(x.shape[-2:], dtype=torch.bool, device=x.device)
        keep[cell[0] * fh:(cell[0] + 1) * fh, cell[1] * fw:(cell[1] + 1) * fw] = False
        g = x.reshape(x.shape[0], mod.num_groups, -1, *x.shape[-2:])
        sel = g[..., keep]
        mean = sel.mean((-1, -2), keepdim=True)
        var = sel.var((-1, -2), unbiased=False, keepdim=True)
        y = ((g - mean[..., None]) / torch.sqrt(var[..., None] + mod.eps)).reshape(x.shape)
        return y * mod.weight[None, :, None, None] + mod.bias[None, :, None, None]

    handles = [m.register_forward_hook(hook) for m in vae.model.decoder.modules() if isinstance(m, nn.GroupNorm)]
    try:
        return vae.decode(z)
    finally:
        for hd in handles:
            hd.remove()


def test_images(size: int) -> list[tuple[str, np.ndarray]]:
    from train_mini_vae import colour_field

    rng = np.random.default_rng(1)
    imgs = [(f"grey {v}", np.full((size, size, 3), v, np.float32)) for v in (0.2, 0.5, 0.8)]
    imgs += [(f"colour field {k}", colour_field(rng, size)) for k in range(3)]
    imgs += [(i.name, i.array) for i in load_images("builtin:photos-heldout", size=size)]
    return imgs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vae", default="builtin:mini-kl-f8")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--radius", type=int, default=3)
    ap.add_argument("--grid", type=int, default=8, help="grid step of the comparison cells in step 6")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    vae = load_vae(args.vae)
    f = vae.factor
    rows = []
    for name, arr in test_images(args.size):
        x = torch.from_numpy(arr).permute(2, 0, 1)[None] * 2 - 1
        z = vae.encode(x).mean
        h, w = z.shape[-2:]
        cell, worst, med = worst_cell((vae.decode(z) - x).abs().mean(1)[0], f)
        const = z.flatten(2).median(-1).values[..., None, None].expand_as(z).contiguous()
        rc = vae.decode(const)[0]
        c_cell, c_worst, c_med = worst_cell((rc - rc.mean((1, 2), keepdim=True)).abs().mean(0), f)
        flip_cell = worst_cell((vae.decode(z.flip(-1)) - x.flip(-1)).abs().mean(1)[0], f)[0]
        drops = droplet_layers(groupnorm_droplets(vae, z))
        at_cell = drops[(drops.lat_row == cell[0]) & (drops.lat_col == cell[1])]
        ref = vae.decode(z)
        masked = decode_without_cell(vae, z, cell, h, w)
        rr, cc = torch.arange(h * f) // f, torch.arange(w * f) // f
        far = ((rr[:, None] - cell[0]).abs() > args.radius) | ((cc[None, :] - cell[1]).abs() > args.radius)
        diff = (masked - ref)[0].pow(2).mean(0)
        norm = z[0].norm(dim=0)
        sites = select_sites([cell], (h, w)) + select_sites(f"grid:{args.grid}", (h, w))
        scan = exact_scan(vae, z, sites, "zero", radius=args.radius, batch=4, ref=ref, measures=("far_l2",)).table
        grid_med = float(scan.far_l2.iloc[1:].median())
        rows.append({
            "image": name, "worst_cell": list(cell), "worst_cell_error": worst, "median_cell_error": med,
            "constant_latent_worst_cell": list(c_cell), "constant_latent_worst_over_median": c_worst / max(c_med, 1e-8),
            "flipped_latent_worst_cell": list(flip_cell),
            "droplet_layers_at_worst_cell": int(len(at_cell)), "droplet_layers": int(len(drops)),
            "max_droplet_share_at_worst_cell": float(at_cell.max_share.max()) if len(at_cell) else 0.0,
            "first_droplet_layer_at_worst_cell": str(at_cell.layer.iloc[0]) if len(at_cell) else None,
            "stats_without_cell_far_rms": float(diff[far].mean().sqrt()),
            "stats_without_cell_far_max_abs": float((masked - ref)[0].abs().amax(0)[far].max()),
            "latent_norm_ratio_at_cell": float(norm[cell] / norm.median()),
            "latent_norm_ratio_max": float(norm.max() / norm.median()),
            "zeroing_far_over_grid_median": float(scan.far_l2.iloc[0]) / grid_med,
            "grid_max_over_median": float(scan.far_l2.iloc[1:].max()) / grid_med})
        print(json.dumps({k: rows[-1][k] for k in ("image", "worst_cell", "constant_latent_worst_cell",
                                                   "flipped_latent_worst_cell", "droplet_layers_at_worst_cell",
                                                   "stats_without_cell_far_rms", "latent_norm_ratio_at_cell",
                                                   "zeroing_far_over_grid_median")}))
    counts = Counter(tuple(r["worst_cell"]) for r in rows)
    summary = {"vae": args.vae, "size": args.size, "radius": args.radius, "n_images": len(rows),
               "most_common_worst_cell": list(counts.most_common(1)[0][0]),
               "images_with_that_cell": counts.most_common(1)[0][1], "images": rows,
               "command": " ".join(["python", *sys.argv])}
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / "corner_blob.json"
    write_text_atomic(out, json.dumps(summary, indent=1))
    print(f"worst cell {summary['most_common_worst_cell']} on {summary['images_with_that_cell']}/{len(rows)} "
          f"images; wrote {out}")


if __name__ == "__main__":
    main()
