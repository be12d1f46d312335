"""vaeprobe: diagnostics for the latent space of image VAEs (Stable Diffusion's KL-f8 AutoencoderKL first).

Flow: images -> posterior -> latent maps and spot candidates -> perturbation -> response -> table -> report.
"""

from vaeprobe.errors import ImageLoadError, SetupError, VAELoadError, VaeprobeError
from vaeprobe.data.images import ImageBatch, LoadedImage, iter_images, load_images
from vaeprobe.probes.metrics import LPIPS, compare_images, psnr, ssim
from vaeprobe.probes.latents import LatentStats, find_spots, latent_maps, score_localisation
from vaeprobe.probes.mechanism import (attention_mass, attribute_pathways, decode_frozen, groupnorm_droplets, record_pathways)
from vaeprobe.probes.perturb import Site, apply_batch, parse_operator
from vaeprobe.probes.response import measure
from vaeprobe.probes.scan import exact_scan, linear_scan, select_sites, two_stage_scan
from vaeprobe.models.taesd import TAESD, load_taesd
from vaeprobe.models.adapter import VAE, Posterior
from vaeprobe.models.loading import load_vae

__version__ = "0.1.0"

__all__ = [
    "VAE", "Posterior", "load_vae", "TAESD", "load_taesd", "load_images", "iter_images", "ImageBatch", "LoadedImage", "LPIPS",
    "compare_images", "psnr", "ssim", "VaeprobeError", "VAELoadError", "ImageLoadError", "SetupError",
    "latent_maps", "find_spots", "LatentStats", "score_localisation", "Site", "apply_batch", "parse_operator",
    "measure", "select_sites", "exact_scan", "linear_scan", "two_stage_scan", "attribute_pathways",
    "record_pathways", "decode_frozen", "attention_mass", "groupnorm_droplets", "compare_vaes", "load_pipeline",
    "run_pipeline", "build_report", "run_latents", "run_scan", "run_mechanism", "evaluate_vaes",
]

_LAZY = {"compare_vaes": "jobs.compare", "load_pipeline": "jobs.pipeline", "run_pipeline": "jobs.pipeline",
         "build_report": "reports.report", "run_latents": "jobs.latents", "run_scan": "jobs.scan",
         "run_mechanism": "jobs.mechanism", "evaluate_vaes": "jobs.evaluate"}


def __getattr__(name: str):
    """Heavier stages (the diffusion pipeline imports transformers) load on first use."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'vaeprobe' has no attribute {name!r}")
