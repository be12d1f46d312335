"""The TAESD family of tiny autoencoders (taesd, taesdxl, taesd3, taef1, taef2), built from their published layout.

These are small, deterministic, convolutional autoencoders at factor 8, published by their author as raw PyTorch
state dicts (``NAME_encoder.pth`` and ``NAME_decoder.pth``, MIT licence). vaeprobe builds the modules itself so
that the published files load with ``torch.load(weights_only=True)``; the layout (how many latent channels,
whether the lowest-resolution blocks carry a "pool" branch) is read from the state dict's keys and shapes.

- Encoder: a 3x3 conv to 64 channels, one block, then three times (a stride-2 3x3 conv without bias, three
  blocks), and a 3x3 conv to the latent channels.
- Decoder: ``tanh(z / 3) * 3``, a 3x3 conv to 64 channels, ReLU, three blocks, then three times (2x nearest
  upsampling, a 3x3 conv without bias, three blocks; the last stage one block), and a 3x3 conv to RGB.
- Block: three 3x3 convs with ReLU between them, plus a skip (identity, or a 1x1 conv when the width changes),
  and ReLU after the sum. In the newer members (taef2), the blocks at the lowest resolution add a *pool* branch
  to their input before the convs: a 1x1 conv to 256 channels, ``GroupNorm(4, 256)``, ReLU, a 1x1 conv back to
  64. The GroupNorm's statistics are taken over the whole latent grid, so the branch is a genuine global pathway
  (vaeprobe's mechanism probes find it as an ``nn.GroupNorm``).

Inside, images are in [0, 1] as the published models expect; :class:`TAESD` takes and returns [-1, 1] like every
other VAE in vaeprobe (and like diffusers' ``AutoencoderTiny``). The latents are the encoder's output as is.

>>> model = TAESD(latent_channels=4)
>>> z = model.encode(torch.zeros(1, 3, 32, 32)).latents
>>> tuple(z.shape), tuple(model.decode(z).sample.shape)
((1, 4, 4, 4), (1, 3, 32, 32))
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from vaeprobe.errors import VAELoadError

WIDTH = 64
POOL_WIDTH = 256
POOL_GROUPS = 4


def _conv(n_in: int, n_out: int, **kw) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kw)


class Clamp(nn.Module):
    """``tanh(x / 3) * 3``: the decoder's soft clamp of its input latent."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """Residual block of three 3x3 convs; with ``pool=True`` a 1x1-GroupNorm-1x1 branch is added to the input first."""

    def __init__(self, n_in: int, n_out: int, pool: bool = False):
        super().__init__()
        self.conv = nn.Sequential(_conv(n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()
        self.pool = (nn.Sequential(nn.Conv2d(n_in, POOL_WIDTH, 1, bias=False), nn.GroupNorm(POOL_GROUPS, POOL_WIDTH),
                                   nn.ReLU(), nn.Conv2d(POOL_WIDTH, n_in, 1, bias=False)) if pool else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


def make_encoder(latent_channels: int, pool: bool = False) -> nn.Sequential:
    """The encoder as an ``nn.Sequential`` whose indices match the published state dict."""
    layers: list[nn.Module] = [_conv(3, WIDTH), Block(WIDTH, WIDTH)]
    for stage in range(3):
        layers.append(_conv(WIDTH, WIDTH, stride=2, bias=False))
        layers += [Block(WIDTH, WIDTH, pool=pool and stage == 2) for _ in range(3)]
    layers.append(_conv(WIDTH, latent_channels))
    return nn.Sequential(*layers)


def make_decoder(latent_channels: int, pool: bool = False) -> nn.Sequential:
    """The decoder as an ``nn.Sequential`` whose indices match the published state dict."""
    layers: list[nn.Module] = [Clamp(), _conv(latent_channels, WIDTH), nn.ReLU()]
    layers += [Block(WIDTH, WIDTH, pool=pool) for _ in range(3)]
    for stage, n_blocks in enumerate((3, 3, 1)):
        layers += [nn.Upsample(scale_factor=2), _conv(WIDTH, WIDTH, bias=False)]
        layers += [Block(WIDTH, WIDTH) for _ in range(n_blocks)]
    layers.append(_conv(WIDTH, 3))
    return nn.Sequential(*layers)


class TAESD(nn.Module):
    """A TAESD-family autoencoder with the diffusers ``AutoencoderTiny`` interface.

    ``encode(x)`` takes images in [-1, 1] and returns an object with ``latents``; ``decode(z)`` returns an object
    with ``sample`` in [-1, 1]. ``config`` is a plain dict (``latent_channels``, ``scaling_factor``,
    ``shift_factor``, ``pool``); the published TAESD latents need no scaling, so the factors are 1 and 0 unless
    given.
    """

    def __init__(self, latent_channels: int = 4, pool: bool = False, scaling_factor: float = 1.0,
                 shift_factor: float = 0.0, name: str = "taesd"):
        super().__init__()
        self.encoder = make_encoder(latent_channels, pool)
        self.decoder = make_decoder(latent_channels, pool)
        self.config = {"_class_name": "TAESD", "name": name, "latent_channels": latent_channels, "pool": pool,
                       "scaling_factor": scaling_factor, "shift_factor": shift_factor}

    def encode(self, x: torch.Tensor):
        from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTinyOutput

        return AutoencoderTinyOutput(latents=self.encoder(x.add(1).div(2)))

    def decode(self, z: torch.Tensor):
        from diffusers.models.autoencoders.vae import DecoderOutput

        return DecoderOutput(sample=self.decoder(z).mul(2).sub(1))

    @classmethod
    def from_state_dicts(cls, encoder: dict, decoder: dict, name: str = "taesd", **config) -> "TAESD":
        """Build the module that fits the published state dicts and load them (strictly)."""
        try:
            latent = int(encoder[f"{len(make_encoder(4)) - 1}.weight"].shape[0])
            dec_latent = int(decoder["1.weight"].shape[1])
        except KeyError as exc:
            raise VAELoadError(f"{name}: not a TAESD state dict (no key {exc.args[0]})") from None
        if latent != dec_latent:
            raise VAELoadError(f"{name}: the encoder writes {latent} latent channels but the decoder reads "
                               f"{dec_latent}; give a matching encoder/decoder pair")
        pool = any(".pool." in k for k in list(encoder) + list(decoder))
        model = cls(latent_channels=latent, pool=pool, name=name, **config)
        for part, sd in (("encoder", encoder), ("decoder", decoder)):
            try:
                getattr(model, part).load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
            except RuntimeError as exc:
                raise VAELoadError(f"{name}: the {part} weights do not fit the TAESD layout "
                                   f"({str(exc).splitlines()[0][:160]})") from None
        return model.eval()


_PAIR = re.compile(r"^(?P<stem>.*?)[_\-.]?(?P<part>encoder|decoder)\.(?P<ext>pth|pt|safetensors)$")


def find_pair(path: Path) -> tuple[Path, Path] | None:
    """The ``(encoder, decoder)`` files of a published TAESD pair: ``path`` is a folder holding exactly one pair,
    or one file of the pair (its partner must sit beside it). ``None`` when ``path`` is neither."""
    path = Path(path)
    if path.is_dir():
        encs = sorted(p for p in path.iterdir() if (m := _PAIR.match(p.name)) and m["part"] == "encoder")
        pairs = [(e, e.with_name(e.name.replace("encoder", "decoder"))) for e in encs]
        pairs = [(e, d) for e, d in pairs if d.exists()]
        if len(pairs) > 1:
            raise VAELoadError(f"{path}: holds several encoder/decoder pairs "
                               f"({', '.join(e.name for e, _ in pairs)}); give one of the files")
        return pairs[0] if pairs else None
    m = _PAIR.match(path.name)
    if not m:
        return None
    other = "decoder" if m["part"] == "encoder" else "encoder"
    partner = path.with_name(path.name[:m.start("part")] + other + path.name[m.end("part"):])
    if not partner.exists():
        raise VAELoadError(f"{path}: its partner {partner.name} is not beside it; a TAESD model needs both files")
    return (path, partner) if m["part"] == "encoder" else (partner, path)


def _read_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise VAELoadError(f"{path}: cannot read it as a plain state dict with weights_only=True "
                           f"({str(exc).splitlines()[0][:160]})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise VAELoadError(f"{path}: not a state dict of tensors")
    return sd


def load_taesd(encoder: str | Path, decoder: str | Path, **config) -> TAESD:
    """Load a published TAESD pair (``*_encoder.pth`` / ``*_decoder.pth``, or ``.safetensors``).

    The model's name is the files' common stem (``taef2`` for ``taef2_encoder.pth``).
    """
    encoder, decoder = Path(encoder), Path(decoder)
    m = _PAIR.match(encoder.name)
    name = (m["stem"] if m and m["stem"] else encoder.stem)
    return TAESD.from_state_dicts(_read_state_dict(encoder), _read_state_dict(decoder), name=name, **config)
