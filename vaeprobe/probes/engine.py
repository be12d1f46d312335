"""The perturbation engine: perturb a latent at many sites, decode in batches, measure. Every command's
perturbations go through it (scans, the verdicts' reference cells, swap donors and evidence, mechanism,
pipeline interventions, compare).

One named default, :data:`DECODE_BATCH`, says how many perturbed latents go to the decoder at once; decodes are
returned in float32, so every difference downstream is taken in float32 whatever the VAE's dtype. The engine
counts what it decodes (:attr:`Engine.decodes`, :attr:`Engine.calls`), which the jobs report.

>>> from vaeprobe.models.loading import load_vae
>>> from vaeprobe.probes.perturb import Site, Zero
>>> vae = load_vae("builtin:tiny-random")
>>> z = vae.encode(torch.zeros(1, 3, 32, 32)).mean
>>> engine = Engine(vae, batch=2)
>>> [b.sites for b in engine.batches(z, [Site(0, 0), Site(1, 1), Site(2, 2)], Zero())]
[[Site(row=0, col=0, size=1, channel=None), Site(row=1, col=1, size=1, channel=None)], [Site(row=2, col=2, size=1, channel=None)]]
>>> engine.decodes, engine.calls
(3, 2)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import pandas as pd
import torch

from vaeprobe.probes.perturb import Operator, PerturbError, Site, apply_batch, parse_operator

DECODE_BATCH = 8
"""Perturbed latents per decoder call, the default of every command's ``--batch`` and of every internal loop."""


@dataclass
class DecodedBatch:
    """One decoder call's worth of perturbations.

    Attributes
    ----------
    sites : list of Site
        The sites of this batch.
    latents : torch.Tensor
        The perturbed latents ``[n, C, h, w]`` (in the latent's dtype and device).
    decodes : torch.Tensor
        Their decodes ``[n, 3, H, W]``, float32.
    start : int
        The position of the first site in the whole list.
    """

    sites: list
    latents: torch.Tensor
    decodes: torch.Tensor
    start: int


def site_columns(site: Site, op: Operator) -> dict:
    """The columns that name a perturbation in every table: ``row, col, size, channel, op`` (channel -1: all).

    Examples
    --------
    >>> from vaeprobe.probes.perturb import Zero
    >>> site_columns(Site(2, 3, channel=1), Zero())
    {'row': 2, 'col': 3, 'size': 1, 'channel': 1, 'op': 'zero'}
    """
    return {"row": site.row, "col": site.col, "size": site.size,
            "channel": -1 if site.channel is None else site.channel, "op": op.name}


class Engine:
    """Perturb, decode and measure, :data:`DECODE_BATCH` latents per decoder call.

    Parameters
    ----------
    vae : vaeprobe.models.adapter.VAE
        The model (anything with ``decode(z)``).
    batch : int, keyword-only
        Latents per decoder call (at least 1).
    progress : bool or str, keyword-only
        Show a progress bar over sites on stderr (a string is its label).

    Attributes
    ----------
    decodes, calls : int
        Latents decoded and decoder calls made so far.

    Raises
    ------
    PerturbError
        When ``batch`` is below 1.
    """

    def __init__(self, vae, *, batch: int = DECODE_BATCH, progress: bool | str = False):
        if int(batch) < 1:
            raise PerturbError(f"batch {batch}: give the number of latents per decoder call, 1 or more")
        self.vae, self.batch, self.progress = vae, int(batch), progress
        self.decodes = 0
        self.calls = 0

    def _decode(self, zz: torch.Tensor) -> torch.Tensor:
        self.decodes += len(zz)
        self.calls += 1
        return self.vae.decode(zz).float()

    def _decode_missing(self, zz: torch.Tensor, sites: list, known: Mapping | None) -> torch.Tensor:
        """Decodes of the perturbed latents ``zz``, taking those of sites in ``known`` from there."""
        have = [k for k, s in enumerate(sites) if known and s in known]
        if not have:
            return self._decode(zz)
        missing = [k for k in range(len(sites)) if k not in have]
        first = known[sites[have[0]]]
        out = torch.empty((len(sites), *first.shape), dtype=torch.float32, device=first.device)
        for k in have:
            out[k] = known[sites[k]]
        if missing:
            out[missing] = self._decode(zz[missing]).to(out.device)
        return out

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode a stack of latents ``[n, C, h, w]``, ``batch`` per call, as float32.

        Examples
        --------
        >>> from vaeprobe.models.loading import load_vae
        >>> engine = Engine(load_vae("builtin:tiny-random"), batch=2)
        >>> tuple(engine.decode(torch.zeros(3, 4, 2, 2)).shape), engine.calls
        ((3, 3, 16, 16), 2)
        """
        return torch.cat([self._decode(latents[s:s + self.batch]) for s in range(0, len(latents), self.batch)])

    def batches(self, z: torch.Tensor | Sequence[torch.Tensor], sites: Sequence[Site], op: Operator | str, *,
                index: int | Sequence[int] = 0, known: Mapping[Site, torch.Tensor] | None = None
                ) -> Iterator[DecodedBatch]:
        """Perturb ``z`` at each site with ``op`` and decode, one :class:`DecodedBatch` per decoder call.

        Parameters
        ----------
        z : torch.Tensor or sequence of torch.Tensor
            One latent ``[1, C, h, w]``, or one latent per site (e.g. each site in another donor's latent).
        sites : sequence of Site
            Where to perturb.
        op : Operator or str
            The perturbation (a text form is parsed with :func:`~vaeprobe.probes.perturb.parse_operator`).
        index : int or sequence of int, keyword-only
            The draw number of random operators, one for all or one per site.
        known : mapping of Site to torch.Tensor, keyword-only
            Decodes ``[3, H, W]`` already made of ``z`` perturbed by ``op`` at some of the sites (e.g. the verdicts'
            reference cells, :attr:`vaeprobe.probes.verdict.ReceptiveField.decodes`): those sites are not decoded
            again and do not count in :attr:`decodes`. The caller vouches that they are this latent's and this
            operator's (with the same ``index`` for a random operator).

        Yields
        ------
        DecodedBatch

        Examples
        --------
        >>> from vaeprobe.models.loading import load_vae
        >>> from vaeprobe.probes.perturb import Zero
        >>> vae = load_vae("builtin:tiny-random")
        >>> z = vae.encode(torch.zeros(1, 3, 32, 32)).mean
        >>> engine = Engine(vae)
        >>> first = next(engine.batches(z, [Site(1, 1)], Zero())).decodes[0]
        >>> again = next(engine.batches(z, [Site(0, 0), Site(1, 1)], Zero(), known={Site(1, 1): first}))
        >>> engine.decodes, bool(torch.equal(again.decodes[1], first))
        (2, True)
        """
        op = parse_operator(op) if isinstance(op, str) else op
        sites = list(sites)
        per_site = not isinstance(z, torch.Tensor)
        if per_site and len(z) != len(sites):
            raise PerturbError(f"got {len(z)} latents for {len(sites)} sites; pass one latent or one per site")
        indices = [index] * len(sites) if isinstance(index, int) else list(index)
        from tqdm import tqdm

        desc = self.progress if isinstance(self.progress, str) else "positions"
        bar = tqdm(total=len(sites), desc=desc, unit="pos", file=sys.stderr, disable=not self.progress,
                   leave=False)
        try:
            for start in range(0, len(sites), self.batch):
                chunk, idx = sites[start:start + self.batch], indices[start:start + self.batch]
                if per_site:
                    zz = torch.cat([apply_batch(z[start + k], [s], op, index=i)
                                    for k, (s, i) in enumerate(zip(chunk, idx))])
                else:
                    zz = apply_batch(z, chunk, op, index=idx)
                yield DecodedBatch(chunk, zz, self._decode_missing(zz, chunk, known), start)
                bar.update(len(chunk))
        finally:
            bar.close()

    def table(self, z: torch.Tensor, sites: Sequence[Site], op: Operator | str,
              measure: Callable[[DecodedBatch], list[dict]], *, on_batch: Callable | None = None,
              known: Mapping[Site, torch.Tensor] | None = None) -> pd.DataFrame:
        """One row per site: :func:`site_columns` and what ``measure`` returns for it.

        Parameters
        ----------
        z, sites, op
            As for :meth:`batches`.
        measure : callable
            ``measure(batch) -> list of dict``, one dict of measures per site of the batch.
        on_batch : callable, keyword-only
            Called as ``on_batch(batch, values)`` after each batch (e.g. to keep some decodes).
        known : mapping of Site to torch.Tensor, keyword-only
            Decodes already made, as for :meth:`batches`.

        Returns
        -------
        pandas.DataFrame

        Examples
        --------
        >>> from vaeprobe.models.loading import load_vae
        >>> vae = load_vae("builtin:tiny-random")
        >>> z = vae.encode(torch.zeros(1, 3, 32, 32)).mean
        >>> ref = vae.decode(z).float()
        >>> t = Engine(vae).table(z, [Site(0, 0), Site(3, 3)], "zero",
        ...                       lambda b: [{"l2": float((d - ref).pow(2).sum())} for d in b.decodes])
        >>> list(t.columns), len(t)
        (['row', 'col', 'size', 'channel', 'op', 'l2'], 2)
        """
        op = parse_operator(op) if isinstance(op, str) else op
        rows = []
        for b in self.batches(z, sites, op, known=known):
            values = measure(b)
            if on_batch is not None:
                on_batch(b, values)
            rows += [{**site_columns(s, op), **v} for s, v in zip(b.sites, values)]
        return pd.DataFrame(rows)
