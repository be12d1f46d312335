"""Linearised sensitivity of the decoder around a latent: exact per-position Jacobian norms and a cheap estimate.

Write ``D`` for the decoder, ``z`` for a latent ``[1, C, h, w]`` and ``J = dD/dz`` for the Jacobian at ``z``. The
*sensitivity* of latent position ``p = (r, c)`` is

    S_p = sum over channels ch of ||J e_{p,ch}||^2,

where ``e_{p,ch}`` is the unit latent vector at channel ``ch`` of cell ``p`` and the squared norm is a **sum** over
every output value (3 colour channels x H x W pixels; no division). To first order, adding Gaussian noise of
variance ``s^2`` to each channel of cell ``p`` changes the image by ``s^2 * S_p`` in expected squared norm. To
compare with the mean-squared energies of :mod:`vaeprobe.probes.response`, divide by the number of output values
counted (``3 * H * W``, or ``3 * |far field|``). The *far-field sensitivity* ``F_p`` sums only over the pixels of the
far field of ``p`` (pixels whose latent cell is more than ``radius`` cells away, Chebyshev, as
:func:`vaeprobe.probes.geometry.far_mask`).

- :func:`jacobian_norms` computes ``S_p`` / ``F_p`` exactly: one forward-mode product ``J e_{p,ch}`` per position
  and channel, so ``C`` Jacobian-vector products per position (each somewhat dearer than a decode).
- :func:`sensitivity_map` estimates ``S_p`` for every position at once from a few random reverse-mode products
  ``g = J^T v``: for Gaussian ``v``, ``E[g_{p,ch}^2] = ||J e_{p,ch}||^2``. The cost is one forward pass plus
  ``n_probes`` backward passes whatever the size of the latent grid (times the number of blocks for far fields).
- :func:`shrink_map` lowers the estimate's noise with a limited-translation empirical-Bayes shrinkage towards the
  neighbouring cells (the map of a decoder is spatially smooth while the probe noise is independent per cell);
  large isolated deviations such as a spot move by at most one standard error.
- :func:`agreement` compares an estimate with the exact values (Spearman rank correlation, top-k overlap).

Far fields by blocks. :func:`sensitivity_map` with ``radius`` cuts the latent grid into ``blocks = (rows, cols)``
rectangles (an int means the same number both ways). For each block the probes are zero outside the pixels more than ``radius`` cells from *every* cell
of the block (:func:`vaeprobe.probes.geometry.far_mask` of a :class:`~vaeprobe.probes.geometry.Block`). For a
cell ``p`` of the block this estimates, without bias, the energy in the block's far field, a smaller region
inside ``p``'s own far field: it lacks the cells within ``radius`` of the rest of the block, so it starts
``radius + 1`` cells from ``p`` only on the sides where ``p`` touches the block's edge. As an estimate of
``F_p`` it is therefore biased low, most for cells inside the block, and since far-field energy is usually
concentrated just beyond the radius the shortfall is not small (about 1/3 of ``F_p`` kept with quadrants on an
8x8 grid at radius 1 in the tests, ranks still agreeing at Spearman ~0.87). More blocks shrink the bias
(``blocks = (h, w)``, one block per cell, is unbiased) but cost ``n_probes x n_blocks`` backward passes; the
default quadrants cost 4x the plain map, a fixed factor whatever the grid size. A block whose far field is empty
(radius too large for the grid) gets NaN, with a warning, and uses no backward passes.

The functions that decode take ``vae``, the model (a :class:`~vaeprobe.models.adapter.VAE`), and ``z``, one latent
``[1, C, h, w]`` (or ``[C, h, w]``).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from vaeprobe.errors import VaeprobeError
from vaeprobe.probes.engine import DECODE_BATCH
from vaeprobe.probes.geometry import Block, far_mask

__all__ = ["SensitivityMap", "jacobian_norms", "sensitivity_map", "shrink_map", "agreement",
           "NotDifferentiableError", "check_differentiable"]


class NotDifferentiableError(VaeprobeError):
    """Autograd cannot give the decoder's vector-Jacobian products (in-place writes into tensors autograd needs, a
    decoder that runs under ``no_grad`` or detaches, integer or rounding ops with zero gradient)."""


def _autograd_reason(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "inplace" in first or "in-place" in first:
        return "it writes in place into a tensor that autograd needs for the backward pass"
    if "does not require grad" in first or "does not have a grad_fn" in first:
        return "its output is cut off from the latent's graph (it runs under no_grad, detaches or casts to integers)"
    return f"autograd cannot go through it ({first[:160]})"


def check_differentiable(vae, z: torch.Tensor) -> str | None:
    """Whether autograd can go through the decoder at ``z``: one vector-Jacobian product, informative or not.

    Costs one decode and one backward pass.

    Parameters
    ----------
    vae, z
        As in the module docstring.

    Returns
    -------
    str or None
        ``None`` when the product works and is informative, else the reason in a few words (what
        :class:`NotDifferentiableError` would say).

    Examples
    --------
    >>> from vaeprobe.models.loading import load_vae
    >>> vae = load_vae("builtin:tiny-random")
    >>> check_differentiable(vae, torch.randn(1, 4, 4, 4)) is None
    True
    """
    try:
        sensitivity_map(vae, z, n_probes=1)
    except NotDifferentiableError as exc:
        return str(exc)
    return None


# -- helpers ---------------------------------------------------------------------------------------------------
def _latent(vae, z: torch.Tensor) -> torch.Tensor:
    """``z`` as a detached float32 ``[1, C, h, w]`` tensor on the model's device."""
    if z.dim() == 3:
        z = z.unsqueeze(0)
    if z.dim() != 4 or z.shape[0] != 1:
        raise ValueError(f"expected one latent [1, C, h, w] (or [C, h, w]); got shape {tuple(z.shape)}")
    return z.detach().to(vae.device, torch.float32)


def _positions(positions, h: int, w: int) -> list[tuple[int, int]]:
    if positions is None:
        return [(r, c) for r in range(h) for c in range(w)]
    if isinstance(positions, torch.Tensor):
        positions = positions.reshape(-1, 2).tolist()
    out = []
    for pos in positions:
        r, c = (int(v) for v in pos)
        if not (0 <= r < h and 0 <= c < w):
            raise ValueError(f"position {(r, c)} is outside the {h}x{w} latent grid")
        out.append((r, c))
    return out


@contextlib.contextmanager
def _forward_ad_safe(model: torch.nn.Module) -> Iterator[None]:
    """Make ``model`` usable under forward-mode AD for the duration of the block.

    PyTorch's fused CPU attention kernel has no forward-mode derivative. Every diffusers ``Attention`` layer whose
    processor is the SDPA one (``AttnProcessor2_0``) gets the classic matmul-softmax ``AttnProcessor`` instead (the
    same computation, written with ordinary ops), and any other call to ``scaled_dot_product_attention`` is routed
    to the composite "math" backend. The layers are found by walking the modules, so wrappers that are not
    diffusers ``ModelMixin`` (no ``set_attn_processor``) work too, and custom processors are left alone. The
    original processor objects are put back on exit, also when the block raises.
    """
    try:
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
    except ImportError:  # pragma: no cover - diffusers is a dependency, but a plain torch model needs none of this
        AttnProcessor = AttnProcessor2_0 = None
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        math_only = sdpa_kernel(SDPBackend.MATH)
    except ImportError:  # pragma: no cover - torch < 2.3
        math_only = contextlib.nullcontext()

    swapped: list[tuple[torch.nn.Module, object]] = []
    try:
        if AttnProcessor2_0 is not None:
            for module in model.modules():
                proc = getattr(module, "processor", None)
                if type(proc) is AttnProcessor2_0 and callable(getattr(module, "set_processor", None)):
                    swapped.append((module, proc))
                    module.set_processor(AttnProcessor())
        with math_only:
            yield
    finally:
        for module, proc in reversed(swapped):
            module.set_processor(proc)


@contextlib.contextmanager
def _frozen_parameters(model: torch.nn.Module) -> Iterator[None]:
    """Parameters stop requiring grad inside the block, so a kept graph stores only what ``d/dz`` needs."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in trainable:
            p.requires_grad_(False)
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    """``[0, n)`` cut into ``parts`` contiguous non-empty ranges of near-equal length."""
    parts = max(1, min(int(parts), n))
    edges = [round(i * n / parts) for i in range(parts + 1)]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def _blocks(blocks, h: int, w: int) -> tuple[int, int]:
    if isinstance(blocks, int):
        blocks = (blocks, blocks)
    br, bc = (int(b) for b in blocks)
    if br < 1 or bc < 1:
        raise ValueError(f"blocks must be positive; got {blocks}")
    return min(br, h), min(bc, w)


# -- exact reference -------------------------------------------------------------------------------------------
def _jvps(decode, z: torch.Tensor, tangents: torch.Tensor, use_vmap: bool):
    """``J t`` for each tangent, vmapped when it can be (then ``use_vmap`` stays true), else one at a time."""
    if use_vmap and len(tangents) > 1:
        try:
            return torch.func.vmap(lambda t: torch.func.jvp(decode, (z,), (t,))[1])(tangents), True
        except (RuntimeError, NotImplementedError):
            pass  # data-dependent control flow or an op without a batching rule
    return [torch.func.jvp(decode, (z,), (t,))[1] for t in tangents], use_vmap and len(tangents) <= 1


def jacobian_norms(vae, z: torch.Tensor, positions: Iterable[Sequence[int]] | None = None, *,
                   radius: int | None = None, batch: int = DECODE_BATCH) -> torch.Tensor:
    """Exact sensitivity ``S_p`` (or far-field sensitivity ``F_p`` when ``radius`` is given) of each position.

    For each position ``p`` and latent channel ``ch`` one Jacobian-vector product ``J e_{p,ch}`` is computed in
    forward mode (``torch.func.jvp``); ``S_p`` is the sum over channels of its squared norm summed over all
    output values, ``F_p`` the same sum restricted to the pixels of the far field of ``p``. Products are batched
    ``batch`` tangents at a time with ``torch.func.vmap`` (falling back to one at a time if the model cannot be
    vmapped), so the cost is ``len(positions) * C`` JVPs. Batched, a JVP costs about one to two decodes; unbatched,
    the per-call overhead of forward-mode AD can make it ten times dearer on small models, so raise ``batch`` where
    memory allows (``batch`` tangents are decoded at once). This is the reference the estimate of
    :func:`sensitivity_map` is checked against.

    Parameters
    ----------
    vae, z
        As in the module docstring.
    positions : iterable of (int, int) or torch.Tensor, optional
        ``(row, col)`` pairs; ``None`` means all ``h * w`` cells in row-major order.
    radius : int, keyword-only
        Sum only over the far field, the pixels more than ``radius`` cells away (Chebyshev); ``None``: the
        whole image.
    batch : int, keyword-only
        Tangents decoded at once.

    Returns
    -------
    torch.Tensor
        float32 on the CPU, ``[len(positions)]``.

    Examples
    --------
    >>> from vaeprobe.models.loading import load_vae
    >>> vae = load_vae("builtin:tiny-random")
    >>> z = torch.randn(1, vae.latent_channels, 4, 4, generator=torch.Generator().manual_seed(0))  # 32x32 px
    >>> s = jacobian_norms(vae, z, positions=[(0, 0), (1, 2)])  # positions=None: all 16
    >>> tuple(s.shape), bool((s > 0).all())
    ((2,), True)
    >>> far = jacobian_norms(vae, z, positions=[(0, 0), (1, 2)], radius=1)
    >>> bool((far < s).all())  # the far field is part of the image
    True
    """
    z = _latent(vae, z)
    _, C, h, w = z.shape
    pos = _positions(positions, h, w)
    if not pos:
        return torch.zeros(0)
    batch = max(1, int(batch))
    jobs = [(i, ch) for i in range(len(pos)) for ch in range(C)]
    totals = torch.zeros(len(pos), dtype=torch.float64)
    mask_of: dict[int, torch.Tensor] = {}  # the current position's far field only (jobs come position by position)
    use_vmap = True

    def decode(zz: torch.Tensor) -> torch.Tensor:
        return vae.decode(zz)  # no_grad does not switch off forward-mode AD, and keeps no reverse graph

    def push(chunk, tangents: torch.Tensor) -> None:
        for (i, ch), out in zip(chunk, tangents):
            sq = out.detach().double().pow(2).reshape(-1, *out.shape[-2:]).sum(0)  # [H, W]
            if radius is not None:
                if i not in mask_of:
                    mask_of.clear()
                    mask_of[i] = far_mask(pos[i], tuple(sq.shape), vae.factor, radius).to(sq.device)
                sq = sq[mask_of[i]]
            totals[i] += float(sq.sum())

    with _forward_ad_safe(vae.model):
        for start in range(0, len(jobs), batch):
            chunk = jobs[start:start + batch]
            tangents = torch.zeros(len(chunk), *z.shape, dtype=z.dtype, device=z.device)
            for k, (i, ch) in enumerate(chunk):
                tangents[k, 0, ch, pos[i][0], pos[i][1]] = 1.0
            outs, use_vmap = _jvps(decode, z, tangents, use_vmap)
            push(chunk, outs)
    return totals.float()


# -- randomised estimate ---------------------------------------------------------------------------------------
def _rel_se(mean: torch.Tensor, mean_sq: torch.Tensor, k: int) -> torch.Tensor:
    """Relative standard error of a mean of ``k`` probe values from their mean and mean square (NaN if k < 2)."""
    if k < 2:
        return torch.full_like(mean, float("nan"))
    var = (mean_sq - mean ** 2).clamp(min=0) * k / (k - 1)
    return (var / k).sqrt() / mean


@dataclass
class SensitivityMap:
    """Estimated sensitivity of every latent position, with what it cost (:func:`sensitivity_map`).

    ``n_forward`` decodes with the graph kept and ``n_backward`` backward passes (vector-Jacobian products) were
    used; a backward pass costs roughly two decodes, so a benchmark can express the cost in decode-equivalents.

    Attributes
    ----------
    map : torch.Tensor
        float32 ``[h, w]`` (same units as :func:`jacobian_norms`; NaN in blocks whose far field is empty).
    n_probes : int
        Random probes per block.
    radius : int or None
        The far-field radius used (``None`` for the plain map).
    blocks : (int, int) or None
        The far-field blocks used, clipped to the grid (``None`` for the plain map).
    n_backward : int
        Backward passes used.
    n_forward : int
        Decodes with the graph kept.
    rel_se : torch.Tensor or None
        The estimated relative standard error of each cell's value (the spread of its per-probe values over
        ``sqrt(n_probes)``, divided by the value; NaN with one probe).
    shrunk : bool
        Whether :func:`shrink_map` was applied.
    raw : torch.Tensor or None
        With ``shrunk``, the unbiased map it started from.
    probes : torch.Tensor or None
        ``[n_probes, h, w]``, each probe's values (``sensitivity_map(..., keep_probes=True)``).
    tau2 : float or None
        :func:`shrink_map`'s estimate of the true local variation (log units squared).
    """

    map: torch.Tensor
    n_probes: int
    radius: int | None
    blocks: tuple[int, int] | None
    n_backward: int
    n_forward: int
    rel_se: torch.Tensor | None = None
    shrunk: bool = False
    raw: torch.Tensor | None = None
    probes: torch.Tensor | None = None
    tau2: float | None = None  # shrink_map's estimate of the true local variation (log units squared)

    @classmethod
    def from_probes(cls, energies: torch.Tensor, *, n_backward: int | None = None) -> "SensitivityMap":
        """The whole-image map (mean and relative standard error) from per-probe values.

        Parameters
        ----------
        energies : torch.Tensor
            ``[K, h, w]`` per-probe values (e.g. a subset of the ``probes`` kept by
            ``sensitivity_map(..., keep_probes=True)``).
        n_backward : int, keyword-only
            The backward passes to record (default ``K``).

        Returns
        -------
        SensitivityMap

        Examples
        --------
        >>> m = SensitivityMap.from_probes(torch.tensor([[[1.0]], [[3.0]]]))
        >>> m.map.item(), round(m.rel_se.item(), 4)  # mean 2, sample std sqrt(2), over sqrt(2), over 2
        (2.0, 0.5)
        """
        e = energies.double()
        k = e.shape[0]
        mean = e.mean(0)
        rel_se = _rel_se(mean, e.pow(2).mean(0), k)
        return cls(map=mean.float(), n_probes=k, radius=None, blocks=None,
                   n_backward=k if n_backward is None else n_backward, n_forward=1, rel_se=rel_se.float())


def _decode_with_graph(vae, zz: torch.Tensor) -> torch.Tensor:
    """``vae.decode(zz)`` with its autograd graph, or :class:`NotDifferentiableError` saying why there is none."""
    try:
        out = vae.decode(zz, grad=True)
    except RuntimeError as exc:  # e.g. an in-place write into the leaf latent
        raise NotDifferentiableError(_autograd_reason(exc)) from None
    if not out.requires_grad:
        raise NotDifferentiableError("its output is cut off from the latent's graph (it runs under no_grad, "
                                     "detaches or casts to integers)")
    return out


def _block_masks(cells, out: torch.Tensor, factor: int, radius, est: torch.Tensor) -> list:
    """Each block's far-field mask of the output (``[None]`` for the whole image); a block with an empty far field
    is warned about and its cells of ``est`` set to NaN."""
    if radius is None:
        return [None]
    h, w = est.shape
    masks = [far_mask(Block(rs, cs), tuple(out.shape[-2:]), factor, radius).to(out.device) for rs, cs in cells]
    for b, m in enumerate(masks):
        if not bool(m.any()):
            (r0, r1), (c0, c1) = cells[b]
            warnings.warn(f"radius={radius}: the block rows {r0}..{r1 - 1}, columns {c0}..{c1 - 1} has an "
                          f"empty far field on this {h}x{w} grid; its cells are NaN", RuntimeWarning, stacklevel=3)
            est[r0:r1, c0:c1] = float("nan")
    return masks


def _vjp(out: torch.Tensor, zz: torch.Tensor, v: torch.Tensor, *, retain: bool, first: bool) -> torch.Tensor:
    """``v^T J`` through the graph of ``out``; the first product is checked to be finite and not all zero."""
    try:
        (g,) = torch.autograd.grad(out, zz, v, retain_graph=retain, allow_unused=True)
    except RuntimeError as exc:
        raise NotDifferentiableError(_autograd_reason(exc)) from None
    if first and (g is None or not bool(g.any()) or not bool(torch.isfinite(g).all())):
        raise NotDifferentiableError(
            "its gradient with respect to the latent is " + ("not finite" if g is not None and bool(
                g.any()) else "zero everywhere (rounding, quantisation or integer ops)"))
    return g


def _probe_blocks(vae, z, cells, radius, n_probes: int, gen, est, est_sq, kept) -> int:
    """The probes of :func:`sensitivity_map`: one decode with its graph, then per block ``n_probes`` backward passes
    of seeded Gaussian images masked to the block's far field, accumulated into ``est`` and ``est_sq`` (and each
    probe's map into ``kept`` unless it is ``None``); returns the number of backward passes."""
    zz = z.clone().requires_grad_(True)
    out, n_backward = None, 0
    with _frozen_parameters(vae.model):
        try:
            out = _decode_with_graph(vae, zz)
            masks = _block_masks(cells, out, vae.factor, radius, est)
            work = [(b, k) for b in range(len(cells)) if masks[b] is None or bool(masks[b].any())
                    for k in range(n_probes)]
            for j, (b, _) in enumerate(work):
                v = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
                if masks[b] is not None:
                    v = v * masks[b]
                g = _vjp(out, zz, v, retain=j < len(work) - 1, first=j == 0)
                n_backward += 1
                (r0, r1), (c0, c1) = cells[b]
                energy = g[0].detach().double().pow(2).sum(0).cpu()
                est[r0:r1, c0:c1] += energy[r0:r1, c0:c1] / n_probes
                est_sq[r0:r1, c0:c1] += energy[r0:r1, c0:c1] ** 2 / n_probes
                if kept is not None:
                    kept.append(energy.float())
        finally:
            del out  # releases the graph if a backward pass raised before the last one
    return n_backward


def sensitivity_map(vae, z: torch.Tensor, *, n_probes: int = 8, radius: int | None = None,
                    blocks: int | tuple[int, int] = (2, 2), seed: int = 0,
                    keep_probes: bool = False) -> SensitivityMap:
    """Randomised estimate of ``S_p`` (or of a far-field sensitivity) for all positions of latent ``z`` at once.

    One decode keeps the autograd graph; then for each of ``n_probes`` Gaussian images ``v`` (seeded) one backward
    pass gives ``g = J^T v``. Because ``E[g_{p,ch}^2] = ||J e_{p,ch}||^2``, the mean over probes of
    ``sum_ch g_{p,ch}^2`` is an unbiased estimate of ``S_p`` for every ``p`` simultaneously; its relative standard
    error falls like ``1 / sqrt(n_probes)`` (at most ``sqrt(2 / n_probes)``), and the cost does not depend on the
    number of positions.

    With ``radius``: the blocked far-field estimate of the module docstring (section "Far fields by blocks":
    biased low as an estimate of ``F_p``, ``n_probes x n_blocks`` backward passes, NaN for a block with an empty
    far field).

    Parameters
    ----------
    vae, z
        As in the module docstring.
    n_probes : int, keyword-only
        Gaussian probes per block (at least 1).
    radius : int, keyword-only
        Estimate far-field sensitivities beyond ``radius`` cells (Chebyshev); ``None``: the whole image.
    blocks : int or (int, int), keyword-only
        With ``radius``, the ``(rows, cols)`` of blocks the grid is cut into.
    seed : int, keyword-only
        Seed of the probes.
    keep_probes : bool, keyword-only
        Whole-image map only: also return each probe's values, ``probes`` ``[n_probes, h, w]``, for resampling
        studies (:meth:`SensitivityMap.from_probes`).

    Returns
    -------
    SensitivityMap

    Raises
    ------
    NotDifferentiableError
        When autograd cannot go through the decoder or the gradient is zero or not finite.

    Examples
    --------
    >>> from vaeprobe.models.loading import load_vae
    >>> vae = load_vae("builtin:tiny-random")
    >>> z = torch.randn(1, vae.latent_channels, 4, 4, generator=torch.Generator().manual_seed(0))  # 32x32 px
    >>> est = sensitivity_map(vae, z, n_probes=4)
    >>> tuple(est.map.shape), est.n_forward, est.n_backward
    ((4, 4), 1, 4)
    >>> bool((est.map > 0).all())
    True
    >>> sensitivity_map(vae, z, n_probes=2, radius=0, blocks=(2, 2)).n_backward  # 2 probes x 4 blocks
    8
    """
    n_probes = int(n_probes)
    if n_probes < 1:
        raise ValueError(f"n_probes must be at least 1; got {n_probes}")
    z = _latent(vae, z)
    _, _, h, w = z.shape
    gen = torch.Generator().manual_seed(int(seed))
    est = torch.zeros(h, w, dtype=torch.float64)
    est_sq = torch.zeros(h, w, dtype=torch.float64)  # mean over probes of the squared per-probe value
    kept: list[torch.Tensor] = []
    if keep_probes and radius is not None:
        raise ValueError("keep_probes is for the whole-image map (radius=None)")

    if radius is None:
        grid, cells = None, [((0, h), (0, w))]
    else:
        grid = _blocks(blocks, h, w)
        cells = [(rs, cs) for rs in _split(h, grid[0]) for cs in _split(w, grid[1])]
    n_backward = _probe_blocks(vae, z, cells, radius, n_probes, gen, est, est_sq, kept if keep_probes else None)
    rel_se = _rel_se(est, est_sq, n_probes)
    return SensitivityMap(map=est.float(), n_probes=n_probes, radius=radius, blocks=grid,
                          n_backward=n_backward, n_forward=1, rel_se=rel_se.float(),
                          probes=torch.stack(kept) if kept else None)


def shrink_map(est: SensitivityMap, *, size: int = 3, limit: float = 1.0) -> SensitivityMap:
    """Shrink a noisy sensitivity map towards each cell's neighbours (limited-translation empirical Bayes).

    Work in logs: ``l_p = log S_p`` has standard error ``s_p`` (``est.rel_se``); ``n_p`` is the mean log of the
    other cells of the ``size x size`` window around ``p`` (those inside the grid). The spread of ``l_p - n_p``
    beyond the noise estimates the true local variation, robustly so that one huge cell (a spot) and its
    neighbours do not inflate it: ``tau^2 = (1.4826 MAD(l - n))^2 - median(s^2) (1 + 1/m)`` (``m`` neighbours;
    kept in ``tau2``); each cell moves towards ``n_p`` by the posterior weight ``s_p^2 / (tau^2 + s_p^2)`` of the
    prior, but by at most ``limit`` standard errors (Efron and Morris's limited translation), so a real isolated
    peak such as a spot keeps its rank while noise-level wiggles are smoothed. Needs ``n_probes >= 2`` and a map
    without NaN (the whole-image map, not a far-field one). Against exact Jacobian norms at 32 probes
    (docs/scan.md): on the SD-sized model and photo its constants were chosen on, Spearman rho 0.886 -> 0.927 (a
    plain 3x3 box average of log S does as well there); out of sample on taef2, 0.980 -> 0.981, where the box
    average falls to 0.803, and on the trained mini, 0.58 -> 0.72 (box 0.70).

    Parameters
    ----------
    est : SensitivityMap
        A whole-image map from at least 2 probes.
    size : int, keyword-only
        The odd side of the neighbour window (at least 3).
    limit : float, keyword-only
        The most a cell moves, in standard errors.

    Returns
    -------
    SensitivityMap
        ``shrunk`` True, ``raw`` the input map, ``tau2`` the estimated local variation.

    Examples
    --------
    >>> from vaeprobe.models.loading import load_vae
    >>> vae = load_vae("builtin:tiny-random")
    >>> z = torch.randn(1, vae.latent_channels, 4, 4, generator=torch.Generator().manual_seed(0))
    >>> raw = sensitivity_map(vae, z, n_probes=4)
    >>> out = shrink_map(raw)
    >>> out.shrunk, bool(((out.map.log() - raw.map.log()).abs() <= raw.rel_se + 1e-6).all())
    (True, True)
    """
    import torch.nn.functional as F

    if est.rel_se is None or est.n_probes < 2:
        raise ValueError("shrink_map needs a map from at least 2 probes (its per-cell standard error)")
    if est.radius is not None or not bool(torch.isfinite(est.map).all()) or not bool((est.map > 0).all()):
        raise ValueError("shrink_map works on a whole-image map with positive finite values (not a far-field map)")
    size = int(size)
    if size < 3 or size % 2 == 0:
        raise ValueError(f"size must be an odd window of at least 3; got {size}")
    log = est.map.double().log()[None, None]
    se2 = (est.rel_se.double() ** 2).nan_to_num(0.0)
    kernel = torch.ones(1, 1, size, size, dtype=torch.float64)
    pad = size // 2
    total = F.conv2d(F.pad(log, (pad,) * 4), kernel)[0, 0] - log[0, 0]
    count = F.conv2d(F.pad(torch.ones_like(log), (pad,) * 4), kernel)[0, 0] - 1
    neigh = total / count
    diff = log[0, 0] - neigh
    m = float(count.mean())
    tau2 = robust_tau2(diff, se2, m)
    weight = se2 / (tau2 + se2)
    bound = limit * se2.sqrt()
    shift = torch.maximum(torch.minimum(weight * diff, bound), -bound)
    out = (log[0, 0] - shift).exp()
    return SensitivityMap(map=out.float(), n_probes=est.n_probes, radius=None, blocks=None, n_backward=est.n_backward,
                          n_forward=est.n_forward, rel_se=est.rel_se, shrunk=True, raw=est.map, tau2=tau2)


def robust_tau2(diff: torch.Tensor, se2: torch.Tensor, m: float) -> float:
    """True local variation of a log map from its neighbour differences and their noise.

    The squared MAD-based scale of ``diff`` (1.4826 MAD, the standard deviation for normal data) minus the median
    noise ``se2 (1 + 1/m)``; at least 1e-12. A few outlying cells move a median, not a mean.

    Parameters
    ----------
    diff : torch.Tensor
        Each cell's log value minus its neighbours' mean.
    se2 : torch.Tensor
        The cells' squared standard errors (log units).
    m : float
        Neighbours per cell (the noise of the neighbours' mean is ``se2 / m``).

    Returns
    -------
    float

    Examples
    --------
    >>> d = torch.tensor([0.1, -0.1, 0.2, -0.2, 0.0, 50.0])   # one huge cell
    >>> round(robust_tau2(d, torch.zeros(6), 8.0), 4), round(float((d ** 2).mean()), 1)
    (0.022, 416.7)
    """
    d = diff.flatten().double()
    scale = 1.4826 * float((d - d.median()).abs().median())
    return max(scale ** 2 - float(se2.double().median()) * (1 + 1 / m), 1e-12)


# -- comparison ------------------------------------------------------------------------------------------------
def _flat(values) -> np.ndarray:
    if isinstance(values, SensitivityMap):
        values = values.map
    if isinstance(values, torch.Tensor):
        values = values.detach().double().cpu().numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


def agreement(estimate, exact, *, k: int = 10) -> dict:
    """How well an estimate ranks positions like the exact values.

    Positions where either is not finite are left out.

    Parameters
    ----------
    estimate, exact : SensitivityMap, torch.Tensor or array_like
        The same number of entries each, in the same (row-major) order.
    k : int, keyword-only
        The size of the top sets compared.

    Returns
    -------
    dict
        ``spearman`` (rank correlation, ``scipy.stats.spearmanr``; NaN if either side is constant or fewer than 2
        positions remain), ``topk`` (``|top-k(estimate) & top-k(exact)| / k``), ``k`` (clipped to the number of
        positions) and ``n``.

    Raises
    ------
    ValueError
        When the sizes differ.

    Examples
    --------
    >>> res = agreement(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([10.0, 30.0, 20.0, 40.0]), k=2)
    >>> round(res["spearman"], 6), res["topk"], res["k"], res["n"]
    (0.8, 0.5, 2, 4)
    """
    from scipy.stats import spearmanr

    a, b = _flat(estimate), _flat(exact)
    if a.shape != b.shape:
        raise ValueError(f"estimate has {a.size} values, exact {b.size}")
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    n = int(a.size)
    k = max(0, min(int(k), n))
    if n >= 2 and np.ptp(a) > 0 and np.ptp(b) > 0:
        rho = float(spearmanr(a, b)[0])
    else:
        rho = float("nan")
    if k:
        top_a = set(np.argsort(-a, kind="stable")[:k].tolist())
        top_b = set(np.argsort(-b, kind="stable")[:k].tolist())
        topk = len(top_a & top_b) / k
    else:
        topk = float("nan")
    return {"spearman": rho, "topk": topk, "k": k, "n": n}
