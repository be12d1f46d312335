"""The GPU check: decode speed, scan throughput, the linear map's cost and a tiny pipeline on one CUDA device.

    bash benchmarks/gpu_check.sh                 # on a CUDA machine: the full check, under 8 minutes
    python benchmarks/gpu_check.py --device cpu --quick --out /tmp/gpu_check.json   # the same code, tiny, on CPU

On an SD-layout AutoencoderKL built from SD's VAE config (random weights: the timings do not depend on them) at
``--size`` px (512: SD's 64x64 latent):

1. decode time per latent in fp32 and fp16 (batch 1 and ``--batch``), median of ``--reps`` after a warm-up,
   with ``torch.cuda.synchronize`` around each (published anchor: about 31 ms per fp16 decode at 512 px on an
   RTX 4090, issue 18);
2. the exact scan: ``--positions`` cells zeroed and decoded in batches of ``--batch`` (fp32, as vaeprobe measures
   differences), its decodes per second and its time over the same number of batched decodes;
3. the linear map (``linear_scan``, ``--probes`` JVP probes) in decode-equivalents;
4. a ``vaeprobe pipeline`` run of ``builtin:tiny-sd-planted`` on the device (``--batch 2``).

Writes one JSON (``--out``) with the device, the versions and every figure. ``--quick`` shrinks everything so the
same code runs in seconds on a CPU (``tests/test_distributed.py`` runs it), where the figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vaeprobe._io import write_text_atomic  # noqa: E402
from vaeprobe.models.adapter import VAE  # noqa: E402

SD_CONFIG = {
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
    "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215,
}
TINY_CONFIG = {**SD_CONFIG, "block_out_channels": [32, 32, 64, 64], "layers_per_block": 1, "sample_size": 64}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, reps: int) -> tuple[float, object]:
    """Median wall time of ``fn()`` over ``reps`` runs after one warm-up run."""
    out = fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def sd_layout(device: str, dtype: str, quick: bool) -> VAE:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    model = AutoencoderKL(**(TINY_CONFIG if quick else SD_CONFIG)).eval()
    return VAE(model, spec="sd-layout AutoencoderKL (random init from SD's config)", device=device, dtype=dtype)


def decode_times(device: str, size: int, batch: int, reps: int, quick: bool) -> dict:
    out = {}
    for dtype in ("fp32", "fp16"):
        if dtype == "fp16" and not device.startswith("cuda"):
            out[dtype] = {"skipped": "fp16 decodes are timed on CUDA only"}
            continue
        vae = sd_layout(device, dtype, quick)
        z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
        t1, _ = timed(lambda: vae.decode(z), device, reps)
        tb, _ = timed(lambda: vae.decode(z.repeat(batch, 1, 1, 1)), device, reps)
        out[dtype] = {"batch1_ms": 1e3 * t1, f"batch{batch}_ms_per_latent": 1e3 * tb / batch}
        print(f"decode {dtype} at {size} px: {1e3 * t1:.1f} ms (batch 1), {1e3 * tb / batch:.1f} ms/latent "
              f"(batch {batch})", flush=True)
        del vae
    return out


def scan_throughput(device: str, size: int, batch: int, positions: int, probes: int, reps: int, quick: bool) -> dict:
    from vaeprobe.probes.scan import exact_scan, linear_scan, select_sites

    vae = sd_layout(device, "fp32", quick)
    z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0)).to(device)
    h, w = z.shape[-2:]
    step = max(1, int((h * w / positions) ** 0.5))
    cells = [(r, c) for r in range(0, h, step) for c in range(0, w, step)][:positions]
    sites = select_sites(cells, (h, w))
    ref = vae.decode(z)
    t_batch, _ = timed(lambda: vae.decode(z.repeat(batch, 1, 1, 1)), device, reps)
    _sync(device)
    t0 = time.perf_counter()
    res = exact_scan(vae, z, sites, "zero", batch=batch, ref=ref)
    _sync(device)
    t_scan = time.perf_counter() - t0
    t_one, _ = timed(lambda: vae.decode(z), device, reps)
    out = {"positions": len(sites), "batch": batch, "seconds": t_scan, "decodes": res.decodes,
           "decodes_per_s": res.decodes / t_scan, "scan_over_batched_decodes": t_scan / (len(sites) / batch * t_batch)}
    print(f"exact scan of {len(sites)} positions: {t_scan:.2f} s, {out['decodes_per_s']:.1f} decodes/s, "
          f"{out['scan_over_batched_decodes']:.2f}x the batched decodes alone", flush=True)
    _sync(device)
    t0 = time.perf_counter()
    linear_scan(vae, z, n_probes=probes, radius=None)
    _sync(device)
    t_lin = time.perf_counter() - t0
    out["linear"] = {"probes": probes, "seconds": t_lin, "decode_equivalents": t_lin / t_one}
    print(f"linear map, {probes} probes: {t_lin:.2f} s = {t_lin / t_one:.1f} decodes", flush=True)
    return out


def tiny_pipeline(device: str) -> dict:
    from vaeprobe.jobs.pipeline import run_pipeline

    out = Path(tempfile.mkdtemp()) / "pipeline"
    t0 = time.perf_counter()
    run = run_pipeline("builtin:tiny-sd-planted", ["a lighthouse", "a red fox"], "0-1", out, steps=4, controls=2,
                       lpips=False, device=device, batch=2, progress=False)
    seconds = time.perf_counter() - t0
    s = run.summary
    print(f"tiny pipeline on {device}: {s['n_samples']} samples in {seconds:.1f} s, spot in the final latent of "
          f"{s['final_spot_rate']:.0%}, emerged in {s['emerged']}", flush=True)
    return {"samples": s["n_samples"], "seconds": seconds, "final_spot_rate": s["final_spot_rate"],
            "emerged": s["emerged"], "config_device": json.loads((out / "config.json").read_text())["device"]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--positions", type=int, default=256)
    ap.add_argument("--probes", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for a CPU smoke run")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
    a = ap.parse_args(argv)
    if a.quick:
        a.size, a.batch, a.positions, a.probes, a.reps = 64, 2, 4, 2, 1
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; run it on a GPU machine (or --device cpu --quick)")
    info = {"device": torch.cuda.get_device_name(0) if a.device.startswith("cuda") else platform.processor() or "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "size": a.size, "quick": a.quick,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(json.dumps(info), flush=True)
    t0 = time.perf_counter()
    result = {**info, "decode": decode_times(a.device, a.size, a.batch, a.reps, a.quick),
              "scan": scan_throughput(a.device, a.size, a.batch, a.positions, a.probes, a.reps, a.quick),
              "pipeline": tiny_pipeline(a.device)}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    write_text_atomic(Path(a.out), json.dumps(result, indent=1) + "\n")
    print(f"gpu_check: done in {result['seconds']} s; {a.out}", flush=True)
    return result


if __name__ == "__main__":
    main()
