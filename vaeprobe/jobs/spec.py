"""One declaration per job: its parameters, from which the command line, the API defaults and ``config.json``
are made (the idea of diffusers' ``register_to_config``).

A :class:`JobSpec` lists :class:`Param` entries. :meth:`JobSpec.add_arguments` writes the job's ``argparse``
options, :meth:`JobSpec.from_args` turns parsed arguments into the API's keywords, :meth:`JobSpec.resolve`
fills the API's defaults and refuses unknown keywords in one line, and :meth:`JobSpec.config` writes the
parameters that decide the results. A parameter is therefore written once: name, default, help, CLI flag and
whether it goes to ``config.json``.

>>> spec = JobSpec("demo", "a demo job", (Param("size", 64, "image size", type=int),
...                                        Param("verdicts", True, "skip the verdicts", negate=True),
...                                        Param("batch", 8, "latents per call", type=int, config=False)))
>>> opts = spec.resolve({"size": 128})
>>> opts, spec.config(opts)
({'size': 128, 'verdicts': True, 'batch': 8}, {'job': 'demo', 'size': 128, 'verdicts': True})
>>> import argparse
>>> p = argparse.ArgumentParser()
>>> spec.add_arguments(p)
>>> spec.from_args(p.parse_args(["--no-verdicts", "--size", "32"]))
{'size': 32, 'verdicts': False, 'batch': 8}
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable

from vaeprobe.errors import VaeprobeError


class SpecError(VaeprobeError, TypeError):
    """A keyword the job does not have (the message names the ones it has)."""


@dataclass(frozen=True)
class Param:
    """One parameter of a job.

    Parameters
    ----------
    name : str
        The API keyword (and the ``config.json`` key).
    default : object
        The default, the same for the API and the CLI.
    help : str
        The CLI help; ``{default}`` is replaced by the default.
    type : callable, optional
        The CLI's converter of the option's text (e.g. ``int``).
    flag : str, optional
        The CLI option (default ``--name`` with dashes); a boolean with ``negate`` is ``--no-name``.
    choices : tuple, optional
        The allowed values.
    negate : bool, optional
        A boolean that the CLI switches off with ``--no-NAME``.
    switch : bool, optional
        A boolean that the CLI switches on with its flag.
    config : bool, optional
        It decides the results, so it goes to ``config.json`` (a resumed run must have the same).
    parse : callable, optional
        Turns the CLI's value into the API's (e.g. comma-separated text into a tuple).
    show : callable, optional
        Turns the API's value into the CLI's default text (the inverse of ``parse``).
    metavar : str, optional
        The CLI's placeholder.
    append : bool, optional
        A repeatable CLI option whose values make a tuple (the default when it is not given).
    """

    name: str
    default: Any
    help: str
    type: Callable | None = None
    flag: str | None = None
    choices: tuple | None = None
    negate: bool = False
    switch: bool = False
    config: bool = True
    parse: Callable | None = None
    show: Callable | None = None
    metavar: str | None = None
    append: bool = False

    @property
    def option(self) -> str:
        """The CLI option."""
        if self.flag:
            return self.flag
        return ("--no-" if self.negate else "--") + self.name.replace("_", "-")

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        """Add this parameter's option to ``parser``."""
        text = self.help.replace("{default}", str(self.show(self.default) if self.show else self.default))
        if self.negate:
            parser.add_argument(self.option, dest=self.name, action="store_false", default=self.default, help=text)
        elif self.append:
            parser.add_argument(self.option, dest=self.name, action="append", type=self.type, default=None,
                                metavar=self.metavar, help=text)
        elif self.switch:
            parser.add_argument(self.option, dest=self.name, action="store_true", default=self.default, help=text)
        else:
            kw = {"type": self.type} if self.type else {}
            if self.choices:
                kw["choices"] = self.choices
            if self.metavar:
                kw["metavar"] = self.metavar
            default = self.show(self.default) if self.show else self.default
            parser.add_argument(self.option, dest=self.name, default=default, help=text, **kw)


@dataclass(frozen=True)
class Input:
    """A leading argument of a job's entry: a CLI positional (``nargs``) or a required option (``--name``)."""

    name: str
    help: str
    positional: bool = False
    nargs: str | None = None
    metavar: str | None = None
    default: str | None = None
    """An optional CLI option's default (then not required)."""

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        """Add this argument to ``parser``."""
        kw = {k: v for k, v in (("nargs", self.nargs), ("metavar", self.metavar)) if v}
        if self.positional:
            parser.add_argument(self.name, help=self.help, **kw)
        else:
            if self.default is None:
                kw["required"] = True
            else:
                kw["default"] = self.default
            parser.add_argument("--" + self.name.replace("_", "-"), dest=self.name, help=self.help, **kw)


IMAGE_INPUTS = (Input("vae", "VAE spec (hub id, folder, file, builtin:NAME, module:factory)"),
                Input("images", "folder, glob, image file or builtin:photos[-train|-heldout]"),
                Input("out", "run directory"))
"""``--vae --images --out``: the inputs of the jobs that run one VAE over images."""


@dataclass(frozen=True)
class JobSpec:
    """A job's name, one-line help and parameters (see the module docstring)."""

    name: str
    help: str
    params: tuple
    entry: str | None = None
    """The module's function that runs the job as ``entry(*inputs, resume, overwrite, progress, device, dtype,
    **options)``; a spec with one gets its ``vaeprobe NAME`` command made from this declaration alone (the
    module's ``cli_line(summary, options, out)`` says what it prints)."""
    inputs: tuple = ()
    """The leading arguments of ``entry``, as CLI arguments (:class:`Input`); default :data:`IMAGE_INPUTS`."""
    rank: int = 50
    """Where the command stands in ``vaeprobe --help`` (smaller first)."""
    run_help: dict | None = None
    """Other help texts of the shared run options (``quiet``, ``dtype``)."""

    def __post_init__(self):
        names = [p.name for p in self.params]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: a parameter is declared twice")

    def default(self, name: str) -> Any:
        """The default of parameter ``name``."""
        return self._by_name()[name].default

    def _by_name(self) -> dict:
        return {p.name: p for p in self.params}

    def resolve(self, options: dict) -> dict:
        """The API's keywords with every default filled; an unknown keyword is refused in one line.

        Raises
        ------
        SpecError
            When a keyword is not a parameter of the job.
        """
        known = self._by_name()
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise SpecError(f"{self.name} has no parameter {', '.join(map(repr, unknown))}; it takes "
                            f"{', '.join(known)}")
        return {p.name: options.get(p.name, p.default) for p in self.params}

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add every parameter's option to ``parser``."""
        for p in self.params:
            p.add_to(parser)

    def from_args(self, args: argparse.Namespace) -> dict:
        """The API's keywords from parsed CLI arguments."""
        out = {}
        for p in self.params:
            value = getattr(args, p.name)
            if p.append:
                value = tuple(value) if value else p.default
            out[p.name] = p.parse(value) if p.parse and value is not None else value
        return out

    def config(self, options: dict) -> dict:
        """``{"job": name}`` and the parameters that decide the results (``config.json``)."""
        return {"job": self.name, **{p.name: options[p.name] for p in self.params if p.config}}


def _csv(text) -> tuple:
    return tuple(m.strip() for m in str(text).split(",") if m.strip())


def _joined(values) -> str:
    return ",".join(values)


def image_params() -> tuple:
    """``size``, ``fit`` and ``limit``: what every job that reads a stream of images declares."""
    from vaeprobe.data.images import DEFAULT_FIT, FIT_POLICIES

    return (Param("size", None, "resize the shorter side to SIZE and center-crop SIZE x SIZE (default: keep the "
                                "size)", type=int),
            Param("fit", DEFAULT_FIT, "how sides become multiples of the VAE factor (default: {default}, i.e. "
                                      "center-crop the remainder; resize: scale to the nearest multiples)",
                  choices=FIT_POLICIES),
            Param("limit", None, "use only the first N readable images (default: all)", type=int, metavar="N"))


def image_jobs() -> list:
    """The job modules of :mod:`vaeprobe.jobs` whose :data:`SPEC` has an ``entry``, by ``rank``: the commands the
    CLI makes from their declarations. Only modules whose source assigns ``SPEC`` at the top level are imported,
    so building the CLI does not import every job's dependencies (diffusers pipelines, for one)."""
    import importlib
    from pathlib import Path

    import vaeprobe.jobs as pkg

    found = []
    for path in sorted(Path(pkg.__path__[0]).glob("*.py")):
        if path.stem in ("spec", "runner", "distributed", "__init__") or "\nSPEC = " not in path.read_text():
            continue
        mod = importlib.import_module(f"{pkg.__name__}.{path.stem}")
        spec = getattr(mod, "SPEC", None)
        if isinstance(spec, JobSpec) and spec.entry:
            found.append(mod)
    return sorted(found, key=lambda m: (m.SPEC.rank, m.SPEC.name))
