"""Rebuild everything that depends on the weights of ``builtin:mini-kl-f8``, in one command.

    python experiments/rebuild_mini.py                      # every step, skipping those done for these weights
    python experiments/rebuild_mini.py --list               # the steps and their commands
    python experiments/rebuild_mini.py --only card,corner-blob --force

Run it after new weights are exported to ``vaeprobe/models/builtin/mini-kl-f8`` (``train_mini_vae.py --export``).
The steps, in order:

- ``ft-mse``: ``builtin:mini-kl-f8-ft-mse``, the decoder-only fine-tune (``finetune_decoder.py``), so that its
  encoder stays the new mini's;
- ``card-data``: the model card's numbers on held-out sources at 128 and 256 px, colour fidelity, latent
  statistics and the training curve (``evaluate_mini.py``), against ``builtin:taef2`` and, when present, the
  previous weights in ``runs/train-mini-kl-f8/export``;
- ``corner-blob``: the corner-droplet investigation (``corner_blob.py``);
- ``card``: ``MODEL_CARD.md`` and ``eval.json`` with the planted controls (``evaluate_builtin.py``);
- the calibrations behind the detector defaults: ``latent-norms`` (spot threshold, ``latent_norm_ratios.py``),
  ``scan-defaults-64`` / ``scan-defaults-128`` (far-field radius and global-effect threshold,
  ``scan_defaults.py``), ``mechanism`` (pathway attribution on the controls, ``mechanism_controls.py``);
- ``known-effects``: the far-field plateau against planted effects of known size on the mini and taef2 at 64-512
  px, and the verdict measures of the clean models' chosen cells (``known_effects.py``; docs/verdicts.md);
- ``heldout-verdicts``: every control's planted cell and cells of the clean models on the held-out photos at
  64-256 px under the verdict rule (``heldout_verdicts.py``; docs/verdicts.md, docs/findings.md);
- ``compare-taef2``: ``vaeprobe compare builtin:mini-kl-f8 builtin:taef2`` on the 15 builtin photos at 256 px
  (quoted in docs/taef2.md), and ``compare-taef2-wallpapers`` on the held-out wallpapers at 256 px;
- ``corner-verdicts``: the verdict measures of the mini's corner-droplet cell on the held-out photos
  (``corner_verdicts.py``).

Not rebuilt here (slow; their docs say which weights they were measured on): ``benchmarks/linear_agreement.py
--model mini``, ``benchmarks/scan_bench.py`` and ``benchmarks/mechanism_bench.py``.

Each step's command is printed before it runs; a step that fails stops the rebuild with its exit status. A step
that finished is recorded in ``runs/rebuild-mini/done.json`` with the SHA-256 of the weights it ran on, so a rerun
after a kill continues with the first step not done for the current weights. The documentation quoting these
numbers (docs/latents.md, docs/scan.md, docs/mechanism.md) is edited by hand; the last step, ``doc-tables``,
writes their tables to ``experiments/results/doc_tables.md`` (``doc_tables.py``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vaeprobe._io import cache_dir, write_text_atomic# noqa: E402

WEIGHTS = ROOT / "vaeprobe" / "models" / "builtin" / "mini-kl-f8" / "diffusion_pytorch_model.safetensors"
RESULTS = "experiments/results"


def _copy(py: str, src: str, dst: str) -> list[str]:
    return [py, "-c", f"import shutil; shutil.copyfile({src!r}, {dst!r})"]


def steps(py: str, wallpapers: Path) -> dict[str, list[list[str]]]:
    """Each step: the commands it runs, in order (run from the repository root)."""
    previous = ROOT / "runs" / "train-mini-kl-f8" / "export"
    compare = ["--compare", "builtin:taef2"] + (["--compare", str(previous.relative_to(ROOT))]
                                                if previous.is_dir() else [])
    tmp = "runs/rebuild-mini"
    return {
        "ft-mse": [[py, "experiments/finetune_decoder.py", "--export", "vaeprobe/models/builtin/mini-kl-f8-ft-mse"]],
        "card-data": [[py, "experiments/evaluate_mini.py", "--vae", "builtin:mini-kl-f8", *compare,
                       "--log", "vaeprobe/models/builtin/mini-kl-f8/training.json", "--out", f"{RESULTS}/mini_kl_f8"]],
        "corner-blob": [[py, "experiments/corner_blob.py", "--out", f"{RESULTS}/corner_blob_mini.json"]],
        "card": [[py, "experiments/evaluate_builtin.py", "--mini-results", f"{RESULTS}/mini_kl_f8/results.json",
                  "--blob-results", f"{RESULTS}/corner_blob_mini.json"]],
        "latent-norms": [[py, "experiments/latent_norm_ratios.py", "--models", ",".join(
            ["builtin:mini-kl-f8", "builtin:tiny-random"] + [f"builtin:planted-{m}" for m in
                                                             ("direct", "groupnorm", "attention", "hidden")]),
            "--out", f"{RESULTS}/latent_norm_ratios.json"]],
        "scan-defaults-64": [[py, "experiments/scan_defaults.py", "--size", "64",
                              "--out", f"{RESULTS}/scan_defaults_64.json"]],
        "scan-defaults-128": [[py, "experiments/scan_defaults.py", "--size", "128",
                               "--out", f"{RESULTS}/scan_defaults.json"]],
        "mechanism": [[py, "experiments/mechanism_controls.py", "--out", f"{RESULTS}/mechanism_controls.json"]],
        # the plateau against effects of known size (docs/verdicts.md); nothing here is fitted
        "known-effects": [[py, "experiments/known_effects.py", "--sizes", "64,128,256,512",
                           "--out", f"{RESULTS}/known_effects.json"]],
        "heldout-verdicts": [[py, "experiments/heldout_verdicts.py", "--sizes", "64,128,256",
                              "--out", f"{RESULTS}/heldout_verdicts.json"]],
        # docs/taef2.md quotes this one (15 builtin photos at 256 px)
        "compare-taef2": [[py, "-m", "vaeprobe", "compare", "builtin:mini-kl-f8", "builtin:taef2",
                           "--images", "builtin:photos", "--size", "256", "--quiet",
                           "--out", f"{tmp}/compare-taef2-photos-256"],
                          _copy(py, f"{tmp}/compare-taef2-photos-256/summary.json",
                                f"{RESULTS}/taef2_cli_256/compare.summary.json")],
        # the gap on the held-out wallpapers (the faithful-mini issue's sources)
        "compare-taef2-wallpapers": [[py, "-m", "vaeprobe", "compare", "builtin:mini-kl-f8", "builtin:taef2",
                                      "--images", str(wallpapers / "heldout" / "*" / "*.png"), "--size", "256",
                                      "--quiet", "--out", f"{tmp}/compare-taef2-wallpapers-256"],
                                     _copy(py, f"{tmp}/compare-taef2-wallpapers-256/summary.json",
                                           f"{RESULTS}/compare_mini_taef2_wallpapers_256.json")],
        # the corner droplet's cell under the verdict rule (docs/mini-corner-blob.md)
        "corner-verdicts": [[py, "experiments/corner_verdicts.py", "--out", f"{RESULTS}/corner_verdicts_mini.json"]],
        "doc-tables": [[py, "experiments/doc_tables.py", "--out", f"{RESULTS}/doc_tables.md"]],
    }


def weights_hash() -> str:
    return hashlib.sha256(WEIGHTS.read_bytes()).hexdigest()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated step names (default: all)")
    ap.add_argument("--force", action="store_true", help="rerun steps already done for these weights")
    ap.add_argument("--list", action="store_true", help="print the steps and exit")
    ap.add_argument("--wallpapers", default=str(cache_dir() / "wallpapers"),
                    help="the set written by experiments/fetch_wallpapers.py")
    args = ap.parse_args(argv)
    plan = steps(sys.executable, Path(args.wallpapers))
    if args.list:
        for name, cmds in plan.items():
            print(f"{name}: " + " && ".join(" ".join(c) for c in cmds))
        return 0
    wanted = list(plan) if not args.only else [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in plan]
    if unknown:
        print(f"error: unknown step(s) {', '.join(unknown)}; the steps are {', '.join(plan)}", file=sys.stderr)
        return 2
    if not (Path(args.wallpapers) / "manifest.csv").exists():
        print(f"error: no wallpaper set in {args.wallpapers}; run python experiments/fetch_wallpapers.py first",
              file=sys.stderr)
        return 2
    state_file = ROOT / "runs" / "rebuild-mini" / "done.json"
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    digest = weights_hash()
    for i, name in enumerate(wanted, 1):
        if state.get(name, {}).get("weights") == digest and not args.force:
            print(f"[{i}/{len(wanted)}] {name}: done for these weights, skipped (--force reruns it)")
            continue
        t0 = time.time()
        rc = 0
        for cmd in plan[name]:
            print(f"[{i}/{len(wanted)}] {name}: {' '.join(cmd)}", flush=True)
            rc = subprocess.call(cmd, cwd=ROOT)
            if rc != 0:
                break
        if rc != 0:
            print(f"error: step {name} failed with exit status {rc}; fix it and rerun (finished steps are kept)",
                  file=sys.stderr)
            return rc
        state[name] = {"weights": digest, "seconds": round(time.time() - t0, 1)}
        write_text_atomic(state_file, json.dumps(state, indent=1))
        print(f"[{i}/{len(wanted)}] {name}: done in {state[name]['seconds']} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
