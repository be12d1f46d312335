"""vaeprobe's exact scan beside captum's ``Occlusion`` on the same work, and the floor, in one run (issue 32, item 4).

    pip install -e '.[bench]'        # captum: a benchmark-only dependency
    python benchmarks/peer_bench.py [--vae builtin:mini-kl-f8] [--size 128] [--batch 8] [--reps 5]
                                    [--out benchmarks/results/peer_bench.json]

The same decoder, latent (the first held-out photo, posterior mean) and cells (every cell), the same ablation
(all channels of one cell set to 0) and the same batch size:

- **vaeprobe**: ``exact_scan(vae, z, sites, "zero", measures=("l2",), batch=B)``;
- **captum**: ``Occlusion(f).attribute(z, sliding_window_shapes=(C, 1, 1), strides=(C, 1, 1), baselines=0,
  perturbations_per_eval=B)`` with ``f(zz)`` the change energy of each decode against the clean decode (mean
  squared difference, what vaeprobe's ``l2`` is); captum's attribution of a cell is ``f(z) - f(ablated)`` =
  minus the energy, spread over the window;
- **floor**: ``ceil(N / B)`` batched decodes of ``B`` latents (the decodes any exact scan must make).

The three run in turn, ``--reps`` rounds, each round in a rotated order. Reported: the best of the ``--reps``
wall-clock times of each, both ratios to the floor, vaeprobe over captum by best, by median and per round, and the
rank agreement
(Spearman) and largest difference of the two attributions, which must agree (the same ablation). Times are on
this machine; quote the ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch

from vaeprobe._io import write_text_atomic
from vaeprobe.data.images import load_images
from vaeprobe.models.loading import load_vae
from vaeprobe.probes.scan import exact_scan, select_sites


def interleaved(fns: dict, reps: int) -> tuple[dict, dict]:
    """Run each function ``reps`` times, in turn and in a rotated order each round (so that a slow spell of the
    machine falls on all of them); returns ``({name: [seconds, ...]}, {name: last result})``."""
    names, times, out = list(fns), {k: [] for k in fns}, {}
    for r in range(reps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            out[name] = fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vae", default="builtin:mini-kl-f8")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/peer_bench.json")
    args = ap.parse_args()
    from captum.attr import Occlusion
    from scipy.stats import spearmanr

    torch.manual_seed(0)
    vae = load_vae(args.vae)
    img = load_images("builtin:photos-heldout", factor=vae.factor, size=args.size)[0]
    with torch.no_grad():
        z = vae.encode(img.tensor()).mean
        ref = vae.decode(z).float()
    c, h, w = z.shape[1:]
    sites = select_sites("all", (h, w))
    n, b = len(sites), args.batch

    def floor():
        zz = z.repeat(b, 1, 1, 1)
        with torch.no_grad():
            for _ in range(math.ceil(n / b)):
                vae.decode(zz)

    def ours():
        with torch.no_grad():
            return exact_scan(vae, z, sites, "zero", measures=("l2",), batch=b, ref=ref).table

    def energy(zz):
        return (vae.decode(zz).float() - ref).pow(2).flatten(1).mean(1)

    def theirs():
        with torch.no_grad():
            return Occlusion(energy).attribute(z, sliding_window_shapes=(c, 1, 1), strides=(c, 1, 1), baselines=0.0,
                                               perturbations_per_eval=b)

    times, out = interleaved({"floor": floor, "vaeprobe": ours, "captum": theirs}, args.reps)
    t_floor, t_ours, t_theirs = (min(times[k]) for k in ("floor", "vaeprobe", "captum"))
    table, attr = out["vaeprobe"], out["captum"]
    mine = table.set_index(["row", "col"])["l2"].to_numpy()
    peer = -attr[0].mean(0).double().flatten().numpy()  # every channel of a window gets the whole difference
    rho = float(spearmanr(mine, peer).statistic)
    res = {"vae": args.vae, "size": args.size, "latent": [int(c), int(h), int(w)], "cells": n, "batch": b,
           "reps": args.reps, "floor_s": t_floor, "vaeprobe_s": t_ours, "captum_s": t_theirs,
           "vaeprobe_over_floor": t_ours / t_floor, "captum_over_floor": t_theirs / t_floor,
           "vaeprobe_over_captum": t_ours / t_theirs, "times_s": times,
           "median_vaeprobe_over_captum": float(np.median(times["vaeprobe"]) / np.median(times["captum"])),
           "paired_vaeprobe_over_captum": [a / b for a, b in zip(times["vaeprobe"], times["captum"])],
           "spearman": rho,
           "max_rel_difference": float(np.max(np.abs(mine - peer)) / np.max(np.abs(peer))),
           "torch": torch.__version__, "threads": torch.get_num_threads(), "platform": platform.platform()}
    for k, v in res.items():
        print(f"{k}: {v}")
    write_text_atomic(Path(args.out), json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
