"""Where the time goes: a profile of ``vaeprobe demo`` and of a two-stage scan at 512 px, in decode-equivalents.

    python benchmarks/profile_bench.py demo [--out benchmarks/results/profile_demo.json]
    python benchmarks/profile_bench.py two-stage [--vae builtin:taef2] [--size 512] [--images 3]
                                                 [--out benchmarks/results/profile_two_stage.json]

Every call of the VAE adapter's ``decode``, ``encode`` and every backward pass of the linear map is timed and
charged to the innermost *part* on the call stack (the table ``PARTS`` below: the verdict's reference cells, stage
one's linear map, the ablations, the swap donors, the swap test, the evidence, ...); what runs outside them (Python,
measures, files) is ``other``. A part's cost in **decode-equivalents** is its seconds over the time of one latent
in a batched decode of ``DECODE_BATCH`` latents of the same model at the same size, measured in the same run
(so a decode-equivalent is what one batched ablation costs). The ablations of a two-stage scan are split into the
candidates' own and the controls' by the table's ``stage`` column (one decode each).

``demo`` runs :func:`vaeprobe.jobs.demo.run_demo` with its defaults (into a temporary folder) and also reports the
seconds of each job; ``two-stage`` runs ``run_scan(mode="two-stage")`` with the scan's defaults on the first
``--images`` held-out photos. Times are wall-clock on this machine; the decode-equivalents are the portable figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from vaeprobe._io import write_text_atomic
from vaeprobe.models.adapter import VAE

# innermost function on the stack -> part (the first match walking outwards from the decode)
PARTS = {
    "receptive_field": "reference cells",
    "_two_stage_candidates": "linear map (stage one)",
    "exact_scan": "ablations",
    "make_donors": "swap donors",
    "counterpart_cells": "swap test: counterpart search",
    "swap_information": "swap test: swapped decodes",
    "matched_controls_many": "evidence: matched controls",
    "frozen_removed_many": "evidence: frozen pathways",
    "measure": "verdict profiles (another operator)",
    "swap_latent": "swap partner",
    "linear_scan": "linear map",
}
JOBS = {"run_latents": "latents", "run_scan": "scan", "run_mechanism": "mechanism", "make_donors": "scan"}


class Ledger:
    """Seconds and counts charged to parts (see the module docstring)."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self.decodes = defaultdict(int)
        self.backward = defaultdict(int)
        self.model = "?"

    @staticmethod
    def part() -> tuple[str, str]:
        """(job, part): the outermost job function and the innermost part on the stack."""
        f, part, job = sys._getframe(2), None, "other"
        while f is not None:
            name = f.f_code.co_name
            if "vaeprobe" in f.f_code.co_filename:
                if part is None and name in PARTS:
                    part = PARTS[name]
                job = JOBS.get(name, job)
            f = f.f_back
        return job, part or "encode, clean decode and other decodes"

    def charge(self, key: str, seconds: float, decodes: int = 0, backward: int = 0) -> None:
        self.seconds[key] += seconds
        self.decodes[key] += decodes
        self.backward[key] += backward


def install(ledger: Ledger) -> None:
    """Wrap ``VAE.decode``/``VAE.encode`` and ``torch.autograd.grad``/``Tensor.backward`` to charge the ledger."""
    decode, encode = VAE.decode, VAE.encode
    grad, backward = torch.autograd.grad, torch.Tensor.backward
    depth = [0]

    def timed(fn, kind):
        def wrapper(*args, **kwargs):
            if depth[0]:
                return fn(*args, **kwargs)
            depth[0] += 1
            job, part = Ledger.part()
            model = getattr(args[0], "spec", None) if kind != "backward" else None
            model = model or ledger.model
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
                n = 0
                if kind == "decode":
                    n = int(args[1].shape[0])
                if kind != "backward":
                    ledger.model = model
                ledger.charge(f"{model}|{job}: {part}", time.perf_counter() - t0, decodes=n,
                              backward=int(kind == "backward"))
        return wrapper

    VAE.decode = timed(decode, "decode")
    VAE.encode = timed(encode, "encode")
    torch.autograd.grad = timed(grad, "backward")
    torch.Tensor.backward = timed(backward, "backward")


def unit_decode(vae: VAE, size: int, batch: int = 8, reps: int = 2) -> float:
    """Seconds per latent of a batched decode of ``batch`` latents at ``size`` px (best of ``reps``)."""
    side = size // vae.factor
    z = torch.randn(batch, vae.latent_channels, side, side, generator=torch.Generator().manual_seed(0))
    best = float("inf")
    with torch.no_grad():
        vae.decode(z[:1])
        for _ in range(reps):
            t0 = time.perf_counter()
            vae.decode(z)
            best = min(best, time.perf_counter() - t0)
    return best / batch


def table(ledger: Ledger, units: dict[str, float], wall: dict[tuple[str, str], float]) -> list[dict]:
    """One row per (model, part): seconds, decodes, backward passes and decode-equivalents; per (model, job) of
    ``wall``, the job's wall time less its charged parts is ``JOB: other (Python, measures, files)``."""
    rows = []
    for key in sorted(ledger.seconds):
        model, _, part = key.partition("|")
        rows.append({"model": model, "part": part, "seconds": ledger.seconds[key], "decodes": ledger.decodes[key],
                     "backward": ledger.backward[key]})
    for (model, job), seconds in wall.items():
        charged = sum(r["seconds"] for r in rows if r["model"] == model and r["part"].startswith(job + ":"))
        rows.append({"model": model, "part": f"{job}: other (Python, measures, files)", "seconds": seconds - charged,
                     "decodes": 0, "backward": 0})
    for r in rows:
        unit = units.get(r["model"])
        r["decode_equivalents"] = round(r["seconds"] / unit, 1) if unit else None
        r["seconds"] = round(r["seconds"], 3)
    return rows


def split_ablations(rows: list[dict], model: str, candidates: int, controls: int) -> None:
    """Split a model's scan ablations row into the candidates' own and the controls' (one decode each, none for
    the controls that are the reference cells, whose decodes are reused)."""
    for r in list(rows):
        if r["model"] == model and r["part"] == "scan: ablations" and r["decodes"]:
            n = r["decodes"]
            candidates = min(candidates, n)  # a candidate that is a reference cell reuses its decode
            controls = min(controls, n - candidates)
            for part, k in (("scan: ablations: candidates", candidates), ("scan: ablations: controls", controls)):
                rows.append({**r, "part": part, "decodes": k, "seconds": round(r["seconds"] * k / n, 3),
                             "decode_equivalents": (round(r["decode_equivalents"] * k / n, 1)
                                                    if r["decode_equivalents"] is not None else None)})
            rows.remove(r)


def _timed_jobs(wall: dict) -> list:
    """Wrap the job functions the demo calls so that each (model, job)'s wall time lands in ``wall``; returns
    what to restore."""
    import vaeprobe.jobs.latents as latents
    import vaeprobe.jobs.mechanism as mechanism
    import vaeprobe.jobs.scan as scan

    saved = []
    for mod, name, job in ((latents, "run_latents", "latents"), (scan, "run_scan", "scan"),
                           (mechanism, "run_mechanism", "mechanism")):
        fn = getattr(mod, name)

        def wrapper(vae, *a, _fn=fn, _job=job, **k):
            t0 = time.perf_counter()
            try:
                return _fn(vae, *a, **k)
            finally:
                wall[(getattr(vae, "spec", str(vae)), _job)] += time.perf_counter() - t0
        setattr(mod, name, wrapper)
        saved.append((mod, name, fn))
    return saved


def profile_demo(args) -> dict:
    import inspect

    from vaeprobe.jobs.demo import run_demo
    from vaeprobe.models.loading import load_vae

    sig = inspect.signature(run_demo).parameters
    specs = [sig["vae_spec"].default, *sig["extra"].default, sig["control"].default]
    size = sig["size"].default
    units = {spec: unit_decode(load_vae(spec), size) for spec in specs}
    ledger = Ledger()
    install(ledger)
    wall: dict = defaultdict(float)
    saved = _timed_jobs(wall)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        res = run_demo(out=tmp, progress=False, log=lambda line: None)
        scans = _two_stage_counts(res["runs"])
    total = time.perf_counter() - t0
    for mod, name, fn in saved:
        setattr(mod, name, fn)
    rows = table(ledger, units, dict(wall))
    for model, (cand, ctrl) in scans.items():
        split_ablations(rows, model, cand, ctrl)
    jobs = [{"model": m, "job": j, "seconds": round(s, 2)} for (m, j), s in wall.items()]
    return {"what": "vaeprobe demo (run_demo with its defaults, profiled)", "size": size,
            "seconds": round(total, 2), "report_and_loading_seconds": round(total - sum(wall.values()), 2),
            "jobs": jobs, "unit_decode_s": units, "parts": rows}


def _two_stage_counts(runs) -> dict:
    """Per model: (candidate ablations, control ablations) of its two-stage scan runs."""
    import pandas as pd

    out = {}
    for run in runs:
        run = Path(run)
        table_path = run / "scan.parquet"
        if run.name != "scan" or not table_path.exists():
            continue
        cfg = json.loads((run / "config.json").read_text())
        df = pd.read_parquet(table_path, columns=["stage"])
        spec = cfg["vae"]["spec"] if isinstance(cfg.get("vae"), dict) else str(cfg.get("vae"))
        out[spec] = (int((df.stage != "control").sum()), int((df.stage == "control").sum()))
    return out


def profile_two_stage(args) -> dict:
    from vaeprobe.data.images import load_images
    from vaeprobe.jobs.scan import run_scan
    from vaeprobe.models.loading import load_vae

    vae = load_vae(args.vae)
    unit = unit_decode(vae, args.size)
    from PIL import Image

    images = [Image.fromarray((img.array * 255 + 0.5).clip(0, 255).astype("uint8"))
              for img in load_images("builtin:photos-heldout", size=args.size)[:args.images]]
    ledger = Ledger()
    install(ledger)
    ledger._job = f"{args.vae}|"
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run = run_scan(vae, images, Path(tmp) / "scan", mode="two-stage", size=args.size, progress=False)
        wall = time.perf_counter() - t0
        counts = _two_stage_counts([run.path])
        images_meta = [{k: m.get(k) for k in ("image", "positions", "decodes", "backward", "seconds", "verdicts")}
                       for _, m in run.metas()]
    rows = table(ledger, {args.vae: unit}, {(args.vae, "scan"): wall})
    cand, ctrl = next(iter(counts.values()))
    split_ablations(rows, args.vae, cand, ctrl)
    n = args.images
    per_image = {r["part"]: round(r["decode_equivalents"] / n, 1) for r in rows if r["decode_equivalents"] is not None}
    beyond = sum(v for k, v in per_image.items() if k != "scan: ablations: candidates")
    return {"what": f"run_scan(mode='two-stage') defaults, {n} held-out photos", "vae": args.vae, "size": args.size,
            "images": n, "seconds": round(wall, 2), "seconds_per_image": round(wall / n, 2), "unit_decode_s": unit,
            "candidates_per_image": cand / n, "controls_per_image": ctrl / n, "parts": rows,
            "per_image_decode_equivalents": per_image,
            "beyond_candidates_per_image": round(beyond, 1), "image_meta": images_meta}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("demo", "two-stage"))
    ap.add_argument("--vae", default="builtin:taef2")
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.what == "demo":
        res = profile_demo(args)
        out = args.out or "benchmarks/results/profile_demo.json"
    else:
        args.size = args.size or 512
        res = profile_two_stage(args)
        out = args.out or "benchmarks/results/profile_two_stage.json"
    res.update(python=platform.python_version(), torch=torch.__version__, threads=torch.get_num_threads(),
               command=" ".join(["python", "benchmarks/profile_bench.py", *sys.argv[1:]]))
    for r in res["parts"]:
        print(f"{r['model'][:24]:24s} {r['part'][:44]:44s} {r['seconds']:8.2f} s {r['decodes']:5d} dec "
              f"{r['backward']:4d} bwd {r['decode_equivalents'] if r['decode_equivalents'] is not None else '':>7}")
    write_text_atomic(Path(out), json.dumps(res, indent=1, default=str) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
