"""Factories used by the ``package.module:factory`` loading tests (importable because tests/ is on the path)."""

import torch
from torch import nn


def tiny():
    from vaeprobe.models.zoo import tiny_random

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
    from vaeprobe.models.zoo import tiny_random

    return tiny_random(seed=4, latent_channels=16)


def planted16():
    """A planted direct-mechanism spot on a 16-channel base."""
    from vaeprobe.models.controls import PlantedSpotVAE

    return PlantedSpotVAE(tiny16(), mechanism="direct", location="flattest").eval()


# -- models trained or written elsewhere: duck-typed modules (the model-matrix test) ------------------------------

class DuckTiny(nn.Module):
    """An ``AutoencoderTiny``-interface module (``encode(x).latents``, ``decode(z).sample``) that is not a diffusers
    model: its ``config`` is whatever the factory gives (a ``SimpleNamespace``, or none at all)."""

    def __init__(self, config=None, seed: int = 5, latent_channels: int = 32):
        super().__init__()
        from diffusers import AutoencoderTiny

        torch.manual_seed(seed)
        self.inner = AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                                     num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1),
                                     latent_channels=latent_channels).eval()
        if config is not None:
            self.config = config

    def encode(self, x):
        return self.inner.encode(x)

    def decode(self, z):
        return self.inner.decode(z)


def namespace_config():
    """A duck-typed module whose config is a ``types.SimpleNamespace`` (the issue's first failure)."""
    from types import SimpleNamespace

    return DuckTiny(SimpleNamespace(latent_channels=32, scaling_factor=0.5, shift_factor=0.1))


def no_config():
    """A duck-typed module with no ``config`` at all."""
    return DuckTiny(None)


class InPlaceDecoder(DuckTiny):
    """The decoder writes into a tensor that autograd needs (``h[b, :, i, j] = ...`` after a sigmoid, whose
    backward reads its output): decodes are fine, vector-Jacobian products fail."""

    def __init__(self):
        super().__init__({"latent_channels": 32})
        self.gate = nn.Conv2d(32, 32, 1)

    def decode(self, z):
        h = torch.sigmoid(self.gate(z))
        for b in range(h.shape[0]):
            h[b, :, 0, 0] = 0.5
        return self.inner.decode(z * 2 * h)


class NoGradDecoder(DuckTiny):
    """The decoder runs under ``torch.no_grad`` (as some wrappers do)."""

    def decode(self, z):
        with torch.no_grad():
            return self.inner.decode(z)


class RoundingDecoder(DuckTiny):
    """The decoder quantises the latent to steps of 1/8 (zero gradient almost everywhere)."""

    def decode(self, z):
        return self.inner.decode(torch.round(z * 8) / 8)


def inplace_decoder():
    return InPlaceDecoder()


def nograd_decoder():
    return NoGradDecoder({"latent_channels": 32})


def rounding_decoder():
    return RoundingDecoder({"latent_channels": 32})


class FailsOnWide(DuckTiny):
    """Encoding an image wider than 64 px raises (as a CUDA out-of-memory error would): one bad item in a batch."""

    def encode(self, x):
        if x.shape[-1] > 64:
            raise RuntimeError("out of memory (a stand-in for CUDA OOM on a large image)")
        return super().encode(x)


def fails_on_wide():
    return FailsOnWide({"latent_channels": 32})


class BrokenEncoder(DuckTiny):
    """Its encode always raises a plain Python error (not one of vaeprobe's)."""

    def encode(self, x):
        raise ValueError("shapes do not match\nsecond line of detail")


def broken_encoder():
    return BrokenEncoder({"latent_channels": 32})
