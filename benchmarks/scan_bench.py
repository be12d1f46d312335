"""Benchmark of the perturbation scans (issue: perturbation probes), ratios measured in one run.

    python benchmarks/scan_bench.py [--size 256] [--out benchmarks/results/scan_bench.json] [--quick]

For each model — the shipped ``builtin:mini-kl-f8`` and an SD-sized AutoencoderKL built from SD's config
(random weights: no hub here) — at ``--size`` px on a held-out photo:

1. exact-scan overhead: time of an exact scan of N positions / (N / B x the time of one batched decode of B
   latents), B = the scan's batch size;
2. linearised map: its cost in decode-equivalents (time / one per-image decode) and its agreement (Spearman rho,
   top-k overlap) with exact per-position Jacobian norms from JVPs on a random subset of positions;
3. two-stage: its cost as a share of a full exact scan (all positions), and whether its top far-field position
   equals the full exact scan's (on ``builtin:planted-groupnorm`` for the mini model, where the full exact scan
   is affordable; for the SD-sized model the full scan's cost is N_all x the measured per-image decode time and
   its top position is not computed — that scan would take about an hour here);
4. memory: max RSS of ``run_scan`` over 3 and over 12 images (separate processes).

Times are wall-clock on this machine; quote the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from vaeprobe._io import write_text_atomic
from vaeprobe.data.images import load_images
from vaeprobe.probes.linear import agreement, jacobian_norms
from vaeprobe.probes.scan import exact_scan, linear_scan, select_sites, two_stage_scan
from vaeprobe.models.adapter import VAE
from vaeprobe.models.loading import load_vae

SD_CONFIG = {
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
    "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215,
}


def sd_sized() -> VAE:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return VAE(AutoencoderKL(**SD_CONFIG).eval(), spec="sd-sized (random init from SD's config)")


def timed(fn, reps: int = 1):
    best, out = float("inf"), None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_model(vae: VAE, x: torch.Tensor, n_exact: int, batch: int, probes: int, n_jac: int, reps: int,
                truth_vae: VAE | None) -> dict:
    z = vae.encode(x).mean
    h, w = z.shape[-2:]
    n_all = h * w
    res: dict = {"model": vae.spec, "latent": [int(h), int(w)], "positions": n_all, "batch": batch}
    zb = z.repeat(batch, 1, 1, 1)
    t_batch, _ = timed(lambda: vae.decode(zb), reps)
    t_one = t_batch / batch
    res["batched_decode_s"] = t_batch
    res["per_image_decode_s"] = t_one
    print(f"[{vae.spec}] one batched decode of {batch}: {t_batch:.2f} s ({t_one:.3f} s/image)", flush=True)

    # 1. exact scan overhead
    rng = np.random.default_rng(0)
    cells = [divmod(int(i), w) for i in rng.choice(n_all, size=min(n_exact, n_all), replace=False)]
    sites = select_sites(cells, (h, w))
    ref = vae.decode(z)
    t_scan, _ = timed(lambda: exact_scan(vae, z, sites, "zero", batch=batch, ref=ref).table)
    res["exact"] = {"n": len(sites), "seconds": t_scan,
                    "ratio_to_batched_decodes": t_scan / (len(sites) / batch * t_batch)}
    print(f"  exact scan of {len(sites)}: {t_scan:.1f} s, ratio {res['exact']['ratio_to_batched_decodes']:.3f}",
          flush=True)

    # 2. linearised map vs exact Jacobian norms
    t_lin, lin = timed(lambda: linear_scan(vae, z, n_probes=probes, radius=None).table)
    jac_cells = [divmod(int(i), w) for i in rng.choice(n_all, size=min(n_jac, n_all), replace=False)]
    t_jac, exact = timed(lambda: jacobian_norms(vae, z, positions=jac_cells))
    est = np.array([lin.sensitivity.to_numpy()[r * w + c] for r, c in jac_cells])
    agree = agreement(est, exact.numpy(), k=max(1, len(jac_cells) // 10))
    res["linear"] = {"probes": probes, "seconds": t_lin, "decode_equivalents": t_lin / t_one,
                     "jacobian_positions": len(jac_cells), "jacobian_seconds": t_jac, **agree}
    print(f"  linear map ({probes} probes): {t_lin:.1f} s = {t_lin / t_one:.1f} decodes; {agree}", flush=True)

    # 3. two-stage
    t_two, two = timed(lambda: two_stage_scan(vae, z, "zero", ref=ref).table)
    full_cost = n_all * t_one
    res["two_stage"] = {"seconds": t_two, "positions_decoded": len(two), "share_of_full_scan": t_two / full_cost,
                        "full_scan_estimate_s": full_cost}
    print(f"  two-stage: {t_two:.1f} s = {t_two / full_cost:.2%} of a full scan ({len(two)} decodes)", flush=True)
    if truth_vae is not None:
        zt = truth_vae.encode(x).mean
        reft = truth_vae.decode(zt)
        t_full, full = timed(lambda: exact_scan(truth_vae, zt, select_sites("all", (h, w)), "zero", batch=batch,
                                                ref=reft).table)
        t_two_t, two_t = timed(lambda: two_stage_scan(truth_vae, zt, "zero", ref=reft).table)
        top_full = tuple(int(v) for v in full.loc[full.far_l2.idxmax(), ["row", "col"]])
        top_two = tuple(int(v) for v in two_t.loc[two_t.far_l2.idxmax(), ["row", "col"]])
        res["two_stage_vs_full"] = {"model": truth_vae.spec, "full_seconds": t_full, "two_stage_seconds": t_two_t,
                                    "share": t_two_t / t_full, "top_full": top_full, "top_two_stage": top_two,
                                    "same_top": top_full == top_two}
        print(f"  on {truth_vae.spec}: full {t_full:.1f} s, two-stage {t_two_t:.1f} s ({t_two_t / t_full:.2%}); "
              f"top {top_full} vs {top_two}", flush=True)
    return res


MEM_SNIPPET = """
import sys, tempfile
from vaeprobe.jobs.scan import run_scan
run_scan("builtin:mini-kl-f8", sys.argv[1], tempfile.mkdtemp(), size=64, positions="grid:2", progress=False)
# VmHWM is this process's own peak RSS (ru_maxrss would carry the parent's peak across fork + exec)
print([l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")][0])
"""


def memory_check() -> dict:
    import tempfile

    from PIL import Image

    out = {}
    photos = load_images("builtin:photos", size=64)
    for n in (3, 12):
        d = Path(tempfile.mkdtemp())
        for img in list(photos)[:n]:
            Image.fromarray((img.array * 255).astype(np.uint8)).save(d / f"{img.name}.png")
        r = subprocess.run([sys.executable, "-c", MEM_SNIPPET, str(d)], capture_output=True, text=True, check=True)
        out[f"max_rss_mb_{n}_images"] = int(r.stdout.strip().splitlines()[-1]) / 1024
    print(f"  memory: {out}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--out", default="benchmarks/results/scan_bench.json")
    ap.add_argument("--probes", type=int, default=32, help="random probes of the linearised map (default 32)")
    ap.add_argument("--memory-only", action="store_true", help="redo only the memory check in an existing --out")
    ap.add_argument("--quick", action="store_true", help="mini model only, fewer positions (a smoke run)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.memory_only:
        old = json.loads(Path(args.out).read_text())
        old["memory"] = memory_check()
        write_text_atomic(args.out, json.dumps(old, indent=1))
        return
    x = load_images("builtin:photos-heldout", size=args.size)[2].tensor()  # rocket
    results = {"size": args.size, "python": platform.python_version(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "models": []}
    t0 = time.time()
    mini = load_vae("builtin:mini-kl-f8")
    results["models"].append(bench_model(mini, x, n_exact=64 if args.quick else 256, batch=8, probes=args.probes,
                                         n_jac=16 if args.quick else 64, reps=3,
                                         truth_vae=None if args.quick else load_vae("builtin:planted-groupnorm")))
    if not args.quick:
        results["models"].append(bench_model(sd_sized(), x, n_exact=32, batch=8, probes=args.probes, n_jac=16, reps=1,
                                             truth_vae=None))
        results["memory"] = memory_check()
    results["seconds"] = time.time() - t0
    results["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    write_text_atomic(args.out, json.dumps(results, indent=1))
    print(f"written {args.out} in {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
