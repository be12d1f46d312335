"""Agreement of the linearised sensitivity map with exact Jacobian norms on more positions (issue 5).

    python benchmarks/linear_agreement.py [--model sd|mini] [--size 256] [--probes 32] [--positions 48]
        [--out benchmarks/results/linear_agreement_sd.json]

``scan_bench.py`` could afford exact JVP norms on only 16 positions of the SD-sized model, where a Spearman rho
is itself uncertain. This computes the same 32-probe map and exact norms on ``--positions`` random cells
(seeded; written after every 8, so a killed run keeps what it finished), and reports Spearman rho with a
bootstrap 90 % interval, the top-k overlap and the relative error of the estimates.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from vaeprobe._io import write_text_atomic
from vaeprobe.images import load_images
from vaeprobe.linear import agreement, jacobian_norms
from vaeprobe.scan import linear_scan
from vaeprobe.vae import load_vae

from scan_bench import sd_sized  # noqa: E402  (same directory)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("sd", "mini"), default="sd")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--probes", type=int, default=32)
    ap.add_argument("--positions", type=int, default=48)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/linear_agreement_sd.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    vae = sd_sized() if args.model == "sd" else load_vae("builtin:mini-kl-f8")
    x = load_images("builtin:photos-heldout", size=args.size)[2].tensor()  # rocket, as scan_bench
    z = vae.encode(x).mean
    h, w = z.shape[-2:]
    t0 = time.perf_counter()
    lin = linear_scan(vae, z, n_probes=args.probes, radius=None)
    t_lin = time.perf_counter() - t0
    est_all = lin.sensitivity.to_numpy()
    rng = np.random.default_rng(args.seed)
    cells = [divmod(int(i), w) for i in rng.choice(h * w, size=min(args.positions, h * w), replace=False)]
    exact: list[float] = []
    res: dict = {"model": vae.spec, "size": args.size, "probes": args.probes, "linear_seconds": t_lin}
    for start in range(0, len(cells), 8):
        chunk = cells[start:start + 8]
        exact += jacobian_norms(vae, z, positions=chunk).tolist()
        done = cells[:len(exact)]
        est = np.array([est_all[r * w + c] for r, c in done])
        ex = np.array(exact)
        res.update(agreement(est, ex, k=max(1, len(done) // 10)))
        boot = []
        for _ in range(2000):
            idx = rng.integers(0, len(done), len(done))
            boot.append(agreement(est[idx], ex[idx], k=1)["spearman"])
        res["spearman_90ci"] = [float(np.nanquantile(boot, 0.05)), float(np.nanquantile(boot, 0.95))]
        res["median_relative_error"] = float(np.median(np.abs(est / ex - 1)))
        res["exact_spread_q90_over_q10"] = float(np.quantile(ex, 0.9) / np.quantile(ex, 0.1))
        res["cells"] = [list(c) for c in done]
        res["seconds"] = round(time.perf_counter() - t0, 1)
        write_text_atomic(args.out, json.dumps(res, indent=1))
        print(json.dumps({k: v for k, v in res.items() if k != "cells"}), flush=True)


if __name__ == "__main__":
    main()
