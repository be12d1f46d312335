"""Benchmark of pathway attribution (issue: mechanism), ratios measured in one run.

    python benchmarks/mechanism_bench.py [--size 256] [--out benchmarks/results/mechanism_bench.json]

For the shipped ``builtin:mini-kl-f8`` and an SD-sized AutoencoderKL built from SD's config (random weights: no
hub here), at ``--size`` px on a held-out photo, fp32, batch 1:

- ``attribution_over_decode``: time of ``attribute_pathways`` for one position (the recorded clean decode plus
  the four variants) / the time of one plain decode. The budget is 4 decodes plus the clean one, i.e. <= 5.
- ``record_over_decode`` and ``frozen_over_decode``: the hooks' overhead on one decode (recording every
  GroupNorm's statistics and the attention projections; decoding with both pathways frozen).

Each timing is the best of ``--reps`` runs. Quote the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from vaeprobe._io import write_text_atomic
from vaeprobe.data.images import load_images
from vaeprobe.probes.mechanism import attribute_pathways, decode_frozen, record_pathways
from vaeprobe.probes.perturb import Site
from vaeprobe.models.loading import load_vae

from scan_bench import sd_sized  # noqa: E402  (same directory)


def best_of(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench(vae, x: torch.Tensor, reps: int) -> dict:
    z = vae.encode(x).mean
    site = [Site(z.shape[-2] // 2, z.shape[-1] // 3)]
    vae.decode(z)  # warm-up
    t_dec = best_of(lambda: vae.decode(z), reps)
    _, rec = record_pathways(vae, z)
    t_rec = best_of(lambda: record_pathways(vae, z), reps)
    t_frz = best_of(lambda: decode_frozen(vae, z, rec), reps)
    t_att = best_of(lambda: attribute_pathways(vae, z, site), reps)
    decodes = attribute_pathways(vae, z, site).decodes
    res = {"model": vae.spec, "latent": list(z.shape[-2:]), "decode_s": t_dec, "record_over_decode": t_rec / t_dec,
           "frozen_over_decode": t_frz / t_dec, "attribution_s": t_att, "attribution_over_decode": t_att / t_dec,
           "decodes_per_attribution": decodes}
    print(json.dumps(res), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/mechanism_bench.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    x = load_images("builtin:photos-heldout", size=args.size)[2].tensor()  # rocket
    results = {"size": args.size, "python": platform.python_version(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "reps": args.reps, "models": []}
    results["models"].append(bench(load_vae("builtin:mini-kl-f8"), x, max(args.reps, 3)))
    results["models"].append(bench(sd_sized(), x, args.reps))
    write_text_atomic(args.out, json.dumps(results, indent=1))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
