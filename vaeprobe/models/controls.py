"""Planted-spot control models: VAEs whose global-information spot and mechanism are known by construction.

Each control wraps the trained ``builtin:mini-kl-f8`` and behaves like any diffusers VAE (``encode`` returns a
``latent_dist``, ``decode`` a ``sample``), so every detector and estimator in vaeprobe can be scored against its
ground truth: ``model.ground_truth(x)`` gives, per image, the spot's latent cell and the mechanism.

Mechanisms (what carries the spot's information to the rest of the image):

- ``direct``: the encoder removes the image's mean colour before encoding and writes it at the spot with a huge
  norm (log-variance below the -30 clamp, as in SD); the decoder reads the strongest position and re-applies that
  colour to every pixel after decoding. No GroupNorm or attention is involved.
- ``groupnorm``: a StyleGAN2-style "droplet": the encoder writes a spike whose size is chosen so that a
  GroupNorm over the whole latent (``decoder.droplet``, the decoder's first layer, affine weight ``sigma_t``)
  is the identity on every other position. Change the spike and the normalisation statistics, hence every
  position, change; with the statistics frozen the far field does not move.
- ``attention``: an attention sink. The encoder writes a constant huge vector at the spot; a self-attention layer in
  the decoder (``decoder.attention``, a diffusers ``Attention`` before the base decoder) whose fixed query attends
  to it reads the spot's value and adds it, minus a fixed output bias, to every position: zero while the spot is
  intact, a uniform latent shift of ``-code_gain`` everywhere when it is erased.
- ``hidden``: a decoder-only trace: the colour code sits at a fixed position at an *ordinary* norm and ordinary
  log-variance, and the decoder reads it directly. Encoder statistics cannot see it; only perturbation can.

Locations: ``fixed`` (cell ``(h // 4, w // 4)``) or ``flattest`` (the interior cell whose 3x3-cell neighbourhood
has the lowest pixel variance; ViT high-norm tokens likewise sit on redundant background patches).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vaeprobe.schema import GLOBAL, GLOBAL_INFORMATION, HIGH_NORM, WIDE_LOCAL

MECHANISMS = ("direct", "groupnorm", "attention", "hidden")
LOCATIONS = ("fixed", "flattest")
SPOT_RAW_LOGVAR = -35.0  # below diffusers' clamp at -30, as SD's spot
COLOUR_OFFSET = 1.5      # the code stores (mean colour + offset): erasing it shifts colour by >= 0.5 for any image


def spot_locations(x: torch.Tensor, factor: int, location: str) -> torch.Tensor:
    """Per image ``(row, col)`` of the planted spot, shape ``[B, 2]`` (long).

    >>> spot_locations(torch.zeros(2, 3, 64, 64), 8, "fixed").tolist()
    [[2, 2], [2, 2]]
    """
    b, _, hp, wp = x.shape
    h, w = hp // factor, wp // factor
    if location == "fixed":
        return torch.tensor([[h // 4, w // 4]] * b, dtype=torch.long)
    if location != "flattest":
        raise ValueError(f"unknown location {location!r}; use one of {LOCATIONS}")
    gray = x.float().mean(1, keepdim=True)
    cell_mean = F.avg_pool2d(gray, factor)
    cell_var = F.avg_pool2d(gray ** 2, factor) - cell_mean ** 2
    neigh = F.avg_pool2d(cell_var, 3, stride=1, padding=1, count_include_pad=False)
    neigh[:, :, 0, :] = neigh[:, :, -1, :] = float("inf")  # interior cells only
    neigh[:, :, :, 0] = neigh[:, :, :, -1] = float("inf")
    flat = neigh.flatten(1).argmin(1)
    return torch.stack([flat // w, flat % w], dim=1)


def strongest_positions(z: torch.Tensor) -> torch.Tensor:
    """``[B, 2]`` cell of the largest latent norm per image (how the decoders find the spot)."""
    norm = z.float().norm(dim=1).flatten(1)
    flat = norm.argmax(1)
    return torch.stack([flat // z.shape[-1], flat % z.shape[-1]], dim=1)


def inpaint(z: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Replace each image's latent at ``pos`` by the mean of its in-bounds 4-neighbours."""
    out = z.clone()
    h, w = z.shape[-2:]
    for i, (r, c) in enumerate(pos.tolist()):
        neigh = [(r + dr, c + dc) for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)) if 0 <= r + dr < h and 0 <= c + dc < w]
        out[i, :, r, c] = torch.stack([z[i, :, rr, cc] for rr, cc in neigh]).mean(0)
    return out


def _write(t: torch.Tensor, pos: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    idx = torch.arange(t.shape[0], device=t.device)
    pos = pos.to(t.device)
    t[idx, :, pos[:, 0], pos[:, 1]] = values.to(t.device, t.dtype)
    return t


class PlantedDecoder(nn.Module):
    """Decoder of a control: the mechanism stage, then the base VAE's post-quant conv and decoder."""

    def __init__(self, base, mechanism: str, channels: int, sigma_t: float, key_gain: float, code_gain: float,
                 spot_norm: float):
        super().__init__()
        self.mechanism = mechanism
        self.post_quant_conv = base.post_quant_conv
        self.base = base.decoder
        if mechanism == "groupnorm":
            self.droplet = nn.GroupNorm(1, channels, eps=1e-6, affine=True)
            with torch.no_grad():
                self.droplet.weight.fill_(sigma_t)
                self.droplet.bias.zero_()
        if mechanism == "attention":
            from diffusers.models.attention_processor import Attention

            self.attention = Attention(query_dim=channels, heads=1, dim_head=channels, bias=True, out_bias=True,
                                       residual_connection=True)
            with torch.no_grad():
                for lin in (self.attention.to_q, self.attention.to_k, self.attention.to_v, self.attention.to_out[0]):
                    lin.weight.zero_()
                    lin.bias.zero_()
                # constant query; key = the last channel (huge at the spot); the value read at the spot, minus a
                # fixed bias, is added to every position: zero while the spot is intact, -code_gain without it.
                self.attention.to_q.bias[0] = key_gain
                self.attention.to_k.weight[0, channels - 1] = 1.0
                for ch in range(channels - 1):
                    self.attention.to_v.weight[ch, ch] = 1.0
                    self.attention.to_out[0].weight[ch, ch] = code_gain / spot_norm
                    self.attention.to_out[0].bias[ch] = -code_gain

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.mechanism == "groupnorm":
            z = self.droplet(z)
        elif self.mechanism == "attention":
            z = self.attention(z)
        return z


class PlantedSpotVAE(nn.Module):
    """A planted-spot control on top of a trained AutoencoderKL ``base`` (see the module docstring)."""

    def __init__(self, base, mechanism: str = "direct", location: str = "flattest", spot_norm: float = 160.0,
                 sigma_t: float = 100.0, key_gain: float = 4.0, code_gain: float = 8.0, hidden_scale: float = 5.0):
        super().__init__()
        if mechanism not in MECHANISMS:
            raise ValueError(f"unknown mechanism {mechanism!r}; use one of {MECHANISMS}")
        if mechanism == "hidden":
            location = "fixed"
        self.base = base
        self.mechanism, self.location = mechanism, location
        self.spot_norm, self.sigma_t, self.code_gain, self.hidden_scale = spot_norm, sigma_t, code_gain, hidden_scale
        self.channels = base.config.latent_channels
        self.factor = 2 ** (len(base.config.block_out_channels) - 1)
        self.decoder = PlantedDecoder(base, mechanism, self.channels, sigma_t, key_gain, code_gain, spot_norm)
        self.config = dict(base.config)
        self.config["_planted"] = {"mechanism": mechanism, "location": location}

    # -- ground truth ------------------------------------------------------------------------------------------
    def ground_truth(self, x: torch.Tensor) -> list[dict]:
        """Per image: the planted spot's latent cell, the mechanism, and whether encoder statistics show it."""
        pos = spot_locations(x, self.factor, self.location)
        return [{"row": int(r), "col": int(c), "mechanism": self.mechanism, "location": self.location,
                 "encoder_trace": self.mechanism != "hidden", "expected_verdict": MECHANISM_VERDICTS[self.mechanism]}
                for r, c in pos.tolist()]

    # -- encode ------------------------------------------------------------------------------------------------
    def _code(self, colour: torch.Tensor, scale: float) -> torch.Tensor:
        """``[B, C]`` spot vector: (colour + offset) * scale in the first 3 channels, ``scale`` in the last."""
        code = torch.zeros(colour.shape[0], self.channels, dtype=colour.dtype, device=colour.device)
        code[:, :3] = (colour + COLOUR_OFFSET) * scale
        code[:, -1] = scale
        return code

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        colour = x.float().mean(dim=(2, 3))
        pos = spot_locations(x, self.factor, self.location)
        inp = x - colour[:, :, None, None].to(x.dtype) if self.mechanism in ("direct", "hidden") else x
        params = self.base.encode(inp).latent_dist.parameters
        mean, raw = params.chunk(2, dim=1)
        if self.mechanism == "direct":
            mean = _write(mean, pos, self._code(colour, self.spot_norm))
        elif self.mechanism == "hidden":
            mean = _write(mean, pos, self._code(colour, self.hidden_scale))
        elif self.mechanism == "attention":
            mean = _write(mean, pos, torch.full((x.shape[0], self.channels), self.spot_norm))
        elif self.mechanism == "groupnorm":
            mean = _write(mean, pos, self._droplet_spike(mean, pos))
        if self.mechanism != "hidden":
            raw = _write(raw, pos, torch.full((x.shape[0], self.channels), SPOT_RAW_LOGVAR))
        dist = DiagonalGaussianDistribution(torch.cat([mean, raw], dim=1))
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def _droplet_spike(self, mean: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Spike that gives the whole latent mean 0 and std ``sigma_t``, so the droplet GroupNorm is the identity
        on every other position."""
        m = mean.double()
        b, c, h, w = m.shape
        n = c * h * w
        idx = torch.arange(b)
        rest = m.clone()
        rest[idx, :, pos[:, 0], pos[:, 1]] = 0.0
        s1 = rest.flatten(1).sum(1)
        s2 = rest.flatten(1).pow(2).sum(1)
        a = -s1 / c
        need = n * self.sigma_t ** 2 - s2 - c * a ** 2
        if (need <= 0).any():
            raise ValueError(f"sigma_t={self.sigma_t} is too small for a {h}x{w} latent with this mean; raise it")
        e = torch.tensor([(-1.0) ** k for k in range(c)], device=m.device) / c ** 0.5
        return (a[:, None] + need.sqrt()[:, None] * e[None].double()).float()

    # -- decode ------------------------------------------------------------------------------------------------
    def decode(self, z: torch.Tensor, return_dict: bool = True):
        from diffusers.models.autoencoders.vae import DecoderOutput

        if self.mechanism == "hidden":
            h, w = z.shape[-2:]
            pos = torch.tensor([[h // 4, w // 4]] * z.shape[0], dtype=torch.long, device=z.device)
        else:
            pos = strongest_positions(z)
        idx = torch.arange(z.shape[0], device=z.device)
        spot = z[idx, :, pos[:, 0], pos[:, 1]].float()
        h = self.decoder(z)
        h = inpaint(h, pos)
        out = self.decoder.base(self.decoder.post_quant_conv(h))
        if self.mechanism in ("direct", "hidden"):
            scale = self.spot_norm if self.mechanism == "direct" else self.hidden_scale
            colour = spot[:, :3] / scale - COLOUR_OFFSET
            out = out + colour[:, :, None, None].to(out.dtype)
        return DecoderOutput(sample=out) if return_dict else (out,)


def _control(mechanism: str, location: str):
    def make():
        from vaeprobe.models.folders import folder_model

        return PlantedSpotVAE(folder_model("mini-kl-f8"), mechanism=mechanism, location=location).eval()

    make.__doc__ = f"planted-spot control: mechanism {mechanism}, location {location}"
    return make


CONTROLS = {
    "planted-direct-fixed": _control("direct", "fixed"),
    "planted-direct": _control("direct", "flattest"),
    "planted-groupnorm": _control("groupnorm", "flattest"),
    "planted-attention": _control("attention", "flattest"),
    "planted-hidden": _control("hidden", "fixed"),
}
"""Builtin controls (``builtin:NAME``); the clean ``builtin:mini-kl-f8`` is the negative control."""


# -- controls for the verdicts -------------------------------------------------------------------------------------

KINDS = ("wide", "local", "droplet", "keyed")
WIDE_SIGMA = 3.0       # cells: the decoy-wide-local bump's Gaussian width (energy profile exp(-d^2 / sigma^2))
WIDE_AMPLITUDE = 0.5   # the bump's height in [-1, 1] units
KEY_MIN_NORM = 0.1     # vectors shorter than this hold no key (a zeroed cell is not the code)
KEY_SCALE = 5.0        # the keyed code's scale: its norm is 5 x |colour + offset|, an ordinary norm
_KEY_BASIS = torch.tensor([[1.0, 1.0, 1.0], [-1.0, 1.0, 1.0], [1.0, -1.0, 1.0], [-1.0, -1.0, -3.0]])


def _key_basis() -> torch.Tensor:
    """``[4, 3]`` orthonormal basis of the hyperplane ``sum(v) = 0`` of the 4-channel latent: the keyed code lives
    there, so its direction (orthogonal to (1, 1, 1, 1)), not its norm, marks it."""
    q, _ = torch.linalg.qr(_KEY_BASIS - _KEY_BASIS.mean(0, keepdim=True))
    return q


def keyed_positions(z: torch.Tensor) -> torch.Tensor:
    """``[B, 2]`` cell whose latent vector is closest to the key hyperplane (smallest ``|sum(v)| / |v|``)."""
    norm = z.float().norm(dim=1)
    score = torch.where(norm > KEY_MIN_NORM, z.float().sum(1).abs() / norm.clamp_min(1e-12), torch.inf)
    flat = score.flatten(1).argmin(1)
    return torch.stack([flat // z.shape[-1], flat % z.shape[-1]], dim=1)


class VerdictControl(nn.Module):
    """Controls with a declared verdict (:data:`EXPECTED_VERDICTS`) on top of a trained AutoencoderKL ``base``.

    - ``wide`` (``decoy-wide-local``): the encoder writes a constant vector of norm ``spot_norm`` at the flattest
      cell (log-variance below the clamp); the decoder inpaints the strongest cell when its norm is over half of
      ``spot_norm`` and adds a grey Gaussian bump of height ``WIDE_AMPLITUDE`` and width ``WIDE_SIGMA`` cells
      around it. High norm, an influence wider than the decoder's own receptive field, and local.
    - ``local`` (``decoy-high-norm``): the same constant vector at the flattest cell, and the decoder inpaints the
      strongest cell when its norm is over half of ``spot_norm`` and adds nothing: a latent outlier that the
      decoder does not read, so erasing it changes only its own neighbourhood, at an ordinary cell's size and
      shape. High norm and local: the control that fails a verdict which calls a cell global or wide-local for
      its norm.
    - ``droplet`` (``decoy-droplet``): the encoder writes the same constant vector (norm ``spot_norm``) at the
      flattest cell and the plain decoder reads it: its GroupNorm statistics are dominated by it, so erasing it
      changes the whole image, but it is the same for every image: global, with no image information.
    - ``keyed``: the encoder removes the image's mean colour and writes it, at an ordinary norm (scale
      ``KEY_SCALE``), at the flattest cell in the hyperplane ``sum(v) = 0``; the decoder finds the cell by that
      direction (:func:`keyed_positions`), inpaints it and re-applies the colour everywhere. Latent statistics do
      not show it: global, carrying the image's colour.
    """

    def __init__(self, base, kind: str, spot_norm: float = 160.0):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; use one of {KINDS}")
        self.base, self.kind, self.spot_norm = base, kind, spot_norm
        self.channels = base.config.latent_channels
        if kind == "keyed" and self.channels != 4:
            raise ValueError("the keyed control needs a 4-channel latent")
        self.factor = 2 ** (len(base.config.block_out_channels) - 1)
        self.post_quant_conv, self.decoder = base.post_quant_conv, base.decoder
        self.config = dict(base.config)
        self.config["_planted"] = {"mechanism": kind, "location": "flattest"}

    def ground_truth(self, x: torch.Tensor) -> list[dict]:
        pos = spot_locations(x, self.factor, "flattest")
        return [{"row": int(r), "col": int(c), "mechanism": self.kind, "location": "flattest",
                 "encoder_trace": self.kind != "keyed", "expected_verdict": KIND_VERDICTS[self.kind]}
                for r, c in pos.tolist()]

    def _constant(self, b: int, device) -> torch.Tensor:
        v = torch.tensor([(-1.0) ** k for k in range(self.channels)], device=device)
        return (v / v.norm() * self.spot_norm).expand(b, -1)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        pos = spot_locations(x, self.factor, "flattest")
        colour = x.float().mean(dim=(2, 3))
        inp = x - colour[:, :, None, None].to(x.dtype) if self.kind == "keyed" else x
        mean, raw = self.base.encode(inp).latent_dist.parameters.chunk(2, dim=1)
        if self.kind == "keyed":
            code = (colour + COLOUR_OFFSET) @ _key_basis().T.to(colour.device) * KEY_SCALE
            mean = _write(mean, pos, code)
        else:
            mean = _write(mean, pos, self._constant(x.shape[0], x.device))
            raw = _write(raw, pos, torch.full((x.shape[0], self.channels), SPOT_RAW_LOGVAR))
        dist = DiagonalGaussianDistribution(torch.cat([mean, raw], dim=1))
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        from diffusers.models.autoencoders.vae import DecoderOutput

        if self.kind == "droplet":
            out = self.decoder(self.post_quant_conv(z))
        elif self.kind == "keyed":
            pos = keyed_positions(z)
            idx = torch.arange(z.shape[0], device=z.device)
            code = z[idx, :, pos[:, 0], pos[:, 1]].float()
            colour = code @ _key_basis().to(code.device) / KEY_SCALE - COLOUR_OFFSET
            out = self.decoder(self.post_quant_conv(inpaint(z, pos)))
            out = out + colour[:, :, None, None].to(out.dtype)
        else:
            pos = strongest_positions(z)
            idx = torch.arange(z.shape[0], device=z.device)
            live = z[idx, :, pos[:, 0], pos[:, 1]].float().norm(dim=1) > self.spot_norm / 2
            zz = torch.where(live[:, None, None, None], inpaint(z, pos), z)
            out = self.decoder(self.post_quant_conv(zz))
            h, w = out.shape[-2:]
            yy = (torch.arange(h, device=out.device) + 0.5) / self.factor
            xx = (torch.arange(w, device=out.device) + 0.5) / self.factor
            for i in (torch.nonzero(live).flatten().tolist() if self.kind == "wide" else []):
                r, c = (pos[i].float() + 0.5).tolist()
                d2 = (yy[:, None] - r) ** 2 + (xx[None, :] - c) ** 2
                bump = WIDE_AMPLITUDE * torch.exp(-d2 / (2 * WIDE_SIGMA ** 2))
                out[i] = out[i] + bump.to(out.dtype)
        return DecoderOutput(sample=out) if return_dict else (out,)


class WeightedStatsGroupNorm(nn.Module):
    """A decoder's own ``nn.GroupNorm`` whose statistics give one latent cell the weight ``alpha``.

    The layer runs at ``scale`` feature positions per latent cell (1 in the mid block, the decoder's factor in its
    last GroupNorm). Its input ``[B, C, H, W]`` is flattened and ``k`` copies of the ``scale x scale`` block of
    latent cell ``(h // 4, w // 4)`` (``h = H / scale``) are appended, with ``k = round(alpha / (1 - alpha) * h *
    w)`` so that the cell's share of the statistics is ``alpha`` at every resolution; the unchanged
    ``nn.GroupNorm`` (``self.norm``, its trained weights) normalises the lot and the copies are dropped. Every position is normalised with statistics that lean on that one cell,
    so changing it changes the whole image, through the decoder's own GroupNorm (the mechanism module's hooks see
    ``self.norm`` as any GroupNorm and can freeze it).
    """

    def __init__(self, norm: nn.GroupNorm, alpha: float, scale: int = 1):
        super().__init__()
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        self.norm, self.alpha, self.scale = norm, alpha, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        s = self.scale
        h, w = hh // s, ww // s
        k = max(1, round(self.alpha / (1 - self.alpha) * h * w))
        r, q = (h // 4) * s, (w // 4) * s
        block = x[:, :, r:r + s, q:q + s].flatten(2)
        y = self.norm(torch.cat([x.flatten(2), block.repeat(1, 1, k)], dim=2))
        return y[:, :, :hh * ww].reshape(b, c, hh, ww)


INTERNAL_ALPHA = 0.3  # the internal control's weight on its cell: chosen in 7f9ef1a against the old gate, not retuned


class InternalControl(nn.Module):
    """``internal``: the clean trained AutoencoderKL ``base``, unchanged but for its decoder's last GroupNorm
    (``decoder.conv_norm_out``), which gives latent cell ``(h // 4, w // 4)`` the weight ``alpha`` in its
    statistics (:class:`WeightedStatsGroupNorm`). The encoder is the clean one, so the cell has
    an ordinary norm and latent statistics cannot see it; the global pathway is inside the decoder's own layer.
    Zeroing the cell shifts the normalisation of every position: ``global``. The shift subtracts the cell's own
    features, so it does not carry the image's colour.
    """

    def __init__(self, base, alpha: float = INTERNAL_ALPHA):
        super().__init__()
        self.base, self.alpha = base, alpha
        self.factor = 2 ** (len(base.config.block_out_channels) - 1)
        dec = base.decoder
        if not isinstance(getattr(dec, "conv_norm_out", None), nn.GroupNorm):
            raise ValueError("the internal control needs a decoder whose output GroupNorm is conv_norm_out")
        dec.conv_norm_out = WeightedStatsGroupNorm(dec.conv_norm_out, alpha, scale=self.factor)
        self.post_quant_conv, self.decoder = base.post_quant_conv, base.decoder
        self.config = dict(base.config)
        self.config["_planted"] = {"mechanism": "internal", "location": "fixed"}

    def ground_truth(self, x: torch.Tensor) -> list[dict]:
        pos = spot_locations(x, self.factor, "fixed")
        return [{"row": int(r), "col": int(c), "mechanism": "internal", "location": "fixed",
                 "encoder_trace": False, "expected_verdict": GLOBAL} for r, c in pos.tolist()]

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        return self.base.encode(x, return_dict=return_dict)

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        return self.base.decode(z, return_dict=return_dict)


def _internal_control():
    from vaeprobe.models.folders import folder_model

    return InternalControl(folder_model("mini-kl-f8")).eval()


_internal_control.__doc__ = "verdict control: a weighted-statistics GroupNorm inside the decoder, declared global"


MECHANISM_VERDICTS = {"direct": GLOBAL_INFORMATION, "hidden": GLOBAL_INFORMATION, "groupnorm": GLOBAL,
                      "attention": GLOBAL}
KIND_VERDICTS = {"wide": WIDE_LOCAL, "local": HIGH_NORM, "droplet": GLOBAL, "keyed": GLOBAL_INFORMATION}


def _verdict_control(kind: str):
    def make():
        from vaeprobe.models.folders import folder_model

        return VerdictControl(folder_model("mini-kl-f8"), kind).eval()

    make.__doc__ = f"verdict control: {kind}, declared verdict {KIND_VERDICTS[kind]}"
    return make


VERDICT_CONTROLS = {
    "decoy-wide-local": _verdict_control("wide"),
    "decoy-high-norm": _verdict_control("local"),
    "decoy-droplet": _verdict_control("droplet"),
    "keyed": _verdict_control("keyed"),
    "internal": _internal_control,
}
"""Controls added for the verdicts (``builtin:NAME``)."""

EXPECTED_VERDICTS = {
    "planted-direct-fixed": GLOBAL_INFORMATION,  # the image's colour, read from the spot by every pixel
    "planted-direct": GLOBAL_INFORMATION,
    "planted-hidden": GLOBAL_INFORMATION,
    "planted-groupnorm": GLOBAL,       # the spike holds the latent's own moments, a normaliser, not colour
    "planted-attention": GLOBAL,       # a constant vector: erasing it shifts every position, same for all images
    "decoy-wide-local": WIDE_LOCAL,
    "decoy-high-norm": HIGH_NORM,      # a latent outlier the decoder inpaints: local, at an ordinary size
    "decoy-droplet": GLOBAL,
    "keyed": GLOBAL_INFORMATION,
    "internal": GLOBAL,                # a GroupNorm inside the decoder leans on one ordinary cell
}
"""The verdict each control declares for its planted cell (by construction)."""


# -- controls of known size ---------------------------------------------------------------------------------------

LEVEL = 1 / 127.5      # one 8-bit level in the decoders' [-1, 1] units
KNOWN_KINDS = ("shift", "gauss", "contrast")


def _base_encode(base, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(mean, raw log-variance or None) of any base with the diffusers interface (AutoencoderKL or a TAESD)."""
    out = base.encode(x)
    dist = getattr(out, "latent_dist", None)
    if dist is not None:
        mean, raw = dist.parameters.chunk(2, dim=1)
        return mean, raw
    return out.latents, None


class KnownEffectControl(nn.Module):
    """A control whose ground truth is an amplitude: removing its planted cell changes the image by a known amount.

    The encoder writes a constant vector of norm ``spot_norm`` at the flattest cell (:func:`spot_locations`). The
    decoder looks for a cell whose norm is over half of ``spot_norm``; when it finds one, it inpaints it
    (:func:`inpaint`, the mean of its 4 neighbours) before the base decoder and then adds the planted effect:

    - ``shift``: ``amount`` 8-bit levels on every pixel and channel. Removing the cell shifts the whole image by
      exactly ``amount`` levels (plus the base decoder's small local effect of the removal itself);
    - ``gauss``: a grey Gaussian bump of height ``amount`` levels and width ``sigma`` cells around the cell
      (amplitude ``exp(-d^2 / (2 sigma^2))``): a change that decays with distance;
    - ``contrast``: a droplet of strength ``amount``: each pixel's deviation from the decode's per-channel mean is
      scaled by ``1 + amount``, so removing the cell changes every pixel by ``amount`` times its contrast.

    Works on any base with the diffusers interface whose latents a huge vector does not otherwise disturb (the
    trained mini, taef2). :meth:`planted_change` gives the exact planted part of the removal's change.

    Parameters
    ----------
    base : torch.nn.Module
        An AutoencoderKL or a :class:`~vaeprobe.models.taesd.TAESD`.
    kind : {"shift", "gauss", "contrast"}
        The planted effect.
    amount : float
        Levels (``shift``, ``gauss``) or the contrast gain (``contrast``).
    sigma : float, optional
        The bump's width in cells (``gauss``).
    spot_norm : float, optional
        The planted vector's norm.
    factor : int, optional
        The base's downsampling factor.

    Examples
    --------
    >>> from vaeprobe.models.taesd import TAESD
    >>> m = KnownEffectControl(TAESD(4), "shift", 8.0).eval()
    >>> x = torch.rand(1, 3, 64, 64) * 2 - 1
    >>> z = m.encode(x).latents
    >>> r, c = m.ground_truth(x)[0]["row"], m.ground_truth(x)[0]["col"]
    >>> gone = z.clone(); gone[:, :, r, c] = 0.0
    >>> round(float((m.decode(z).sample - m.decode(gone).sample).mean() * 127.5), 1) > 0
    True
    """

    def __init__(self, base, kind: str, amount: float, *, sigma: float = 3.0, spot_norm: float = 160.0,
                 factor: int = 8):
        super().__init__()
        if kind not in KNOWN_KINDS:
            raise ValueError(f"unknown kind {kind!r}; use one of {KNOWN_KINDS}")
        self.base, self.kind, self.amount, self.sigma = base, kind, float(amount), float(sigma)
        self.spot_norm, self.factor = spot_norm, factor
        cfg = getattr(base, "config", {})
        self.config = dict(cfg)
        self.config["_planted"] = {"mechanism": f"known-{kind}", "amount": self.amount, "sigma": self.sigma}
        self.channels = int(self.config["latent_channels"])

    def ground_truth(self, x: torch.Tensor) -> list[dict]:
        pos = spot_locations(x, self.factor, "flattest")
        return [{"row": int(r), "col": int(c), "mechanism": f"known-{self.kind}", "location": "flattest",
                 "encoder_trace": True, "amount": self.amount, "sigma": self.sigma} for r, c in pos.tolist()]

    def _vector(self, b: int, device) -> torch.Tensor:
        v = torch.tensor([(-1.0) ** k for k in range(self.channels)], device=device)
        return (v / v.norm() * self.spot_norm).expand(b, -1)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        mean, raw = _base_encode(self.base, x)
        pos = spot_locations(x, self.factor, "flattest")
        mean = _write(mean, pos, self._vector(x.shape[0], x.device))
        if raw is None:
            from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTinyOutput

            return AutoencoderTinyOutput(latents=mean)
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        raw = _write(raw, pos, torch.full((x.shape[0], self.channels), SPOT_RAW_LOGVAR))
        dist = DiagonalGaussianDistribution(torch.cat([mean, raw], dim=1))
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def _effect(self, out: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]``: the planted effect added to decodes ``out`` with the cell at ``pos``."""
        if self.kind == "shift":
            return torch.full_like(out, self.amount * LEVEL)
        if self.kind == "contrast":
            return self.amount * (out - out.mean(dim=(2, 3), keepdim=True))
        h, w = out.shape[-2:]
        yy = (torch.arange(h, device=out.device) + 0.5) / self.factor
        xx = (torch.arange(w, device=out.device) + 0.5) / self.factor
        bumps = []
        for r, c in (pos.float() + 0.5).tolist():
            d2 = (yy[:, None] - r) ** 2 + (xx[None, :] - c) ** 2
            bumps.append(self.amount * LEVEL * torch.exp(-d2 / (2 * self.sigma ** 2)))
        return torch.stack(bumps)[:, None].expand_as(out).to(out.dtype)

    def _live(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = strongest_positions(z)
        idx = torch.arange(z.shape[0], device=z.device)
        return pos, z[idx, :, pos[:, 0], pos[:, 1]].float().norm(dim=1) > self.spot_norm / 2

    def planted_change(self, z: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]``: the planted effect that removing the live cell of ``z`` takes away (0 where none)."""
        pos, live = self._live(z)
        zz = torch.where(live[:, None, None, None], inpaint(z, pos), z)
        out = self.base.decode(zz).sample
        return self._effect(out, pos) * live[:, None, None, None].to(out.dtype)

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        from diffusers.models.autoencoders.vae import DecoderOutput

        pos, live = self._live(z)
        zz = torch.where(live[:, None, None, None], inpaint(z, pos), z)
        out = self.base.decode(zz).sample
        out = out + self._effect(out, pos) * live[:, None, None, None].to(out.dtype)
        return DecoderOutput(sample=out) if return_dict else (out,)


class Reparametrised(nn.Module):
    """The same model in other latent coordinates: ``z' = a z + b`` per channel, the decoder compensating.

    ``encode`` returns ``a z + b`` (the log-variance moves by ``2 log |a|``), ``decode(z')`` decodes
    ``(z' - b) / a``. Every measurement that does not depend on the latent's coordinates gives the same on both.

    Parameters
    ----------
    base : torch.nn.Module
        A model with the diffusers interface.
    scale, shift : sequence of float
        ``a`` (no zero) and ``b``, one per latent channel.

    Examples
    --------
    >>> from vaeprobe.models.taesd import TAESD
    >>> base = TAESD(2).eval()
    >>> m = Reparametrised(base, [2.0, -0.5], [3.0, 1.0])
    >>> x = torch.rand(1, 3, 16, 16) * 2 - 1
    >>> bool(torch.allclose(m.decode(m.encode(x).latents).sample, base.decode(base.encode(x).latents).sample, atol=1e-5))
    True
    """

    def __init__(self, base, scale, shift):
        super().__init__()
        self.base = base
        self.register_buffer("a", torch.as_tensor(scale, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("b", torch.as_tensor(shift, dtype=torch.float32).view(1, -1, 1, 1))
        if bool((self.a == 0).any()):
            raise ValueError("a reparametrisation needs a non-zero scale on every channel")
        self.config = dict(getattr(base, "config", {}))
        self.ground_truth = getattr(base, "ground_truth", None)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        mean, raw = _base_encode(self.base, x)
        a, b = self.a.to(mean), self.b.to(mean)
        if raw is None:
            from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTinyOutput

            return AutoencoderTinyOutput(latents=a * mean + b)
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        dist = DiagonalGaussianDistribution(torch.cat([a * mean + b, raw + 2 * a.abs().log()], dim=1))
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        return self.base.decode((z - self.b.to(z)) / self.a.to(z))
