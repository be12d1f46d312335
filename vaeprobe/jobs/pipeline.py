"""Downstream: the spot through a full diffusion pipeline (emergence, interventions, VAE swap).

The denoising UNet was trained on encoded latents, so it may generate the spot too. :func:`run_pipeline` runs a
diffusers text-to-image pipeline (``StableDiffusionPipeline`` or any pipeline with the same latent interface:
``unet``, ``scheduler``, ``vae``, ``callback_on_step_end`` and ``output_type="latent"``) for every prompt and seed
and measures three things:

1. **Emergence.** At every denoising step the scheduler's predicted clean latent ``x0`` (its
   ``pred_original_sample``, or computed from the model output and ``alphas_cumprod`` for schedulers that do not
   return it) is mapped to the VAE's raw latent space and goes through the latent diagnostics: largest norm over
   the median norm, where, and whether it passes the spot threshold of :mod:`vaeprobe.probes.latents`. The emergence
   step is the first step from which a spot is present at every later step.
2. **Interventions.** The final latent's strongest position (the spot when there is one) is perturbed with any
   operator of :mod:`vaeprobe.probes.perturb`, and so are ``controls`` random positions; each is decoded and measured
   against the unperturbed decode with the measures of :mod:`vaeprobe.probes.response`. ``global_ratio`` is a
   position's far-field energy over the median control's. With ``ablate_from=[k, ...]`` the same operator is also
   applied to the noisy latent after every step from step ``k`` on (then denoising goes on and the UNet may
   rebuild what was removed), for the spot and ``step_controls`` random positions.
3. **VAE swap.** The same generated latents are decoded by the pipeline's own VAE and every VAE given; LPIPS,
   PSNR and colour statistics compare each with the pipeline's decode. A VAE whose latent space is not the
   pipeline's (:func:`vaeprobe.probes.compatibility.latent_compatibility`: identical encoder outputs) gets no numbers, only
   the reason, since decoding latents it was not trained on says nothing about the VAE.

Every decode for a measurement runs in float32 (``vae_dtype``), whatever the pipeline's dtype. Generation uses
a CPU ``torch.Generator`` seeded per (prompt, seed), so an image is reproducible across batch sizes and devices.

Builtin pipelines for tests and demos, built offline from configs (seeded random weights, no download):
``builtin:tiny-sd`` (tiny UNet2DConditionModel, tiny CLIP text encoder and tokenizer, DDIM, and the builtin
``mini-kl-f8`` VAE; its UNet (:class:`vaeprobe.models.pipelines.ContentUNet`) steers x0 towards a builtin photo's latent, so samples are
real images) and ``builtin:tiny-sd-planted``, whose UNet also writes a known spot into its x0 prediction from a
known timestep on: the ground truth for emergence and interventions.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from vaeprobe.jobs.runner import Job, RunDir, coerce_vae, run_job
from vaeprobe.jobs.spec import Input, JobSpec, Param
from vaeprobe.models.pipelines import PIPELINE_BUILTINS, PipelineError, load_pipeline
from vaeprobe.probes.generation import Generation, emergence_step, emergence_table, generate, generate_batch

__all__ = ["PipelineError", "load_pipeline", "read_prompts", "parse_seeds",
           "generate", "generate_batch", "Generation", "emergence_table", "run_pipeline", "PIPELINE_BUILTINS"]

# -- inputs --------------------------------------------------------------------------------------------------------

def read_prompts(source: str | Path | Sequence[str]) -> list[str]:
    """Read prompts from a file or a list.

    Parameters
    ----------
    source : str, pathlib.Path or sequence of str
        A text file (one prompt per line; lines starting with ``#`` are skipped), a ``.json`` file holding a list
        of strings, or a list or tuple of prompts.

    Returns
    -------
    list of str
        The prompts, stripped; blank ones are dropped.

    Raises
    ------
    PipelineError
        When the file does not exist, its JSON is not a list of strings, or there is no prompt.

    Examples
    --------
    >>> read_prompts(["a red fox", " ", "a blue car"])
    ['a red fox', 'a blue car']
    """
    if isinstance(source, (list, tuple)):
        items = list(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise PipelineError(f"{source}: no such prompt file; give a text file with one prompt per line")
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            try:
                items = json.loads(text)
            except json.JSONDecodeError as e:
                raise PipelineError(f"{source}: not valid JSON ({e.msg} at line {e.lineno}); give a list of "
                                    f"strings or a text file with one prompt per line") from None
            if not isinstance(items, list) or not all(isinstance(p, str) for p in items):
                raise PipelineError(f"{source}: the JSON must be a list of strings")
        else:
            items = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    prompts = [str(p).strip() for p in items if str(p).strip()]
    if not prompts:
        raise PipelineError(f"{source}: no prompts found; write one prompt per line")
    return prompts


def parse_seeds(spec: str | int | Sequence[int]) -> list[int]:
    """Read seeds from text, an int or a list.

    Parameters
    ----------
    spec : str, int or sequence of int
        Comma-separated seeds and inclusive ranges (``"0,1,5"``, ``"0-3"``), one int, or a list.

    Returns
    -------
    list of int
        The seeds in order, duplicates dropped (a list passes through as ints).

    Raises
    ------
    PipelineError
        When the text holds a malformed seed or none at all.

    Examples
    --------
    >>> parse_seeds("0-2,7")
    [0, 1, 2, 7]
    """
    if isinstance(spec, int):
        return [spec]
    if not isinstance(spec, str):
        return [int(s) for s in spec]
    seeds: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                a, b = part.split("-", 1) if not part.startswith("-") else (part, part)
                seeds += list(range(int(a), int(b) + 1))
            else:
                seeds.append(int(part))
        except ValueError:
            raise PipelineError(f"bad seed {part!r} in {spec!r}; write e.g. 0,1,2 or 0-7") from None
    if not seeds:
        raise PipelineError(f"no seeds in {spec!r}; write e.g. 0,1,2 or 0-7")
    return list(dict.fromkeys(seeds))


# -- the job -------------------------------------------------------------------------------------------------------

SWAP_STATS = ("mean_r", "mean_g", "mean_b", "mean_luma", "std_luma")


def _colour_stats(img: torch.Tensor) -> dict:
    """Colour statistics of a decode in [-1, 1] mapped to [0, 1]."""
    from vaeprobe.data.images import luma, to_unit

    x = to_unit(img[0].double())
    y = luma(x)
    return {"mean_r": float(x[0].mean()), "mean_g": float(x[1].mean()), "mean_b": float(x[2].mean()),
            "mean_luma": float(y.mean()), "std_luma": float(y.std())}


def _random_cells(h: int, w: int, n: int, avoid: tuple[int, int], radius: int, seed: int) -> list[tuple[int, int]]:
    """``n`` seeded control cells beyond ``radius`` of ``avoid`` (any other cell when none is that far), sorted."""
    from vaeprobe.probes.geometry import sample_cells

    cells = sample_cells(h, w, n, avoid=[avoid], radius=radius, seed=seed)
    return sorted(cells or sample_cells(h, w, n, avoid=[avoid], seed=seed))


def _pipeline_spec() -> JobSpec:
    from vaeprobe.probes.perturb import OPERATORS
    from vaeprobe.probes.response import DEFAULT_RADIUS

    return JobSpec("pipeline", "the spot through a diffusion pipeline: emergence over the denoising steps, "
                               "interventions, VAE swap", entry="run_pipeline", rank=60,
                   run_help={"dtype": "pipeline dtype: fp16 or bf16 on a GPU, fp32 (default)"},
                   inputs=(Input("model", "pipeline: hub id, local folder (model_index.json) or builtin:tiny-sd / "
                                          "builtin:tiny-sd-planted (offline test pipelines)"),
                           Input("prompts", "text file, one prompt per line (# comments), or a JSON list"),
                           Input("seeds", "e.g. 0,1,2 or 0-7 (default 0)", default="0"),
                           Input("out", "run directory")),
                   params=(
        Param("vaes", (), "a VAE to decode the same latents with (repeatable); the pipeline's own VAE is always "
                          "included first", flag="--vae", append=True, metavar="VAE"),
        Param("steps", 30, "denoising steps (default {default})", type=int),
        Param("guidance", 7.5, "classifier-free guidance scale (default {default})", type=float),
        Param("size", None, "image side in pixels (default: the pipeline's)", type=int),
        Param("op", "zero", f"intervention operator: {', '.join(o for o in OPERATORS if o != 'swap')} (default "
                            f"{{default}}; swap needs a second image, which the pipeline does not provide)"),
        Param("controls", 8, "random positions ablated in the final latent for comparison (default {default})",
              type=int),
        Param("ablate_from", (), "also ablate the spot in the noisy latent after every step from step K on "
                                 "(repeatable; each costs 1 + --step-controls extra generations)", type=int,
              append=True, metavar="K"),
        Param("step_controls", 2, "random positions per --ablate-from step (default {default})", type=int),
        Param("radius", DEFAULT_RADIUS, "far-field radius in latent cells (default {default})", type=int),
        Param("lpips", True, "skip LPIPS in the intervention measures", negate=True),
        Param("vae_dtype", "fp32", "dtype of the decodes that are measured (default {default})"),
        Param("threshold", None, "norm / median-norm ratio of a spot in the emergence table (default: the spot "
                                 "detector's)", type=float),
        Param("batch", 1, "samples generated per pipeline call, each with its own seeded generator (default "
                          "{default})", type=int),
    ))


SPEC = _pipeline_spec()
"""The pipeline job's parameters: its CLI options and API defaults (:mod:`vaeprobe.jobs.spec`); ``config.json``
is :meth:`PipelineJob.config`, which adds the pipeline's classes."""


def cli_line(summary: dict, options: dict, out) -> str:
    """What ``vaeprobe pipeline`` prints when it finishes."""
    step = summary["median_emergence_step"]
    lines = [f"{summary['n_samples']} samples ({summary['n_prompts']} prompts x {len(summary['seeds'])} seeds, "
             f"{summary['steps']} steps): a spot in the final latent of {summary['final_spot_rate']:.0%}; emerged "
             f"and stayed in {summary['emerged']}" + (f" (median step {step:g})" if step is not None else "")]
    for v in summary["vaes"]:
        swap = (f"swap LPIPS {v['mean_swap_lpips']:.4f}" if v["compatible"] else v["compatibility"])
        lines.append(f"  {v['vae']}: ablating the strongest cell gives a median global-effect ratio "
                     f"{v['median_spot_global_ratio']:.3g} (beats every random control in "
                     f"{v['spot_beats_every_control']}); {swap}")
    lines.append(f"results in {out} (vaeprobe report {out} for the report)")
    return "\n".join(lines)


class PipelineJob(Job):
    """Per (prompt, seed): generation, emergence, interventions and the VAE swap (see :func:`run_pipeline`).

    :func:`run_pipeline` builds it and runs it with :func:`~vaeprobe.jobs.runner.run_job`.

    Parameters
    ----------
    pipe : diffusers.DiffusionPipeline
        The loaded pipeline.
    model_spec : str
        How the pipeline was given (recorded in the config).
    tested : list of VAE
        The pipeline's own VAE first, then the VAEs to swap in.
    compat_rows : list of dict
        Per VAE in ``tested``, its latent compatibility with the pipeline's (``encoder_identical``,
        ``compatibility``, ...).
    prompts, seeds, steps, guidance, size, controls, ablate_from, step_controls, radius, lpips, vae_dtype, threshold, batch
        As in :func:`run_pipeline` (already parsed).
    operator : Operator
        The intervention operator.
    """

    name = desc = "pipeline"
    unit = "sample"

    def __init__(self, pipe, model_spec, tested, compat_rows, *, prompts, seeds, steps, guidance, size, operator,
                 controls, ablate_from, step_controls, radius, lpips, vae_dtype, threshold, batch=1):
        self.pipe, self.model_spec, self.tested, self.compat_rows = pipe, model_spec, tested, compat_rows
        self.own = tested[0]
        self.device = pipe.unet.device
        self.compatible = [bool(r["encoder_identical"]) for r in compat_rows]
        self.prompts, self.seeds, self.steps, self.guidance, self.size = prompts, seeds, steps, guidance, size
        self.operator, self.controls, self.ablate_from = operator, int(controls), ablate_from
        self.step_controls, self.radius, self.lpips = int(step_controls), radius, bool(lpips)
        self.vae_dtype, self.threshold = vae_dtype, threshold
        self.batch, self._generated = max(1, int(batch)), {}
        self.measures = ("l2", "far_l2", "far_fraction", "radius90", "far_dy") + (("lpips",) if lpips else ())
        self.started = time.perf_counter()

    def config(self) -> dict:
        """The settings that decide the results (``config.json``).

        Returns
        -------
        dict
            The job, the model (spec, pipeline and scheduler class), the VAEs and every setting.
        """
        pipe = self.pipe
        return {"job": "pipeline", "model": {"spec": self.model_spec, "class": type(pipe).__name__,
                                             "scheduler": type(pipe.scheduler).__name__},
                "vaes": [v.spec for v in self.tested], "prompts": self.prompts, "seeds": self.seeds,
                "steps": self.steps, "guidance": float(self.guidance), "size": self.size, "op": self.operator.name,
                "controls": self.controls, "ablate_from": self.ablate_from, "step_controls": self.step_controls,
                "radius": self.radius, "lpips": self.lpips, "dtype": str(pipe.unet.dtype).replace("torch.", ""),
                "vae_dtype": str(self.vae_dtype), "device": pipe.unet.device.type, "threshold": self.threshold}

    def units(self, skipped: list):
        """The work items: one per (prompt, seed).

        Parameters
        ----------
        skipped : list
            Unused (no input here is ever skipped).

        Yields
        ------
        tuple
            ``(key, name, (key, prompt_index, seed))``, with key and name ``pPPPP-sSEED``.
        """
        for pi in range(len(self.prompts)):
            for seed in self.seeds:
                key = f"p{pi:04d}-s{seed}"
                yield key, key, (key, pi, seed)

    def _next_generation(self, run: RunDir, key: str, pi: int, seed: int) -> Generation:
        """This sample's generation; with ``batch > 1`` the next ``batch`` pending samples of this rank are generated
        in one call and kept until their turn."""
        if key not in self._generated:
            if self.batch == 1:
                return self._generate(self.prompts[pi], seed)
            owns = getattr(getattr(self, "shard", None), "owns", lambda i: True)
            pending = [u for i, u in enumerate(self.units([])) if owns(i) and not run.is_done(u[0])]
            at = next((j for j, u in enumerate(pending) if u[0] == key), 0)
            group = [u[2] for u in pending[at:at + self.batch]] or [(key, pi, seed)]
            gens = generate_batch(self.pipe, [self.prompts[g[1]] for g in group], [g[2] for g in group],
                                  steps=self.steps, guidance=self.guidance, size=self.size)
            self._generated = {g[0]: gen for g, gen in zip(group, gens)}
        return self._generated.pop(key)

    def _generate(self, prompt: str, seed: int, edit=None):
        return generate(self.pipe, prompt, seed, steps=self.steps, guidance=self.guidance, size=self.size, edit=edit)

    def _final(self, z, spot, cells, folder) -> tuple[list[dict], list[torch.Tensor]]:
        """The final latent's spot and control ablations, decoded and measured by every VAE."""
        from vaeprobe.probes.engine import Engine
        from vaeprobe.probes.perturb import Site
        from vaeprobe.probes.response import measure
        from vaeprobe.reports.plots import save_png, signed_difference, tensor_to_unit

        sites = [Site(*spot)] + [Site(*c) for c in cells]
        kinds = ["spot"] + ["control"] * len(cells)
        rows, decodes = [], []
        for k, vae in enumerate(self.tested):
            ref = vae.decode(z.to(vae.device))
            decodes.append(ref)
            save_png(folder / f"vae{k}-generated.png", tensor_to_unit(ref))
            perturbed = torch.cat([b.decodes for b in Engine(vae).batches(z.to(vae.device), sites, self.operator)])
            vals = measure(ref, perturbed, sites, vae.factor, radius=self.radius, measures=self.measures)
            med = float(np.nanmedian([v["far_l2"] for v in vals[1:]])) if len(vals) > 1 else math.nan
            for site, kind, v in zip(sites, kinds, vals):
                rows.append({"vae": vae.spec, "vae_index": k, "compatible": self.compatible[k], "when": "final",
                             "from_step": -1, "kind": kind, "row": site.row, "col": site.col, **v,
                             "global_ratio": v["far_l2"] / med if med > 0 else math.nan})
            save_png(folder / f"vae{k}-final-spot.png", tensor_to_unit(perturbed[:1]))
            save_png(folder / f"vae{k}-final-spot-diff.png", signed_difference(perturbed[:1], ref)[0])
        return rows, decodes

    def _from_step(self, prompt, seed, k_step, cells, decodes, folder) -> list[dict]:
        """The spot and control cells ablated in the noisy latent after every step from ``k_step`` on."""
        from vaeprobe.probes.perturb import Site
        from vaeprobe.probes.response import measure
        from vaeprobe.reports.plots import save_png, signed_difference, tensor_to_unit

        own, rows = self.own, []
        for j, cell in enumerate(cells):
            def edit(step, latents, cell=cell):
                if step < k_step:
                    return latents
                raw = self.operator.apply(own.from_diffusion(latents.float()), Site(*cell))
                return own.to_diffusion(raw).to(latents.dtype)

            z_edit = own.from_diffusion(self._generate(prompt, seed, edit=edit).latents).float()
            for k, vae in enumerate(self.tested):
                img = vae.decode(z_edit.to(vae.device))
                v = measure(decodes[k], img, [Site(*cell)], vae.factor, radius=self.radius, measures=self.measures)[0]
                rows.append({"vae": vae.spec, "vae_index": k, "compatible": self.compatible[k],
                             "when": f"from step {k_step}", "from_step": k_step,
                             "kind": "spot" if j == 0 else "control", "row": cell[0], "col": cell[1], **v,
                             "global_ratio": math.nan})
                if j == 0:
                    save_png(folder / f"vae{k}-from{k_step}-spot.png", tensor_to_unit(img))
                    save_png(folder / f"vae{k}-from{k_step}-spot-diff.png", signed_difference(img, decodes[k])[0])
        return rows

    def _swap(self, decodes) -> list[dict]:
        """Each VAE's decode of the same latent against the pipeline VAE's (compatible VAEs only)."""
        from vaeprobe.probes.metrics import compare_images
        from vaeprobe.reports.plots import tensor_to_unit

        stats0 = _colour_stats(decodes[0])
        rows = []
        for k, vae in enumerate(self.tested):
            row = {"vae": vae.spec, "vae_index": k, "compatible": self.compatible[k],
                   "note": self.compat_rows[k]["compatibility"], "lpips": math.nan, "psnr": math.nan,
                   **{s: math.nan for s in SWAP_STATS}, **{f"d_{s}": math.nan for s in SWAP_STATS}}
            if self.compatible[k]:
                st = _colour_stats(decodes[k])
                row.update(st)
                row.update({f"d_{s}": st[s] - stats0[s] for s in SWAP_STATS})
                if k > 0:
                    cmp = compare_images(tensor_to_unit(decodes[0]), tensor_to_unit(decodes[k]))
                    row.update(lpips=cmp["lpips"], psnr=cmp["psnr"])
                else:
                    row.update(lpips=0.0, psnr=math.inf)
            rows.append(row)
        return rows

    def _step_ratios(self, inter: pd.DataFrame) -> pd.DataFrame:
        """Step-k ratios: the spot's far field over the median step-k control's."""
        for k_step in self.ablate_from:
            for k in range(len(self.tested)):
                sel = (inter.from_step == k_step) & (inter.vae_index == k)
                ctrl = inter.loc[sel & (inter.kind == "control"), "far_l2"]
                med = float(ctrl.median()) if len(ctrl) else math.nan
                inter.loc[sel, "global_ratio"] = inter.loc[sel, "far_l2"] / med if med > 0 else math.nan
        return inter

    def process(self, run: RunDir, key: str, item) -> None:
        """Generate one sample, measure it and write its part (emergence, interventions and swap tables).

        Parameters
        ----------
        run : RunDir
            The run directory.
        key : str
            The item's key.
        item : tuple
            ``(key, prompt_index, seed)`` from :meth:`units`.

        Raises
        ------
        PipelineError
            When the generated latents are not finite.
        """
        key, pi, seed = item
        prompt = self.prompts[pi]
        gen = self._next_generation(run, key, pi, seed)
        if not bool(torch.isfinite(gen.latents).all()):
            raise PipelineError("the generated latents are not finite (fp16 overflow? try --dtype bf16 or fp32)")
        em = emergence_table(gen, self.own.from_diffusion, threshold=self.threshold)
        z = self.own.from_diffusion(gen.latents).float()
        h, w = z.shape[-2:]
        final = em.iloc[-1]
        spot = (int(final.row), int(final.col))
        folder = run.path / "images" / key
        cells = _random_cells(h, w, self.controls, spot, self.radius, seed=seed * 7919 + pi)
        inter_rows, decodes = self._final(z, spot, cells, folder)
        for k_step in self.ablate_from:
            step_cells = [spot] + _random_cells(h, w, self.step_controls, spot, self.radius,
                                                seed=seed * 104729 + pi + k_step)
            inter_rows += self._from_step(prompt, seed, k_step, step_cells, decodes, folder)
        ident = {"key": key, "prompt_index": pi, "prompt": prompt, "seed": seed}
        inter = self._step_ratios(pd.DataFrame(inter_rows)).assign(spot_detected=bool(final.spot), **ident)
        em = em.assign(**ident)
        swap = pd.DataFrame(self._swap(decodes)).assign(**ident)
        fin = inter[inter.when == "final"]
        spot_gain = {str(k): float(fin.loc[(fin.vae_index == k) & (fin.kind == "spot"), "global_ratio"].iloc[0])
                     for k in range(len(self.tested))}
        meta = {**ident, "image": key, "h": h, "w": w, "emergence_step": emergence_step(em),
                "final_spot": bool(final.spot), "spot_row": spot[0], "spot_col": spot[1],
                "final_norm_ratio": float(final.norm_ratio), "spot_global_ratio": spot_gain}
        run.write_part(key, None, meta, extra={"emergence": em, "interventions": inter, "swap": swap})

    def summarise(self, run: RunDir, keys: list[str]) -> dict:
        """Write the run's tables and emergence figure from the finished parts.

        Parameters
        ----------
        run : RunDir
            The run directory.
        keys : list of str
            The keys of the finished items.

        Returns
        -------
        dict
            The summary (``summary.json``), with the failed samples' prompts and seeds.
        """
        emergence = run.concat("emergence.parquet", keys, part="emergence")
        interventions = run.concat("interventions.parquet", keys, part="interventions")
        swap = run.concat("swap.parquet", keys, part="swap")
        run.write_table("compatibility.parquet", pd.DataFrame(self.compat_rows))
        metas = [run.meta(k) for k in keys]
        _emergence_figure(emergence, run.path / "figures" / "emergence.png", self.threshold)
        summary = _summary(self.config(), metas, emergence, interventions, swap, self.compat_rows)
        items = {k: (pi, seed) for k, _, (_, pi, seed) in self.units([])}
        summary["failed"] = [{**f, "prompt": self.prompts[items[f["key"]][0]], "seed": items[f["key"]][1]}
                             for f in run.failed]
        summary["seconds"] = round(time.perf_counter() - self.started, 1)
        return summary


def run_pipeline(model, prompts, seeds, out, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
                 device=None, dtype=None, **options) -> RunDir:
    """Emergence, interventions and VAE swap for every (prompt, seed); writes the run directory ``out``.

    The keyword options and their defaults are declared once, in :data:`SPEC`; an unknown keyword is refused in
    one line.

    Files: see docs/outputs.md, section pipeline. One part per (prompt, seed) is written atomically, so
    ``resume=True`` continues a killed run; a sample that fails (out of memory, non-finite latents) is reported and
    listed under ``failed``, and the run goes on.

    Parameters
    ----------
    model : str, pathlib.Path or pipeline
        The pipeline (see :func:`load_pipeline`).
    prompts : str, pathlib.Path or sequence of str
        A prompt file or a list (see :func:`read_prompts`).
    seeds : str, int or sequence of int
        The seeds (see :func:`parse_seeds`).
    out : str or pathlib.Path
        The run directory.
    resume, overwrite, progress : bool, keyword-only
        As for :func:`~vaeprobe.jobs.runner.run_job`.
    device, dtype : keyword-only
        Where the pipeline runs and its dtype (a bare ``cuda`` under a launcher is ``cuda:LOCAL_RANK``).
    **options
        Declared in :data:`SPEC` with their defaults and meanings (``vaeprobe pipeline --help``): ``vaes``,
        ``steps``, ``guidance``, ``size``, ``op``, ``controls``, ``ablate_from``, ``step_controls``, ``radius``,
        ``lpips``, ``vae_dtype``, ``threshold``, ``batch``.

    Returns
    -------
    RunDir
        The run directory; its ``summary`` holds ``summary.json``.

    Raises
    ------
    PipelineError
        When a setting cannot be used (checked before any generation).

    Examples
    --------
    >>> import tempfile
    >>> run = run_pipeline("builtin:tiny-sd-planted", ["a lighthouse"], "0", tempfile.mkdtemp(), steps=3,
    ...                    controls=2, lpips=False, progress=False)
    >>> run.summary["final_spot_rate"], run.summary["emerged"]
    (1.0, '1/1')
    """
    from vaeprobe.models.adapter import VAE
    from vaeprobe.probes.perturb import check_operator, parse_operator
    from vaeprobe.probes.response import DEFAULT_RADIUS

    opts = SPEC.resolve(options)
    vaes, steps, op, batch, size, vae_dtype = (opts[k] for k in ("vaes", "steps", "op", "batch", "size", "vae_dtype"))
    prompts, seeds = read_prompts(prompts), parse_seeds(seeds)
    radius = DEFAULT_RADIUS if opts["radius"] is None else int(opts["radius"])
    steps, ablate_from = _checked_steps(steps, opts["ablate_from"])
    check_operator(op, command="pipeline")  # fails early, in one line, on a spec the pipeline cannot use
    operator = parse_operator(op)
    model_spec = model if isinstance(model, str) else type(model).__name__
    from vaeprobe.jobs.distributed import rank_device

    if int(batch) < 1:
        raise PipelineError(f"--batch {batch}: give the number of samples per pipeline call, 1 or more")
    pipe = load_pipeline(model, device=rank_device(device), dtype=dtype)
    factor = int(getattr(pipe, "vae_scale_factor", 8))
    if size is not None and (int(size) % factor or int(size) < 3 * factor):
        raise PipelineError(f"size {size} must be a multiple of the VAE factor {factor} and at least {3 * factor}")
    own = VAE(pipe.vae, spec=f"{model_spec} (pipeline VAE)", dtype=vae_dtype)
    tested = [own] + [v if isinstance(v, VAE) else coerce_vae(v, device=own.device, dtype=vae_dtype) for v in vaes]
    job = PipelineJob(pipe, model_spec, tested, _compatibility_rows(own, tested[1:]), prompts=prompts, seeds=seeds,
                      steps=steps, guidance=opts["guidance"], size=size, operator=operator, controls=opts["controls"],
                      ablate_from=ablate_from, step_controls=opts["step_controls"], radius=radius,
                      lpips=opts["lpips"], vae_dtype=vae_dtype, threshold=opts["threshold"], batch=batch)
    return run_job(job, out, resume=resume, overwrite=overwrite, progress=progress)


def _checked_steps(steps, ablate_from) -> tuple[int, list[int]]:
    """The number of steps and the sorted ``--ablate-from`` steps, or a one-line :class:`PipelineError`."""
    steps = int(steps)
    if steps < 1:
        raise PipelineError(f"steps must be at least 1; got {steps}")
    ablate = sorted({int(k) for k in ablate_from or ()})
    for k in ablate:
        if not 0 <= k < steps:
            raise PipelineError(f"ablate-from step {k} is outside 0..{steps - 1}")
    return steps, ablate


def _compatibility_rows(own, others) -> list[dict]:
    """Each tested VAE's latent compatibility with the pipeline's own (:func:`latent_compatibility`), own first."""
    from vaeprobe.probes.compatibility import latent_compatibility

    rows = [{"model": own.spec, "encoder_identical": True, "compatibility": "the pipeline's own VAE"}]
    for vae in others:
        row = latent_compatibility(own, vae)
        rows.append({k: row[k] for k in ("model", "encoder_identical", "compatibility", "max_latent_diff",
                                         "differing_positions")})
    return rows


def _summary(config: dict, metas: list[dict], emergence, interventions, swap, compat_rows) -> dict:
    n = len(metas)
    steps = [m["emergence_step"] for m in metas if m["emergence_step"] is not None]
    per_vae = []
    for k, spec in enumerate(config["vaes"]):
        fin = interventions[(interventions.when == "final") & (interventions.vae_index == k)]
        spot = fin[fin.kind == "spot"]
        beats = 0
        for key, grp in fin.groupby("key"):
            s = grp.loc[grp.kind == "spot", "far_l2"]
            c = grp.loc[grp.kind == "control", "far_l2"]
            beats += bool(len(s) and len(c) and float(s.iloc[0]) > float(c.max()))
        sw = swap[swap.vae_index == k]
        entry = {"vae": spec, "compatible": bool(compat_rows[k]["encoder_identical"]),
                 "compatibility": compat_rows[k]["compatibility"],
                 "median_spot_global_ratio": float(spot.global_ratio.median()) if len(spot) else math.nan,
                 "spot_beats_every_control": f"{beats}/{fin.key.nunique()}",
                 "median_spot_far_fraction": float(spot.far_fraction.median()) if len(spot) else math.nan,
                 "mean_swap_lpips": float(sw.lpips.mean()) if len(sw) and sw.lpips.notna().any() else math.nan,
                 "mean_swap_d_luma": float(sw.d_mean_luma.mean()) if len(sw) and sw.d_mean_luma.notna().any()
                 else math.nan}
        for k_step in config["ablate_from"]:
            st = interventions[(interventions.from_step == k_step) & (interventions.vae_index == k)
                               & (interventions.kind == "spot")]
            entry[f"median_global_ratio_from_step_{k_step}"] = float(st.global_ratio.median()) if len(st) else math.nan
        per_vae.append(entry)
    return {"job": "pipeline", "model": config["model"]["spec"], "n_samples": n,
            "n_prompts": len(config["prompts"]), "seeds": config["seeds"], "steps": config["steps"],
            "final_spot_rate": (sum(m["final_spot"] for m in metas) / n) if n else math.nan,
            "emerged": f"{len(steps)}/{n}",
            "median_emergence_step": float(np.median(steps)) if steps else None,
            "median_final_norm_ratio": float(np.median([m["final_norm_ratio"] for m in metas])) if n else math.nan,
            "vaes": per_vae}


def _emergence_figure(emergence: pd.DataFrame | None, path: Path, threshold: float | None) -> Path | None:
    """Largest x0 norm / median norm against the denoising step, one line per (prompt, seed)."""
    from vaeprobe.probes.latents import DEFAULT_THRESHOLD
    from vaeprobe.reports.plots import figure, save_figure

    if emergence is None or not len(emergence):
        return None
    plt, fig, axes = figure(1, width=5.0)
    ax = axes[0]
    for key, grp in emergence.groupby("key", sort=True):
        label = f"{str(grp.prompt.iloc[0])[:28]} / seed {int(grp.seed.iloc[0])}"
        ax.plot(grp.step.to_numpy(), grp.norm_ratio.to_numpy(), marker=".", label=label)
    ax.axhline(DEFAULT_THRESHOLD if threshold is None else threshold, color="k", ls="--", lw=0.8,
               label="spot threshold")
    ax.set_yscale("log")
    ax.set_xlabel("denoising step", fontsize=8)
    ax.set_ylabel("x0: largest norm / median norm", fontsize=8)
    ax.set_title("spot emergence in the predicted clean latent", fontsize=8)
    ax.legend(fontsize=6)
    fig.tight_layout()
    return save_figure(fig, plt, path)
