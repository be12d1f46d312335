"""Agreement of the linearised sensitivity map with exact Jacobian norms (issue 5), raw and shrunk.

    python benchmarks/linear_agreement.py [--model sd|mini|taef2] [--image 2] [--size 256] [--probes 32,36]
        [--max-probes 96] [--positions 48] [--seed 1] [--out benchmarks/results/linear_agreement_sd.json]

On one held-out photo (``--image``: its index in builtin:photos-heldout; 2 is rocket, as scan_bench.py) this keeps ``--max-probes`` per-probe maps of the randomised
estimator (``sensitivity_map(..., keep_probes=True)``, seed 0: its first K probes are exactly the map a user gets
with ``n_probes=K``) and computes exact JVP norms on ``--positions`` random cells (seeded). Both are cached
beside ``--out`` (``.npz`` and the JSON, written after every 8 cells, so a killed run keeps what it finished and
a rerun only evaluates). For each K of ``--probes`` it reports, against the exact norms:

- ``raw_first`` / ``shrunk_first``: Spearman rho of the seed-0 map of K probes, unbiased and after
  :func:`vaeprobe.probes.linear.shrink_map` (what ``linear_scan`` returns as ``sensitivity``), with a bootstrap 90 %
  interval over cells and the top-k overlap;
- ``raw_resampled`` / ``shrunk_resampled``: mean and 10th percentile of rho over 200 random K-subsets of the kept
  probes, i.e. what another seed would give;
- ``box_first`` / ``box_resampled``: the same for the simplest smoother, a 3x3 box average of log S (the
  comparison the global-effect issue asked for);
- the cost in decode-equivalents: (time of the K_max-probe map / K_max x K + one forward) / one plain decode.

The shrinkage constants were chosen on the rocket photo, the SD-sized model and seed-1 cells
(``benchmarks/results/linear_agreement_sd.json``, in-sample); other ``--image``, ``--model`` and ``--seed`` values
evaluate them out of sample.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from vaeprobe._io import atomic_path, write_text_atomic
from vaeprobe.data.images import load_images
from vaeprobe.probes.linear import SensitivityMap, agreement, jacobian_norms, sensitivity_map, shrink_map
from vaeprobe.models.loading import load_vae

from scan_bench import sd_sized  # noqa: E402  (same directory)


def _rho_ci(est: np.ndarray, ex: np.ndarray, rng, n: int = 2000) -> list[float]:
    boot = []
    for _ in range(n):
        idx = rng.integers(0, len(ex), len(ex))
        boot.append(agreement(est[idx], ex[idx], k=1)["spearman"])
    return [float(np.nanquantile(boot, 0.05)), float(np.nanquantile(boot, 0.95))]


def box_map(est: SensitivityMap) -> SensitivityMap:
    """The 3x3 box average of log S (cells at the border average the window cells inside the grid)."""
    log = est.map.double().log()[None, None]
    avg = torch.nn.functional.avg_pool2d(log, 3, stride=1, padding=1, count_include_pad=False)[0, 0]
    return SensitivityMap(map=avg.exp().float(), n_probes=est.n_probes, radius=None, blocks=None,
                          n_backward=est.n_backward, n_forward=est.n_forward)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("sd", "mini", "taef2"), default="sd")
    ap.add_argument("--image", type=int, default=2, help="index in builtin:photos-heldout (2: rocket)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--probes", default="32,36")
    ap.add_argument("--max-probes", type=int, default=96)
    ap.add_argument("--positions", type=int, default=48)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or f"benchmarks/results/linear_agreement_{args.model}.json")
    cache = out.with_suffix(".npz")
    torch.set_num_threads(2)
    vae = sd_sized() if args.model == "sd" else load_vae(f"builtin:{'mini-kl-f8' if args.model == 'mini' else 'taef2'}")
    photo = load_images("builtin:photos-heldout", size=args.size)[args.image]
    x = photo.tensor()
    z = vae.encode(x).mean
    h, w = z.shape[-2:]
    res: dict = json.loads(out.read_text()) if out.exists() else {}
    t0 = time.perf_counter()
    vae.decode(z)  # warm-up
    t_dec = time.perf_counter()
    vae.decode(z)
    t_dec = time.perf_counter() - t_dec
    if cache.exists():
        probes = torch.from_numpy(np.load(cache)["probes"])
    else:
        t_map = time.perf_counter()
        probes = sensitivity_map(vae, z, n_probes=args.max_probes, seed=0, keep_probes=True).probes
        res["map_seconds"] = time.perf_counter() - t_map
        with atomic_path(cache) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, probes=probes.numpy())
    rng = np.random.default_rng(args.seed)
    cells = [divmod(int(i), w) for i in rng.choice(h * w, size=min(args.positions, h * w), replace=False)]
    if res.get("cells") != [list(c) for c in cells[:len(res.get("exact", []))]]:
        res["exact"] = []
    res.update(model=vae.spec, size=args.size, image=f"{photo.name} (builtin:photos-heldout[{args.image}])",
               max_probes=int(probes.shape[0]), decode_seconds=t_dec)
    exact: list[float] = list(res.get("exact", []))
    while len(exact) < len(cells):
        exact += jacobian_norms(vae, z, positions=cells[len(exact):len(exact) + 8]).tolist()
        res["exact"], res["cells"] = exact, [list(c) for c in cells[:len(exact)]]
        write_text_atomic(out, json.dumps(res, indent=1))
        print(f"exact norms: {len(exact)}/{len(cells)} cells, {time.perf_counter() - t0:.0f} s", flush=True)
    ex = np.array(exact)
    flat = [r * w + c for r, c in cells]
    k_top = max(1, len(cells) // 10)
    res["exact_spread_q90_over_q10"] = float(np.quantile(ex, 0.9) / np.quantile(ex, 0.1))
    res["estimates"] = {}
    for K in (int(k) for k in args.probes.split(",")):
        entry: dict = {}
        first = SensitivityMap.from_probes(probes[:K])
        for name, m in (("raw", first), ("shrunk", shrink_map(first)), ("box", box_map(first))):
            est = m.map.flatten().double().numpy()[flat]
            a = agreement(est, ex, k=k_top)
            entry[f"{name}_first"] = {"spearman": a["spearman"], "topk": a["topk"], "k": a["k"],
                                      "spearman_90ci": _rho_ci(est, ex, rng),
                                      "median_relative_error": float(np.median(np.abs(est / ex - 1)))}
        draws = {"raw": [], "shrunk": [], "box": []}
        for _ in range(200):
            sub = SensitivityMap.from_probes(probes[torch.from_numpy(rng.choice(probes.shape[0], K, replace=False))])
            for name, m in (("raw", sub), ("shrunk", shrink_map(sub)), ("box", box_map(sub))):
                draws[name].append(agreement(m.map.flatten().double().numpy()[flat], ex, k=1)["spearman"])
        for name, vals in draws.items():
            entry[f"{name}_resampled"] = {"mean": float(np.mean(vals)), "q10": float(np.quantile(vals, 0.1)),
                                          "q90": float(np.quantile(vals, 0.9))}
        if "map_seconds" in res:
            per_probe = res["map_seconds"] / probes.shape[0]
            entry["decode_equivalents"] = (per_probe * K + t_dec) / t_dec
        res["estimates"][str(K)] = entry
    write_text_atomic(out, json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k not in ("cells", "exact")}, indent=1))


if __name__ == "__main__":
    main()
