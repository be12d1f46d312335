"""Perturbation operators: change a latent at one site and nowhere else.

A :class:`Site` names a square patch of latent cells (optionally a single channel). An operator is a small
frozen dataclass with one verb, ``apply(z, site, *, index=0)``, that returns a new latent ``[1, C, h, w]`` equal
to ``z`` everywhere except at the site's cells (and channel). The input is never modified.

Operators: :class:`Zero`, :class:`Mean` (the latent's own robust per-channel centre), :class:`Fill` (a given
value), :class:`Noise`, :class:`Scale`, :class:`Swap` (values from another image's latent), :class:`Smudge` (mean
of the surrounding ring of cells) and :class:`Compose` (several in order; also written ``a + b``).
:func:`apply_batch` makes one perturbed copy per site in a single tensor, ready to decode; :func:`parse_operator`
reads the command-line form, which is also each operator's :attr:`~Operator.name`::

    zero | mean | fill:V | noise:SIGMA | scale:F | swap | smudge     joined by "+", e.g. "scale:0.5+noise:0.1"

Every operator with a text form is one class that registers itself (:data:`REGISTRY`, through its ``word``);
:func:`parse_operator` and :func:`check_operator` read the registry, so a new operator is one class. The text
form means the same in every command: ``mean`` is the perturbed latent's own robust per-channel centre and
``noise:SIGMA`` is in units of that latent's robust per-channel std (:func:`~vaeprobe.probes.stats.robust_channel_stats`),
unless statistics are passed explicitly.

Noise is seeded from the site itself (seed, row, col, size, channel, index) through a stable hash, so a site
gets the same noise whatever else is in its batch or scan, and a resumed scan equals an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import math
import operator
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, ClassVar, Sequence

import torch

from vaeprobe.errors import VaeprobeError


class PerturbError(VaeprobeError, ValueError):
    """A site, operator or operator spec that cannot be used (the message says what to change).

    Examples
    --------
    >>> try:
    ...     Site(0, 0, size=0)
    ... except PerturbError as exc:
    ...     print(exc)
    Site size must be at least 1, got 0
    """


# -- sites ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Site:
    """A ``size`` x ``size`` patch of latent cells around ``(row, col)``, in one channel or all (``None``).

    The patch covers rows ``row - (size - 1) // 2 .. row + size // 2`` (and the same for columns), clipped to
    the latent, so an even size extends one cell further down and to the right. Sites are frozen and hashable.

    Parameters
    ----------
    row, col : int
        The centre cell, from 0.
    size : int, optional
        Side of the patch in cells (at least 1).
    channel : int or None, optional
        The one channel to change, or ``None`` for all channels.

    Raises
    ------
    PerturbError
        When a field is not an int, a coordinate is negative or the size is below 1.

    Examples
    --------
    >>> Site(0, 0, size=3).cells(4, 4)
    [(0, 0), (0, 1), (1, 0), (1, 1)]
    >>> Site(2, 1, size=2, channel=3).slices(8, 8)
    (slice(3, 4, None), slice(2, 4, None), slice(1, 3, None))
    """

    row: int
    col: int
    _: KW_ONLY
    size: int = 1
    channel: int | None = None

    def __post_init__(self):
        for name in ("row", "col", "size") + (() if self.channel is None else ("channel",)):
            value = getattr(self, name)
            try:
                if isinstance(value, bool):
                    raise TypeError
                object.__setattr__(self, name, operator.index(value))
            except TypeError:
                raise PerturbError(f"Site {name} must be an int, got {value!r}") from None
        if self.row < 0 or self.col < 0:
            raise PerturbError(f"Site ({self.row}, {self.col}) has a negative coordinate; use cells from 0")
        if self.size < 1:
            raise PerturbError(f"Site size must be at least 1, got {self.size}")
        if self.channel is not None and self.channel < 0:
            raise PerturbError(f"Site channel must be None (all channels) or >= 0, got {self.channel}")

    def bounds(self, h: int, w: int) -> tuple[int, int, int, int]:
        """The patch's rows and columns inside an ``h`` x ``w`` latent.

        Parameters
        ----------
        h, w : int
            The latent's height and width in cells.

        Returns
        -------
        tuple of int
            ``(r0, r1, c0, c1)``: rows ``r0 .. r1 - 1`` and columns ``c0 .. c1 - 1``.

        Raises
        ------
        PerturbError
            When the centre lies outside the latent.

        Examples
        --------
        >>> Site(3, 0, size=3).bounds(4, 4)
        (2, 4, 0, 2)
        """
        if self.row >= h or self.col >= w:
            raise PerturbError(f"site ({self.row}, {self.col}) lies outside the {h}x{w} latent; "
                               f"use rows < {h} and columns < {w}")
        lo, hi = (self.size - 1) // 2, self.size // 2
        return (max(self.row - lo, 0), min(self.row + hi + 1, h), max(self.col - lo, 0), min(self.col + hi + 1, w))

    def cells(self, h: int, w: int) -> list[tuple[int, int]]:
        """The cells of the patch inside an ``h`` x ``w`` latent.

        Parameters
        ----------
        h, w : int
            As in :meth:`bounds`.

        Returns
        -------
        list of tuple of int
            The ``(r, c)`` cells, row by row.

        Examples
        --------
        >>> Site(1, 1, size=2).cells(8, 8)
        [(1, 1), (1, 2), (2, 1), (2, 2)]
        """
        r0, r1, c0, c1 = self.bounds(h, w)
        return [(r, c) for r in range(r0, r1) for c in range(c0, c1)]

    def slices(self, h: int, w: int) -> tuple[slice, slice, slice]:
        """Slices that select the site in a ``[C, h, w]`` tensor.

        Parameters
        ----------
        h, w : int
            As in :meth:`bounds`, whose ranges it turns into slices.

        Returns
        -------
        tuple of slice
            ``(channels, rows, cols)``; indexing with them keeps all three dims.

        Examples
        --------
        >>> torch.zeros(4, 8, 8)[Site(0, 0, size=3).slices(8, 8)].shape
        torch.Size([4, 2, 2])
        """
        r0, r1, c0, c1 = self.bounds(h, w)
        ch = slice(None) if self.channel is None else slice(self.channel, self.channel + 1)
        return ch, slice(r0, r1), slice(c0, c1)


# -- helpers --------------------------------------------------------------------------------------------------

def _fmt(x: float) -> str:
    """Shortest text that reads back to the same float (``2.0`` -> ``2``)."""
    text = repr(float(x))
    return text[:-2] if text.endswith(".0") else text


def _finite(value: Any, what: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise PerturbError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise PerturbError(f"{what} must be finite, got {x}")
    return x


def _per_channel(value: Any, what: str) -> float | tuple[float, ...]:
    """A scalar, or a 1-D per-channel vector (tensor, array or sequence) as a tuple of floats."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _finite(value, what)
    t = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
    if t.ndim == 0:
        return _finite(t.item(), what)
    if t.ndim != 1 or t.numel() == 0:
        raise PerturbError(f"{what} must be a scalar or one value per channel (shape [C]), got shape "
                           f"{tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise PerturbError(f"{what} has non-finite entries; fix the statistics it came from")
    return tuple(float(v) for v in t.tolist())


def _channel_values(value: float | tuple[float, ...], z: torch.Tensor, box: tuple[slice, slice, slice],
                    what: str) -> torch.Tensor:
    """``value`` as a ``[c', 1, 1]`` tensor matching the channels that ``box`` selects in ``z``."""
    if isinstance(value, float):
        return torch.tensor(value, dtype=z.dtype, device=z.device).reshape(1, 1, 1)
    channels = z.shape[1]
    if len(value) != channels:
        raise PerturbError(f"{what} has {len(value)} values but the latent has {channels} channels; "
                           f"use statistics of the same VAE")
    return torch.tensor(value, dtype=z.dtype, device=z.device)[box[0]].reshape(-1, 1, 1)


def _check_latent(z: torch.Tensor) -> None:
    if not isinstance(z, torch.Tensor) or z.ndim != 4 or z.shape[0] != 1:
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise PerturbError(f"expected one latent of shape [1, C, h, w], got {shape}; index or unsqueeze it")


def _check_site(z: torch.Tensor, site: Site) -> tuple[slice, slice, slice]:
    if not isinstance(site, Site):
        raise PerturbError(f"expected a Site, got {site!r}; build one with Site(row, col)")
    if site.channel is not None and site.channel >= z.shape[1]:
        raise PerturbError(f"site channel {site.channel} does not exist in a latent with {z.shape[1]} channels")
    return site.slices(z.shape[-2], z.shape[-1])


def _stable_seed(*parts: Any) -> int:
    """A 63-bit seed from ``parts`` that is the same in every process (unlike the salted built-in ``hash``)."""
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


_OWN_STATS: list = []   # [(latent, its version, its statistics)]: the last latent's, held so it is not reused


def _own_stats(z: torch.Tensor) -> dict:
    """The robust per-channel centre and std of latent ``z`` (what ``mean`` and ``noise`` use by default).

    :func:`apply_batch` edits one site after another of the same latent, so the last latent's statistics are
    kept; the cache holds that tensor itself (so its identity cannot pass to another) and its version (so an
    in-place change recomputes them)."""
    from vaeprobe.probes.stats import robust_channel_stats

    if not (_OWN_STATS and _OWN_STATS[0][0] is z and _OWN_STATS[0][1] == z._version):
        _OWN_STATS[:] = [(z, z._version, robust_channel_stats(z))]
    return _OWN_STATS[0][2]


# -- operators ------------------------------------------------------------------------------------------------

REGISTRY: dict[str, type] = {}
"""The operators with a text form, by word, in the order they are defined (filled by :class:`Operator`)."""


class Operator:
    """Base class of the operators: subclasses implement :meth:`_edit` (new values of the site's patch) and
    :attr:`name`.

    Operators compose with ``+`` (a :class:`Compose`); ``str(op)`` is ``op.name``.

    Attributes
    ----------
    name : str
        The operator's command-line form, which :func:`parse_operator` reads back.

    Examples
    --------
    >>> str(Scale(2) + Zero())
    'scale:2+zero'
    """

    word: ClassVar[str | None] = None
    """The operator's word in the text form; a subclass that sets it is registered in :data:`REGISTRY`."""
    argument: ClassVar[str | None] = None
    """The name of its number (``"SIGMA"`` for ``noise:SIGMA``), or ``None`` when it takes none."""
    example: ClassVar[str | None] = None
    """A valid text form, quoted in error messages (default: ``word``, or ``word:1``)."""
    needs: ClassVar[tuple[str, ...]] = ()
    """What it needs beyond the latent: ``"other"`` (a second image's latent). A command that cannot provide it
    refuses the operator in :func:`check_operator`."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "word" in cls.__dict__ and cls.word:
            REGISTRY[cls.word] = cls

    @classmethod
    def from_text(cls, number: float | None, *, stats: Any = None, other: torch.Tensor | None = None,
                  seed: int = 0) -> "Operator":
        """Build the operator from its parsed text form (:func:`parse_operator` calls it).

        Parameters
        ----------
        number : float or None
            The number after ``:`` (``None`` for an operator without :attr:`argument`).
        stats, other, seed : keyword-only
            As for :func:`parse_operator`.

        Returns
        -------
        Operator
        """
        return cls() if cls.argument is None else cls(number)

    @property
    def name(self) -> str:  # pragma: no cover - every operator overrides it
        """The operator's command-line form (see :data:`OPERATORS`)."""
        raise NotImplementedError

    def apply(self, z: torch.Tensor, site: Site, *, index: int = 0) -> torch.Tensor:
        """Change a latent at one site and nowhere else.

        Parameters
        ----------
        z : torch.Tensor
            One latent ``[1, C, h, w]``; it is not modified.
        site : Site
            Where to change it.
        index : int, optional
            Numbers repeated draws of the same site (only :class:`Noise` uses it).

        Returns
        -------
        torch.Tensor
            A new latent ``[1, C, h, w]``: ``z`` changed at ``site`` only.

        Raises
        ------
        PerturbError
            When ``z`` is not one latent ``[1, C, h, w]`` or ``site`` does not fit it.

        Examples
        --------
        >>> Scale(3).apply(torch.ones(1, 1, 1, 3), Site(0, 2)).tolist()
        [[[[1.0, 1.0, 3.0]]]]
        """
        _check_latent(z)
        box = _check_site(z, site)
        out = z.clone()
        out[0][box] = self._edit(z[0][box], z, site, box, index, 0)
        return out

    def _edit(self, patch: torch.Tensor, z: torch.Tensor, site: Site, box: tuple[slice, slice, slice],
              index: int, stream: int) -> torch.Tensor:
        """New values for ``patch`` (the site's current values ``[c', hp, wp]``); ``z`` is the untouched latent
        (for reads outside the patch); ``stream`` is the position inside a :class:`Compose`."""
        raise NotImplementedError  # pragma: no cover

    def __add__(self, other: "Operator") -> "Compose":
        if not isinstance(other, Operator):
            return NotImplemented
        return Compose(self, other)

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Zero(Operator):
    """Set the site to 0 (name ``zero``).

    Examples
    --------
    >>> Zero().apply(torch.ones(1, 2, 2, 2), Site(0, 1))[:, :, 0]
    tensor([[[1., 0.],
             [1., 0.]]])
    """

    word = "zero"

    @property
    def name(self) -> str:
        return "zero"

    def _edit(self, patch, z, site, box, index, stream):
        return torch.zeros_like(patch)


@dataclass(frozen=True)
class Mean(Operator):
    """Set the site to the latent's own robust per-channel centre (name ``mean``).

    The centre is each channel's median over the latent's cells, spots left out
    (:func:`~vaeprobe.probes.stats.robust_channel_stats`), taken from the latent the operator is applied to, so
    it is the same in every command and moves with any per-channel shift of the latent. ``value`` overrides it.

    Parameters
    ----------
    value : array_like, optional
        Given per-channel values ``[C]`` (e.g. a dataset's mean) instead of the latent's own.

    Examples
    --------
    >>> z = torch.tensor([[[[1.0, 2.0, 3.0, 50.0]]]])
    >>> Mean().apply(z, Site(0, 3)).flatten().tolist()  # the spot (50) is left out of the centre
    [1.0, 2.0, 3.0, 2.0]
    """

    value: Any = None
    word = "mean"

    def __post_init__(self):
        if self.value is not None:
            object.__setattr__(self, "value", _per_channel(self.value, "Mean value"))

    @classmethod
    def from_text(cls, number, *, stats=None, other=None, seed=0):
        return cls(_stat(stats, "mean"))

    @property
    def name(self) -> str:
        return "mean"

    def _edit(self, patch, z, site, box, index, stream):
        value = self.value if self.value is not None else _own_stats(z)["mean"]
        return _channel_values(_per_channel(value, "the latent centre"), z, box, "the mean value").expand_as(
            patch).clone()


@dataclass(frozen=True)
class Fill(Operator):
    """Set the site to ``value``: a scalar (name ``fill:V``) or one number per channel (name ``mean``).

    :meth:`from_stats` builds the per-channel form from given statistics (e.g. a dataset's mean); the text form
    ``mean`` is :class:`Mean`, the latent's own centre.

    Parameters
    ----------
    value : float or array_like
        A scalar, or one value per channel (a ``[C]`` tensor, array or sequence); stored as a float or a tuple of
        floats.

    Raises
    ------
    PerturbError
        When ``value`` is not finite or not a scalar or 1-D, or (on use) has the wrong number of channels.

    Examples
    --------
    >>> op = Fill.from_stats(torch.tensor([0.5, -1.0]))
    >>> op.name, op.apply(torch.zeros(1, 2, 1, 2), Site(0, 0)).flatten().tolist()
    ('mean', [0.5, 0.0, -1.0, 0.0])
    """

    value: Any
    word = "fill"
    argument = "V"
    example = "fill:0"

    def __post_init__(self):
        object.__setattr__(self, "value", _per_channel(self.value, "Fill value"))

    @classmethod
    def from_stats(cls, mean: Any) -> "Fill":
        """Fill with given per-channel values, e.g. a dataset's latent mean.

        Parameters
        ----------
        mean : array_like
            The per-channel values, ``[C]``.

        Returns
        -------
        Mean
            Named ``mean``, with these values instead of the latent's own.

        Examples
        --------
        >>> Fill.from_stats([0.1, 0.2]).name
        'mean'
        """
        return Mean(mean)

    @property
    def name(self) -> str:
        return f"fill:{_fmt(self.value)}" if isinstance(self.value, float) else "mean"

    def _edit(self, patch, z, site, box, index, stream):
        return _channel_values(self.value, z, box, "the fill value").expand_as(patch).clone()


@dataclass(frozen=True)
class Noise(Operator):
    """Add Gaussian noise of standard deviation ``sigma * std[channel]``.

    The draw depends only on ``(seed, row, col, size, channel, index)``: the same site gets the same noise in
    any batch order or scan. ``seed`` and ``std`` are not part of :attr:`name` (``noise:SIGMA``).

    Parameters
    ----------
    sigma : float
        The noise level, at least 0, in units of ``std``.
    std : float, array_like or None, optional
        ``None`` (the default, and what ``noise:SIGMA`` means in every command): the robust per-channel std of
        the latent the noise is added to (:func:`~vaeprobe.probes.stats.robust_channel_stats`). Otherwise a
        scalar or one std per channel ``[C]``; ``std=1`` means ``sigma`` is in raw latent units.
    seed : int, optional
        Seed of every draw (combined with the site through a stable hash).

    Raises
    ------
    PerturbError
        When ``sigma`` or ``std`` is negative or not finite, or ``seed`` is not an int.

    Examples
    --------
    >>> op = Noise(0.5, seed=3)
    >>> z = torch.zeros(1, 4, 8, 8)
    >>> bool(torch.equal(op.apply(z, Site(2, 2)), op.apply(z, Site(2, 2))))
    True
    >>> op.name
    'noise:0.5'
    """

    sigma: float
    _: KW_ONLY
    std: Any = None
    seed: int = 0
    word = "noise"
    argument = "SIGMA"
    example = "noise:0.5"

    def __post_init__(self):
        sigma = _finite(self.sigma, "Noise sigma")
        if sigma < 0:
            raise PerturbError(f"Noise sigma must be >= 0, got {sigma}")
        std = None if self.std is None else _per_channel(self.std, "Noise std")
        if std is not None and min(std if isinstance(std, tuple) else (std,)) < 0:
            raise PerturbError("Noise std must be >= 0 in every channel")
        try:
            object.__setattr__(self, "seed", operator.index(self.seed))
        except TypeError:
            raise PerturbError(f"Noise seed must be an int, got {self.seed!r}") from None
        object.__setattr__(self, "sigma", sigma)
        object.__setattr__(self, "std", std)

    @classmethod
    def from_text(cls, number, *, stats=None, other=None, seed=0):
        return cls(number, std=_stat(stats, "std"), seed=seed)

    @property
    def name(self) -> str:
        return f"noise:{_fmt(self.sigma)}"

    def _edit(self, patch, z, site, box, index, stream):
        parts = [self.seed, site.row, site.col, site.size, site.channel, index] + ([stream] if stream else [])
        gen = torch.Generator(device="cpu").manual_seed(_stable_seed(*parts))
        draw = torch.randn(tuple(patch.shape), generator=gen, dtype=torch.float32)
        std = self.std if self.std is not None else _per_channel(_own_stats(z)["std"], "the latent std")
        scale = _channel_values(std, z, box, "the noise std") * self.sigma
        return patch + draw.to(device=patch.device, dtype=patch.dtype) * scale


@dataclass(frozen=True)
class Scale(Operator):
    """Multiply the site by ``factor`` (name ``scale:F``).

    Parameters
    ----------
    factor : float
        The finite factor.

    Examples
    --------
    >>> Scale(2).apply(torch.ones(1, 1, 1, 2), Site(0, 1)).flatten().tolist()
    [1.0, 2.0]
    """

    word = "scale"
    argument = "F"
    example = "scale:2"
    factor: float

    def __post_init__(self):
        object.__setattr__(self, "factor", _finite(self.factor, "Scale factor"))

    @property
    def name(self) -> str:
        return f"scale:{_fmt(self.factor)}"

    def _edit(self, patch, z, site, box, index, stream):
        return patch * self.factor


@dataclass(frozen=True, eq=False)
class Swap(Operator):
    """Take the values of another image's latent at the site (name ``swap``).

    Parameters
    ----------
    other : torch.Tensor
        The partner latent, same shape ``[1, C, h, w]`` as the latents it is applied to.

    Raises
    ------
    PerturbError
        When ``other`` is not one latent, or (on use) its shape differs from the latent's.

    Examples
    --------
    >>> Swap(torch.full((1, 1, 1, 2), 7.0)).apply(torch.zeros(1, 1, 1, 2), Site(0, 0)).flatten().tolist()
    [7.0, 0.0]
    """

    other: torch.Tensor = field(repr=False)
    word = "swap"
    needs = ("other",)

    def __post_init__(self):
        _check_latent(self.other)

    @classmethod
    def from_text(cls, number, *, stats=None, other=None, seed=0):
        if other is None:
            raise PerturbError("operator 'swap' needs the latent of a second image to take values from; "
                               "pass other (a [1, C, h, w] latent)")
        return cls(other)

    @property
    def name(self) -> str:
        return "swap"

    def _edit(self, patch, z, site, box, index, stream):
        if self.other.shape != z.shape:
            raise PerturbError(f"swap partner has shape {tuple(self.other.shape)} but the latent has "
                               f"{tuple(z.shape)}; encode both images at the same size")
        return self.other[0][box].to(device=patch.device, dtype=patch.dtype).clone()


@dataclass(frozen=True)
class Smudge(Operator):
    """Replace the site by the per-channel mean of the ring of cells just around it (name ``smudge``).

    The ring of a single cell is its 8 neighbours; only cells inside the latent count, so a corner cell uses 3.
    A site that covers the whole latent has no ring and raises :class:`PerturbError`.

    Examples
    --------
    >>> z = torch.tensor([[[[9.0, 2.0, 0.0], [4.0, 6.0, 0.0], [0.0, 0.0, 0.0]]]])
    >>> Smudge().apply(z, Site(0, 0))[0, 0].tolist()  # corner: mean of 2, 4 and 6
    [[4.0, 2.0, 0.0], [4.0, 6.0, 0.0], [0.0, 0.0, 0.0]]
    """

    word = "smudge"

    @property
    def name(self) -> str:
        return "smudge"

    def _edit(self, patch, z, site, box, index, stream):
        h, w = z.shape[-2:]
        chans, rows, cols = box
        o_r0, o_r1 = max(rows.start - 1, 0), min(rows.stop + 1, h)
        o_c0, o_c1 = max(cols.start - 1, 0), min(cols.stop + 1, w)
        count = (o_r1 - o_r0) * (o_c1 - o_c0) - (rows.stop - rows.start) * (cols.stop - cols.start)
        if count == 0:
            raise PerturbError("smudge needs at least one cell around the site, but the site covers the whole "
                               "latent; use a smaller size")
        plane = z[0][chans].to(torch.float64)
        ring = plane[:, o_r0:o_r1, o_c0:o_c1].sum((1, 2)) - plane[:, rows, cols].sum((1, 2))
        mean = (ring / count).to(patch.dtype).reshape(-1, 1, 1)
        return mean.expand_as(patch).clone()


@dataclass(frozen=True, init=False, eq=False)
class Compose(Operator):
    """Apply several operators in order to the same site (nested compositions are flattened).

    Two noise operators in one composition draw independent noise (the position is part of the seed after
    the first operator). ``a + b`` builds ``Compose(a, b)``; the name joins the parts' names with ``+``.

    Parameters
    ----------
    *ops : Operator
        The operators, in order (at least one).

    Attributes
    ----------
    ops : tuple of Operator
        The flattened operators.

    Examples
    --------
    >>> op = Compose(Scale(0.5), Fill(1.0))
    >>> op.name, op.apply(torch.full((1, 1, 1, 1), 4.0), Site(0, 0)).item()
    ('scale:0.5+fill:1', 1.0)
    >>> (Fill(1.0) + Scale(0.5)).apply(torch.full((1, 1, 1, 1), 4.0), Site(0, 0)).item()
    0.5
    """

    ops: tuple[Operator, ...]

    def __init__(self, *ops: Operator):
        flat: list[Operator] = []
        for op in ops:
            if isinstance(op, Compose):
                flat.extend(op.ops)
            elif isinstance(op, Operator):
                flat.append(op)
            else:
                raise PerturbError(f"Compose takes operators, got {op!r}")
        if not flat:
            raise PerturbError("Compose needs at least one operator")
        object.__setattr__(self, "ops", tuple(flat))

    def __eq__(self, other):
        return isinstance(other, Compose) and len(self.ops) == len(other.ops) and all(
            a == b for a, b in zip(self.ops, other.ops))

    def __hash__(self):
        return hash(self.ops)

    @property
    def name(self) -> str:
        return "+".join(op.name for op in self.ops)

    def _edit(self, patch, z, site, box, index, stream):
        for i, op in enumerate(self.ops):
            patch = op._edit(patch, z, site, box, index, i)
        return patch


# -- batches and parsing --------------------------------------------------------------------------------------

def apply_batch(z: torch.Tensor, sites: Sequence[Site], op: Operator, *,
                index: int | Sequence[int] = 0) -> torch.Tensor:
    """One perturbed copy of a latent per site, in a single tensor ready to decode.

    Parameters
    ----------
    z : torch.Tensor
        One latent ``[1, C, h, w]``; it is not modified.
    sites : sequence of Site
        The ``N`` sites.
    op : Operator
        The operator to apply at each site.
    index : int or sequence of int, optional
        The draw number (see :meth:`Operator.apply`): one int for all sites or one per site.

    Returns
    -------
    torch.Tensor
        ``[N, C, h, w]``; row ``i`` equals ``op.apply(z, sites[i], index=index[i])``.

    Raises
    ------
    PerturbError
        When ``z``, ``op``, a site or the number of indices does not fit.

    Examples
    --------
    >>> out = apply_batch(torch.ones(1, 1, 2, 2), [Site(0, 0), Site(1, 1)], Zero())
    >>> out[:, 0].tolist()
    [[[0.0, 1.0], [1.0, 1.0]], [[1.0, 1.0], [1.0, 0.0]]]
    """
    _check_latent(z)
    if not isinstance(op, Operator):
        raise PerturbError(f"expected an operator, got {op!r}; build one with parse_operator('zero')")
    sites = list(sites)
    indices = [index] * len(sites) if isinstance(index, int) else list(index)
    if len(indices) != len(sites):
        raise PerturbError(f"got {len(indices)} indices for {len(sites)} sites; pass one int or one per site")
    out = z.repeat(len(sites), 1, 1, 1)
    for i, (site, idx) in enumerate(zip(sites, indices)):
        box = _check_site(z, site)
        out[i][box] = op._edit(z[0][box], z, site, box, idx, 0)
    return out


def _stat(stats: Any, key: str) -> Any:
    """``stats[key]`` / ``stats["channel_" + key]`` for a mapping (e.g. a LatentStats summary) or the attribute
    ``key`` of an object; ``None`` if absent."""
    if stats is None:
        return None
    if isinstance(stats, dict):
        for k in (key, f"channel_{key}"):
            if stats.get(k) is not None:
                return stats[k]
        return None
    return getattr(stats, key, None)


def _forms() -> tuple[str, ...]:
    return tuple(f"{w}:{c.argument}" if c.argument else w for w, c in REGISTRY.items())


def _example(cls) -> str:
    return cls.example or (f"{cls.word}:1" if cls.argument else cls.word)


def _parse_part(part: str, spec: str) -> tuple[type, float | None]:
    """One ``word[:number]`` of a spec: its class and number, or a one-line :class:`PerturbError`."""
    word, sep, arg = part.strip().lower().partition(":")
    word, arg = word.strip(), arg.strip()
    if not word:
        raise PerturbError(f"empty operator in {spec!r}; join operators with a single '+', e.g. "
                           f"'scale:0.5+noise:0.1'")
    cls = REGISTRY.get(word)
    if cls is None:
        raise PerturbError(f"unknown operator {word!r} in {spec!r}; use one of {', '.join(OPERATORS)}")
    if cls.argument is None:
        if sep:
            raise PerturbError(f"operator {word!r} takes no argument; write {word!r} instead of {part.strip()!r}")
        return cls, None
    if not arg:
        raise PerturbError(f"operator {word!r} needs a number, e.g. {_example(cls)!r}")
    try:
        return cls, float(arg)
    except ValueError:
        raise PerturbError(f"{word}:{arg}: {arg!r} is not a number") from None


def _split(spec: Any) -> list[str]:
    if not isinstance(spec, str) or not spec.strip():
        raise PerturbError(f"empty operator spec {spec!r}; use one of {', '.join(OPERATORS)}")
    return spec.split("+")


def parse_operator(spec: str, *, stats: Any = None, other: torch.Tensor | None = None, seed: int = 0) -> Operator:
    """Build an operator from its text form (see :data:`OPERATORS`); ``name`` gives the same text back.

    Parameters
    ----------
    spec : str
        One or more of the :data:`OPERATORS` forms (``zero``, ``mean``, ``fill:V``, ``noise:SIGMA``,
        ``scale:F``, ``swap``, ``smudge``), joined by ``+`` (case and spaces do not matter).
    stats : mapping or object, optional
        Per-channel latent statistics that override the latent's own: a mapping with ``mean``/``std`` or
        ``channel_mean``/``channel_std``, or an object with ``mean``/``std`` attributes. Without them ``mean``
        and ``noise`` use the robust statistics of the latent they are applied to (the meaning of the text form
        in every command).
    other : torch.Tensor, optional
        The partner latent ``[1, C, h, w]`` that ``swap`` takes values from (``swap`` needs it).
    seed : int, optional
        Seeds every noise operator.

    Returns
    -------
    Operator
        One operator, or a :class:`Compose` of several.

    Raises
    ------
    PerturbError
        When the spec is empty or malformed, names an unknown operator, or needs ``other``.

    Examples
    --------
    >>> op = parse_operator("scale:0.5+noise:0.1")
    >>> op.name
    'scale:0.5+noise:0.1'
    >>> parse_operator(op.name) == op
    True
    """
    ops = []
    for part in _split(spec):
        cls, number = _parse_part(part, spec)
        ops.append(cls.from_text(number, stats=stats, other=other, seed=seed))
    return ops[0] if len(ops) == 1 else Compose(*ops)


def check_operator(spec: str, *, provides: Sequence[str] = (), command: str = "this command") -> str:
    """Check an operator spec before any work: its syntax, its numbers, and that ``command`` can give it what it
    needs (see :attr:`Operator.needs`).

    Parameters
    ----------
    spec : str
        The text form.
    provides : sequence of str, keyword-only
        What the command can give operators (``"other"``: a second image's latent for ``swap``).
    command : str, keyword-only
        The command's name, for the message.

    Returns
    -------
    str
        The canonical name of the operator (``parse_operator(spec).name``). A spec the command cannot use raises
        :class:`PerturbError` with one line that says what is wrong and what to use instead.

    Examples
    --------
    >>> check_operator(" Scale:2 + zero ")
    'scale:2+zero'
    >>> try:
    ...     check_operator("swap", command="mechanism")
    ... except PerturbError as exc:
    ...     print(exc)
    mechanism cannot use operator 'swap': it needs a second image's latent, which mechanism does not provide; use one of zero, mean, fill:V, noise:SIGMA, scale:F, smudge
    """
    what = {"other": "a second image's latent"}
    for part in _split(spec):
        cls, _ = _parse_part(part, spec)
        missing = [n for n in cls.needs if n not in provides]
        if missing:
            usable = [f for f, c in zip(_forms(), REGISTRY.values()) if all(n in provides for n in c.needs)]
            raise PerturbError(f"{command} cannot use operator {cls.word!r}: it needs "
                               f"{' and '.join(what.get(n, n) for n in missing)}, which {command} does not "
                               f"provide; use one of {', '.join(usable)}")
    dummy = torch.zeros(1, 1, 1, 1)
    return parse_operator(spec, other=dummy if "other" in provides else None).name


OPERATORS = _forms()
"""The operator forms :func:`parse_operator` accepts (join several with ``+``), one per class in
:data:`REGISTRY`."""
