"""The ``vaeprobe scan`` job: a perturbation scan per image, with verdicts, kept decodes and a summary."""

from __future__ import annotations
import math
import re
import time
from typing import Sequence
import numpy as np
import pandas as pd
import torch
from vaeprobe.probes.latents import robust_channel_stats
from vaeprobe.probes.perturb import parse_operator
from vaeprobe.probes.response import DEFAULT_MEASURES, DEFAULT_RADIUS
from vaeprobe.probes.scan import (DEFAULT_GLOBAL_THRESHOLD, KeptDecodes, MODES, ScanCost, ScanError, exact_scan, linear_scan, select_sites, two_stage_scan)


# -- the `vaeprobe scan` job -------------------------------------------------------------------------------------

def _save_kept(folder, array: np.ndarray, ref: torch.Tensor, keep: KeptDecodes) -> list[dict]:
    from vaeprobe.reports.plots import save_png, signed_difference, tensor_to_unit

    save_png(folder / "input.png", array)
    save_png(folder / "recon.png", tensor_to_unit(ref))
    kept = []
    for (r, c), img in keep.items():
        diff, gain = signed_difference(img, ref)
        save_png(folder / f"r{r}_c{c}.png", tensor_to_unit(img))
        save_png(folder / f"r{r}_c{c}_diff.png", diff)
        kept.append({"row": r, "col": c, "gain": gain})
    return kept


def _sum_counts(dicts) -> dict:
    out: dict = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + int(v)
    return out


def run_scan(vae, images, out, op: str = "zero", positions: str = "all", mode: str = "exact",
             size: int | None = None, fit: str = "crop", radius: int = DEFAULT_RADIUS,
             measures: Sequence[str] = DEFAULT_MEASURES, batch: int = 8, n_probes: int = 32, seed: int = 0,
             patch: int = 1, channel: int | None = None, threshold: float = DEFAULT_GLOBAL_THRESHOLD,
             swap_with: str = "builtin:photos-train", keep_images: int = 8, resume: bool = False,
             overwrite: bool = False, progress: bool = True, verdicts: bool = True, evidence: int = 4,
             n_donors: int = 4):
    """Scan every image of ``images`` and write a run directory ``out``.

    Files: ``config.json`` (every setting and the VAE's description), ``parts/NNNNNN.parquet`` + ``.json`` (one
    image each, written atomically; ``resume=True`` skips finished ones), ``scan.parquet`` (one row per image and
    scanned position: ``image, row, col, ...`` measures, ``global_ratio``, the verdict columns, ``is_global``),
    ``images.parquet`` (per image: the top far-field position, its ratio, the verdict counts, decode count and
    seconds) and ``summary.json``. Returns the :class:`~vaeprobe.jobs.runner.RunDir`.

    Verdicts (``verdicts=True``, exact and two-stage modes): each scanned cell gets ``verdict`` (``ordinary``,
    ``high-norm``, ``wide-local``, ``global`` or ``global-information``) and ``is_global`` (True exactly for the
    last two) from :mod:`vaeprobe.probes.verdict`, with its measures and evidence: per image, a few ordinary cells are
    zeroed first to measure the decoder's effective receptive field; the swap test uses the first ``n_donors``
    images of ``swap_with`` as donors; the ``evidence`` most unusual cells get the matched controls and the
    frozen-pathway share. The verdict of a cell depends on that image's ordinary cells, not on which positions
    were scanned. It is calibrated for zeroing one cell: with another operator, patches or one channel, the
    verdict columns are those of zeroing the cell ``(row, col)`` (one more decode per position). ``linear``
    mode gives no verdict (``verdict`` is empty and ``is_global`` False): its estimates have no calibrated rule.
    ``global_ratio`` (far-field energy over the median scanned position's, or the controls' in two-stage mode)
    stays as a descriptive column; ``threshold`` only sets ``n_ratio_over`` in ``images.parquet``.

    The ``swap`` operator takes the values of another image's latent at the same place: the first image of
    ``swap_with``, resized to each scanned image's size (so a resumed run swaps with the same latent). The
    ``mean`` operator and ``noise`` sigma use each image's own per-channel latent mean and std.

    ``keep_images`` (exact and two-stage modes): under ``images/NNNNNN/``, the input (``input.png``), its clean
    decode (``recon.png``) and, for the ``keep_images`` positions with the largest far-field energy, the perturbed
    decode (``rR_cC.png``) and the signed difference (``rR_cC_diff.png``, amplified by the ``gain`` recorded in
    the image's metadata under ``kept``). Reports show them.
    """
    from vaeprobe.jobs.runner import RunDir
    from vaeprobe.models.loading import load_vae

    if mode not in MODES:
        raise ScanError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    if not (isinstance(positions, str) and re.fullmatch(r"all|grid:\d+|top:\d+|list:[\d,;\s]+", positions.strip().lower())):
        raise ScanError(f"unknown positions {positions!r}; use all, grid:S, top:K or list:R,C;R,C")
    if not hasattr(vae, "encode") or not hasattr(vae, "factor"):
        vae = load_vae(vae)
    parse_operator(op, stats={"mean": [0.0] * vae.latent_channels, "std": [1.0] * vae.latent_channels},
                   other=torch.zeros(1, vae.latent_channels, 1, 1), seed=seed)  # fail fast on a bad spec
    if mode == "linear":
        from vaeprobe.probes.linear import check_differentiable

        side = 8 * vae.factor
        reason = check_differentiable(vae, vae.encode(torch.zeros(1, 3, side, side)).mean)
        if reason:
            raise ScanError(f"{vae.spec}: --mode linear needs a decoder that autograd can go through, but {reason}; "
                            f"use --mode exact or --mode two-stage")
    info = vae.info()
    info.pop("device", None)
    config = {"job": "scan", "vae": info, "images": str(images), "op": op, "positions": positions, "mode": mode,
              "verdicts": bool(verdicts), "evidence": evidence, "n_donors": n_donors,
              "size": size, "fit": fit, "radius": radius, "measures": list(measures), "n_probes": n_probes,
              "seed": seed, "patch": patch, "channel": channel, "threshold": threshold,
              "keep_images": keep_images if mode != "linear" else 0}
    started = time.perf_counter()
    run = RunDir(out, config, resume=resume, overwrite=overwrite)
    skipped: list = []
    keys: list[str] = []
    names: list[str] = []
    lpips_model = None
    if "lpips" in measures:
        from vaeprobe.probes.metrics import get_lpips

        lpips_model = get_lpips(vae.device)
    partner: dict = {}
    donor_sets: dict = {}

    def donors_for(shape: tuple[int, int]):
        if shape not in donor_sets:
            from vaeprobe.data.images import resize, iter_images
            from vaeprobe.probes.verdict import make_donors

            got = []
            for item in iter_images(swap_with, factor=1, report=lambda s: None):
                got.append(item)
                if len(got) >= n_donors:
                    break
            if not got:
                donor_sets[shape] = None
            else:
                xs = [torch.from_numpy(np.ascontiguousarray(resize(g.array, shape[0], shape[1]))).permute(2, 0, 1)[None]
                      .float() * 2 - 1 for g in got]
                donor_sets[shape] = make_donors(vae, xs, [g.name for g in got])
        return donor_sets[shape]

    def swap_latent(shape: tuple[int, int]) -> torch.Tensor:
        if shape not in partner:
            from vaeprobe.data.images import resize, iter_images

            first = next(iter_images(swap_with, factor=1, report=lambda s: None), None)
            if first is None:
                raise ScanError(f"--swap-with {swap_with!r} holds no readable image")
            arr = resize(first.array, shape[0], shape[1])
            x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)[None].float() * 2 - 1
            partner[shape] = vae.encode(x).mean
        return partner[shape]

    for key, img, done in run.items(images, vae.factor, fit, size, skipped, f"scan ({mode})", progress):
        keys.append(key)
        names.append(img.name)
        if done:
            continue
        with run.guard(key, img.name):
            t0 = time.perf_counter()
            post = vae.encode(img.tensor())
            z = post.mean
            norm = z[0].norm(dim=0)
            stats = robust_channel_stats(z)
            other = swap_latent(tuple(img.array.shape[:2])) if "swap" in op else None
            operator = parse_operator(op, stats=stats, other=other, seed=seed)
            cost = ScanCost()
            ref = vae.decode(z)
            keep = KeptDecodes(keep_images) if keep_images and mode != "linear" else None
            field = None
            if verdicts and mode != "linear":
                from vaeprobe.probes.verdict import receptive_field

                field = receptive_field(vae, z, ref, seed=seed, exclude=stats["excluded"])
                cost.decodes += len(field.cells)
            if mode == "exact":
                sites = select_sites(positions, z.shape[-2:], norm=norm, size=patch, channel=channel)
                df = exact_scan(vae, z, sites, operator, measures=measures, radius=radius, batch=batch, ref=ref,
                                lpips_model=lpips_model, progress=progress, cost=cost, keep=keep, field=field)
            elif mode == "linear":
                df = linear_scan(vae, z, n_probes=n_probes, radius=radius, seed=seed, cost=cost)
            else:
                df = two_stage_scan(vae, z, operator, norm=norm, radius=radius, seed=seed, measures=measures,
                                    batch=batch, ref=ref, lpips_model=lpips_model, cost=cost, keep=keep,
                                    field=field)
                if df.attrs.get("linear_fallback"):
                    run.say(f"vaeprobe: note: {vae.spec}: no linear map, since the decoder is not differentiable "
                            f"({df.attrs['linear_fallback']}); two-stage takes latent-norm candidates and a larger "
                            f"random control sample instead", once=True)
            kept = _save_kept(run.path / "images" / key, img.array, ref, keep) if keep is not None else []
            df.insert(0, "image", img.name)
            score = "global_ratio" if "global_ratio" in df else "far_ratio"
            profiles = None
            if field is not None:
                from vaeprobe.probes.verdict import attach_verdicts

                df = attach_verdicts(vae, z, ref, df, field, donors=donors_for(tuple(img.array.shape[:2])),
                                     evidence=evidence, cost=cost)
                profiles = df.attrs.get("profiles")
            else:
                df["verdict"] = None
                df["is_global"] = False
            top = df.loc[df[score].idxmax()] if score in df and df[score].notna().any() else None
            meta = {"image": img.name, "source": img.source, "h": int(z.shape[-2]), "w": int(z.shape[-1]),
                    "top_row": int(top.row) if top is not None else -1, "top_col": int(top.col) if top is not None else -1,
                    "top_ratio": float(top[score]) if top is not None else math.nan,
                    "n_global": int(df["is_global"].sum()), "positions": len(df),
                    "n_ratio_over": int((df[score] >= threshold).sum()) if score in df else 0,
                    "verdicts": {str(k): int(v) for k, v in df["verdict"].value_counts().items()},
                    "erf": float(field.erf) if field is not None else math.nan, "profiles": profiles,
                    "decodes": cost.decodes, "backward": cost.backward, "kept": kept,
                    "linear_fallback": df.attrs.get("linear_fallback"),
                    "seconds": round(time.perf_counter() - t0, 3)}
            run.write_part(key, df, meta)
    keys = run.finished(keys)
    run.concat("scan.parquet", keys)
    rows = [run.meta(k) for k in keys]
    import json

    # nested per-image records stay in parts/*.json; the table keeps flat columns (verdict counts as JSON text)
    images_df = pd.DataFrame([{**{k: v for k, v in r.items() if k not in ("profiles", "verdicts")},
                               "verdicts": json.dumps(r.get("verdicts") or {}, sort_keys=True)} for r in rows])
    run.write_table("images.parquet", images_df)
    summary = {"n_images": len(rows), "mode": mode, "op": op, "threshold": threshold,
               "global_rate": (float(np.mean([r["n_global"] > 0 for r in rows])) if rows else math.nan)
               if verdicts and mode != "linear" else math.nan,
               "verdicts": _sum_counts(r.get("verdicts") or {} for r in rows),
               "decodes": int(sum(r["decodes"] for r in rows)), "seconds": float(sum(r["seconds"] for r in rows)),
               "linear_fallback": sorted({r["linear_fallback"] for r in rows if r.get("linear_fallback")}),
               "skipped": [str(s) for s in skipped], "failed": run.failed, "vae": info}
    run.write_json("summary.json", summary)
    run.finish(time.perf_counter() - started)
    return run
