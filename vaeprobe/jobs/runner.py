"""The job runner: run directories (a config, per-item part files written atomically, resume after a kill) and
:func:`run_job`, the one loop every job goes through.

Every job (``vaeprobe latents``, ``scan``, ``mechanism``, ``compare``, ``pipeline``) writes one part per finished
item (image, or prompt and seed) under ``parts/`` with an atomic rename, so a killed run leaves only whole parts
behind. Rerun with ``resume=True`` and the finished items are skipped; the final tables are concatenated from the
parts, streaming, so memory stays flat in the number of items. The files of a run directory, those every job
writes and those of each job: docs/outputs.md.

>>> import tempfile, pandas as pd
>>> run = RunDir(tempfile.mkdtemp(), {"job": "demo"})
>>> run.write_part("000000", pd.DataFrame({"x": [1, 2]}), {"name": "a"})
>>> run.is_done("000000"), run.is_done("000001")
(True, False)
>>> run.concat("x.parquet").x.tolist()
[1, 2]
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

import pandas as pd

from vaeprobe._io import atomic_path, write_text_atomic
from vaeprobe.errors import VaeprobeError, one_line


COMMAND: list[str] | None = None
"""The command line of the running ``vaeprobe`` CLI invocation (set by :mod:`vaeprobe.cli`), for ``run.json``."""


def run_info(seconds: float) -> dict:
    """What produced a run: command, package versions, host facts, finish time and duration (``run.json``).

    Parameters
    ----------
    seconds : float
        The run's duration.

    Returns
    -------
    dict
        ``command`` (the CLI command line, or ``python API (...)``), ``versions`` (of vaeprobe, torch,
        diffusers, numpy, pandas, lpips; ``None`` when not installed), ``python``, ``platform``, ``finished``
        (UTC, ISO 8601) and ``seconds`` (rounded to 0.01).

    Examples
    --------
    >>> info = run_info(1.234)
    >>> info["seconds"], sorted(info)
    (1.23, ['command', 'finished', 'platform', 'python', 'seconds', 'versions'])
    """
    import datetime
    import platform
    import shlex
    from importlib import metadata

    versions = {}
    for pkg in ("vaeprobe", "torch", "diffusers", "numpy", "pandas", "lpips"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    command = shlex.join(COMMAND) if COMMAND else f"python API ({shlex.join(sys.argv[:1])})"
    return {"command": command, "versions": versions, "python": platform.python_version(),
            "platform": platform.platform(), "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"), "seconds": round(seconds, 2)}


class RunDirError(VaeprobeError):
    """A run directory that cannot be used as asked, or a run in which every item failed (the message says what
    to do)."""


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


class RunDir:
    """A run directory holding ``config.json``, ``parts/KEY.parquet`` + ``parts/KEY.json`` and final tables.

    A directory that holds a run with a different config, or any parts when ``resume`` is false, is refused
    unless ``overwrite`` is set (then it is cleared first). Creating it writes ``config.json``.

    Parameters
    ----------
    path : str or Path
        The directory (created when missing).
    config : dict
        What decides the results (JSON-serialisable; other values are written as ``str``).
    resume : bool, keyword-only
        Accept a directory that already holds finished parts of the same config.
    overwrite : bool, keyword-only
        Clear the parts and config of an existing run first.

    Attributes
    ----------
    path : Path
        The directory.
    config : dict
        The config.
    failed : list of dict
        The items that failed in this process (``key``, ``image``, ``error``; see :meth:`guard`).

    Raises
    ------
    RunDirError
        When the directory holds a run with other settings, or finished parts without ``resume``.

    Examples
    --------
    >>> import tempfile
    >>> path = tempfile.mkdtemp()
    >>> _ = RunDir(path, {"job": "demo", "size": 64})
    >>> try:
    ...     RunDir(path, {"job": "demo", "size": 128})
    ... except RunDirError as exc:
    ...     print("other settings (size)" in str(exc))
    True
    >>> RunDir(path, {"job": "demo", "size": 128}, overwrite=True).config["size"]
    128
    """

    def __init__(self, path: str | Path, config: dict, *, resume: bool = True, overwrite: bool = False):
        self.path = Path(path)
        self.config = config
        cfg_file = self.path / "config.json"
        if overwrite and self.path.exists():
            shutil.rmtree(self.parts_dir, ignore_errors=True)
            cfg_file.unlink(missing_ok=True)
        if cfg_file.exists():
            try:
                old = json.loads(cfg_file.read_text())
            except json.JSONDecodeError:
                old = None
            if old is not None and _canonical(old) != _canonical(json.loads(_canonical(config))):
                diff = sorted(k for k in set(old) | set(config) if _canonical(old.get(k)) != _canonical(config.get(k)))
                raise RunDirError(f"{self.path} holds a run with other settings ({', '.join(diff)}); "
                                  f"use another --out, or --overwrite to discard it")
            if not resume and any(self.parts_dir.glob("*.json")):
                raise RunDirError(f"{self.path} already holds finished items; pass --resume to continue the run "
                                  f"or --overwrite to start again")
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(cfg_file, json.dumps(config, indent=1, sort_keys=True, default=str))
        self.failed: list[dict] = []
        self._notes: set[str] = set()

    def say(self, message: str, *, once: bool = False) -> None:
        """Print one line to stderr without breaking the progress bar.

        Parameters
        ----------
        message : str
            The line.
        once : bool, keyword-only
            Print it only the first time this run says it.
        """
        if once and message in self._notes:
            return
        self._notes.add(message)
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)

    @contextlib.contextmanager
    def guard(self, key: str, name: str) -> Iterator[None]:
        """Run one item's work; if it raises, record the error and go on.

        The error is printed in one line, recorded in ``failed`` (key, image, error) and the run goes on with the
        next item; no part is written for it, so ``--resume`` retries it. ``KeyboardInterrupt`` still stops the
        run.

        Parameters
        ----------
        key : str
            The item's key.
        name : str
            Its name (the image's), for the message.

        Examples
        --------
        >>> import tempfile
        >>> run = RunDir(tempfile.mkdtemp(), {"job": "demo"})
        >>> with run.guard("000000", "a.png"):
        ...     raise RuntimeError("out of memory")
        >>> run.failed
        [{'key': '000000', 'image': 'a.png', 'error': 'RuntimeError: out of memory'}]
        """
        try:
            yield
        except Exception as exc:  # one bad item must not lose the run (KeyboardInterrupt still stops it)
            error = one_line(exc)
            self.failed.append({"key": key, "image": name, "error": error})
            self.say(f"vaeprobe: {name}: failed ({error}); going on with the next image")

    def finished(self, keys: list[str]) -> list[str]:
        """The keys of ``keys`` whose part exists (drops items that failed).

        Parameters
        ----------
        keys : list of str
            The items of the run.

        Returns
        -------
        list of str

        Raises
        ------
        RunDirError
            When every item failed.
        """
        done = [k for k in keys if self.is_done(k)]
        if keys and not done and self.failed:
            raise RunDirError(f"every image failed ({len(self.failed)}); the first, {self.failed[0]['image']}: "
                              f"{self.failed[0]['error']}")
        return done

    @property
    def parts_dir(self) -> Path:
        """``path / "parts"``, where the per-item files are."""
        return self.path / "parts"

    def is_done(self, key: str) -> bool:
        """True when item ``key`` finished (its metadata is written last, so it marks completion)."""
        return (self.parts_dir / f"{key}.json").exists()

    def meta(self, key: str) -> dict:
        """The metadata dict that item ``key``'s part was written with."""
        return json.loads((self.parts_dir / f"{key}.json").read_text())

    def write_part(self, key: str, table: pd.DataFrame | None, meta: dict, *,
                   extra: dict[str, pd.DataFrame] | None = None) -> None:
        """Write item ``key``: its table, its extra tables, then its metadata (which marks it done), each atomically.

        Parameters
        ----------
        key : str
            The item's key.
        table : pandas.DataFrame or None
            Its rows of the job's main table (``KEY.parquet``), or ``None`` for none.
        meta : dict
            Its metadata (``KEY.json``; numpy values and paths are converted).
        extra : dict of str to pandas.DataFrame, keyword-only
            Further tables, written as ``KEY.NAME.parquet`` and read back with ``concat(..., part=NAME)``.
        """
        if table is not None:
            with atomic_path(self.parts_dir / f"{key}.parquet") as tmp:
                _to_parquet(table, tmp)
        for name, df in (extra or {}).items():
            with atomic_path(self.parts_dir / f"{key}.{name}.parquet") as tmp:
                _to_parquet(df, tmp)
        write_text_atomic(self.parts_dir / f"{key}.json", json.dumps(meta, default=_json_default))

    def keys(self) -> list[str]:
        """Finished items, in key order."""
        return sorted(p.stem for p in self.parts_dir.glob("*.json"))

    def metas(self) -> Iterator[tuple[str, dict]]:
        """``(key, metadata)`` of every finished item, in key order."""
        for key in self.keys():
            yield key, self.meta(key)

    def concat(self, name: str, keys: list[str] | None = None, *, part: str | None = None) -> pd.DataFrame | None:
        """Concatenate the parts' tables into the final table ``name``, streamed (one part in memory at a time).

        Parameters
        ----------
        name : str
            The file to write under ``path`` (e.g. ``scan.parquet``).
        keys : list of str, optional
            The items to take, in this order (default: every finished item, :meth:`keys`).
        part : str, keyword-only
            Take each item's ``extra`` table of this name instead of its main table.

        Returns
        -------
        pandas.DataFrame or None
            The table read back when it is small (< 2 million rows), else ``None``.
        """
        import pyarrow.parquet as pq

        keys = self.keys() if keys is None else keys
        suffix = f".{part}.parquet" if part else ".parquet"
        files = [self.parts_dir / f"{k}{suffix}" for k in keys if (self.parts_dir / f"{k}{suffix}").exists()]
        target = self.path / name
        with atomic_path(target) as tmp:
            writer = None
            schema = None
            for f in files:
                table = pq.read_table(f)
                if writer is None:
                    schema = table.schema
                    writer = pq.ParquetWriter(tmp, schema)
                writer.write_table(table.cast(schema) if table.schema != schema else table)
            if writer is None:
                pd.DataFrame().to_parquet(tmp)
            else:
                writer.close()
        rows = pq.ParquetFile(target).metadata.num_rows if files else 0
        return pd.read_parquet(target) if rows < 2_000_000 else None

    def iterate(self, units: Iterable[tuple[str, str, Any]], desc: str, *, unit: str = "img",
                progress: bool = True) -> Iterator[tuple[str, str, Any, bool]]:
        """Go through ``units`` with a progress bar (``self.bar`` while it runs).

        Parameters
        ----------
        units : iterable of (str, str, object)
            ``(key, name, item)`` triples.
        desc : str
            The bar's label.
        unit : str, keyword-only
            The bar's unit.
        progress : bool, keyword-only
            Show the bar.

        Yields
        ------
        (str, str, object, bool)
            ``(key, name, item, done)``; ``done`` is true when a finished part of the same key and name exists, so
            the caller skips it.
        """
        from tqdm import tqdm

        self.bar = tqdm(desc=desc, unit=unit, file=sys.stderr, disable=not progress)
        try:
            for key, name, item in units:
                yield key, name, item, self.is_done(key) and self.meta(key).get("image") == name
                self.bar.update(1)
        finally:
            self.bar.close()

    def finish(self, seconds: float) -> Path:
        """Write ``run.json`` (:func:`run_info` of ``seconds``) once the job's final tables are written; returns its
        path."""
        return self.write_json("run.json", run_info(seconds))

    def write_table(self, name: str, table: pd.DataFrame) -> Path:
        """Write ``table`` to ``path / name`` as parquet, atomically; returns the path."""
        with atomic_path(self.path / name) as tmp:
            _to_parquet(table, tmp)
        return self.path / name

    def write_json(self, name: str, obj: Any) -> Path:
        """Write ``obj`` to ``path / name`` as indented JSON, atomically; returns the path."""
        write_text_atomic(self.path / name, json.dumps(obj, indent=1, default=_json_default))
        return self.path / name


def _to_parquet(table: pd.DataFrame, path) -> None:
    """Write ``table`` without its ``attrs``: pandas would store them in the file's metadata, and every operation
    on the table read back would deep-copy them (the verdicts' attrs made the report's loops over a scan table take
    seconds); what a table's attrs held goes to the part's JSON metadata instead."""
    attrs, table.attrs = table.attrs, {}
    try:
        table.to_parquet(path, index=False)
    finally:
        table.attrs = attrs


def _json_default(obj):
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# -- the job runner ------------------------------------------------------------------------------------------------

POSITIONS = re.compile(r"all|grid:\d+|top:\d+|list:[\d,;\s]+")


def coerce_vae(vae, *, device=None, dtype=None):
    """``vae`` as a :class:`~vaeprobe.models.adapter.VAE` adapter.

    Parameters
    ----------
    vae : VAE, str or torch.nn.Module
        An adapter (returned as it is when neither ``device`` nor ``dtype`` is given) or anything
        :func:`~vaeprobe.models.loading.load_vae` loads.
    device, dtype : keyword-only
        Where and in what precision it runs (default: as loaded). Under a launcher a bare ``cuda`` is
        ``cuda:LOCAL_RANK`` (:func:`~vaeprobe.jobs.distributed.rank_device`).

    Returns
    -------
    vaeprobe.models.adapter.VAE

    Examples
    --------
    >>> vae = coerce_vae("builtin:tiny-random")
    >>> coerce_vae(vae) is vae, vae.factor
    (True, 8)
    """
    from vaeprobe.jobs.distributed import rank_device
    from vaeprobe.models.loading import load_vae

    if hasattr(vae, "encode") and hasattr(vae, "factor") and device is None and dtype is None:
        return vae
    return load_vae(vae, device=rank_device(device), dtype=dtype)


def vae_config(vae) -> dict:
    """The VAE's description for ``config.json`` (without the device, which does not decide the results).

    Parameters
    ----------
    vae : vaeprobe.models.adapter.VAE
        The model.

    Returns
    -------
    dict
        ``vae.info()`` less ``device``.

    Examples
    --------
    >>> cfg = vae_config(coerce_vae("builtin:tiny-random"))
    >>> cfg["spec"], cfg["factor"], "device" in cfg
    ('builtin:tiny-random', 8, False)
    """
    info = vae.info()
    info.pop("device", None)
    return info


def check_positions(positions, error: type[Exception]) -> None:
    """Fail fast on a positions spec that :func:`~vaeprobe.probes.scan.select_sites` would refuse.

    Parameters
    ----------
    positions : str
        ``all``, ``grid:S``, ``top:K`` or ``list:R,C;R,C``.
    error : type of Exception
        What to raise (the job's error class).

    Examples
    --------
    >>> check_positions("grid:4", ValueError)
    >>> check_positions("corners", ValueError)
    Traceback (most recent call last):
    ...
    ValueError: unknown positions 'corners'; use all, grid:S, top:K or list:R,C;R,C
    """
    if not (isinstance(positions, str) and POSITIONS.fullmatch(positions.strip().lower())):
        raise error(f"unknown positions {positions!r}; use all, grid:S, top:K or list:R,C;R,C")


def image_units(images, *, factor: int, fit: str, size: int | None,
                skipped: list) -> Iterator[tuple[str, str, Any]]:
    """``(key, name, image)`` for every readable image of ``images`` (keys ``000000``, ``000001``, ...).

    Parameters
    ----------
    images : str, path or sequence
        What :func:`~vaeprobe.data.images.iter_images` reads.
    factor : int, keyword-only
        Image sides become multiples of this.
    fit : str, keyword-only
        How (``iter_images``' ``fit``).
    size : int or None, keyword-only
        Resize to this many pixels (``None``: as they are).
    skipped : list, keyword-only
        Unreadable inputs are appended to it.

    Yields
    ------
    (str, str, vaeprobe.data.images.LoadedImage)

    Examples
    --------
    >>> skipped = []
    >>> units = list(image_units("builtin:photos-heldout", factor=8, fit="crop", size=32, skipped=skipped))
    >>> units[0][0], units[0][2].array.shape, skipped
    ('000000', (32, 32, 3), [])
    """
    from vaeprobe.data.images import iter_images

    for i, img in enumerate(iter_images(images, factor=factor, fit=fit, size=size, skipped=skipped)):
        yield f"{i:06d}", img.name, img


class Job:
    """What one job adds to the runner: its settings, its per-item work and its summary.

    Subclasses set :attr:`name` and :attr:`desc` and implement :meth:`config`, :meth:`process` (one item: write
    its part with ``run.write_part``) and :meth:`summarise` (write the final tables from the finished parts and
    return the summary dict). :meth:`units` yields ``(key, name, item)``; by default the images of
    ``self.images`` at ``self.factor``, ``self.fit`` and ``self.size``. :func:`run_job` has an example.

    Attributes
    ----------
    name : str
        The job's name.
    desc : str
        The progress bar's label.
    unit : str
        The progress bar's unit.
    images, factor, fit, size :
        What the default :meth:`units` reads (:func:`image_units`).
    shard : vaeprobe.jobs.distributed.Context
        Set by :func:`run_job`: this process's rank and which units it owns (``shard.owns(i)``).
    """

    name = "job"
    desc = "job"
    unit = "img"
    images: Any = None
    factor = 1
    fit = "crop"
    size: int | None = None

    def set_options(self, spec, options: dict) -> dict:
        """Resolve ``options`` against the job's declaration ``spec`` (:class:`~vaeprobe.jobs.spec.JobSpec`: its
        defaults filled, an unknown keyword refused), keep them as ``self.options`` and as attributes; returns
        them."""
        self.options = spec.resolve(options)
        self.__dict__.update(self.options)
        return self.options

    def config(self) -> dict:
        """What decides the results (``config.json``; a resumed run must have the same)."""
        raise NotImplementedError

    def units(self, skipped: list) -> Iterator[tuple[str, str, Any]]:
        """``(key, name, item)`` for every item (the first ``limit`` when the job has one); unreadable inputs are
        appended to ``skipped``."""
        import itertools

        units = image_units(self.images, factor=self.factor, fit=self.fit, size=self.size, skipped=skipped)
        limit = getattr(self, "limit", None)
        return units if limit is None else itertools.islice(units, max(0, int(limit)))

    def process(self, run: "RunDir", key: str, item: Any) -> None:
        """Do one item's work and write its part (``run.write_part(key, ...)``)."""
        raise NotImplementedError

    def collect(self, run: "RunDir", key: str, meta: dict) -> None:
        """Called for every finished item (new or resumed), in order: running totals, the bar's postfix."""

    def summarise(self, run: "RunDir", keys: list[str]) -> dict:
        """Write the final tables from the finished parts ``keys`` and return the summary (``summary.json``)."""
        raise NotImplementedError

    def after(self, run: "RunDir", summary: dict) -> None:
        """Called once ``summary.json`` and ``run.json`` are written (a report, for instance)."""


def _process_units(ctx, job: Job, run: RunDir, units, progress: bool) -> dict:
    """Process this rank's units (finished ones skipped; each in :meth:`RunDir.guard`); returns its work record
    (``rank``, ``units`` computed, ``done_before``, busy ``seconds``)."""
    import time

    desc = job.desc if ctx.world == 1 else f"{job.desc} [rank {ctx.rank}/{ctx.world}]"
    work = {"rank": ctx.rank, "units": 0, "done_before": 0, "seconds": 0.0}
    for key, name, item, done in run.iterate(units, desc, unit=job.unit, progress=progress and ctx.is_main):
        if done:
            work["done_before"] += 1
        else:
            t0 = time.perf_counter()
            with run.guard(key, name):
                job.process(run, key, item)
            work["units"] += 1
            work["seconds"] = round(work["seconds"] + time.perf_counter() - t0, 3)
        if ctx.world == 1 and run.is_done(key):
            job.collect(run, key, run.meta(key))
    return work


def _merge_ranks(ctx, job: Job, run: RunDir, keys: list[str], work: dict) -> list | None:
    """In a sharded run, wait for every rank, gather their failures and work records, and let rank 0 collect
    every finished part; returns the work records (``None`` in a single process)."""
    if ctx.world == 1:
        return None
    ctx.barrier()  # every rank's parts are written before rank 0 reads them
    gathered = ctx.gather((run.failed, work))
    run.failed = [f for failed, _ in gathered for f in failed]
    if ctx.is_main:
        for key in keys:
            if run.is_done(key):
                job.collect(run, key, run.meta(key))
    return [w for _, w in gathered]


def _summarise(ctx, job: Job, run: RunDir, keys: list[str], skipped: list, ranks, started: float) -> dict | None:
    """On rank 0, the job's summary (with skipped inputs, failed items and, sharded, the load balance) written to
    ``summary.json`` and ``run.json`` (the run's seconds since ``started``): ``{"summary": ...}`` or
    ``{"error": ...}``; ``None`` on other ranks."""
    import time

    if not ctx.is_main:
        return None
    try:
        summary = job.summarise(run, run.finished(keys))
        summary.setdefault("skipped", [str(s) for s in skipped])
        summary.setdefault("failed", run.failed)
        if ranks is not None:  # the load balance: units each rank computed (and found done), busy seconds
            summary.setdefault("world_size", ctx.world)
            summary.setdefault("ranks", ranks)
        run.write_json("summary.json", summary)
        run.finish(time.perf_counter() - started)
        return {"summary": summary}
    except VaeprobeError as exc:
        if ctx.world == 1:
            raise
        return {"error": exc}


def run_job(job: Job, out, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> "RunDir":
    """Run ``job`` into the run directory ``out``.

    Every item runs once (finished ones skipped with ``resume``), a failing item is reported in one line and
    recorded while the run goes on, then the job's summary (plus the skipped inputs and failed items) goes to
    ``summary.json``, and ``run.json`` is written.

    Under ``torchrun`` (or any launcher that sets ``RANK`` and ``WORLD_SIZE``; :mod:`vaeprobe.jobs.distributed`),
    item ``i`` is done by rank ``i % WORLD_SIZE`` into the shared run directory; after a barrier rank 0 merges the
    parts, writes the summary, ``run.json`` and the job's report, and every rank returns the same summary. A
    resumed run may use another world size: finished items are skipped whoever finished them.

    Parameters
    ----------
    job : Job
        What to run.
    out : str or Path
        The run directory (:class:`RunDir`).
    resume : bool, keyword-only
        Skip the items a previous run of the same config finished.
    overwrite : bool, keyword-only
        Discard a previous run in ``out``.
    progress : bool, keyword-only
        Show a progress bar on stderr.

    Returns
    -------
    RunDir
        Its ``summary`` attribute holds the summary.

    Raises
    ------
    RunDirError
        When ``out`` cannot be used as asked, or every item failed.

    Examples
    --------
    >>> import tempfile, pandas as pd
    >>> class Count(Job):
    ...     name = desc = "count"
    ...     def config(self): return {"job": "count"}
    ...     def units(self, skipped): return ((f"{i:06d}", str(i), i) for i in range(3))
    ...     def process(self, run, key, item): run.write_part(key, pd.DataFrame({"x": [item]}), {"image": str(item)})
    ...     def summarise(self, run, keys): return {"total": int(run.concat("x.parquet", keys).x.sum())}
    >>> run_job(Count(), tempfile.mkdtemp(), progress=False).summary["total"]
    3
    """
    import time

    from vaeprobe.jobs import distributed

    started = time.perf_counter()
    ctx = distributed.setup(getattr(job, "device", None) or getattr(getattr(job, "vae", None), "device", None))
    run = _open_run(ctx, out, job.config(), resume=resume, overwrite=overwrite)
    job.shard = ctx  # which units are this rank's (a job that works ahead, like the pipeline's --batch, needs it)
    skipped: list = []
    keys: list[str] = []

    def owned() -> Iterator[tuple[str, str, Any]]:
        for index, unit in enumerate(job.units(skipped)):
            keys.append(unit[0])
            if ctx.owns(index):
                yield unit

    work = _process_units(ctx, job, run, owned(), progress)
    ranks = _merge_ranks(ctx, job, run, keys, work)
    outcome = _summarise(ctx, job, run, keys, skipped, ranks, started)
    outcome = ctx.share(outcome)
    if "error" in outcome:
        raise outcome["error"]
    run.summary = outcome["summary"]
    if ctx.is_main:
        job.after(run, run.summary)
    return run


def _open_run(ctx, out, config: dict, *, resume: bool, overwrite: bool) -> RunDir:
    """The run directory: rank 0 checks and prepares it (resume, overwrite), then the other ranks open it."""
    if ctx.world == 1:
        return RunDir(out, config, resume=resume, overwrite=overwrite)
    run, error = None, None
    if ctx.is_main:
        try:
            run = RunDir(out, config, resume=resume, overwrite=overwrite)
        except VaeprobeError as exc:
            error = exc
    error = ctx.share(error)
    if error is not None:
        raise error
    return run if run is not None else RunDir(out, config, resume=True)
