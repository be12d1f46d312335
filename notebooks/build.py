"""Write the notebooks from their cells below and execute them, so the committed outputs come from this code.

    python notebooks/build.py              # all notebooks
    python notebooks/build.py quickstart   # one

Each notebook runs offline on the builtin models at 64 px (a minute or two on 2 CPU cores). Printed outputs
avoid temporary paths and timings, so a re-execution prints the same text up to float rounding;
``tests/test_notebooks.py`` re-executes every notebook and compares its text outputs with the committed ones
(numbers masked).
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
TIMEOUT = 600  # seconds per cell

SETUP = """\
import json, tempfile, warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="IProgress not found")   # tqdm in a kernel without ipywidgets

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

import vaeprobe

pd.set_option("display.width", 120, "display.precision", 3, "display.max_columns", 12)
out = Path(tempfile.mkdtemp(prefix="vaeprobe-notebook-"))
SIZE = 64   # pixels: an 8x8 latent, so the notebook runs in a minute or two on a CPU; use 256-512 on a GPU
"""

QUICKSTART = [
    ("md", """\
# vaeprobe quickstart

The whole flow on one model: load a VAE, find latent outliers, zero every latent cell and measure how far the
change spreads (with a verdict per cell), attribute the far effect to the decoder's pathways, write a report.

It runs offline on `builtin:planted-groupnorm`, a control built on the project's mini KL-f8 VAE whose encoder
writes a huge spike at the flattest cell and whose decoder reads it only through a GroupNorm's statistics (the
StyleGAN2 "droplet"). The ground truth is known (`vae.ground_truth(x)`), so every step can be checked. For SD's
VAE, pass `stabilityai/sd-vae-ft-mse` or a local folder instead (weights you have; no download here)."""),
    ("code", SETUP),
    ("code", """\
vae = vaeprobe.load_vae("builtin:planted-groupnorm")
images = vaeprobe.load_images("builtin:photos-heldout", factor=vae.factor, size=SIZE)
print(vae.spec, "| latent channels", vae.latent_channels, "| factor", vae.factor, "|", len(images), "held-out photos")"""),
    ("md", """\
## 1. Latent diagnostics

Per image: latent norm map, raw log-variance, spot candidates (a norm at least 10x the median, or an isolated
log-variance clamp hit)."""),
    ("code", """\
lat = vaeprobe.run_latents(vae, "builtin:photos-heldout", out / "latents", size=SIZE, progress=False)
spots = pd.read_parquet(out / "latents" / "spots.parquet")
found = spots[spots.is_spot][["image", "row", "col", "norm_ratio", "raw_logvar_min"]]
truth = {img.name: vae.ground_truth(img.tensor())[0] for img in images}
found = found.assign(planted=[(r, c) == (truth[i]["row"], truth[i]["col"]) for i, r, c in zip(found.image, found.row, found.col)])
print(f"spot rate {lat.summary['spot_rate']:.2f}; every spot at the planted cell: {bool(found.planted.all())}")
found"""),
    ("code", """\
maps = vaeprobe.latent_maps(vae.encode(images[0].tensor()), names=[images[0].name])[0]
fig, ax = plt.subplots(1, 3, figsize=(9, 3))
ax[0].imshow(images[0].array); ax[0].set_title(images[0].name)
ax[1].imshow(maps.norm_ratio, cmap="magma"); ax[1].set_title("latent norm / median")
ax[2].imshow(maps.raw_logvar_min, cmap="viridis"); ax[2].set_title("raw log-variance (min over channels)")
for a in ax: a.axis("off")
plt.tight_layout(); plt.show()"""),
    ("md", """\
## 2. Zero every cell: how far does the change spread?

`run_scan` decodes the latent with each cell zeroed and measures the change. Each cell gets a verdict
(docs/verdicts.md): `ordinary`, `high-norm` (an outlier with a local effect), `wide-local`, `global`, or
`global-information` (global and carrying the image's content). The verdict compares each cell with the
decoder's effective receptive field measured on ordinary cells, not with a fixed radius."""),
    ("code", """\
scan = vaeprobe.run_scan(vae, "builtin:photos-heldout", out / "scan", size=SIZE, keep_images=1, n_donors=2, progress=False)
table = pd.read_parquet(out / "scan" / "scan.parquet")
print("verdicts over all cells:", dict(sorted(scan.summary["verdicts"].items())))
at_spot = pd.DataFrame([table[(table.image == i) & (table.row == t["row"]) & (table.col == t["col"])].iloc[0]
                        for i, t in truth.items()])
print("declared verdict of the planted cell:", set(t["expected_verdict"] for t in truth.values()))
at_spot[["image", "row", "col", "norm_ratio", "far_plateau", "far_plateau_lo", "decay_exponent", "swap_corr", "verdict"]]"""),
    ("code", """\
one = table[table.image == images[0].name]
grid = np.full((8, 8), np.nan)
grid[one.row, one.col] = np.log10(one.far_l2)
plt.figure(figsize=(3.5, 3)); plt.imshow(grid, cmap="inferno"); plt.colorbar(label="log10 far-field energy")
plt.title("removing each cell (smudge)"); plt.axis("off"); plt.show()"""),
    ("md", """\
## 3. Which pathway carries it?

`run_mechanism` decodes again with every GroupNorm's statistics frozen at their clean values, then with every
attention's context frozen, and reports the share of the far-field change each removes."""),
    ("code", """\
mech = vaeprobe.run_mechanism(vae, "builtin:photos-heldout", out / "mechanism", positions="top:1", size=SIZE,
                              figures=False, progress=False)
print("dominant pathway per image:", mech.summary["dominant"])
pd.read_parquet(out / "mechanism" / "mechanism.parquet")[["image", "row", "col", "share_groupnorm", "share_attention", "share_residual", "dominant"]]"""),
    ("md", "## 4. One report for all three runs"),
    ("code", """\
rep = vaeprobe.build_report([out / "latents", out / "scan", out / "mechanism"], out=out / "report")
print(rep["html"].name, rep["markdown"].name, len(rep["tables"]), "tables")"""),
]

COMPARE = [
    ("md", """\
# Comparing VAEs

`compare_vaes` runs the same measurements on a reference and candidates: reconstruction (PSNR, SSIM, LPIPS),
latent statistics, spot rate, cell verdicts and pathway attribution, and whether a candidate is a drop-in
replacement (same latent space: identical encoder outputs).

Models, all offline: `builtin:mini-kl-f8` (the project's mini KL-f8, trained here), `builtin:mini-kl-f8-ft-mse`
(its decoder fine-tuned with MSE, encoder frozen, like SD's ft-MSE VAE), `builtin:taef2` (a real autoencoder
trained elsewhere, for FLUX.2's 32-channel latents) and `builtin:planted-direct` (a planted control: the encoder
stores the image's mean colour at one huge cell and the decoder re-applies it everywhere)."""),
    ("code", SETUP),
    ("code", """\
specs = ["builtin:mini-kl-f8", "builtin:mini-kl-f8-ft-mse", "builtin:taef2", "builtin:planted-direct"]
run = vaeprobe.compare_vaes(specs, "builtin:photos-heldout", out / "compare", size=SIZE, rfid=False, progress=False)
for c in run.summary["candidates"]:
    print(f"{c['model']}: {c['verdict']}")"""),
    ("code", """\
models = pd.read_parquet(out / "compare" / "models.parquet")
models[["model", "channels", "psnr_mean", "lpips_mean", "spot_rate", "max_norm_ratio", "global_rate", "dominant"]]"""),
    ("code", """\
compat = pd.read_parquet(out / "compare" / "compatibility.parquet")
compat[["model", "reference", "same_channels", "encoder_identical", "compatibility"]]"""),
    ("md", """\
What to read: the planted control is the only model with a spot (`spot_rate` 1) and a global cell on every
image; the clean mini, its fine-tune and taef2 have none at this size. The fine-tune shares the mini's encoder,
so it is a drop-in replacement; taef2 has another latent space (32 channels) and is compared on reconstruction
only."""),
]

PIPELINE = [
    ("md", """\
# The spot through a diffusion pipeline

`run_pipeline` runs a diffusers text-to-image pipeline for every prompt and seed and records (1) at every
denoising step the predicted clean latent's largest norm over its median (emergence of a spot), (2) the effect of
ablating the final latent's strongest cell against random cells, also from a step k on, (3) the same latents
decoded by another VAE.

Offline here: `builtin:tiny-sd-planted`, a tiny StableDiffusionPipeline built from configs whose UNet plants a
known spot vector at a known cell from a known timestep on (the ground truth). On SD 1.5 you would pass
`stable-diffusion-v1-5/stable-diffusion-v1-5` and `--device cuda`."""),
    ("code", SETUP),
    ("code", """\
prompts = ["a lighthouse on a cliff", "a red fox in snow", "a bowl of fruit"]
run = vaeprobe.run_pipeline("builtin:tiny-sd-planted", prompts, "0-1", out / "pipeline", steps=8, controls=4,
                            ablate_from=[4], vaes=["builtin:mini-kl-f8-ft-mse"], lpips=False, progress=False)
s = run.summary
print(f"{s['n_samples']} samples; spot in the final latent of {s['final_spot_rate']:.0%}; emerged and stayed in {s['emerged']}; median step {s['median_emergence_step']}")"""),
    ("code", """\
em = pd.read_parquet(out / "pipeline" / "emergence.parquet")
fig, ax = plt.subplots(figsize=(5, 3))
for key, g in em.groupby("key"):
    ax.plot(g.step, g.norm_ratio, marker=".", label=key)
ax.axhline(10, color="grey", ls="--", lw=1); ax.set_yscale("log")
ax.set_xlabel("denoising step"); ax.set_ylabel("largest norm / median (x0)"); ax.legend(fontsize=6)
plt.tight_layout(); plt.show()"""),
    ("code", """\
inter = pd.read_parquet(out / "pipeline" / "interventions.parquet")
inter.groupby(["vae", "when", "kind"]).far_l2.median().unstack("kind")"""),
    ("code", """\
for v in s["vaes"]:
    print(v["vae"], "| compatible:", v["compatible"], "| spot beats every control:", v["spot_beats_every_control"])"""),
]

NOTEBOOKS = {"quickstart": QUICKSTART, "compare_vaes": COMPARE, "diffusion_pipeline": PIPELINE}


def make(cells) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
                for kind, src in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def execute(nb: nbformat.NotebookNode, cwd: Path = HERE) -> nbformat.NotebookNode:
    """Run every cell in a fresh kernel (an error stops it and raises)."""
    NotebookClient(nb, timeout=TIMEOUT, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def main(argv=None) -> None:
    names = (argv if argv is not None else sys.argv[1:]) or list(NOTEBOOKS)
    for name in names:
        nb = execute(make(NOTEBOOKS[name]))
        path = HERE / f"{name}.ipynb"
        tmp = path.with_suffix(".ipynb.tmp")
        nbformat.write(nb, tmp)
        tmp.replace(path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
