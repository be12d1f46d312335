"""The ``vaeprobe scan`` job: a perturbation scan per image, with verdicts, kept decodes and a summary.

Verdicts (``verdicts=True``, exact and two-stage modes): each scanned cell gets ``verdict`` (``ordinary``,
``high-norm``, ``wide-local``, ``global`` or ``global-information``) and ``is_global`` (True exactly for the
last two) from :mod:`vaeprobe.probes.verdict`, with its measures (the far-field plateau in 8-bit levels and
its decay) and evidence: per image, a few ordinary cells are removed first to measure the decoder's kernel;
the swap test uses the first ``n_donors`` images of ``swap_with`` as donors; the ``evidence`` most unusual
cells get the matched controls and the frozen-pathway share. The verdict of a cell depends on that image's
ordinary cells, not on which positions were scanned. Cells are removed by ``removal`` (default ``smudge``,
which does not depend on the latent's coordinates; ``zero`` is available): with another ``op``, patches or
one channel, the verdict columns are those of removing the cell ``(row, col)`` (one more decode per
position). ``visible_levels`` is the verdicts' visibility threshold in 8-bit levels. ``linear`` mode gives
no verdict (``verdict`` is empty and ``is_global`` False).
``global_ratio`` (far-field energy over the median scanned position's, or the controls' in two-stage mode)
stays as a descriptive column; ``threshold`` only sets ``n_ratio_over`` in ``images.parquet``.

The ``swap`` operator takes the values of another image's latent at the same place: the first image of
``swap_with``, resized to each scanned image's size (so a resumed run swaps with the same latent). The
``mean`` operator and ``noise`` sigma use each image's own robust per-channel latent centre and std.

``keep_images`` (exact and two-stage modes): per image, the input, its clean decode and, for the
``keep_images`` positions with the largest far-field energy, the perturbed decode and the signed difference
(amplified by the ``gain`` recorded in the image's metadata under ``kept``) are saved as PNG files; reports
show them.

``position_blocks`` B > 1 (exact mode) cuts each image's positions into B blocks, each a work unit of its own,
so that a sharded run (README, "Many GPUs") spreads a few large images over many ranks. Every block repeats the
image's encode, clean decode and receptive field (13 decodes with verdicts) and its own evidence; the blocks are
merged into the image's part when all are done. Blocks are whole decoder batches, so the merged table equals an
unsplit scan's (tested bitwise on CPU); ``decodes`` counts the repeated work.
"""

from __future__ import annotations

import json
import math
import time
import numpy as np
import pandas as pd
import torch

from vaeprobe.jobs.runner import Job, RunDir, check_positions, coerce_vae, run_job, vae_config
from vaeprobe.jobs.spec import JobSpec, Param, _csv, _joined, image_params
from vaeprobe.probes.engine import DECODE_BATCH
from vaeprobe.probes.latents import robust_channel_stats
from vaeprobe.probes.perturb import check_operator, parse_operator
from vaeprobe.probes.response import DEFAULT_MEASURES, DEFAULT_RADIUS
from vaeprobe.probes.scan import (DEFAULT_GLOBAL_THRESHOLD, MODES, ScanError, ScanResult, exact_scan, linear_scan,
                                  select_sites, two_stage_scan)


# -- the `vaeprobe scan` job -------------------------------------------------------------------------------------

def _save_kept(folder, array: np.ndarray, ref: torch.Tensor, kept: list) -> list[dict]:
    """Write the input, its clean decode and each kept perturbed decode with its signed difference; returns
    ``[{row, col, gain}]``."""
    from vaeprobe.reports.plots import save_png, signed_difference, tensor_to_unit

    save_png(folder / "input.png", array)
    save_png(folder / "recon.png", tensor_to_unit(ref))
    out = []
    for (r, c), img in kept:
        diff, gain = signed_difference(img, ref)
        save_png(folder / f"r{r}_c{c}.png", tensor_to_unit(img))
        save_png(folder / f"r{r}_c{c}_diff.png", diff)
        out.append({"row": r, "col": c, "gain": gain})
    return out


def _sum_counts(dicts) -> dict:
    out: dict = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + int(v)
    return out


def _scan_spec() -> JobSpec:
    from vaeprobe.probes.perturb import OPERATORS
    from vaeprobe.probes.response import ALL_MEASURES

    return JobSpec("scan", "perturb latent positions, decode and measure how far the change spreads",
                   entry="run_scan", rank=20, run_help={
                       "quiet": "no progress bars",
                       "dtype": "fp32 (default), fp16 or bf16: half precision decodes faster but adds ~1-2%% "
                                "rounding noise to every decode, which floors the far-field measures"}, params=(
        Param("op", "smudge", f"perturbation: {', '.join(OPERATORS)}; join with + (e.g. scale:0.5+noise:0.1); "
                              f"default smudge (the cell takes its neighbours' mean, the verdicts' removal)"),
        Param("positions", "all", "all, grid:S, top:K or list:R,C;R,C (exact mode)"),
        Param("mode", "exact", "exact (decode every position), two-stage or linear (default {default})",
              choices=MODES),
        *image_params(),
        Param("radius", DEFAULT_RADIUS, "far-field radius in latent cells (default {default}; see docs/scan.md)",
              type=int),
        Param("measures", tuple(DEFAULT_MEASURES), f"comma-separated, from {', '.join(ALL_MEASURES)} (default: "
                                                   f"all but ssim and lpips)", parse=_csv, show=_joined),
        Param("batch", DECODE_BATCH, "perturbed latents per decoder call (default {default})", type=int,
              config=False),
        Param("position_blocks", 1, "exact mode: split each image's positions into B work units, so that a "
                                    "sharded run (torchrun) spreads a few large images over its ranks (default 1)",
              type=int, metavar="B"),
        Param("n_probes", 32, "random probes of the linear map (linear mode)", type=int, flag="--probes", metavar="N"),
        Param("patch", 1, "perturb a k x k patch around each position", type=int),
        Param("channel", None, "perturb one channel only", type=int),
        Param("seed", 0, "seed of random operators, probes and reference cells (default 0)", type=int),
        Param("threshold", DEFAULT_GLOBAL_THRESHOLD, "global_ratio counted in images.parquet's n_ratio_over "
                                                     "(default {default}); descriptive only: is_global comes from "
                                                     "the verdicts", type=float),
        Param("verdicts", True, "skip the per-cell verdicts (saves the receptive-field and swap decodes)",
              negate=True),
        Param("evidence", 4, "cells per image that get the matched controls and frozen-pathway share (default "
                             "{default})", type=int),
        Param("removal", "smudge", "how the verdicts remove a cell: smudge (default; the same in any latent "
                                   "coordinates) or another operator, e.g. zero"),
        Param("visible_levels", 1.0, "the verdicts' visibility threshold in 8-bit levels: a far plateau whose "
                                     "lower bound reaches it, is over the image's ordinary cells and does not "
                                     "decay is global (default 1, the smallest step an 8-bit image shows; "
                                     "docs/verdicts.md)", type=float),
        Param("n_donors", 4, "images of --swap-with used as donors by the verdicts' swap test (default {default})",
              type=int, flag="--donors", metavar="N"),
        Param("swap_with", "builtin:photos-train", "image source whose first image the swap operator takes "
                                                   "values from (and whose first --donors images the verdicts' "
                                                   "swap test uses)"),
        Param("keep_images", 8, "save the perturbed decode and difference image of the K positions with the "
                                "largest far-field energy, for reports (default {default}; 0: none)", type=int),
    ))


def cli_line(summary: dict, options: dict, out) -> str:
    """What ``vaeprobe scan`` prints when it finishes."""
    from vaeprobe.schema import global_cell_phrase

    counts = summary.get("verdicts") or {}
    if counts:
        verdict = (f"{global_cell_phrase()} on {summary['global_rate']:.0%} of them; cell verdicts: "
                   + ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])))
    elif options["mode"] == "linear":
        verdict = "no verdicts (linear mode has no calibrated rule; use exact or two-stage)"
    else:
        verdict = "no verdicts (--no-verdicts)"
    return (f"{summary['n_images']} images scanned ({options['mode']}, {options['op']}); {verdict}; "
            f"{summary['decodes']} decodes in {summary['seconds']:.1f} s"
            f"; results in {out}")


SPEC = _scan_spec()
"""The scan job's parameters: its CLI options, API defaults and ``config.json`` (:mod:`vaeprobe.jobs.spec`)."""


class ScanJob(Job):
    """Per image: a perturbation scan with verdicts (see :func:`run_scan`)."""

    name = "scan"

    def __init__(self, vae, images, *, progress: bool = True, **options):
        opts = SPEC.resolve(options)
        opts["measures"] = list(opts["measures"])
        opts["keep_images"] = opts["keep_images"] if opts["mode"] != "linear" else 0
        opts["verdicts"] = bool(opts["verdicts"])
        opts["position_blocks"] = max(1, int(opts["position_blocks"]))
        opts["visible_levels"] = float(opts["visible_levels"])
        self.set_options(SPEC, opts)
        self.vae, self.images, self.factor, self.progress = vae, images, vae.factor, progress
        mode = self.mode
        self.desc = f"scan ({mode})"
        if self.position_blocks > 1:
            self.unit = "block"
        self.lpips_model = None
        if "lpips" in self.measures:
            from vaeprobe.probes.metrics import get_lpips

            self.lpips_model = get_lpips(vae.device)
        self._partner: dict = {}
        self._donors: dict = {}

    def config(self) -> dict:
        return {**SPEC.config(self.options), "vae": vae_config(self.vae), "images": str(self.images)}

    def rules(self):
        from vaeprobe.probes.verdict import VerdictRules

        return VerdictRules(visible_levels=self.visible_levels)

    def units(self, skipped: list):
        """Images, or with ``position_blocks`` B > 1 each image's B blocks of positions (keys ``KEY-bNN``)."""
        units = super().units(skipped)
        if self.position_blocks == 1:
            yield from units
            return
        for key, name, img in units:
            for b in range(self.position_blocks):
                yield f"{key}-b{b:02d}", name, (key, img, b)

    def block_sites(self, sites: list, block: int) -> list:
        """Block ``block`` of ``sites``: contiguous, each a whole number of ``batch``-sized decoder calls, so every
        decoder call holds the same latents as in an unsplit scan (blocks past the end are empty)."""
        per = -(-len(sites) // self.position_blocks)
        per = -(-per // self.batch) * self.batch
        return sites[block * per:(block + 1) * per]

    def _swap_images(self, n: int, shape: tuple[int, int]) -> list:
        """The first ``n`` images of ``swap_with`` resized to ``shape``, as ``[1, 3, H, W]`` tensors in [-1, 1]."""
        from vaeprobe.data.images import iter_images, resize

        got = []
        for item in iter_images(self.swap_with, factor=1, report=lambda s: None):
            arr = resize(item.array, shape[0], shape[1])
            got.append((item.name, torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)[None].float() * 2 - 1))
            if len(got) >= n:
                break
        return got

    def donors(self, shape: tuple[int, int]):
        """The swap test's donors at this image size (cached)."""
        if shape not in self._donors:
            from vaeprobe.probes.verdict import make_donors

            got = self._swap_images(self.n_donors, shape)
            self._donors[shape] = (make_donors(self.vae, [x for _, x in got], names=[n for n, _ in got])
                                   if got else None)
        return self._donors[shape]

    def swap_latent(self, shape: tuple[int, int]) -> torch.Tensor:
        """The ``swap`` operator's partner latent at this image size (cached)."""
        if shape not in self._partner:
            got = self._swap_images(1, shape)
            if not got:
                raise ScanError(f"--swap-with {self.swap_with!r} holds no readable image")
            self._partner[shape] = self.vae.encode(got[0][1]).mean
        return self._partner[shape]

    def _scan(self, run: RunDir, z, ref, norm, operator, field, block: int | None = None) -> ScanResult:
        vae, mode = self.vae, self.mode
        common = {"radius": self.radius, "measures": self.measures, "batch": self.batch, "ref": ref,
                  "lpips_model": self.lpips_model, "keep": self.keep_images, "field": field}
        if mode == "exact":
            sites = select_sites(self.positions, z.shape[-2:], norm=norm, size=self.patch, channel=self.channel)
            if block is not None:
                sites = self.block_sites(sites, block)
                if not sites:
                    return ScanResult(table=pd.DataFrame())
            return exact_scan(vae, z, sites, operator, progress=self.progress, **common)
        if mode == "linear":
            return linear_scan(vae, z, n_probes=self.n_probes, radius=self.radius, seed=self.seed)
        res = two_stage_scan(vae, z, operator, norm=norm, seed=self.seed, **common)
        if res.table.attrs.get("linear_fallback"):
            run.say(f"vaeprobe: note: {vae.spec}: no linear map, since the decoder is not differentiable "
                    f"({res.table.attrs['linear_fallback']}); two-stage takes latent-norm candidates and a larger "
                    f"random control sample instead", once=True)
        return res

    def process(self, run: RunDir, key: str, item) -> None:
        image_key, img, block = item if self.position_blocks > 1 else (key, item, None)
        vae = self.vae
        t0 = time.perf_counter()
        x = img.tensor()
        z = vae.encode(x).mean
        from vaeprobe.probes.verdict import output_range_problem, standard_norm

        norm = standard_norm(z)  # the same in any latent coordinates
        stats = robust_channel_stats(z)
        other = self.swap_latent(tuple(img.array.shape[:2])) if "swap" in self.op else None
        operator = parse_operator(self.op, other=other, seed=self.seed)
        ref = vae.decode(z)
        problem = output_range_problem(x, ref)
        if problem:
            run.say(f"vaeprobe: warning: {vae.spec}: {problem.split(' (')[0]}; the verdicts' 8-bit levels assume "
                    f"[-1, 1] outputs", once=True)
        field, decodes = None, 0
        if self.verdicts and self.mode != "linear":
            from vaeprobe.probes.verdict import receptive_field

            field = receptive_field(vae, z, ref, seed=self.seed, exclude=stats["excluded"], removal=self.removal)
            decodes += len(field.cells)
            visible = self.rules().visible_levels
            if field.plateau_bound >= visible:  # e.g. 64 px: the far field is a few cells wide (docs/verdicts.md)
                run.say(f"vaeprobe: note: at {x.shape[-2]}x{x.shape[-1]} px ordinary cells keep up to about "
                        f"{math.ceil(field.plateau_bound)} 8-bit levels beyond the receptive field, over "
                        f"--visible-levels {visible:g}; fainter plateaus are not resolved at this size (use a larger "
                        f"--size)", once=True)
        res = self._scan(run, z, ref, norm, operator, field, block)
        decodes += res.decodes
        kept = _save_kept(run.path / "images" / image_key, img.array, ref, res.kept) if self.keep_images else []
        df = res.table
        if df.empty:  # a block past the last position
            run.write_part(key, None, {"image": img.name, "source": img.source, "h": int(z.shape[-2]),
                                       "w": int(z.shape[-1]), "block": block, "image_key": image_key,
                                       "positions": 0, "decodes": decodes, "backward": 0, "kept": [],
                                       "erf": float(field.erf) if field is not None else math.nan,
                                       "profiles": None, "seconds": round(time.perf_counter() - t0, 3)})
            return
        df.insert(0, "image", img.name)
        profiles = None
        if field is not None:
            from vaeprobe.probes.verdict import attach_verdicts

            known = res.removed if field.decodes_for(operator) else None  # the scan removed cells as the verdicts do
            donors = self.donors(tuple(img.array.shape[:2]))
            if donors is not None:
                donors.removed.clear()  # reuse within this image only: its decode count is the same on any rank
            df = attach_verdicts(vae, z, ref, df, field, donors=donors, evidence=self.evidence, rules=self.rules(),
                                 known=known)
            profiles = df.attrs.get("profiles")
            decodes += df.attrs["decodes"]
        else:
            df["verdict"] = None
            df["is_global"] = False
        meta = {"image": img.name, "source": img.source, "h": int(z.shape[-2]), "w": int(z.shape[-1]),
                **self._top(df), "n_global": int(df["is_global"].sum()), "positions": len(df),
                "verdicts": {str(k): int(v) for k, v in df["verdict"].value_counts().items()},
                "erf": float(field.erf) if field is not None else math.nan, "profiles": profiles,
                "decodes": decodes, "backward": res.backward, "kept": kept,
                "linear_fallback": df.attrs.get("linear_fallback"), "seconds": round(time.perf_counter() - t0, 3)}
        if block is not None:
            meta.update(block=block, image_key=image_key)
        run.write_part(key, df, meta)

    def _top(self, df: pd.DataFrame) -> dict:
        score = "global_ratio" if "global_ratio" in df else "far_ratio"
        top = df.loc[df[score].idxmax()] if score in df and df[score].notna().any() else None
        return {"top_row": int(top.row) if top is not None else -1, "top_col": int(top.col) if top is not None else -1,
                "top_ratio": float(top[score]) if top is not None else math.nan,
                "n_ratio_over": int((df[score] >= self.threshold).sum()) if score in df else 0}

    def merge_blocks(self, run: RunDir, keys: list[str]) -> list[str]:
        """Merge each image whose position blocks all finished into one part under the image's key, as an unsplit
        scan would have written it: ``global_ratio`` over all its positions, the matched controls and the
        frozen share for its ``evidence`` most unusual cells only (each block measured its own), the kept decodes
        of its ``keep_images`` largest far fields (the others' files are removed). Returns the image keys."""
        from vaeprobe.probes.response import global_effect_ratio
        from vaeprobe.probes.verdict import PROFILE_COLUMNS, evidence_rows

        groups: dict[str, list[str]] = {}
        for k in keys:
            groups.setdefault(k.rsplit("-b", 1)[0], []).append(k)
        merged = []
        for image_key, block_keys in groups.items():
            if len(block_keys) < self.position_blocks:
                continue  # a block failed: it is listed under failed, and --resume retries it
            metas = [run.meta(k) for k in block_keys]
            tables = [pd.read_parquet(run.parts_dir / f"{k}.parquet") for k, m in zip(block_keys, metas)
                      if m.get("positions")]
            df = pd.concat(tables, ignore_index=True)
            if "far_l2" in df:
                df["global_ratio"] = global_effect_ratio(df["far_l2"].to_numpy())
            profiles = next((m["profiles"] for m in metas if m.get("profiles")), None)
            if self.verdicts and self.mode != "linear":
                records = df[list(PROFILE_COLUMNS)].to_dict("records")
                chosen = evidence_rows(records, self.rules(), self.evidence)
                drop = np.ones(len(df), bool)
                drop[chosen] = False
                df.loc[drop, ["matched_ratio", "transplant_ratio", "frozen_removed"]] = math.nan
                keep_cells = {f"{df.row.iloc[i]},{df.col.iloc[i]}" for i in chosen}
                cells = {c: p for m in metas for c, p in ((m.get("profiles") or {}).get("cells") or {}).items()}
                profiles = {"reference": profiles["reference"] if profiles else None,
                            "cells": {c: p for c, p in cells.items() if c in keep_cells}}
            kept = self._merge_kept(run, image_key, df, [k for m in metas for k in m.get("kept") or []])
            first = metas[0]
            meta = {"image": first["image"], "source": first["source"], "h": first["h"], "w": first["w"],
                    **self._top(df), "n_global": int(df["is_global"].sum()), "positions": len(df),
                    "verdicts": {str(k): int(v) for k, v in df["verdict"].value_counts().items()},
                    "erf": first["erf"], "profiles": profiles, "decodes": int(sum(m["decodes"] for m in metas)),
                    "backward": int(sum(m.get("backward") or 0 for m in metas)), "kept": kept,
                    "linear_fallback": None, "seconds": round(sum(m["seconds"] for m in metas), 3),
                    "blocks": len(block_keys)}
            run.write_part(image_key, df, meta)
            merged.append(image_key)
        return merged

    def _merge_kept(self, run: RunDir, image_key: str, df: pd.DataFrame, kept: list[dict]) -> list[dict]:
        """The ``keep_images`` kept decodes with the largest far field over all blocks; the others' files go."""
        far = {(int(r), int(c)): v for r, c, v in zip(df.row, df.col, df.get("far_l2", df.get("l2")))}
        kept = sorted(kept, key=lambda k: -far.get((k["row"], k["col"]), -math.inf))
        for k in kept[self.keep_images:]:
            for suffix in ("", "_diff"):
                (run.path / "images" / image_key / f"r{k['row']}_c{k['col']}{suffix}.png").unlink(missing_ok=True)
        return kept[:self.keep_images]

    def summarise(self, run: RunDir, keys: list[str]) -> dict:
        if self.position_blocks > 1:
            keys = self.merge_blocks(run, keys)
        run.concat("scan.parquet", keys)
        rows = [run.meta(k) for k in keys]
        # nested per-image records stay in parts/*.json; the table keeps flat columns (verdict counts as JSON text)
        images_df = pd.DataFrame([{**{k: v for k, v in r.items() if k not in ("profiles", "verdicts")},
                                   "verdicts": json.dumps(r.get("verdicts") or {}, sort_keys=True)} for r in rows])
        run.write_table("images.parquet", images_df)
        with_verdicts = self.verdicts and self.mode != "linear"
        return {"n_images": len(rows), "mode": self.mode, "op": self.op, "threshold": self.threshold,
                "global_rate": (float(np.mean([r["n_global"] > 0 for r in rows])) if rows else math.nan)
                if with_verdicts else math.nan,
                "verdicts": _sum_counts(r.get("verdicts") or {} for r in rows),
                "decodes": int(sum(r["decodes"] for r in rows)), "seconds": float(sum(r["seconds"] for r in rows)),
                "linear_fallback": sorted({r["linear_fallback"] for r in rows if r.get("linear_fallback")}),
                "vae": vae_config(self.vae)}


def run_scan(vae, images, out, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
             device=None, dtype=None, **options) -> RunDir:
    """Scan every image of ``images`` and write a run directory ``out``.

    One part per image is written atomically, so ``resume=True`` skips the images a killed run finished. Files: see
    docs/outputs.md, section scan. The keyword options and their defaults are declared once, in :data:`SPEC`
    (which also makes ``vaeprobe scan``'s options and ``config.json``); an unknown keyword is refused in one line.

    Parameters
    ----------
    vae : VAE, str or torch.nn.Module
        The model, or what :func:`~vaeprobe.models.loading.load_vae` loads.
    images : str, path or sequence
        What :func:`~vaeprobe.data.images.iter_images` reads.
    out : str or Path
        The run directory.
    resume, overwrite, progress : bool, keyword-only
        As for :func:`~vaeprobe.jobs.runner.run_job`.
    device, dtype : keyword-only
        Where and in what precision the VAE runs.
    **options
        The scan's options, declared in :data:`SPEC` with their defaults and meanings (``vaeprobe scan --help``
        prints them): ``op``, ``positions``, ``mode``, ``size``, ``fit``, ``radius``, ``measures``, ``batch``,
        ``position_blocks``, ``n_probes``, ``patch``, ``channel``, ``seed``, ``threshold``, ``verdicts``,
        ``evidence``, ``removal``, ``visible_levels``, ``n_donors``, ``swap_with``, ``keep_images``.

    Returns
    -------
    RunDir
        ``summary`` holds ``summary.json``.

    Raises
    ------
    vaeprobe.probes.scan.ScanError
        For an unknown mode or positions, or ``mode="linear"`` with a decoder autograd cannot go through.

    Examples
    --------
    >>> import tempfile
    >>> run = run_scan("builtin:tiny-random", "builtin:photos-heldout", tempfile.mkdtemp(), size=32, keep_images=0,
    ...                progress=False)  # doctest: +SKIP
    >>> run.summary["n_images"], run.summary["mode"]  # doctest: +SKIP
    (7, 'exact')
    """
    opts = SPEC.resolve(options)
    mode, op, removal = opts["mode"], opts["op"], opts["removal"]
    if mode not in MODES:
        raise ScanError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    check_positions(opts["positions"], ScanError)
    position_blocks = opts["position_blocks"]
    if int(position_blocks) < 1 or (int(position_blocks) > 1 and mode != "exact"):
        raise ScanError(f"--position-blocks {position_blocks}: use a positive number, and more than 1 only with "
                        f"--mode exact (a linear map or a two-stage scan is one unit per image)")
    check_operator(op, provides=("other",), command="scan")
    check_operator(removal, command="scan --removal")
    if not (float(opts["visible_levels"]) > 0):
        raise ScanError(f"--visible-levels {opts['visible_levels']}: use a positive number of 8-bit levels "
                        f"(default 1)")
    vae = coerce_vae(vae, device=device, dtype=dtype)
    if mode == "linear":
        from vaeprobe.probes.linear import check_differentiable

        side = 8 * vae.factor
        reason = check_differentiable(vae, vae.encode(torch.zeros(1, 3, side, side)).mean)
        if reason:
            raise ScanError(f"{vae.spec}: --mode linear needs a decoder that autograd can go through, but {reason}; "
                            f"use --mode exact or --mode two-stage")
    job = ScanJob(vae, images, progress=progress, **opts)
    return run_job(job, out, resume=resume, overwrite=overwrite, progress=progress)
