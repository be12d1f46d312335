"""vaeprobe: diagnostics for the latent space of image VAEs (Stable Diffusion's KL-f8 AutoencoderKL first).

Flow: images -> posterior -> latent maps and spot candidates -> perturbation -> response -> table -> report.
"""

from .errors import ImageLoadError, SetupError, VAELoadError, VaeprobeError
from .images import ImageBatch, LoadedImage, iter_images, load_images
from .metrics import LPIPS, compare_images, psnr, ssim
from .vae import VAE, Posterior, load_vae

__version__ = "0.1.0"

__all__ = [
    "VAE", "Posterior", "load_vae", "load_images", "iter_images", "ImageBatch", "LoadedImage", "LPIPS",
    "compare_images", "psnr", "ssim", "VaeprobeError", "VAELoadError", "ImageLoadError", "SetupError",
]
