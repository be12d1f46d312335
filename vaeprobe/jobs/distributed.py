"""Sharded runs on ``torch.distributed``: the rank a process has, the work units it owns, and the few collectives
the job runner needs (a barrier, gathering what failed, sharing the summary).

Launched with ``torchrun`` (or ``accelerate launch``, or ``srun`` with the rendezvous variables set), every process
sees ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`run_job <vaeprobe.jobs.runner.run_job>` then gives
unit ``i`` (image, or prompt and seed) to rank ``i % WORLD_SIZE``, every rank writes its parts into the shared run
directory, and rank 0 writes the summary and the report once all ranks are through. Without those variables
(or with ``WORLD_SIZE=1``) nothing here starts a process group and a run is the plain one-process run.

Backends: NCCL when the job runs on CUDA (one GPU per rank, ``cuda:LOCAL_RANK``), gloo on CPU. The runner's own
collectives exchange only small Python objects, on a gloo group in both cases. Seeds come from the work unit,
never from the rank, so the tables do not depend on the world size.

>>> ctx = Context()          # no launcher variables: one process
>>> ctx.rank, ctx.world, ctx.active, ctx.owns(3)
(0, 1, False, True)
>>> Context(rank=1, world=2).owns(3), Context(rank=1, world=2).owns(4)
(True, False)
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Any

from vaeprobe.errors import VaeprobeError

DEFAULT_TIMEOUT_H = 72.0
"""Hours a rank waits at the runner's barrier for the slowest rank (``VAEPROBE_DIST_TIMEOUT_H`` overrides)."""


class DistributedError(VaeprobeError):
    """A launcher environment that cannot be used (the message says what to set)."""


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"{name}={raw!r} is not an integer; unset it or launch with torchrun") from None


def env_world() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the launcher's variables (``(0, 1, 0)`` without them).

    Returns
    -------
    tuple of int

    Raises
    ------
    DistributedError
        When the variables are not integers or the rank is outside the world.

    Examples
    --------
    >>> import os
    >>> "WORLD_SIZE" in os.environ or env_world() == (0, 1, 0)
    True
    """
    world = _env_int("WORLD_SIZE") or 1
    rank = _env_int("RANK") or 0
    local = _env_int("LOCAL_RANK")
    if not 0 <= rank < world:
        raise DistributedError(f"RANK={rank} is outside WORLD_SIZE={world}; launch with torchrun or set both")
    return rank, world, rank if local is None else local


@dataclass
class Context:
    """The process's place in a sharded run (keyword-only; :func:`setup` makes the live one).

    Attributes
    ----------
    rank, world, local_rank : int
        As the launcher set them.
    active : bool
        Whether a process group is used (``world > 1``).
    group : object
        The gloo group of the runner's collectives (``None`` when not active).
    owned : bool
        Whether :func:`setup` started the process group (and :meth:`close` ends it).
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    active: bool = False
    group: Any = field(default=None, repr=False)
    owned: bool = False

    @property
    def is_main(self) -> bool:
        """True on rank 0, which writes the summary, ``run.json`` and reports."""
        return self.rank == 0

    def owns(self, index: int) -> bool:
        """Whether unit number ``index`` (0-based, in the job's order) is this rank's."""
        return index % self.world == self.rank

    def barrier(self) -> None:
        """Wait until every rank gets here (no-op in one process)."""
        if self.active:
            import torch.distributed as dist

            dist.barrier(group=self.group)

    def gather(self, obj: Any) -> list:
        """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in one process)."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def share(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (``obj`` itself in one process)."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def close(self) -> None:
        """End the process group if :func:`setup` started it."""
        if self.active and self.owned:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.active, self.owned, self.group = False, False, None


_CONTEXT: Context | None = None


def timeout() -> datetime.timedelta:
    """How long collectives wait (``VAEPROBE_DIST_TIMEOUT_H`` hours, default :data:`DEFAULT_TIMEOUT_H`)."""
    raw = os.environ.get("VAEPROBE_DIST_TIMEOUT_H")
    try:
        hours = float(raw) if raw else DEFAULT_TIMEOUT_H
    except ValueError:
        raise DistributedError(f"VAEPROBE_DIST_TIMEOUT_H={raw!r} is not a number of hours") from None
    return datetime.timedelta(hours=hours)


def setup(device: Any = None) -> Context:
    """The process's :class:`Context`, starting the process group on first use under a launcher.

    A process group that the caller (or ``accelerate``) already started is used as it is. Otherwise, with
    ``WORLD_SIZE > 1``, one is started from the launcher's environment (``MASTER_ADDR``, ``MASTER_PORT``):
    NCCL when ``device`` is CUDA, else gloo. The runner's collectives use a gloo group either way.

    Parameters
    ----------
    device : str or torch.device, optional
        Where the job runs (picks the backend).

    Returns
    -------
    Context

    Raises
    ------
    DistributedError
        When the launcher's variables are incomplete or inconsistent.

    Examples
    --------
    >>> setup().world >= 1
    True
    """
    global _CONTEXT
    if _CONTEXT is not None and (_CONTEXT.active or not _launched()):
        return _CONTEXT
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = env_world()[2] if world > 1 else 0
        group = _control_group(dist) if world > 1 else None
        _CONTEXT = Context(rank=rank, world=world, local_rank=local, active=world > 1, group=group)
        return _CONTEXT
    rank, world, local = env_world()
    if world == 1:
        _CONTEXT = Context()
        return _CONTEXT
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise DistributedError(f"WORLD_SIZE={world} but {' and '.join(missing)} not set; launch with torchrun, "
                               f"accelerate launch, or set the rendezvous variables (docs: README, many GPUs)")
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed; run with one process")
    backend = "nccl" if _is_cuda(device) else "gloo"
    if backend == "nccl":
        import torch

        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend, timeout=timeout())
    _CONTEXT = Context(rank=rank, world=world, local_rank=local, active=True, group=_control_group(dist),
                       owned=True)
    return _CONTEXT


def _launched() -> bool:
    try:
        return env_world()[1] > 1
    except DistributedError:
        return True


def _control_group(dist):
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    return dist.new_group(backend="gloo", timeout=timeout())


def _is_cuda(device: Any) -> bool:
    return device is not None and str(device).startswith("cuda")


def rank_device(device: Any) -> Any:
    """``device`` for this rank: a bare ``cuda`` becomes ``cuda:LOCAL_RANK`` under a launcher.

    Parameters
    ----------
    device : str, torch.device or None

    Returns
    -------
    The device to use (unchanged outside a launcher, or when it names an index).

    Examples
    --------
    >>> rank_device("cpu"), rank_device(None)
    ('cpu', None)
    """
    if device is None or str(device) != "cuda":
        return device
    rank, world, local = env_world()
    return f"cuda:{local}" if world > 1 else device


def close() -> None:
    """End the process group this module started (called at the end of the CLI)."""
    global _CONTEXT
    if _CONTEXT is not None:
        _CONTEXT.close()
        _CONTEXT = None
