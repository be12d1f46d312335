"""Mechanism: which cross-position pathway of a decoder carries a perturbation's far-field effect.

In a KL-f8 decoder only two kinds of operation move information between distant positions: GroupNorm (its mean
and variance pool over all positions) and self-attention. Convolutions reach only as far as their receptive
field. :func:`attribute_pathways` decodes a perturbed latent four times,

========================= ==================================================================================
``live``                  the ordinary decode
``groupnorm_frozen``      every GroupNorm normalises with the mean and variance it had in the clean decode
``attention_frozen``      every attention layer sees the clean decode's context (see ``attention=`` below)
``both_frozen``           both at once: the decoder is then position-wise apart from its convolutions
========================= ==================================================================================

and splits the far-field energy of the live effect between the pathways with the Shapley values of the
two-pathway game ``v(open pathways) = far-field energy``: ``share_groupnorm + share_attention + share_residual
= 1``, where ``share_residual = E_both / E_live`` is what survives with both frozen (the receptive field's
spill beyond the far-field radius, or any other explicit route such as a decoder that reads one cell on purpose)
and ``interaction = E_live - E_gn - E_att + E_both`` says how much the two pathways need (> 0) or duplicate
(< 0) each other. The clean latent decoded with frozen pathways reproduces the clean image (the frozen values
*are* its own), so the same reference serves all four.

Attention freezing, ``attention=``:

- ``"context"`` (default): keys and values of every position come from the clean decode, queries stay live.
  Each output position then depends only on its own input, so no information crosses positions through
  attention: the honest "pathway closed".
- ``"probs"``: queries and keys from the clean decode, so the attention probabilities are the clean ones,
  values live. This freezes only the routing: a perturbed value still travels to every query that attended to
  it (an attention sink keeps carrying its content), so it under-counts attention. Offered for comparison.

Both are done with forward hooks on the attention's ``to_q``/``to_k``/``to_v`` projections, so they work with
whichever diffusers attention processor is active (SDPA, classic, xformers) without touching diffusers; every
hook is removed when the call returns or raises.

Diagnostics from one clean pass: :func:`attention_mass` (the attention each key position receives, averaged over
queries and heads, and a sink score) and :func:`groupnorm_droplets` (per GroupNorm layer and group, the share of
the group's variance that its single strongest position contributes: the StyleGAN2 "droplet" signature).

Parameters named alike mean the same in every function here: ``vae`` is the model, a
:class:`~vaeprobe.models.adapter.VAE` (the hooks go on its ``model``), and ``z`` a latent ``[B, C, h, w]``.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from vaeprobe.errors import VaeprobeError
from vaeprobe.probes.engine import DECODE_BATCH, Engine
from vaeprobe.probes.perturb import Operator, Site, parse_operator
from vaeprobe.probes.response import DEFAULT_RADIUS, measure

PATHWAYS = ("groupnorm", "attention", "residual")
ATTENTION_MODES = ("context", "probs")
VARIANTS = ("live", "groupnorm_frozen", "attention_frozen", "both_frozen")
MASS_FLOOR = 1e-9  # attention masses below this count as zero in sink scores
NO_EFFECT = 1e-12  # a live far-field energy at or below this (mean squared change) counts as no effect


class MechanismError(VaeprobeError, ValueError):
    """A model or request that the mechanism probes cannot handle (the message says what to do)."""


# -- the pathway layers ------------------------------------------------------------------------------------------

def _module(vae) -> nn.Module:
    return vae.model if hasattr(vae, "model") and isinstance(vae.model, nn.Module) else vae


def _is_attention(m: nn.Module) -> bool:
    return all(isinstance(getattr(m, a, None), nn.Linear) for a in ("to_q", "to_k", "to_v"))


def pathway_layers(vae) -> dict[str, list[str]]:
    """Names of the modules the probes hook: every ``nn.GroupNorm`` and every attention layer.

    An attention layer is a module with ``to_q``, ``to_k`` and ``to_v`` linear projections, as diffusers'
    ``Attention``.

    Parameters
    ----------
    vae : vaeprobe.models.adapter.VAE or torch.nn.Module
        The model (an adapter's ``model`` is searched).

    Returns
    -------
    dict
        ``{"groupnorm": [...], "attention": [...]}``: the module names, in ``named_modules`` order.

    Raises
    ------
    MechanismError
        When an attention layer uses fused QKV projections, which the hooks cannot freeze.

    Examples
    --------
    >>> from vaeprobe.models.loading import load_vae
    >>> layers = pathway_layers(load_vae("builtin:tiny-random"))
    >>> layers["attention"]
    ['encoder.mid_block.attentions.0', 'decoder.mid_block.attentions.0']
    """
    model = _module(vae)
    gn, att = [], []
    for name, m in model.named_modules():
        if isinstance(m, nn.GroupNorm):
            gn.append(name)
        elif _is_attention(m):
            if getattr(m, "fused_projections", False):
                raise MechanismError(f"attention {name} uses fused QKV projections, which vaeprobe cannot freeze; "
                                     f"call unfuse_qkv_projections() on the model first")
            att.append(name)
    return {"groupnorm": gn, "attention": att}


# -- recording and freezing --------------------------------------------------------------------------------------

@dataclass
class PathwayRecord:
    """What one pass left behind, keyed by ``(module name, call index)``.

    Attributes
    ----------
    groupnorm : dict
        ``(mean, var)`` per GroupNorm call, each ``[B, G]`` float32.
    qkv : dict
        ``{"q", "k", "v"}`` projections per attention call, ``[B, N, C]``.
    attention_shape : dict
        The ``(H, W)`` of each attention call's input.
    droplets : dict
        Per GroupNorm call ``(share [B, G], position [B, G], (H, W))``, when asked for
        (``record_pathways(..., droplets=True)``).

    Examples
    --------
    >>> rec = PathwayRecord()
    >>> rec.groupnorm, rec.qkv
    ({}, {})
    """

    groupnorm: dict = field(default_factory=dict)
    qkv: dict = field(default_factory=dict)
    attention_shape: dict = field(default_factory=dict)
    droplets: dict = field(default_factory=dict)


def _expand(t: torch.Tensor, batch: int, where: str) -> torch.Tensor:
    if t.shape[0] == batch:
        return t
    if t.shape[0] == 1:
        return t.expand(batch, *t.shape[1:])
    raise MechanismError(f"{where}: the clean record has batch {t.shape[0]}, the decode {batch}; record one clean "
                         f"image at a time")


def _group_stats(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    var, mean = torch.var_mean(x.float().reshape(x.shape[0], groups, -1), dim=-1, unbiased=False)
    return mean, var


def _frozen_groupnorm(mod: nn.GroupNorm, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``mod(x)`` with the given per-group statistics, as one fused multiply-add per element:
    ``y = x * a + b`` with ``a = weight / sqrt(var + eps)`` and ``b = bias - mean * a`` per channel."""
    b, c = x.shape[:2]
    per = c // mod.num_groups
    inv = torch.rsqrt(var + mod.eps).repeat_interleave(per, dim=1)          # [B, C]
    a = inv * mod.weight.float()[None] if mod.affine else inv
    shift = -mean.repeat_interleave(per, dim=1) * a
    if mod.affine:
        shift = shift + mod.bias.float()[None]
    shape = (b, c) + (1,) * (x.dim() - 2)
    return torch.addcmul(shift.view(shape).to(x.dtype), x, a.view(shape).to(x.dtype))


def _frozen_projection(out: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """What a frozen ``to_q``/``to_k``/``to_v`` returns: the clean decode's projection, in ``out``'s dtype (a
    function of its own so the tests can replace it by a no-op and see the mechanism checks fail)."""
    return clean.to(out.dtype)


def _droplet(x: torch.Tensor, groups: int, mean: torch.Tensor):
    b, c = x.shape[:2]
    xg = x.float().reshape(b, groups, c // groups, -1)
    contrib = (xg - mean[:, :, None, None]).pow(2).sum(2)           # [B, G, S]
    total = contrib.sum(-1).clamp_min(1e-30)
    share, pos = contrib.max(-1)
    spatial = tuple(x.shape[2:]) if x.dim() == 4 else (contrib.shape[-1],)  # e.g. attention's GroupNorm, [B, C, N]
    return share / total, pos, spatial


@contextlib.contextmanager
def _hooks(vae, record: PathwayRecord | None = None, frozen: PathwayRecord | None = None,
           groupnorm: bool = False, attention: str | None = None, droplets: bool = False) -> Iterator[dict]:
    """Install the recording/freezing hooks for the duration of the block; always removed afterwards.

    Yields a dict counting, per kind, how many calls were frozen (to check that the hooks actually fired)."""
    if attention is not None and attention not in ATTENTION_MODES:
        raise MechanismError(f"unknown attention freezing {attention!r}; use one of {', '.join(ATTENTION_MODES)}")
    model = _module(vae)
    layers = pathway_layers(vae)
    modules = dict(model.named_modules())
    counts = {"groupnorm": 0, "attention": 0}
    calls: dict[str, int] = {}
    handles = []

    def next_call(key: str) -> int:
        calls[key] = calls.get(key, -1) + 1
        return calls[key]

    def gn_hook(name: str):
        def hook(mod: nn.GroupNorm, args, out):
            x = args[0]
            idx = next_call(name)
            key = (name, idx)
            if record is not None:
                mean, var = _group_stats(x, mod.num_groups)
                record.groupnorm[key] = (mean.detach(), var.detach())
                if droplets:
                    s, p, spatial = _droplet(x.detach(), mod.num_groups, mean.detach())
                    record.droplets[key] = (s, p, spatial)
            if groupnorm and frozen is not None:
                if key not in frozen.groupnorm:
                    raise MechanismError(f"GroupNorm {name} ran a call the clean decode did not make; the model's "
                                         f"control flow depends on the input, so its statistics cannot be frozen")
                mean, var = (_expand(t, x.shape[0], name) for t in frozen.groupnorm[key])
                counts["groupnorm"] += 1
                return _frozen_groupnorm(mod, x, mean, var).to(out.dtype)
            return None
        return hook

    def shape_hook(name: str):
        def hook(mod, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states")
            idx = next_call(name + ":shape")
            if record is not None and x is not None:
                record.attention_shape[(name, idx)] = tuple(x.shape[2:]) if x.dim() == 4 else (x.shape[1], 1)
            return None
        return hook

    frozen_parts = {"context": ("k", "v"), "probs": ("q", "k")}.get(attention, ())

    def proj_hook(name: str, part: str):
        def hook(mod, args, out):
            idx = next_call(f"{name}:{part}")
            key = (name, idx)
            if record is not None:
                record.qkv.setdefault(key, {})[part] = out.detach()
            if part in frozen_parts and frozen is not None:
                if key not in frozen.qkv or part not in frozen.qkv[key]:
                    raise MechanismError(f"attention {name} ran a call the clean decode did not make; cannot freeze it")
                counts["attention"] += 1
                return _frozen_projection(out, _expand(frozen.qkv[key][part], out.shape[0], name))
            return None
        return hook

    try:
        for name in layers["groupnorm"]:
            handles.append(modules[name].register_forward_hook(gn_hook(name)))
        for name in layers["attention"]:
            m = modules[name]
            handles.append(m.register_forward_pre_hook(shape_hook(name), with_kwargs=True))
            for part in ("q", "k", "v"):
                handles.append(getattr(m, f"to_{part}").register_forward_hook(proj_hook(name, part)))
        yield counts
    finally:
        for h in handles:
            h.remove()


def record_pathways(vae, z: torch.Tensor, *, droplets: bool = False) -> tuple[torch.Tensor, PathwayRecord]:
    """Decode ``z`` once, recording every GroupNorm's statistics and every attention's q/k/v.

    Parameters
    ----------
    vae, z
        As in the module docstring.
    droplets : bool, keyword-only
        Also record each GroupNorm group's strongest position (:attr:`PathwayRecord.droplets`).

    Returns
    -------
    image : torch.Tensor
        Equal to ``vae.decode(z)`` (recording changes nothing).
    record : PathwayRecord
        The statistics and projections, for :func:`decode_frozen`.

    Examples
    --------
    >>> from vaeprobe.models.loading import load_vae
    >>> vae = load_vae("builtin:tiny-random")
    >>> z = torch.randn(1, 4, 4, 4)
    >>> img, rec = record_pathways(vae, z)
    >>> bool(torch.equal(img, vae.decode(z))), len(rec.qkv)
    (True, 1)
    """
    rec = PathwayRecord()
    with _hooks(vae, record=rec, droplets=droplets):
        img = vae.decode(z)
    return img, rec


def decode_frozen(vae, z: torch.Tensor, record: PathwayRecord, *, groupnorm: bool = True,
                  attention: str | None = "context") -> torch.Tensor:
    """Decode ``z`` with the GroupNorm statistics and/or the attention context taken from ``record``.

    Parameters
    ----------
    vae, z
        As in the module docstring; a record of batch 1 serves any ``B``.
    record : PathwayRecord
        What :func:`record_pathways` recorded on the clean latent.
    groupnorm : bool, keyword-only
        Freeze every GroupNorm's mean and variance.
    attention : {"context", "probs"} or None, keyword-only
        How to freeze attention (see the module docstring); ``None`` leaves attention live.

    Returns
    -------
    torch.Tensor
        The decoded image(s).

    Raises
    ------
    MechanismError
        When the decode makes a call the clean one did not, or the hooks froze nothing although the record
        holds statistics (an attention processor that does not call ``to_q``/``to_k``/``to_v``).

    Examples
    --------
    >>> from vaeprobe.models.loading import load_vae
    >>> vae = load_vae("builtin:tiny-random")
    >>> z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    >>> ref, rec = record_pathways(vae, z)
    >>> bool((decode_frozen(vae, z, rec) - ref).abs().max() < 1e-4)   # the clean latent gives the clean image
    True
    """
    with _hooks(vae, frozen=record, groupnorm=groupnorm, attention=attention) as counts:
        img = vae.decode(z)
    if groupnorm and record.groupnorm and counts["groupnorm"] == 0:
        raise MechanismError("no GroupNorm call was frozen although the clean decode made some")
    if attention and record.qkv and counts["attention"] == 0:
        raise MechanismError("no attention projection was frozen: the active attention processor does not call "
                             "to_q/to_k/to_v; set the classic processor (vae.model.set_attn_processor(AttnProcessor()))")
    return img


# -- attribution -------------------------------------------------------------------------------------------------

def shapley_shares(e_live, e_gn, e_att, e_both) -> dict[str, np.ndarray]:
    """Shapley split of the live far-field energy between GroupNorm, attention and the residual.

    With ``v(S)`` the energy when only the pathways in ``S`` are open: ``v({}) = e_both``, ``v({gn}) = e_att``
    (attention frozen), ``v({att}) = e_gn``, ``v({gn, att}) = e_live``.

    Parameters
    ----------
    e_live, e_gn, e_att, e_both : float or array_like
        Far-field energies of the live, GroupNorm-frozen, attention-frozen and both-frozen decodes (one value
        per site, broadcast together).

    Returns
    -------
    dict of numpy.ndarray
        ``share_groupnorm``, ``share_attention``, ``share_residual`` (summing to 1), ``interaction`` and
        ``dominant`` (the pathway with the largest share); nan shares and ``"none"`` where ``e_live`` is at or
        below ``NO_EFFECT``.

    Examples
    --------
    >>> s = shapley_shares(10.0, 2.0, 10.0, 2.0)   # freezing GroupNorm removes 8 of 10, attention nothing
    >>> float(s["share_groupnorm"]), float(s["share_attention"]), float(s["share_residual"])
    (0.8, 0.0, 0.2)
    """
    e_live, e_gn, e_att, e_both = (np.asarray(v, dtype=np.float64) for v in (e_live, e_gn, e_att, e_both))
    phi_gn = 0.5 * ((e_att - e_both) + (e_live - e_gn))
    phi_att = 0.5 * ((e_gn - e_both) + (e_live - e_att))
    with np.errstate(divide="ignore", invalid="ignore"):
        ok = e_live > NO_EFFECT
        out = {"share_groupnorm": np.where(ok, phi_gn / e_live, np.nan),
               "share_attention": np.where(ok, phi_att / e_live, np.nan),
               "share_residual": np.where(ok, e_both / e_live, np.nan),
               "interaction": np.where(ok, (e_live - e_gn - e_att + e_both) / e_live, np.nan)}
    shares = np.stack([out[f"share_{p}"] for p in PATHWAYS], -1)
    dominant = np.array(PATHWAYS, dtype=object)[np.nanargmax(np.where(np.isnan(shares), -np.inf, shares), -1)]
    out["dominant"] = np.where(ok, dominant, "none")
    return out


@dataclass
class Attribution:
    """What :func:`attribute_pathways` returns.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per site (columns in :func:`attribute_pathways`); ``attrs`` holds the settings.
    decodes : int
        Images decoded, the clean one included.
    seconds : float
        Wall time.
    """

    table: pd.DataFrame
    decodes: int = 0
    seconds: float = 0.0


def _frozen_variants(vae, rec, ref, b, *, attention: str, radius: int, has_gn: bool, has_att: bool) -> list[dict]:
    """Each site of an engine batch ``b`` decoded live (``b.decodes``) and with GroupNorm, attention and both frozen
    to the clean decode's record ``rec``; the far-field measures of each variant, one dict per site."""
    zz, live = b.latents, b.decodes
    gn = decode_frozen(vae, zz, rec, groupnorm=True, attention=None) if has_gn else live
    att = decode_frozen(vae, zz, rec, groupnorm=False, attention=attention) if has_att else live
    both = (decode_frozen(vae, zz, rec, groupnorm=True, attention=attention) if has_gn and has_att
            else (gn if has_gn else att))
    per = {name: measure(ref, img, b.sites, vae.factor, radius=radius, measures=("l2", "far_l2", "far_fraction"))
           for name, img in zip(VARIANTS, (live, gn, att, both))}
    out = []
    for i in range(len(b.sites)):
        row = {}
        for name in VARIANTS:
            row[f"far_l2_{name}"] = per[name][i]["far_l2"]
            row[f"far_fraction_{name}"] = per[name][i]["far_fraction"]
        row["l2_live"] = per["live"][i]["l2"]
        row["l2_both_frozen"] = per["both_frozen"][i]["l2"]
        out.append(row)
    return out


def attribute_pathways(vae, z: torch.Tensor, sites: Sequence[Site], op: Operator | str = "zero", *,
                       radius: int = DEFAULT_RADIUS, attention: str = "context", batch: int = DECODE_BATCH,
                       recorded: tuple[torch.Tensor, PathwayRecord] | None = None) -> Attribution:
    """Attribute the far-field effect of perturbing each site of ``z`` ``[1, C, h, w]`` to the decoder's pathways.

    One clean decode (recorded) plus, per batch of sites, the four variants (a model without attention or
    without GroupNorm skips the variant that would equal another).

    Parameters
    ----------
    vae, z
        As in the module docstring, with ``B = 1``.
    sites : sequence of Site
        The sites to perturb, one at a time.
    op : Operator or str, optional
        The perturbation, or its spec for :func:`~vaeprobe.probes.perturb.parse_operator` (default: zero).
    radius : int, keyword-only
        The far field starts more than ``radius`` latent cells from the site (Chebyshev).
    attention : {"context", "probs"}, keyword-only
        How attention is frozen (see the module docstring).
    batch : int, keyword-only
        Sites decoded at once.
    recorded : (torch.Tensor, PathwayRecord), keyword-only
        What :func:`record_pathways` returned for ``z``, if already made (the clean decode is then not made
        again, and ``decodes`` does not count it).

    Returns
    -------
    Attribution
        Its table has one row per site: ``row, col, op``, per variant ``far_l2_<variant>`` and
        ``far_fraction_<variant>``, the shares of :func:`shapley_shares`, ``interaction`` and ``dominant``
        (``groupnorm``, ``attention``, ``residual`` or ``none``).

    Raises
    ------
    MechanismError
        For an unknown ``attention``, a latent batch other than 1 or a model the hooks cannot freeze.

    Examples
    --------
    >>> from vaeprobe.models.loading import load_vae
    >>> vae = load_vae("builtin:planted-groupnorm")
    >>> from vaeprobe.data.images import load_images
    >>> x = load_images("builtin:photos-heldout", size=64)[0].tensor()
    >>> z = vae.encode(x).mean
    >>> spot = vae.ground_truth(x)[0]
    >>> res = attribute_pathways(vae, z, [Site(spot["row"], spot["col"])])
    >>> res.table.dominant[0], res.decodes   # the clean decode + live, GroupNorm-, attention- and both-frozen
    ('groupnorm', 5)
    """
    if attention not in ATTENTION_MODES:
        raise MechanismError(f"unknown attention freezing {attention!r}; use one of {', '.join(ATTENTION_MODES)}")
    if isinstance(op, str):
        op = parse_operator(op)
    if z.dim() != 4 or z.shape[0] != 1:
        raise MechanismError(f"attribute one latent [1, C, h, w] at a time; got shape {tuple(z.shape)}")
    t0 = time.perf_counter()
    ref, rec = record_pathways(vae, z) if recorded is None else recorded
    has_gn, has_att = bool(rec.groupnorm), bool(rec.qkv)
    engine = Engine(vae, batch=batch)

    df = engine.table(z, sites, op, lambda b: _frozen_variants(vae, rec, ref, b, attention=attention,
                                                               radius=radius, has_gn=has_gn, has_att=has_att))
    n_dec = (recorded is None) + len(df) * (1 + has_gn + has_att + (has_gn and has_att))
    if len(df):
        shares = shapley_shares(df.far_l2_live, df.far_l2_groupnorm_frozen, df.far_l2_attention_frozen,
                                df.far_l2_both_frozen)
        for k, v in shares.items():
            df[k] = v
    df.attrs.update({"attention": attention, "radius": radius, "has_groupnorm": has_gn, "has_attention": has_att})
    return Attribution(table=df, decodes=n_dec, seconds=time.perf_counter() - t0)


# -- diagnostics -------------------------------------------------------------------------------------------------

@dataclass
class AttentionMass:
    """Attention received by each key position of one attention call, averaged over queries and heads.

    ``sink_score(cell)`` is the mass at ``cell`` over the median mass.

    Attributes
    ----------
    layer : str
        The attention module's name.
    call : int
        Which call of that module (0 for the first).
    mass : torch.Tensor
        ``[H, W]``, summing to 1.

    Examples
    --------
    >>> m = AttentionMass("mid", 0, torch.tensor([[0.1, 0.1], [0.1, 0.7]]))
    >>> m.argmax(), round(m.sink_score((1, 1)), 3)
    ((1, 1), 7.0)
    """

    layer: str
    call: int
    mass: torch.Tensor

    def sink_score(self, cell: tuple[int, int]) -> float:
        """Mass at ``cell`` over the median mass.

        The median is floored at ``MASS_FLOOR``, so a layer that puts all its attention on one position scores
        ``1 / MASS_FLOOR`` rather than infinity.

        Parameters
        ----------
        cell : (int, int)
            ``(row, col)`` in the layer's ``[H, W]`` grid.

        Returns
        -------
        float
        """
        return float(self.mass[cell]) / max(float(self.mass.median()), MASS_FLOOR)

    def argmax(self) -> tuple[int, int]:
        """The ``(row, col)`` that receives the most attention."""
        i = int(self.mass.argmax())
        return i // self.mass.shape[1], i % self.mass.shape[1]


def _attention_probs_mass(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """``[B, N]`` mean over queries and heads of softmax(q k^T * scale), computed a block of queries at a time."""
    heads = int(getattr(attn, "heads", 1))
    scale = float(getattr(attn, "scale", (q.shape[-1] // heads) ** -0.5))
    b, n, c = q.shape
    qh = q.float().reshape(b, n, heads, c // heads).transpose(1, 2)
    kh = k.float().reshape(b, k.shape[1], heads, c // heads).transpose(1, 2)
    for norm, which in ((getattr(attn, "norm_q", None), "q"), (getattr(attn, "norm_k", None), "k")):
        if norm is not None:
            if which == "q":
                qh = norm(qh)
            else:
                kh = norm(kh)
    total = torch.zeros(b, kh.shape[2])
    for s in range(0, n, chunk):
        p = torch.softmax(qh[:, :, s:s + chunk] @ kh.transpose(-1, -2) * scale, dim=-1)
        total += p.sum(dim=(1, 2)).cpu()
    return total / (n * heads)


def attention_mass(vae, latent_or_image: torch.Tensor, *, part: str = "decoder",
                   record: PathwayRecord | None = None) -> list[AttentionMass]:
    """Attention mass maps of every attention layer that runs in one decode or encode.

    Parameters
    ----------
    vae
        As in the module docstring.
    latent_or_image : torch.Tensor
        A latent ``[1, C, h, w]`` (``part="decoder"``) or an image ``[1, 3, H, W]`` in [-1, 1]
        (``part="encoder"``).
    part : {"decoder", "encoder"}, keyword-only
        Which half of the model runs.
    record : PathwayRecord, keyword-only
        A record of this latent's decode (:func:`record_pathways`), used instead of decoding again (decoder only).

    Returns
    -------
    list of AttentionMass
        One per attention call, in the order they ran.

    Examples
    --------
    >>> from vaeprobe.models.loading import load_vae
    >>> vae = load_vae("builtin:tiny-random")
    >>> maps = attention_mass(vae, torch.randn(1, 4, 4, 4))
    >>> maps[0].layer, tuple(maps[0].mass.shape), round(float(maps[0].mass.sum()), 4)
    ('decoder.mid_block.attentions.0', (4, 4), 1.0)
    """
    if part not in ("decoder", "encoder"):
        raise MechanismError(f"part must be 'decoder' or 'encoder', got {part!r}")
    rec = record if record is not None and part == "decoder" else PathwayRecord()
    if rec is not record:
        with _hooks(vae, record=rec):
            if part == "decoder":
                vae.decode(latent_or_image)
            else:
                vae.encode(latent_or_image)
    modules = dict(_module(vae).named_modules())
    out = []
    for (name, idx), parts in rec.qkv.items():
        mass = _attention_probs_mass(modules[name], parts["q"][:1], parts["k"][:1])[0]
        hw = rec.attention_shape.get((name, idx), (mass.shape[0], 1))
        out.append(AttentionMass(name, idx, mass.reshape(hw)))
    return out


def groupnorm_droplets(vae, z: torch.Tensor, *, record: PathwayRecord | None = None) -> pd.DataFrame:
    """The StyleGAN2 "droplet" signature of every GroupNorm group in the decode of ``z``.

    Per GroupNorm call and per group: ``share``, the fraction of the group's variance (sum of squared deviations
    from the group mean) contributed by its single strongest spatial position, and where that position is
    (``row, col`` at the layer's resolution, ``lat_row, lat_col`` the latent cell). A uniform group gives
    ``1 / (H W)``; a droplet gives nearly 1.

    Parameters
    ----------
    vae, z
        As in the module docstring, with ``B = 1``.
    record : PathwayRecord, keyword-only
        A record of this latent's decode made with ``droplets=True`` (:func:`record_pathways`), used instead of
        decoding again.

    Returns
    -------
    pandas.DataFrame
        One row per call and group: ``order`` (the call's place in the decode), ``layer``, ``call``, ``group``,
        ``share``, ``row``, ``col``, ``height``, ``width``, ``lat_row``, ``lat_col``.

    Examples
    --------
    >>> from vaeprobe.models.loading import load_vae
    >>> df = groupnorm_droplets(load_vae("builtin:tiny-random"), torch.randn(1, 4, 4, 4))
    >>> sorted(df.columns)[:4], bool(((df.share > 0) & (df.share <= 1)).all())
    (['call', 'col', 'group', 'height'], True)
    """
    rec = record if record is not None and record.droplets else PathwayRecord()
    if rec is not record:
        with _hooks(vae, record=rec, droplets=True):
            vae.decode(z)
    h, w = z.shape[-2:]
    rows = []
    for order, ((name, idx), (share, pos, spatial)) in enumerate(rec.droplets.items()):
        hh, ww = spatial if len(spatial) == 2 else _grid(spatial[0], h, w)
        for g in range(share.shape[1]):
            p = int(pos[0, g])
            r, c = p // ww, p % ww
            rows.append({"order": order, "layer": name, "call": idx, "group": g, "share": float(share[0, g]),
                         "row": r, "col": c, "height": hh, "width": ww,
                         "lat_row": min(h - 1, r * h // hh), "lat_col": min(w - 1, c * w // ww)})
    return pd.DataFrame(rows)


def _grid(n: int, h: int, w: int) -> tuple[int, int]:
    """The ``(H, W)`` of ``n`` flattened positions at an integer multiple of the latent's ``h x w`` grid."""
    s = round(math.sqrt(n / (h * w)))
    return (h * s, w * s) if s >= 1 and h * s * w * s == n else (n, 1)


def droplet_layers(droplets: pd.DataFrame) -> pd.DataFrame:
    """One row per GroupNorm call: the strongest group's share, its latent cell, and the median share.

    Parameters
    ----------
    droplets : pandas.DataFrame
        A table of :func:`groupnorm_droplets`.

    Returns
    -------
    pandas.DataFrame
        ``order, layer, call, max_share, lat_row, lat_col, height, width, median_share``, one row per call (no
        rows, but the columns, for an empty table).

    Examples
    --------
    >>> from vaeprobe.models.loading import load_vae
    >>> top = droplet_layers(groupnorm_droplets(load_vae("builtin:tiny-random"), torch.randn(1, 4, 4, 4)))
    >>> bool((top.max_share >= top.median_share).all()), len(droplet_layers(pd.DataFrame()))
    (True, 0)
    """
    if droplets.empty:
        return pd.DataFrame(columns=["order", "layer", "call", "max_share", "median_share", "lat_row", "lat_col"])
    idx = droplets.groupby("order").share.idxmax()
    top = droplets.loc[idx, ["order", "layer", "call", "share", "lat_row", "lat_col", "height", "width"]]
    top = top.rename(columns={"share": "max_share"}).reset_index(drop=True)
    top["median_share"] = droplets.groupby("order").share.median().to_numpy()
    return top
