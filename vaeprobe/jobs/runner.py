"""Run directories: a config, per-item part files written atomically, and resume after a kill.

Every long job (``vaeprobe latents``, ``vaeprobe scan``) writes one part per finished item (image) under
``parts/`` with an atomic rename, so a killed run leaves only whole parts behind. Rerun with ``resume=True`` and
the finished items are skipped; the final tables are concatenated from the parts, streaming, so memory stays
flat in the number of items.

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
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from vaeprobe._io import atomic_path, write_text_atomic
from vaeprobe.errors import VaeprobeError, one_line


COMMAND: list[str] | None = None
"""The command line of the running ``vaeprobe`` CLI invocation (set by :mod:`vaeprobe.cli`), for ``run.json``."""


def run_info(seconds: float) -> dict:
    """What produced a run: command, package versions, host facts, finish time and duration."""
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
    pass


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


class RunDir:
    """A run directory holding ``config.json``, ``parts/KEY.parquet`` + ``parts/KEY.json`` and final tables.

    ``config`` is what decides the results; a directory that holds a run with a different config, or any parts
    when ``resume`` is false, is refused unless ``overwrite`` is set (then it is cleared first).
    """

    def __init__(self, path: str | Path, config: dict, resume: bool = True, overwrite: bool = False):
        self.path = Path(path)
        self.config = config
        cfg_file = self.path / "config.json"
        if overwrite and self.path.exists():
            for sub in ("parts",):
                shutil.rmtree(self.path / sub, ignore_errors=True)
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

    def say(self, message: str, once: bool = False) -> None:
        """Print one line to stderr without breaking the progress bar (``once``: only the first time)."""
        if once and message in self._notes:
            return
        self._notes.add(message)
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)

    @contextlib.contextmanager
    def guard(self, key: str, name: str) -> Iterator[None]:
        """Run one item's work: if it raises, the error is printed in one line, recorded in ``failed`` (key, image,
        error) and the run goes on with the next item; no part is written for it, so ``--resume`` retries it.

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
        """The keys of ``keys`` whose part exists (drops items that failed); an error when every item failed."""
        done = [k for k in keys if self.is_done(k)]
        if keys and not done and self.failed:
            raise RunDirError(f"every image failed ({len(self.failed)}); the first, {self.failed[0]['image']}: "
                              f"{self.failed[0]['error']}")
        return done

    @property
    def parts_dir(self) -> Path:
        return self.path / "parts"

    def is_done(self, key: str) -> bool:
        """True when item ``key`` finished (its metadata is written last, so it marks completion)."""
        return (self.parts_dir / f"{key}.json").exists()

    def meta(self, key: str) -> dict:
        return json.loads((self.parts_dir / f"{key}.json").read_text())

    def write_part(self, key: str, table: pd.DataFrame | None, meta: dict,
                   extra: dict[str, pd.DataFrame] | None = None) -> None:
        """Write item ``key``: its table (optional), its ``extra`` tables (``KEY.NAME.parquet``, read back with
        ``concat(..., part=NAME)``), then its metadata, each atomically."""
        if table is not None:
            with atomic_path(self.parts_dir / f"{key}.parquet") as tmp:
                table.to_parquet(tmp, index=False)
        for name, df in (extra or {}).items():
            with atomic_path(self.parts_dir / f"{key}.{name}.parquet") as tmp:
                df.to_parquet(tmp, index=False)
        write_text_atomic(self.parts_dir / f"{key}.json", json.dumps(meta, default=_json_default))

    def keys(self) -> list[str]:
        """Finished items, in key order."""
        return sorted(p.stem for p in self.parts_dir.glob("*.json"))

    def metas(self) -> Iterator[tuple[str, dict]]:
        for key in self.keys():
            yield key, self.meta(key)

    def concat(self, name: str, keys: list[str] | None = None, part: str | None = None) -> pd.DataFrame | None:
        """Concatenate the parts' tables (their ``extra`` table ``part`` if given) into ``name`` (streamed, one part
        in memory at a time); return it read back only when it is small (< 2 million rows), else ``None``."""
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

    def items(self, images: Any, factor: int, fit: str, size: int | None, skipped: list, desc: str,
              progress: bool = True) -> Iterator[tuple[str, Any, bool]]:
        """Yield ``(key, image, done)`` for every readable image of ``images`` (keys ``000000``, ``000001``, ...)
        with a progress bar (``self.bar`` while it runs); ``done`` is true when a finished part of the same image
        exists, so the caller skips it. Unreadable inputs are appended to ``skipped`` and the run goes on."""
        from tqdm import tqdm

        from vaeprobe.data.images import iter_images

        self.bar = tqdm(desc=desc, unit="img", file=sys.stderr, disable=not progress)
        try:
            for i, img in enumerate(iter_images(images, factor=factor, policy=fit, size=size, skipped=skipped)):
                key = f"{i:06d}"
                yield key, img, self.is_done(key) and self.meta(key).get("image") == img.name
                self.bar.update(1)
        finally:
            self.bar.close()

    def finish(self, seconds: float) -> Path:
        """Write ``run.json`` (:func:`run_info`) once the job's final tables are written."""
        return self.write_json("run.json", run_info(seconds))

    def write_table(self, name: str, table: pd.DataFrame) -> Path:
        with atomic_path(self.path / name) as tmp:
            table.to_parquet(tmp, index=False)
        return self.path / name

    def write_json(self, name: str, obj: Any) -> Path:
        write_text_atomic(self.path / name, json.dumps(obj, indent=1, default=_json_default))
        return self.path / name


def _json_default(obj):
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
