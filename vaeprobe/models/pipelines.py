"""Diffusion pipelines as models: :func:`load_pipeline` (``builtin:NAME``, a local pipeline folder or a hub id)
and the builtin tiny offline pipelines ``builtin:tiny-sd`` and ``builtin:tiny-sd-planted``.

The builtins exist so that the pipeline job, its tests and the demo run without downloads: a tiny
UNet2DConditionModel (:class:`ContentUNet`, which steers its clean-latent prediction towards a builtin photo's
latent, so samples are real images), a tiny CLIP text encoder and tokenizer, DDIM with SD's noise schedule and the
builtin ``mini-kl-f8`` VAE. ``tiny_sd_pipeline(planted=True)`` also writes a known spot (:data:`PLANTED_CODE`) into
the x0 prediction from timestep :data:`PLANTED_EMERGE_T` on: the ground truth for the emergence and intervention
measurements. Their UNet and text encoder are seeded random weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vaeprobe.errors import VaeprobeError

import functools
import json
import math
from typing import Sequence

import torch


__all__ = ["tiny_sd_pipeline", "ContentUNet", "PLANTED_CODE", "PLANTED_EMERGE_T", "TINY_UNET"]

PLANTED_CODE = (240.0, 240.0, 240.0, 160.0)
"""Raw-latent value the planted UNet writes: the ``planted-direct`` VAE's code for "no colour shift" (norm 420)."""
PLANTED_EMERGE_T = 500
"""The planted UNet writes its spot at every timestep ``t <= PLANTED_EMERGE_T`` (of 1000 training steps)."""


TINY_UNET = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1, "block_out_channels": (32, 64),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32, "attention_head_dim": 8, "norm_num_groups": 8,
}
TINY_TEXT = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
             "max_position_embeddings": 77, "projection_dim": 32}
SD_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}


def _tiny_tokenizer():
    """A CLIP tokenizer with a byte-level vocabulary and no merges (every character is a token)."""
    from transformers import CLIPTokenizer

    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    codes, extra = keep[:], 0
    for b in range(256):  # the printable stand-ins of the other bytes, as CLIP's byte-level BPE maps them
        if b not in keep:
            codes.append(256 + extra)
            extra += 1
    chars = [chr(c) for c in codes]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    try:
        return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TINY_TEXT["max_position_embeddings"])
    except TypeError:  # transformers < 5 reads files
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="vaeprobe-tok-"))
        (folder / "vocab.json").write_text(json.dumps(vocab))
        (folder / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"),
                             model_max_length=TINY_TEXT["max_position_embeddings"])


class _ContentSteering:
    """What :class:`ContentUNet` adds to diffusers' UNet2DConditionModel (a mixin, so that importing this module
    does not import diffusers' UNets; the class itself is made on first use).

    ContentUNet: a UNet2DConditionModel for offline tests whose x0 prediction is a real image's latent, optionally with a
    planted spot.

    A random UNet denoises nothing: its samples are amplified noise, useless for latent diagnostics. This one
    steers the implied clean latent ``x0`` towards the latent of one builtin photo (chosen from the prompt
    embedding, so each prompt has its own content), plus ``residual_gain`` times the base UNet's own output, so
    the network and the text conditioning still run and early x0 predictions are noisy as in a real sampler.

    With a ``spot`` vector (diffusion space), from timestep ``emerge_t`` on (``t <= emerge_t``) the output at one
    interior cell (:meth:`spot_cell`, also chosen from the prompt embedding) makes ``x0`` there equal the
    spot exactly: the ground truth of spot emergence. Epsilon-, v- and sample-prediction are supported. Set up
    with :meth:`setup`.
    """

    def setup(self, alphas_cumprod: torch.Tensor, vae, prediction_type: str = "epsilon",
              spot: Sequence[float] | None = None, emerge_t: int = PLANTED_EMERGE_T, residual_gain: float = 0.1,
              images: str = "builtin:photos") -> "_ContentSteering":
        self._alphas = alphas_cumprod.detach().double().cpu()
        self._vae, self._images = vae, images
        self._prediction = prediction_type
        self._spot = None if spot is None else torch.tensor(list(spot), dtype=torch.float64)
        self._emerge_t = int(emerge_t)
        self._gain = float(residual_gain)
        self._bank: dict[tuple[int, int], torch.Tensor] = {}
        return self

    @property
    def emerge_t(self) -> int:
        return self._emerge_t

    @staticmethod
    def _key(encoder_hidden_states: torch.Tensor) -> int:
        return int(float(encoder_hidden_states[-1].detach().double().abs().mean()) * 1e4)

    @classmethod
    def spot_cell(cls, encoder_hidden_states: torch.Tensor, h: int, w: int) -> tuple[int, int]:
        """Interior cell ``(row, col)`` of the spot for this (last, i.e. conditional) prompt embedding."""
        k = cls._key(encoder_hidden_states) % ((h - 2) * (w - 2))
        return 1 + k // (w - 2), 1 + k % (w - 2)

    def content(self, encoder_hidden_states: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """The target clean latent ``[C, h, w]`` (diffusion space, float64) for this prompt embedding."""
        if (h, w) not in self._bank:
            from vaeprobe.data.images import load_images
            from vaeprobe.models.adapter import VAE

            vae = VAE(self._vae, dtype="fp32")
            f = vae.factor
            batch = load_images(self._images, factor=f, size=None)
            lat = []
            for img in batch:
                x = torch.nn.functional.interpolate(img.tensor().float(), size=(h * f, w * f), mode="area")
                lat.append(vae.to_diffusion(vae.encode(x).mean)[0].double().cpu())
            self._bank[(h, w)] = torch.stack(lat)
        bank = self._bank[(h, w)]
        return bank[self._key(encoder_hidden_states) // 7 % len(bank)]

    @staticmethod
    def _conditional_rows(sample: torch.Tensor) -> list[int]:
        """Per row of the UNet's batch, the row whose prompt embedding decides its content: under classifier-free
        guidance the pipeline doubles the latents (unconditional half first), so both halves take the
        conditional half's embedding of their sample; otherwise each row its own."""
        n = sample.shape[0]
        if n % 2 == 0 and torch.equal(sample[: n // 2], sample[n // 2:]):
            return [n // 2 + i % (n // 2) for i in range(n)]
        return list(range(n))

    def forward(self, sample, timestep, encoder_hidden_states, *args, return_dict: bool = True, **kwargs):
        out = super().forward(sample, timestep, encoder_hidden_states, *args, return_dict=return_dict, **kwargs)
        base = out.sample if return_dict else out[0]
        t = int(torch.as_tensor(timestep).flatten()[0])
        a = float(self._alphas[t])
        h, w = sample.shape[-2:]
        rows = self._conditional_rows(sample)
        x = sample.double()
        x0 = torch.stack([self.content(encoder_hidden_states[k:k + 1], h, w) for k in rows]).to(sample.device)
        cells = [self.spot_cell(encoder_hidden_states[k:k + 1], h, w) for k in rows]
        planted = self._spot is not None and t <= self._emerge_t
        if planted:
            for i, (r, c) in enumerate(cells):
                x0[i, :, r, c] = self._spot.to(x0.device)
        if self._prediction == "epsilon":
            target = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
        elif self._prediction == "v_prediction":
            target = (math.sqrt(a) * x - x0) / math.sqrt(1 - a)
        else:
            target = x0
        pred = target + self._gain * base.double()
        if planted:
            for i, (r, c) in enumerate(cells):
                pred[i, :, r, c] = target[i, :, r, c]  # exact at the spot
        pred = pred.to(base.dtype)
        if return_dict:
            out.sample = pred
            return out
        return (pred,) + tuple(out[1:])


@functools.lru_cache(maxsize=None)
def _content_unet() -> type:
    """:class:`ContentUNet`, made once: :class:`_ContentSteering` over diffusers' UNet2DConditionModel."""
    from diffusers import UNet2DConditionModel

    cls = type("ContentUNet", (_ContentSteering, UNet2DConditionModel), {"__module__": __name__})
    cls.__doc__ = _ContentSteering.__doc__
    return cls


def __getattr__(name: str):
    if name == "ContentUNet":
        return _content_unet()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def tiny_sd_pipeline(planted: bool = False, seed: int = 0):
    """A tiny StableDiffusionPipeline built offline: 64x64 px images (8x8 latents) by default, seeded random
    :class:`ContentUNet` and CLIP text encoder, DDIM with SD's noise schedule and the trained builtin ``mini-kl-f8``
    VAE. ``planted=True`` plants the ``planted-direct`` VAE's neutral code (:data:`PLANTED_CODE`) from timestep
    :data:`PLANTED_EMERGE_T` on.

    >>> pipe = tiny_sd_pipeline()
    >>> type(pipe).__name__, pipe.unet.config.sample_size, pipe.vae_scale_factor
    ('StableDiffusionPipeline', 8, 8)
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from vaeprobe.models.zoo import load_builtin

    tokenizer = _tiny_tokenizer()
    torch.manual_seed(seed)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                        **TINY_TEXT)).eval()
    torch.manual_seed(seed + 1)
    unet = _content_unet()(**TINY_UNET).eval()
    scheduler = DDIMScheduler(**SD_SCHEDULER)
    vae = load_builtin("mini-kl-f8")
    code = [v * float(vae.config.scaling_factor) for v in PLANTED_CODE] if planted else None
    unet.setup(scheduler.alphas_cumprod, vae, scheduler.config.prediction_type, spot=code)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


PIPELINE_BUILTINS = ("tiny-sd", "tiny-sd-planted")


class PipelineError(VaeprobeError, ValueError):
    """A pipeline spec, prompt file or setting that cannot be used (the message says why and what to do).

    Examples
    --------
    >>> try:
    ...     load_pipeline("builtin:nope")
    ... except PipelineError as exc:
    ...     print(exc)
    unknown builtin pipeline 'nope'; available: tiny-sd, tiny-sd-planted
    """


def load_pipeline(spec: Any, *, device: str | torch.device | None = None,
                  dtype: str | torch.dtype | None = None):
    """Load a diffusers text-to-image pipeline and move it to ``device``/``dtype``.

    Parameters
    ----------
    spec : str, pathlib.Path or pipeline
        ``builtin:tiny-sd`` or ``builtin:tiny-sd-planted`` (offline, seeded), a local pipeline folder (with
        ``model_index.json``), a hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``; needs the hub or its
        cache), or a pipeline object, which passes through (moved).
    device : str or torch.device, optional
        Where to put the pipeline (default: leave it where it is).
    dtype : str or torch.dtype, optional
        ``"fp32"``, ``"fp16"``, ``"bf16"`` or a torch dtype (default: the pipeline's own).

    Returns
    -------
    diffusers.DiffusionPipeline
        A latent diffusion pipeline with ``unet``, ``scheduler`` and ``vae``; its progress bar is disabled.

    Raises
    ------
    PipelineError
        When ``spec`` names no loadable pipeline, or the pipeline lacks a unet, scheduler or vae.

    Examples
    --------
    >>> load_pipeline("builtin:tiny-sd").unet.dtype
    torch.float32
    """
    from vaeprobe.models.adapter import parse_dtype
    from vaeprobe.models.loading import HUB_ID

    dtype = parse_dtype(dtype)
    if hasattr(spec, "unet") and hasattr(spec, "scheduler"):
        pipe = spec
    elif not isinstance(spec, (str, Path)):
        raise PipelineError(f"cannot load a pipeline from a {type(spec).__name__}; pass builtin:tiny-sd, a folder "
                            f"or a hub id")
    else:
        s = str(spec)
        path = Path(s).expanduser()
        if s.startswith("builtin:"):
            name = s[len("builtin:"):]
            if name not in PIPELINE_BUILTINS:
                raise PipelineError(f"unknown builtin pipeline {name!r}; available: {', '.join(PIPELINE_BUILTINS)}")
            pipe = tiny_sd_pipeline(planted=name.endswith("planted"))
        elif path.exists():
            if not (path / "model_index.json").exists():
                raise PipelineError(f"{s}: not a diffusers pipeline folder (no model_index.json); save one with "
                                    f"pipe.save_pretrained(folder) or pass a hub id")
            pipe = _from_pretrained(str(path), dtype)
        elif HUB_ID.match(s):
            pipe = _from_hub(s, dtype)
        else:
            raise PipelineError(f"{s!r} is not builtin:NAME, a pipeline folder or a hub id (owner/name)")
    for part in ("unet", "scheduler", "vae"):
        if getattr(pipe, part, None) is None:
            raise PipelineError(f"{type(pipe).__name__} has no {part}; vaeprobe pipeline needs a latent diffusion "
                                f"pipeline with unet, scheduler and vae (e.g. StableDiffusionPipeline)")
    if device is not None or dtype is not None:
        pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _from_hub(repo_id: str, dtype):
    """From the local hub cache if it is there, else from the hub when reachable; one clear line otherwise."""
    from vaeprobe.models.loading import _hub_reachable

    online = _hub_reachable()
    try:
        return _from_pretrained(repo_id, dtype, local_files_only=not online)
    except Exception as exc:  # diffusers raises OSError, ValueError or EnvironmentError depending on what is missing
        why = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        where = "its local cache" if not online else "the hub"
        raise PipelineError(f"{repo_id}: could not load the pipeline from {where} ({why}); download it where the "
                            f"hub is reachable and pass the local folder") from None


def _from_pretrained(where: str, dtype, local_files_only: bool = False):
    from diffusers import DiffusionPipeline

    kwargs: dict = {"low_cpu_mem_usage": False}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    if local_files_only:
        kwargs["local_files_only"] = True
    index = Path(where) / "model_index.json"
    if index.exists() and "safety_checker" in json.loads(index.read_text()):
        kwargs.update(safety_checker=None, requires_safety_checker=False)  # latents only: nothing to check
    return DiffusionPipeline.from_pretrained(where, **kwargs)
