"""The verdict rule on the held-out photos: every control's planted cell and cells of the clean models.

    python experiments/heldout_verdicts.py --sizes 64,128,256 --out experiments/results/heldout_verdicts.json

Nothing here is fitted: the rule's thresholds are the defaults of :class:`vaeprobe.probes.verdict.VerdictRules`
(1 level, decay 1, swap 0.9/0.5), fixed before this was run (docs/verdicts.md). Per size, on the 7 photos of
``builtin:photos-heldout`` (swap donors: the first 4 of ``builtin:photos-train``) it records the verdict measures
of

- each control's planted cell (:data:`vaeprobe.models.controls.EXPECTED_VERDICTS`, swap test always run);
- cells of the clean ``mini-kl-f8`` and ``taef2``: every cell when the latent has at most 64 cells (64 px), else
  the 8 largest standardised norms and 24 seeded random cells.

Writes the rows (JSON) and a Markdown table beside it (``NAME.md``): per control and size, how many planted cells
get their declared verdict; per clean model, how many cells are global, wide-local or below visibility.
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
from vaeprobe.models.controls import EXPECTED_VERDICTS  # noqa: E402
from vaeprobe.schema import GLOBAL_VERDICTS  # noqa: E402
from vaeprobe.probes.verdict import CellVerdict, make_donors, standard_norm  # noqa: E402

CLEAN = ("mini-kl-f8", "taef2")
KEEP = ("verdict", "norm_ratio", "near_levels", "band_levels", "far_plateau", "far_plateau_lo", "far_plateau_hi",
        "decay_exponent", "decay_exponent_lo", "excess_ratio", "ordinary_plateau", "below_visibility",
        "swap_slope", "swap_corr", "swap_structure_slope", "swap_structure_corr")


def clean_cells(z: torch.Tensor, seed: int) -> list[tuple[int, int]]:
    h, w = z.shape[-2:]
    if h * w <= 64:
        return [(r, c) for r in range(h) for c in range(w)]
    top = torch.topk(standard_norm(z).flatten(), 8).indices.tolist()
    g = torch.Generator().manual_seed(seed)
    rest = [i for i in torch.randperm(h * w, generator=g).tolist() if i not in top][:24]
    return [divmod(i, w) for i in top + rest]


def _value(k, v):
    if isinstance(v, str):
        return v
    if k == "below_visibility":
        return bool(v)
    v = float(v)
    return v if math.isfinite(v) else str(v)


def measure(size: int, names) -> list[dict]:
    imgs = load_images("builtin:photos-heldout", size=size)
    donor_imgs = load_images("builtin:photos-train", size=size)[:4]
    rows = []
    for name in names:
        t0 = time.time()
        vae = load_vae(f"builtin:{name}")
        donors = make_donors(vae, [d.tensor() for d in donor_imgs], names=[d.name for d in donor_imgs])
        planted = name not in CLEAN
        cv = CellVerdict(vae, donors=donors, evidence=False, swap="always" if planted else "auto")
        n0 = len(rows)
        for k, img in enumerate(imgs):
            x = img.tensor()
            try:
                with torch.no_grad():
                    z = vae.encode(x).mean
            except ValueError as exc:  # a control that cannot be built on this image
                print(f"note: {name} at {size} px on {img.name}: {exc}; left out", flush=True)
                continue
            if planted:
                gt = vae.ground_truth(x)[0]
                cells, expected = [(gt["row"], gt["col"])], gt["expected_verdict"]
            else:
                cells, expected = clean_cells(z, k), "not global"
            with torch.no_grad():
                df = cv.classify(z, cells)
            for rec, cell in zip(df.to_dict("records"), cells):
                rows.append({"size": size, "model": name, "image": img.name, "cell": list(cell),
                             "expected": expected, **{k: _value(k, rec[k]) for k in KEEP if k in rec}})
        verdicts = {}
        for r in rows[n0:]:
            verdicts[r["verdict"]] = verdicts.get(r["verdict"], 0) + 1
        print(f"{size} px {name}: {len(rows) - n0} cells, {time.time() - t0:.0f} s; {verdicts}", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    sizes = sorted({r["size"] for r in rows})
    lines = ["| model | declared | " + " | ".join(f"{s} px" for s in sizes) + " |",
             "|---|---|" + "---|" * len(sizes)]
    for name in [*EXPECTED_VERDICTS, *CLEAN]:
        d = [r for r in rows if r["model"] == name]
        if not d:
            continue
        exp = d[0]["expected"]
        cells = []
        for s in sizes:
            g = [r for r in d if r["size"] == s]
            if not g:
                cells.append("–")
            elif exp == "not global":
                n_glob = sum(r["verdict"] in GLOBAL_VERDICTS for r in g)
                n_wide = sum(r["verdict"] == "wide-local" for r in g)
                n_below = sum(bool(r.get("below_visibility")) for r in g)
                cells.append(f"{n_glob} global of {len(g)}; {n_wide} wide-local; {n_below} below visibility")
            else:
                ok = sum(r["verdict"] == exp for r in g)
                other = {}
                for r in g:
                    if r["verdict"] != exp:
                        other[r["verdict"]] = other.get(r["verdict"], 0) + 1
                pl = [r["far_plateau"] for r in g if isinstance(r["far_plateau"], float)]
                span = f"; plateau {min(pl):.2g}–{max(pl):.2g}" if pl else ""
                cells.append(f"{ok}/{len(g)}" + (f" (else {other})" if other else "") + span)
        lines.append(f"| {name} | {exp} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="64,128,256")
    ap.add_argument("--models", default=None, help="comma-separated builtin names (default: controls + clean)")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "heldout_verdicts.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    names = a.models.split(",") if a.models else [*EXPECTED_VERDICTS, *CLEAN]
    rows = [r for s in (int(s) for s in a.sizes.split(",")) for r in measure(s, names)]
    path = Path(a.out)
    cmd = "python experiments/heldout_verdicts.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_text_atomic(path, json.dumps({"rows": rows, "command": cmd}, indent=1) + "\n")
    text = table(rows)
    write_text_atomic(path.with_suffix(".md"), f"`{cmd}`\n\n{text}\n")
    print(text)


if __name__ == "__main__":
    main()
