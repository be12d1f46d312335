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
    """The decoder's soft clamp of its input latent: ``tanh(x / 3) * 3``, into (-3, 3).

    Examples
    --------
    >>> Clamp()(torch.tensor([0.0, 100.0])).tolist()
    [0.0, 3.0]
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Clamp a tensor.

        Parameters
        ----------
        x : torch.Tensor
            Any shape.

        Returns
        -------
        torch.Tensor
            ``tanh(x / 3) * 3``, same shape.
        """
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """Residual block of three 3x3 convs; with ``pool=True`` a 1x1-GroupNorm-1x1 branch is added to the input first.

    Parameters
    ----------
    n_in, n_out : int
        Input and output channels.
    pool : bool, optional
        Add the global pool branch of the newer family members (taef2) to the input before the convs: a 1x1 conv
        to 256 channels, ``GroupNorm(4, 256)``, ReLU, a 1x1 conv back to ``n_in``.

    Attributes
    ----------
    conv : torch.nn.Sequential
        The three 3x3 convs with ReLU between them.
    skip : torch.nn.Module
        ``nn.Identity``, or a 1x1 conv without bias when ``n_in != n_out``.
    fuse : torch.nn.ReLU
        The ReLU after the sum of ``conv`` and ``skip``.
    pool : torch.nn.Sequential or None
        The pool branch; ``None`` without ``pool=True``.

    Examples
    --------
    >>> block = Block(4, 8, pool=True)
    >>> tuple(block(torch.zeros(1, 4, 2, 2)).shape), type(block.pool[1]).__name__
    ((1, 8, 2, 2), 'GroupNorm')
    """

    def __init__(self, n_in: int, n_out: int, *, pool: bool = False):
        super().__init__()
        self.conv = nn.Sequential(_conv(n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()
        self.pool = (nn.Sequential(nn.Conv2d(n_in, POOL_WIDTH, 1, bias=False), nn.GroupNorm(POOL_GROUPS, POOL_WIDTH),
                                   nn.ReLU(), nn.Conv2d(POOL_WIDTH, n_in, 1, bias=False)) if pool else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the block.

        Parameters
        ----------
        x : torch.Tensor
            Features ``[B, n_in, H, W]``.

        Returns
        -------
        torch.Tensor
            Features ``[B, n_out, H, W]``.
        """
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


def make_encoder(latent_channels: int, *, pool: bool = False) -> nn.Sequential:
    """The TAESD encoder as an ``nn.Sequential`` whose indices match the published state dict.

    Parameters
    ----------
    latent_channels : int
        Channels of the latent it writes.
    pool : bool, optional
        Give the blocks of the last (lowest-resolution) stage the pool branch (see :class:`Block`).

    Returns
    -------
    torch.nn.Sequential
        Images ``[B, 3, H, W]`` in [0, 1] to latents ``[B, latent_channels, H / 8, W / 8]``.

    Examples
    --------
    >>> tuple(make_encoder(4)(torch.zeros(1, 3, 16, 16)).shape)
    (1, 4, 2, 2)
    """
    layers: list[nn.Module] = [_conv(3, WIDTH), Block(WIDTH, WIDTH)]
    for stage in range(3):
        layers.append(_conv(WIDTH, WIDTH, stride=2, bias=False))
        layers += [Block(WIDTH, WIDTH, pool=pool and stage == 2) for _ in range(3)]
    layers.append(_conv(WIDTH, latent_channels))
    return nn.Sequential(*layers)


def make_decoder(latent_channels: int, *, pool: bool = False) -> nn.Sequential:
    """The TAESD decoder as an ``nn.Sequential`` whose indices match the published state dict.

    Parameters
    ----------
    latent_channels : int
        Channels of the latent it reads (what :func:`make_encoder` writes).
    pool : bool, optional
        Give the three blocks at the latent's resolution (right after the input conv) the pool branch (see
        :class:`Block`).

    Returns
    -------
    torch.nn.Sequential
        Latents ``[B, latent_channels, h, w]`` to images ``[B, 3, 8 h, 8 w]`` in [0, 1] (not clipped).

    Examples
    --------
    >>> tuple(make_decoder(4)(torch.zeros(1, 4, 2, 2)).shape)
    (1, 3, 16, 16)
    """
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
    with ``sample`` in [-1, 1]. Build one from published weights with :func:`load_taesd` or
    :meth:`from_state_dicts`.

    Parameters
    ----------
    latent_channels : int, optional
        Latent channels (4 for taesd, 32 for taef2).
    pool : bool, optional
        Whether the lowest-resolution blocks carry the global pool branch (see :class:`Block`).
    scaling_factor, shift_factor : float, optional
        Diffusion latents are ``(z - shift_factor) * scaling_factor``. The published TAESD latents need no
        scaling, so the factors are 1 and 0 unless given.
    name : str, optional
        The model's name (the published files' stem, e.g. ``taef2``).

    Attributes
    ----------
    encoder, decoder : torch.nn.Sequential
        From :func:`make_encoder` and :func:`make_decoder` (images in [0, 1] inside), in the published layout.
    config : dict
        A plain dict: ``_class_name``, ``name``, ``latent_channels``, ``pool``, ``scaling_factor`` and
        ``shift_factor``.

    Examples
    --------
    >>> model = TAESD(16)
    >>> model.config["latent_channels"], tuple(model.encode(torch.zeros(1, 3, 16, 16)).latents.shape)
    (16, (1, 16, 2, 2))
    """

    def __init__(self, latent_channels: int = 4, *, pool: bool = False, scaling_factor: float = 1.0,
                 shift_factor: float = 0.0, name: str = "taesd"):
        super().__init__()
        self.encoder = make_encoder(latent_channels, pool=pool)
        self.decoder = make_decoder(latent_channels, pool=pool)
        self.config = {"_class_name": "TAESD", "name": name, "latent_channels": latent_channels, "pool": pool,
                       "scaling_factor": scaling_factor, "shift_factor": shift_factor}

    def encode(self, x: torch.Tensor):
        """Encode images.

        Parameters
        ----------
        x : torch.Tensor
            Images ``[B, 3, H, W]`` in [-1, 1].

        Returns
        -------
        diffusers.models.autoencoders.autoencoder_tiny.AutoencoderTinyOutput
            Its ``latents`` are the encoder's output as is, ``[B, latent_channels, H / 8, W / 8]``.
        """
        from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTinyOutput

        return AutoencoderTinyOutput(latents=self.encoder(x.add(1).div(2)))

    def decode(self, z: torch.Tensor):
        """Decode latents.

        Parameters
        ----------
        z : torch.Tensor
            Latents ``[B, latent_channels, h, w]`` as :meth:`encode` returns them (not scaled).

        Returns
        -------
        diffusers.models.autoencoders.vae.DecoderOutput
            Its ``sample`` holds the images ``[B, 3, 8 h, 8 w]`` in [-1, 1] (not clipped).

        Examples
        --------
        >>> tuple(TAESD().decode(torch.zeros(1, 4, 2, 2)).sample.shape)
        (1, 3, 16, 16)
        """
        from diffusers.models.autoencoders.vae import DecoderOutput

        return DecoderOutput(sample=self.decoder(z).mul(2).sub(1))

    @classmethod
    def from_state_dicts(cls, encoder: dict, decoder: dict, *, name: str = "taesd", **config) -> "TAESD":
        """Build the module that fits the published state dicts and load them (strictly).

        The latent channels are read from the encoder's last conv and the decoder's first; the pool branch is
        built when any key holds ``.pool.``.

        Parameters
        ----------
        encoder, decoder : dict of str to torch.Tensor
            The published state dicts, keyed as the modules of :func:`make_encoder` and :func:`make_decoder`.
        name : str, optional
            The model's name, for messages and ``config``.
        **config
            ``scaling_factor`` and ``shift_factor`` (see :class:`TAESD`).

        Returns
        -------
        TAESD
            Float32, in eval mode.

        Raises
        ------
        VAELoadError
            When the dicts are not TAESD state dicts, disagree on the latent channels or do not fit the layout.

        Examples
        --------
        >>> src = TAESD(8)
        >>> model = TAESD.from_state_dicts(src.encoder.state_dict(), src.decoder.state_dict(), name="mine")
        >>> model.config["latent_channels"], model.config["name"], model.training
        (8, 'mine', False)
        """
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


def find_pair(path: str | Path) -> tuple[Path, Path] | None:
    """The ``(encoder, decoder)`` files of a published TAESD pair.

    Parameters
    ----------
    path : str or pathlib.Path
        A folder holding exactly one pair, or one file of the pair (its partner must sit beside it). The files
        are named ``STEM_encoder.EXT`` and ``STEM_decoder.EXT`` (or with ``-``, ``.`` or nothing before the part),
        ``EXT`` one of ``pth``, ``pt`` and ``safetensors``.

    Returns
    -------
    tuple of pathlib.Path or None
        ``(encoder, decoder)``; ``None`` when ``path`` is neither such a folder nor such a file.

    Raises
    ------
    VAELoadError
        When the folder holds several pairs or the file's partner is not beside it.

    Examples
    --------
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> for part in ("encoder", "decoder"):
    ...     _ = (d / f"taef2_{part}.pth").write_bytes(b"")
    >>> [p.name for p in find_pair(d / "taef2_decoder.pth")], find_pair(d) == find_pair(d / "taef2_encoder.pth")
    (['taef2_encoder.pth', 'taef2_decoder.pth'], True)
    >>> find_pair(d / "notes.txt") is None
    True
    """
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

    ``.pth`` files are read with ``torch.load(weights_only=True)``; a ``{"state_dict": ...}`` wrapper is unwrapped.

    Parameters
    ----------
    encoder, decoder : str or pathlib.Path
        The two files (:func:`find_pair` finds them in a folder).
    **config
        ``scaling_factor`` and ``shift_factor``, keyword-only (see :class:`TAESD`).

    Returns
    -------
    TAESD
        Named after the files' common stem (``taef2`` for ``taef2_encoder.pth``), float32, in eval mode.

    Raises
    ------
    VAELoadError
        When a file is not a plain state dict of tensors or the pair does not fit the TAESD layout.

    Examples
    --------
    >>> import tempfile
    >>> d, src = Path(tempfile.mkdtemp()), TAESD(4)
    >>> torch.save(src.encoder.state_dict(), d / "mine_encoder.pth")
    >>> torch.save(src.decoder.state_dict(), d / "mine_decoder.pth")
    >>> load_taesd(d / "mine_encoder.pth", d / "mine_decoder.pth").config["name"]
    'mine'
    """
    encoder, decoder = Path(encoder), Path(decoder)
    m = _PAIR.match(encoder.name)
    name = (m["stem"] if m and m["stem"] else encoder.stem)
    return TAESD.from_state_dicts(_read_state_dict(encoder), _read_state_dict(decoder), name=name, **config)
