"""Generation and emergence: run a diffusion pipeline once, capture every step's clean-latent prediction
(:func:`generate`, :func:`generate_batch`) and measure when the spot appears (:func:`emergence_table`,
:func:`emergence_step`)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import pandas as pd
import torch

from vaeprobe.models.pipelines import PipelineError


def _x0_from_output(scheduler, model_output: torch.Tensor, timestep, sample: torch.Tensor) -> torch.Tensor:
    """x0 implied by a model output on a DDPM-type schedule (for schedulers that do not return it)."""
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is None:
        raise PipelineError(f"{type(scheduler).__name__} neither returns pred_original_sample nor has "
                            f"alphas_cumprod; use a DDIM, DDPM, Euler or DPM-Solver scheduler")
    a = float(alphas[int(torch.as_tensor(timestep).flatten()[0])])
    kind = scheduler.config.get("prediction_type", "epsilon")
    x, m = sample.double(), model_output.double()
    if kind == "epsilon":
        return (x - math.sqrt(1 - a) * m) / math.sqrt(a)
    if kind == "v_prediction":
        return math.sqrt(a) * x - math.sqrt(1 - a) * m
    return m


@contextlib.contextmanager
def _capture_x0(scheduler, store: list) -> Iterator[None]:
    """Record ``(timestep, x0)`` at every ``scheduler.step`` call; the scheduler is restored afterwards."""
    had = "step" in vars(scheduler)
    original = scheduler.step

    def step(model_output, timestep, sample, *args, return_dict: bool = True, **kwargs):
        out = original(model_output, timestep, sample, *args, return_dict=True, **kwargs)
        x0 = getattr(out, "pred_original_sample", None)
        if x0 is None:
            x0 = _x0_from_output(scheduler, model_output, timestep, sample)
        store.append((int(torch.as_tensor(timestep).flatten()[0]), x0.detach().float().cpu()))
        return out if return_dict else (out.prev_sample, x0)

    scheduler.step = step
    try:
        yield
    finally:
        if had:
            scheduler.step = original
        else:
            del scheduler.step


@dataclass
class Generation:
    """One generated sample (what :func:`generate` returns).

    Attributes
    ----------
    prompt : str
        The prompt.
    seed : int
        The seed of the CPU generator.
    latents : torch.Tensor
        The final latents ``[1, C, h, w]``, float32 on the CPU, in the pipeline's diffusion space (what the
        pipeline would decode).
    timesteps : list of int
        The scheduler's timestep at each step.
    x0 : list of torch.Tensor
        The predicted clean latent at each step, float32 on the CPU, in the diffusion space.
    """

    prompt: str
    seed: int
    latents: torch.Tensor
    timesteps: list[int]
    x0: list[torch.Tensor]


def generate(pipe, prompt: str, seed: int, *, steps: int = 30, guidance: float = 7.5, size: int | None = None,
             edit=None) -> Generation:
    """Run ``pipe`` once (CPU generator seeded with ``seed``) and return the final latents and every x0 prediction.

    Parameters
    ----------
    pipe : diffusers.DiffusionPipeline
        A latent diffusion pipeline (see :func:`~vaeprobe.models.pipelines.load_pipeline`).
    prompt : str
        The prompt.
    seed : int
        Seed of the CPU ``torch.Generator`` (the sample is the same on any device and in any batch).
    steps : int, optional
        Denoising steps.
    guidance : float, optional
        Classifier-free guidance scale.
    size : int, optional
        Image side in pixels (default: the pipeline's).
    edit : callable, optional
        ``edit(step, latents) -> latents``, applied to the (diffusion-space) latents after each step.

    Returns
    -------
    Generation
        The final latents and, per step, the timestep and the x0 prediction.

    Examples
    --------
    >>> from vaeprobe.models.pipelines import tiny_sd_pipeline
    >>> pipe = tiny_sd_pipeline(planted=True)
    >>> g = generate(pipe, "a lighthouse", seed=0, steps=4)
    >>> tuple(g.latents.shape), len(g.x0), g.timesteps[0] > g.timesteps[-1]
    ((1, 4, 8, 8), 4, True)
    """
    return generate_batch(pipe, [prompt], [seed], steps=steps, guidance=guidance, size=size, edit=edit)[0]


def generate_batch(pipe, prompts: Sequence[str], seeds: Sequence[int], *, steps: int = 30, guidance: float = 7.5,
                   size: int | None = None, edit=None) -> list[Generation]:
    """Run ``pipe`` once for several (prompt, seed) samples at a time: one batched call, one CPU generator per sample.

    Each sample's initial noise comes from its own generator, seeded with its seed, so a sample starts from the
    same noise in any batch; its result equals the one-sample run's up to the float rounding of batched kernels.

    Parameters
    ----------
    pipe : diffusers.DiffusionPipeline
        A latent diffusion pipeline (see :func:`~vaeprobe.models.pipelines.load_pipeline`).
    prompts : sequence of str
        One prompt per sample.
    seeds : sequence of int
        One seed per sample (as many as ``prompts``).
    steps, guidance, size, edit :
        As for :func:`generate` (``edit`` sees the batch's latents).

    Returns
    -------
    list of Generation
        One per sample, in order.

    Examples
    --------
    >>> from vaeprobe.models.pipelines import tiny_sd_pipeline
    >>> pipe = tiny_sd_pipeline(planted=True)
    >>> two = generate_batch(pipe, ["a lighthouse", "a cat"], [0, 1], steps=4)
    >>> one = generate(pipe, "a cat", seed=1, steps=4)
    >>> len(two), bool((two[1].latents - one.latents).abs().max() < 1e-4)
    (2, True)
    """
    if len(prompts) != len(seeds) or not prompts:
        raise PipelineError(f"generate_batch needs as many prompts as seeds (got {len(prompts)} and {len(seeds)})")
    store: list = []
    kwargs: dict = {"prompt": list(prompts), "num_inference_steps": int(steps), "guidance_scale": float(guidance),
                    "generator": [torch.Generator("cpu").manual_seed(int(s)) for s in seeds], "output_type": "latent"}
    if size is not None:
        kwargs.update(height=int(size), width=int(size))
    if edit is not None:
        def callback(pipeline, step, timestep, callback_kwargs):
            return {"latents": edit(step, callback_kwargs["latents"])}

        kwargs.update(callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents"])
    with _capture_x0(pipe.scheduler, store), torch.no_grad():
        out = pipe(**kwargs)
    latents = (out.images if hasattr(out, "images") else out[0]).detach().float().cpu()
    timesteps = [t for t, _ in store]
    return [Generation(p, int(s), latents[i:i + 1], timesteps, [x[i:i + 1] for _, x in store])
            for i, (p, s) in enumerate(zip(prompts, seeds))]


# -- emergence -----------------------------------------------------------------------------------------------------

def emergence_table(gen: Generation, to_raw, *, threshold: float | None = None) -> pd.DataFrame:
    """The latent diagnostics of every step's x0 prediction: when the spot appears during denoising.

    Parameters
    ----------
    gen : Generation
        A sample from :func:`generate`.
    to_raw : callable
        Maps diffusion latents to the VAE's raw latents (e.g. :meth:`VAE.from_diffusion
        <vaeprobe.models.adapter.VAE.from_diffusion>`).
    threshold : float, optional
        Norm / median-norm ratio of a spot (default :data:`vaeprobe.probes.latents.DEFAULT_THRESHOLD`).

    Returns
    -------
    pandas.DataFrame
        One row per denoising step: ``step``, ``timestep``, the x0 prediction's largest latent norm over the
        median norm (``norm_ratio``) at cell ``(row, col)``, ``max_norm``, ``median_norm`` and ``spot``: the norm
        rule of :func:`vaeprobe.probes.latents.find_spots` at ``threshold`` (x0 has no log-variance, so no clamp
        rule).

    Examples
    --------
    >>> from vaeprobe.models.adapter import VAE
    >>> from vaeprobe.models.pipelines import load_pipeline
    >>> pipe = load_pipeline("builtin:tiny-sd-planted")
    >>> table = emergence_table(generate(pipe, "a lighthouse", 0, steps=4), VAE(pipe.vae).from_diffusion)
    >>> table.spot.tolist(), emergence_step(table)
    ([False, False, True, True], 2)
    """
    from vaeprobe.models.adapter import Posterior
    from vaeprobe.probes.latents import DEFAULT_THRESHOLD, find_spots, latent_maps

    threshold = DEFAULT_THRESHOLD if threshold is None else float(threshold)
    rows = []
    for step, (t, x0) in enumerate(zip(gen.timesteps, gen.x0)):
        maps = latent_maps(Posterior(to_raw(x0).double(), None, None))[0]
        top = find_spots(maps, threshold=threshold, top_k=1).iloc[0]
        rows.append({"step": step, "timestep": int(t), "norm_ratio": float(top.norm_ratio), "row": int(top.row),
                     "col": int(top.col), "max_norm": float(top.norm), "median_norm": float(maps.norm.median()),
                     "spot": bool(top.by_norm)})
    return pd.DataFrame(rows)


def emergence_step(table: pd.DataFrame) -> int | None:
    """The emergence step: the first step from which every later step has a spot.

    Parameters
    ----------
    table : pandas.DataFrame
        An :func:`emergence_table` (only its ``spot`` column is read).

    Returns
    -------
    int or None
        The step; ``None`` if the last step has no spot.

    Examples
    --------
    >>> emergence_step(pd.DataFrame({"spot": [False, True, False, True, True]}))
    3
    """
    spots = table["spot"].tolist()
    if not spots or not spots[-1]:
        return None
    k = len(spots)
    while k > 0 and spots[k - 1]:
        k -= 1
    return k
