"""The far-field plateau against effects of known size, and the real pathways of the mini and taef2.

Part ``known``: on the trained mini and on taef2, :class:`vaeprobe.models.controls.KnownEffectControl` plants a cell
whose removal shifts every pixel by exactly ``delta`` 8-bit levels (``delta`` = 0.5, 1, 2, 8, 32), a Gaussian bump
of 64 levels and sigma 3 cells, and a contrast droplet of strength 0.02 and 0.1; ``far_plateau`` of the planted
cell is recorded with the truth (``delta``; for the droplet the RMS of its planted change over the far field's
outer half) at each size, on one held-out photo, with the ordinary reference cells' plateaus.

Part ``real``: on the clean mini and taef2, the verdict measures of the largest-norm cell, the mini's corner cell
(31, 0 at 256 px: its GroupNorm droplet, docs/mini-corner-blob.md) and two interior cells, on held-out photos.

Command: ``python experiments/known_effects.py --sizes 64,128,256,512 --out experiments/results/known_effects.json``
(and ``--sizes 1024 --photos 1 --out experiments/results/known_effects_1024.json``). Beside the JSON: ``NAME.md``
(the tables; ``--table NAME.json`` rewrites it from the JSON) and ``NAME.png`` (measured plateau against the truth).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vaeprobe import load_images, load_vae  # noqa: E402
from vaeprobe._io import write_text_atomic  # noqa: E402
from vaeprobe.models.controls import KnownEffectControl  # noqa: E402
from vaeprobe.models.zoo import load_builtin  # noqa: E402
from vaeprobe.probes.geometry import cell_distance  # noqa: E402
from vaeprobe.probes.verdict import LEVELS, CellVerdict, standard_norm  # noqa: E402

BASES = ("mini-kl-f8", "taef2")
PLANTS = [("shift", d) for d in (0.5, 1.0, 2.0, 8.0, 32.0)] + [("gauss", 64.0), ("contrast", 0.02), ("contrast", 0.1)]
KEEP = ("verdict", "far_plateau", "far_plateau_lo", "far_plateau_hi", "decay_exponent", "decay_exponent_lo",
        "below_visibility", "band_levels", "near_levels", "norm_ratio", "frozen_removed")


def _row(df) -> dict:
    r = df.iloc[0]
    return {k: (v if isinstance(v, str) else bool(v) if k == "below_visibility" else float(v))
            for k, v in ((k, r[k]) for k in KEEP if k in r)}


def known(base: str, size: int, photo: int) -> list[dict]:
    """Every planted effect on one base, size and photo; the reference is measured once per kind."""
    x = load_images("builtin:photos-heldout", size=size)[photo].tensor()
    out = []
    for kind in ("shift", "gauss", "contrast"):
        vae = load_vae(KnownEffectControl(load_builtin(base), kind, 1.0).eval())
        gt = vae.ground_truth(x)[0]
        cell = (gt["row"], gt["col"])
        cv = CellVerdict(vae, evidence=False)
        with torch.no_grad():
            z = vae.encode(x).mean
            ref = vae.decode(z)
            field = cv.reference(z, ref, exclude=[cell])
            dist = cell_distance(cell, tuple(ref.shape[-2:]), vae.factor, metric="euclidean")
            far = dist > field.erf
            outer = far & (dist > dist[far].median())
            for k, amount in PLANTS:
                if k != kind:
                    continue
                vae.model.amount = amount
                t0 = time.perf_counter()
                row = _row(cv.classify(z, [cell], ref=vae.decode(z), field=field))
                planted = vae.model.planted_change(z).double().pow(2).sum(1)[0]
                truth = amount if kind == "shift" else LEVELS * math.sqrt(float(planted[outer].mean()) / 3)
                out.append({"base": base, "size": size, "photo": photo, "kind": kind, "amount": amount,
                            "truth": truth, "cell": list(cell), **row,
                            "ordinary_plateaus": field.plateaus, "seconds": round(time.perf_counter() - t0, 2)})
                print(json.dumps(out[-1]), flush=True)
    return out


def real(base: str, size: int, photos: int) -> list[dict]:
    """The verdict measures of chosen cells of the clean model (see the module docstring)."""
    vae = load_vae(f"builtin:{base}")
    cv = CellVerdict(vae, evidence=True)
    out = []
    for img in load_images("builtin:photos-heldout", size=size)[:photos]:
        with torch.no_grad():
            z = vae.encode(img.tensor()).mean
            h, w = z.shape[-2:]
            top = divmod(int(standard_norm(z).argmax()), w)
            cells = list(dict.fromkeys([top, (h - 1, 0), (h // 2, w // 2), (h // 3, 2 * w // 3)]))
            df = cv.classify(z, cells)
        for rec, (r, c) in zip(df.to_dict("records"), cells):
            label = "largest norm" if (r, c) == top else "corner (h-1, 0)" if (r, c) == (h - 1, 0) else "interior"
            out.append({"base": base, "size": size, "image": img.name, "cell": [r, c], "which": label,
                        **{k: (v if isinstance(v, str) else bool(v) if k == "below_visibility" else float(v))
                           for k, v in rec.items() if k in KEEP}, "ordinary_plateaus": df.attrs["field"]["plateaus"]})
            print(json.dumps(out[-1]), flush=True)
    return out


def figure(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 4))
    marks = {"mini-kl-f8": "o", "taef2": "s"}
    for r in rows:
        if r["kind"] == "gauss":
            continue
        ax.errorbar(max(r["truth"], 0.05), max(r["far_plateau"], 0.05),
                    yerr=[[max(r["far_plateau"] - r["far_plateau_lo"], 0)], [max(r["far_plateau_hi"] - r["far_plateau"], 0)]],
                    fmt=marks[r["base"]], ms=4, alpha=0.7, color="C0" if r["kind"] == "shift" else "C1")
    ax.plot([0.05, 64], [0.05, 64], "k:", lw=0.8)
    ax.axhline(1.0, color="#999", lw=0.8, ls="--")
    ax.set_xscale("log"); ax.set_yscale("log")
    ax.set_xlabel("planted far change (8-bit levels)"); ax.set_ylabel("measured far_plateau (levels)")
    ax.set_title("circles mini, squares taef2; blue shift, orange droplet", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(rows: list[dict], reals: list[dict]) -> str:
    """Markdown: per base and size, the measured plateau of each planted effect against its truth, and the clean
    models' chosen cells."""
    sizes = sorted({r["size"] for r in rows})
    lines = ["| base | size | " + " | ".join(f"shift {d:g}" for d in (0.5, 1, 2, 8, 32))
             + " | gauss 64 (σ 3) | contrast 0.02 | contrast 0.1 | ordinary cells |", "|---|---|" + "---|" * 9]
    for base in BASES:
        for size in sizes:
            g = [r for r in rows if r["base"] == base and r["size"] == size]
            if not g:
                continue

            def cell(kind, amount):
                r = next((r for r in g if r["kind"] == kind and r["amount"] == amount), None)
                if r is None:
                    return "–"
                truth = "" if kind == "shift" else f"{r['truth']:.2f} → "
                return f"{truth}{r['far_plateau']:.3f} [{r['far_plateau_lo']:.2f}, {r['far_plateau_hi']:.2f}] {r['verdict']}"
            ordinary = max(max(r["ordinary_plateaus"]) for r in g)
            lines.append(f"| {base} | {size} | " + " | ".join(cell("shift", d) for d in (0.5, 1.0, 2.0, 8.0, 32.0))
                         + f" | {cell('gauss', 64.0)} | {cell('contrast', 0.02)} | {cell('contrast', 0.1)} | "
                         f"up to {ordinary:.2f} |")
    lines += ["", "| base | size | image | cell | which | norm_ratio | far_plateau [lo, hi] | decay_exponent | "
              "ordinary cells (max) | frozen_removed | verdict | below visibility |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in reals:
        lines.append(f"| {r['base']} | {r['size']} | {r['image']} | {tuple(r['cell'])} | {r['which']} | "
                     f"{r['norm_ratio']:.2f} | {r['far_plateau']:.3f} [{r['far_plateau_lo']:.3f}, {r['far_plateau_hi']:.3f}] | "
                     f"{r['decay_exponent']:.2f} | {max(r['ordinary_plateaus']):.3f} | {r['frozen_removed']:.2f} | "
                     f"{r['verdict']} | {r['below_visibility']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="64,128,256,512")
    ap.add_argument("--photos", type=int, default=2, help="held-out photos of the real-model part")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "known_effects.json"))
    ap.add_argument("--table", metavar="JSON", help="only write the Markdown table of an existing result")
    a = ap.parse_args(argv)
    if a.table:
        got = json.loads(Path(a.table).read_text())
        write_text_atomic(Path(a.table).with_suffix(".md"), f"`{got['command']}`\n\n{table(got['known'], got['real'])}\n")
        return
    torch.set_num_threads(2)
    sizes = [int(s) for s in a.sizes.split(",")]
    rows = [r for size in sizes for base in BASES for r in known(base, size, 1)]
    reals = [r for size in sizes for base in BASES for r in real(base, size, a.photos)]
    out = {"known": rows, "real": reals,
           "command": "python experiments/known_effects.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    path = Path(a.out)
    write_text_atomic(path, json.dumps(out, indent=1) + "\n")
    write_text_atomic(path.with_suffix(".md"), f"`{out['command']}`\n\n{table(rows, reals)}\n")
    figure(rows, path.with_suffix(".png"))


if __name__ == "__main__":
    main()
