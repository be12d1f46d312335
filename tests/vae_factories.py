"""Factories used by the ``package.module:factory`` loading tests (importable because tests/ is on the path)."""

import torch
from torch import nn


def tiny():
    from vaeprobe.zoo import tiny_random

    return tiny_random(seed=3)


class NaNInHalf(nn.Module):
    """A toy VAE whose decode overflows to inf/NaN in half precision (like SDXL's VAE in fp16)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def encode(self, x):
        return torch.nn.functional.avg_pool2d(x, 8)[:, :1].repeat(1, 4, 1, 1) * self.w

    def decode(self, z):
        up = torch.nn.functional.interpolate(z[:, :3], scale_factor=8)
        big = up * 0 + 70000.0 * self.w  # exceeds fp16's max (65504): inf - inf = NaN in fp16, exact in fp32
        return (big - big) + up


def not_a_module():
    return 42


def tiny16():
    """A 16-channel AutoencoderKL (SD3/FLUX-like channel count) built from config."""
    from vaeprobe.zoo import tiny_random

    return tiny_random(seed=4, latent_channels=16)


def planted16():
    """A planted direct-mechanism spot on a 16-channel base."""
    from vaeprobe.controls import PlantedSpotVAE

    return PlantedSpotVAE(tiny16(), mechanism="direct", location="flattest").eval()
