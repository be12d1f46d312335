"""Reports: one self-contained HTML file, a Markdown summary and the data tables, from one or more run directories.

``build_report(["runs/latents", "runs/scan", "runs/mechanism"], out="runs/report")`` reads the run directories
written by ``vaeprobe latents``, ``scan``, ``mechanism`` and ``pipeline`` (any subset, any number of models) and
writes an HTML report (headline figures, per model the dataset summaries, per image a card, the runs' commands,
settings, package versions and durations), a Markdown summary, the figures as JSON and the runs' tables as CSV;
:func:`build_comparison_report` writes the report of ``vaeprobe compare``. Files: see docs/outputs.md, sections
report and compare.

The HTML file embeds its images as data URIs and its script inline: it opens offline, anywhere, and a
Content-Security-Policy forbids it to load anything. Every string that comes from the user (file names, model
specs, settings) is escaped. Nothing in the report is fixed text about results: every figure is read from the run
directories.
"""

from __future__ import annotations

import base64
import datetime
import functools
import importlib.metadata
import io
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from vaeprobe._io import write_text_atomic
from vaeprobe.errors import VaeprobeError
from vaeprobe.schema import ORDINARY, SCAN_SHOWN, SHOWN_EVIDENCE, global_cell_phrase

JOBS = ("latents", "scan", "mechanism", "pipeline")
BLANK = "data:image/gif;base64,R0lGODlhAQABAIAAAP///wAAACH5BAEAAAAALAAAAAABAAEAAAICRAEAOw=="


class ReportError(VaeprobeError, ValueError):
    """A run directory the report cannot read (the message says which and why).

    Examples
    --------
    >>> import tempfile
    >>> try:
    ...     load_run(tempfile.mkdtemp())
    ... except ReportError as exc:
    ...     print(str(exc).split(" is ", 1)[1])
    not a vaeprobe run directory (no config.json); pass the --out of vaeprobe latents, scan or mechanism
    """


@dataclass
class Run:
    """One run directory as the report reads it (:func:`load_run` builds it).

    Attributes
    ----------
    path : pathlib.Path
        The run directory.
    job : str
        The job that wrote it, one of :data:`JOBS`.
    config, summary : dict
        Its ``config.json`` and ``summary.json``.
    info : dict
        Its ``run.json`` (command, package versions, timing); empty when there is none.
    metas : dict
        Per image name, ``(key, meta)``: the part's key and the contents of ``parts/KEY.json``.

    Examples
    --------
    >>> run = Run(Path("runs/x"), "scan", {"vae": {"spec": "builtin:tiny-random"}}, {})
    >>> run.spec, run.table("scan.parquet").empty
    ('builtin:tiny-random', True)
    """

    path: Path
    job: str
    config: dict
    summary: dict
    info: dict = field(default_factory=dict)
    metas: dict = field(default_factory=dict)   # image name -> (key, meta)

    @property
    def spec(self) -> str:
        """The spec of the model the run tested (the pipeline's for ``pipeline`` runs; ``?`` if not recorded)."""
        if self.job == "pipeline":
            return str(self.config.get("model", {}).get("spec", "?"))
        return str(self.config.get("vae", {}).get("spec", "?"))

    def table(self, name: str) -> pd.DataFrame:
        """One of the run's tables.

        Parameters
        ----------
        name : str
            The Parquet file's name in the run directory (e.g. ``"scan.parquet"``).

        Returns
        -------
        pandas.DataFrame
            The table; empty when the run has no such file.
        """
        p = self.path / name
        return pd.read_parquet(p) if p.exists() else pd.DataFrame()


def load_run(path: str | Path) -> Run:
    """Read a finished run directory.

    Parameters
    ----------
    path : str or pathlib.Path
        The run directory (the ``--out`` of ``vaeprobe latents``, ``scan``, ``mechanism`` or ``pipeline``);
        ``config.json`` and ``summary.json`` must be there.

    Returns
    -------
    Run
        The run, with the per-image metadata of ``parts/*.json``.

    Raises
    ------
    ReportError
        When ``path`` is not a run directory, its job has no report section or the run has not finished.

    Examples
    --------
    >>> import json, tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = (d / "config.json").write_text(json.dumps({"job": "latents", "vae": {"spec": "builtin:tiny-random"}}))
    >>> _ = (d / "summary.json").write_text("{}")
    >>> run = load_run(d)
    >>> run.job, run.spec, run.info, run.metas
    ('latents', 'builtin:tiny-random', {}, {})
    """
    path = Path(path)
    cfg, summ = path / "config.json", path / "summary.json"
    if not cfg.exists():
        raise ReportError(f"{path} is not a vaeprobe run directory (no config.json); pass the --out of "
                          f"vaeprobe latents, scan or mechanism")
    config = json.loads(cfg.read_text())
    job = config.get("job")
    if job not in JOBS:
        raise ReportError(f"{path}: job {job!r} has no report section; reports cover {', '.join(JOBS)}")
    if not summ.exists():
        raise ReportError(f"{path}: the run has not finished (no summary.json); rerun it with --resume first")
    info_path = path / "run.json"
    run = Run(path, job, config, json.loads(summ.read_text()),
              json.loads(info_path.read_text()) if info_path.exists() else {})
    for meta_file in sorted((path / "parts").glob("*.json")):
        meta = json.loads(meta_file.read_text())
        if "block" in meta:  # a block of positions (scan --position-blocks); its image has a merged part
            continue
        run.metas.setdefault(str(meta.get("image")), (meta_file.stem, meta))
    return run


# -- small helpers ---------------------------------------------------------------------------------------------

def _uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


THUMB_SIDE = 256  # embedded images are at most this many pixels on a side


def _file_uri(path: Path, max_side: int = THUMB_SIDE) -> str | None:
    """A JPEG data URI of the image at ``path`` (downscaled to ``max_side``); ``None`` if it does not exist."""
    if not path.exists():
        return None
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if max(im.size) > max_side:
            im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=88)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _fig_uri(fig, plt) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return _uri(buf.getvalue())


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.{digits}g}"
        s = f"{v:.{digits}f}"
        return s.rstrip("0").rstrip(".") if "." in s else s
    return str(v)


def _json_script(obj: Any) -> str:
    """JSON safe to place inside ``<script type="application/json">`` (no ``<``, ``>`` or ``&`` characters)."""
    return (json.dumps(obj, allow_nan=False, default=str)
            .replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))


_MD_BACKSLASHED = re.compile(r"[\\`*_\[\]|~$&<]")
_MD_ENTITIES = {"&": "&amp;", "<": "&lt;"}
# what would make a line a heading, quote, list item, rule or setext underline (not "-0.5" or "0.5")
_MD_LINE_START = re.compile(r"^(\s*)(?:(#(?=#{0,5}(?:\s|$))|>|[-+=](?=[-+=\s]|$))|(\d{1,9})([.)])(?=\s|$))")


def md_escape(s: Any) -> str:
    """Escape a user string for inline Markdown (a list item, a heading or a table cell).

    Markdown's inline syntax is backslashed (``\\``, backticks, ``*``, ``_``, ``[``, ``]``, ``|``, ``~``,
    ``$``), ``<`` and ``&`` become ``&lt;`` and ``&amp;`` so that no HTML tag, autolink or entity can start,
    line breaks become spaces so that no new block can start, and a leading ``#``, ``>``, ``+``, ``-``, ``=`` or
    list marker is backslashed. Nothing else changes: ``>`` on its own (as in ``>=``) stays as it is.
    For HTML the templates escape (jinja's autoescape); this is for ``report.md`` and ``comparison.md`` only.

    Parameters
    ----------
    s : Any
        The value to show; ``str(s)`` is escaped.

    Returns
    -------
    str
        Markdown source that renders as exactly ``str(s)`` (line breaks as spaces).

    Examples
    --------
    >>> print(md_escape("a|b <script>*x*</script> [link](u)"))
    a\\|b &lt;script>\\*x\\*&lt;/script> \\[link\\](u)
    >>> print(md_escape("# norm / median >= 4"), md_escape("1. x"), md_escape("-0.5"))
    \\# norm / median >= 4 1\\. x -0.5
    """
    text = " ".join(str(s).splitlines())
    text = _MD_BACKSLASHED.sub(lambda m: _MD_ENTITIES.get(m[0], "\\" + m[0]), text)
    return _MD_LINE_START.sub(lambda m: m[1] + ("\\" + m[2] if m[2] else m[3] + "\\" + m[4]), text, count=1)


def md_code(s: Any, *, in_table: bool = False) -> str:
    """A Markdown code span that shows ``str(s)`` verbatim (specs, paths, commands).

    The fence is one backtick longer than the longest run of backticks in the string, so none can close it;
    nothing inside a code span is Markdown or HTML. Line breaks become spaces.

    Parameters
    ----------
    s : Any
        The value to show.
    in_table : bool, optional
        The span goes into a table cell: ``|`` is backslashed, as GitHub-flavoured tables need even inside code.

    Returns
    -------
    str
        The code span (a blank string is returned as :func:`md_escape` gives it).

    Examples
    --------
    >>> print(md_code("owner/name"), md_code("a`b"), md_code("x|y", in_table=True))
    `owner/name` ``a`b`` `x\\|y`
    """
    text = " ".join(str(s).splitlines())
    if not text.strip():
        return md_escape(text)
    fence = "`" * (max(map(len, re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text[0] in "` " or text[-1] in "` " else ""
    span = f"{fence}{pad}{text}{pad}{fence}"
    return span.replace("|", "\\|") if in_table else span


def md_table(rows: Sequence[Sequence[Any]], columns: Sequence[str], *, code: Sequence[str] = ()) -> str:
    """A GitHub-flavoured Markdown table (``pandas.DataFrame.to_markdown``) with every cell escaped.

    Parameters
    ----------
    rows : sequence of sequences
        The table's rows, one value per column.
    columns : sequence of str
        The column headers (escaped as well).
    code : sequence of str, optional
        Columns whose cells are shown as code spans (:func:`md_code`); the others go through :func:`md_escape`.

    Returns
    -------
    str
        The table; cells are strings as given (no number parsing or reformatting).

    Examples
    --------
    >>> print(md_table([("a|b", "x", 0.50)], ["image", "spec", "share"], code=["spec"]))
    | image   | spec   | share   |
    |:--------|:-------|:--------|
    | a\\|b    | `x`    | 0.5     |
    """
    cells = [[md_code(v, in_table=True) if c in code else md_escape(v) for c, v in zip(columns, row)]
             for row in rows]
    frame = pd.DataFrame(cells, columns=[md_escape(c) for c in columns], dtype=object)
    return frame.to_markdown(index=False, disable_numparse=True)


@functools.lru_cache(maxsize=None)
def _environment():
    """The one jinja environment of the report templates, built on first use and shared by every report.

    Autoescape is chosen per template by its name: HTML templates (``*.html``, ``*.html.j2``) and strings escape
    HTML; Markdown templates (``*.md``, ``*.md.j2``) do not (they would write ``&gt;`` for ``>``), and have the
    ``md`` and ``md_code`` filters (:func:`md_escape`, :func:`md_code`) for user strings instead.
    """
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("vaeprobe.reports", "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html", "htm", "html.j2", "htm.j2"),
                                            disabled_extensions=("md", "md.j2"), default_for_string=True,
                                            default=True))
    env.filters.update(md=md_escape, md_code=md_code)
    return env


def _version() -> str:
    """vaeprobe's version, read without importing the package root (reports sit below it in the layers)."""
    version = getattr(sys.modules.get("vaeprobe"), "__version__", None)
    if version:
        return str(version)
    try:
        return importlib.metadata.version("vaeprobe")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _plt():
    from vaeprobe.reports.plots import Figures

    return Figures


def _hist_uri(values: np.ndarray, title: str, xlabel: str, log: bool = True) -> str | None:
    values = np.asarray(values, float)
    values = values[np.isfinite(values) & (values > 0)] if log else values[np.isfinite(values)]
    if values.size == 0:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(3.6, 2.6))
    ax.hist(np.log10(values) if log else values, bins=min(30, max(5, values.size)), color="#a33")
    ax.set_xlabel(("log10 " if log else "") + xlabel, fontsize=8)
    ax.set_ylabel("images", fontsize=8)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return _fig_uri(fig, plt)


def _grid_uri(grid: np.ndarray, title: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(3.2, 2.8))
    im = ax.imshow(grid, cmap="magma", interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    return _fig_uri(fig, plt)


def _colour(value: float, vmax: float) -> str:
    from matplotlib import colormaps

    t = 0.0 if not np.isfinite(value) else min(1.0, max(0.0, value / vmax))
    r, g, b, _ = colormaps["magma"](t)
    return f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"


# -- sections --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class JobView:
    """How a report shows one job's run: its section (headlines, summary table, figures), the tables it exports
    as CSV and the per-image cards it fills.

    Attributes
    ----------
    title : str
        The section's title.
    order : int
        Runs are shown by increasing ``order``.
    section : callable
        ``section(run, head) -> (table, figures)``: calls ``head(what, value)`` for each headline figure and
        returns the summary table's ``(quantity, value)`` rows and the figures.
    tables : tuple of str
        The run's Parquet tables that the report exports as CSV.
    cards : callable
        ``cards(run, model)``: fills the per-image cards of ``model``.

    Examples
    --------
    >>> VIEWS["scan"].title, VIEWS["scan"].tables
    ('Perturbation scan', ('scan.parquet', 'images.parquet'))
    """

    title: str
    order: int
    section: Callable[[Run, Callable], tuple[list, list]]
    tables: tuple[str, ...]
    cards: Callable[[Run, dict], None]


def _headlines_and_summary(run: Run) -> tuple[list[dict], dict]:
    heads: list[dict] = []

    def head(what: str, value: str, *, model: str | None = None) -> None:
        heads.append({"model": model or run.spec, "job": run.job, "what": what, "value": value,
                      "run": str(run.path)})

    view = VIEWS[run.job]
    table, figures = view.section(run, head)
    return heads, {"title": f"{view.title} — run {run.path}", "table": [(k, _fmt(v)) for k, v in table],
                   "figures": figures}


def _latents_section(run: Run, head) -> tuple[list, list]:
    """Headlines, summary table and figures of a ``vaeprobe latents`` run."""
    s, figures, table = run.summary, [], []
    images = run.table("images.parquet")
    n = int(s.get("n_images", 0))
    head("spot rate (images with a detected spot)", f"{_fmt(s.get('spot_rate'))} ({s.get('n_spot_images', 0)}/{n})")
    if "norm_ratio_max" in images:
        head("median over images of the largest norm / median norm", _fmt(images.norm_ratio_max.median()))
        uri = _hist_uri(images.norm_ratio_max, "largest latent norm / median, per image", "ratio")
        if uri:
            figures.append({"src": uri, "caption": "norm-ratio distribution", "width": 288})
    grid = s.get("spot_locations_8x8")
    if grid is not None and np.asarray(grid).sum() > 0:
        figures.append({"src": _grid_uri(np.asarray(grid, float), "spot locations (8x8 bins of the latent)"),
                        "caption": "spot-location histogram", "width": 256})
    table = [("images", n), ("spot rate", _fmt(s.get("spot_rate"))), ("threshold", _fmt(s.get("threshold"))),
             ("suggested shift_factor / scaling_factor",
              f"{_fmt(s.get('shift_factor'))} / {_fmt(s.get('scaling_factor'))}"),
             ("the same without spots", f"{_fmt(s.get('shift_factor_ordinary'))} / "
                                        f"{_fmt(s.get('scaling_factor_ordinary'))}"),
             ("skipped inputs", len(s.get("skipped", [])))]
    return table, figures


def _scan_section(run: Run, head) -> tuple[list, list]:
    """Headlines, summary table and figures of a ``vaeprobe scan`` run."""
    s, figures, table = run.summary, [], []
    images = run.table("images.parquet")
    n = int(s.get("n_images", 0))
    rate = s.get("global_rate")
    if rate is not None and rate == rate:
        n_glob = int(round(rate * n)) if n else 0
        head(f"images with {global_cell_phrase()}",
             f"{n_glob}/{n} ({s.get('mode')}, {s.get('op')})")
    else:
        head("images with a global cell", f"no verdict ({s.get('mode')} mode has no calibrated rule)")
    counts = s.get("verdicts") or {}
    if counts:
        head("cell verdicts", ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])))
    if "top_ratio" in images and len(images):
        head("median over images of the largest global-effect ratio", _fmt(images.top_ratio.median()))
        uri = _hist_uri(images.top_ratio, "largest global-effect ratio, per image", "ratio")
        if uri:
            figures.append({"src": uri, "caption": "global-effect ratio distribution", "width": 288})
    table = [("mode", s.get("mode")), ("operator", s.get("op")), ("images", n),
             ("global rate (verdicts)", _fmt(s.get("global_rate"))), ("decodes", s.get("decodes")),
             ("seconds", _fmt(s.get("seconds"), 1)), ("skipped inputs", len(s.get("skipped", [])))]
    return table, figures


def _mechanism_section(run: Run, head) -> tuple[list, list]:
    """Headlines and summary table of a ``vaeprobe mechanism`` run."""
    s = run.summary
    dom = s.get("dominant", {})
    head("dominant pathway at the attributed positions",
         ", ".join(f"{k} {v}" for k, v in sorted(dom.items(), key=lambda kv: -kv[1])) or "none")
    shares = s.get("median_shares", {})
    table = [("positions", s.get("positions")), ("attention frozen by", s.get("attention")),
             ("operator", s.get("op"))] + [(f"median share: {k}", _fmt(v)) for k, v in shares.items()] + \
            [("decodes", s.get("decodes")), ("seconds", _fmt(s.get("seconds"), 1))]
    return table, []


def _pipeline_section(run: Run, head) -> tuple[list, list]:
    """Headlines, summary table and figure of a ``vaeprobe pipeline`` run."""
    s, figures, table = run.summary, [], []
    n = int(s.get("n_samples", 0))
    head("samples with a spot in the final latent (x0 norm / median >= threshold)",
         f"{int(round((s.get('final_spot_rate') or 0) * n))}/{n}; emerged and stayed in {s.get('emerged')}"
         + (f", median step {_fmt(s.get('median_emergence_step'))} of {s.get('steps')}"
            if s.get("median_emergence_step") is not None else ""))
    for v in s.get("vaes", []):
        head("ablating the final latent's strongest cell: median global-effect ratio (far field vs random cells)",
             f"{_fmt(v.get('median_spot_global_ratio'))} (beats every control in "
             f"{v.get('spot_beats_every_control')})", model=str(v.get("vae")))
    uri = _file_uri(run.path / "figures" / "emergence.png", 1024)
    if uri:
        figures.append({"src": uri, "caption": "spot emergence over the denoising steps", "width": 480})
    table = [("pipeline", run.config.get("model", {}).get("class")),
             ("scheduler", run.config.get("model", {}).get("scheduler")),
             ("prompts x seeds", f"{s.get('n_prompts')} x {len(s.get('seeds', []))}"), ("steps", s.get("steps")),
             ("guidance", run.config.get("guidance")), ("operator", run.config.get("op")),
             ("dtype (pipeline / measured decodes)", f"{run.config.get('dtype')} / {run.config.get('vae_dtype')}")]
    for v in s.get("vaes", []):
        table.append((f"VAE {v.get('vae')}", (f"swap LPIPS {_fmt(v.get('mean_swap_lpips'))}, mean luma shift "
                                              f"{_fmt(v.get('mean_swap_d_luma'))}") if v.get("compatible")
                      else str(v.get("compatibility"))))
    table.append(("seconds", _fmt(s.get("seconds"), 1)))
    return table, figures


SCAN_MEASURES = SCAN_SHOWN
VERDICT_EVIDENCE = SHOWN_EVIDENCE


def _profile_uri(profiles: dict, erf: float, verdicts: dict) -> str | None:
    """Distance profiles (mean change energy per pixel against distance in cells), each divided by its value at
    distance 0, for the evidence cells and the image's ordinary reference cells."""
    cells = profiles.get("cells") or {}
    ref = np.asarray(profiles.get("reference") or [], float)
    if not cells or ref.size == 0:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 2.8))

    def norm(p):
        p = np.asarray(p, float)
        return p / p[0] if p.size and p[0] > 0 else p

    ax.plot(np.arange(ref.size), norm(ref), "k--", lw=1.2, label="ordinary cells (median)")
    for key, prof in list(cells.items())[:6]:
        ax.plot(np.arange(len(prof)), norm(prof), marker=".", lw=1, label=f"({key}) {verdicts.get(key, '')}")
    if erf == erf:
        ax.axvline(erf, color="#888", lw=0.8, ls=":", label="receptive field")
    ax.set_yscale("log")
    ax.set_xlabel("distance from the cell (latent cells)", fontsize=8)
    ax.set_ylabel("energy / energy at the cell", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6)
    fig.subplots_adjust(left=0.17, right=0.97, bottom=0.16, top=0.96)  # fixed: tight_layout took half the figure's time
    return _fig_uri(fig, plt)


def _scan_card(run: Run, key: str, meta: dict, rows: pd.DataFrame, card: dict) -> None:
    folder = run.path / "images" / key
    front = [{"src": uri, "caption": caption, "width": 192}
             for name, caption in (("input.png", "input"), ("recon.png", "reconstruction"))
             if (uri := _file_uri(folder / name))]
    card["figures"][:0] = front
    card["op"] = str(run.config.get("op", "perturbed"))
    if "verdict" in rows and rows.verdict.notna().any():
        below = rows.get("below_visibility", pd.Series(False, index=rows.index)).fillna(False).astype(bool)
        order = "far_plateau" if "far_plateau" in rows else "far_rel"
        unusual = rows[(rows.verdict != ORDINARY) | below].sort_values(order, ascending=False, na_position="last")
        for r in unusual.head(8).itertuples(index=False):
            card["verdicts"].append({"row": int(r.row), "col": int(r.col), "verdict": str(r.verdict),
                                     "values": [_fmt(getattr(r, k, None)) for k in VERDICT_EVIDENCE]})
        card["verdict_counts"] = ", ".join(f"{k} {v}" for k, v in rows.verdict.value_counts().items())
        if below.any():  # a plateau that does not decay, significant, but under the visibility threshold
            cells = ", ".join(f"({int(r.row)}, {int(r.col)}) {_fmt(r.far_plateau)} levels"
                              for r in rows[below].sort_values("far_plateau", ascending=False).head(4).itertuples())
            card["verdict_counts"] += f"; a global pathway below visibility at {cells}"
        profiles = meta.get("profiles") or {}
        labels = {f"{int(r.row)},{int(r.col)}": str(r.verdict) for r in rows.itertuples(index=False)}
        uri = _profile_uri(profiles, float(meta.get("erf", math.nan)), labels)
        if uri:
            card["figures"].append({"src": uri, "caption": "distance profiles of the unusual cells", "width": 336})
    h, w = int(meta.get("h", 0)), int(meta.get("w", 0))
    score = "global_ratio" if "global_ratio" in rows else ("far_ratio" if "far_ratio" in rows else None)
    if not (h and w and score):
        return
    kept = {(int(k["row"]), int(k["col"])): k for k in meta.get("kept", [])}
    logs = np.log10(np.maximum(rows[score].to_numpy(float), 1e-12))
    vmax = max(3.0, float(np.nanmax(logs)) if np.isfinite(logs).any() else 3.0)
    by_cell = {(int(r.row), int(r.col)): (r, lg) for r, lg in zip(rows.itertuples(index=False), logs)}
    cells, data = [], {"cells": {}, "blank": BLANK}
    for r in range(h):
        for c in range(w):
            if (r, c) in by_cell:
                row, lg = by_cell[(r, c)]
                cells.append({"r": r, "c": c, "fill": _colour(lg, vmax), "label": f"ratio {_fmt(getattr(row, score))}"})
                entry = {"measures": {m: _fmt(getattr(row, m)) for m in SCAN_MEASURES if hasattr(row, m)}}
                if (r, c) in kept:
                    entry.update(after=_file_uri(folder / f"r{r}_c{c}.png"),
                                 diff=_file_uri(folder / f"r{r}_c{c}_diff.png"), gain=_fmt(kept[(r, c)]["gain"], 1))
                data["cells"][f"{r},{c}"] = entry
            else:
                cells.append({"r": r, "c": c, "fill": "#cccccc", "label": "not scanned"})
    scale = max(8, min(24, 320 // max(h, w)))
    card["heat"] = {"h": h, "w": w, "px_w": w * scale, "px_h": h * scale, "cells": cells, "vmax": _fmt(vmax, 1),
                    "score": score}
    card["data_json"] = _json_script(data)
    recon = _file_uri(folder / "recon.png")
    strongest = sorted(kept, key=lambda rc: -float(getattr(by_cell[rc][0], score)) if rc in by_cell else 0.0)
    for r, c in strongest[:3]:
        row = by_cell.get((r, c))
        card["strongest"].append({"row": r, "col": c, "before": recon or BLANK,
                                  "after": _file_uri(folder / f"r{r}_c{c}.png") or BLANK,
                                  "diff": _file_uri(folder / f"r{r}_c{c}_diff.png") or BLANK,
                                  "gain": _fmt(kept[(r, c)]["gain"], 1),
                                  "ratio": _fmt(getattr(row[0], score)) if row else "—"})


def _new_card(name: str) -> dict:
    """An empty per-image card of the report template."""
    return {"id": 0, "name": name, "figures": [], "heat": None, "data_json": "{}", "strongest": [], "mechanism": [],
            "thumb": 128, "op": "", "verdicts": [], "verdict_counts": "", "evidence_names": VERDICT_EVIDENCE}


def _pipeline_cards(run: Run, model: dict) -> None:
    """One card per (prompt, seed): each VAE's decode, the final-latent spot ablation and its difference, and the
    ablations from step k."""
    vaes = run.config.get("vaes", [])
    for name, (key, meta) in run.metas.items():
        label = f"{meta.get('prompt', name)} (seed {meta.get('seed', '?')})"
        card = model["images"].setdefault(label, _new_card(label))
        folder = run.path / "images" / key
        step = meta.get("emergence_step")
        for k, spec in enumerate(vaes):
            for suffix, what in (("generated", "generated"), ("final-spot", f"cell ({meta.get('spot_row')}, "
                                 f"{meta.get('spot_col')}) ablated in the final latent"),
                                 ("final-spot-diff", "difference (grey: none)")):
                uri = _file_uri(folder / f"vae{k}-{suffix}.png")
                if uri:
                    card["figures"].append({"src": uri, "caption": f"{spec}: {what}", "width": 160})
            for k_step in run.config.get("ablate_from", []):
                uri = _file_uri(folder / f"vae{k}-from{k_step}-spot.png")
                if uri:
                    card["figures"].append({"src": uri, "caption": f"{spec}: spot ablated from step {k_step} on",
                                            "width": 160})
        card["note"] = ((f"Spot emerged at step {step} and stayed" if step is not None else
                         "No spot in the final x0 prediction") +
                        f"; final largest norm / median {_fmt(meta.get('final_norm_ratio'))}.")


def _image_cards(run: Run, model: dict, fill: Callable[[str, dict, dict, pd.DataFrame], None],
                 main: str) -> None:
    table = run.table(main)
    for name, (key, meta) in run.metas.items():
        fill(key, meta, model["images"].setdefault(name, _new_card(name)), table[table.image == name]
             if "image" in table else table.iloc[0:0])


def _latents_cards(run: Run, model: dict) -> None:
    def fill(key, meta, card, rows):
        maps = sorted((run.path / "maps").glob(f"{key}-*.png"))
        if maps:
            card["figures"].append({"src": _file_uri(maps[0], 1024), "caption": "latent maps (spots circled)",
                                    "width": 640})

    _image_cards(run, model, fill, "images.parquet")


def _scan_cards(run: Run, model: dict) -> None:
    def fill(key, meta, card, rows):
        if card["name"] not in model["scan_done"]:
            model["scan_done"].add(card["name"])
            _scan_card(run, key, meta, rows, card)

    _image_cards(run, model, fill, "scan.parquet")


def _mechanism_cards(run: Run, model: dict) -> None:
    def fill(key, meta, card, rows):
        for r in rows.itertuples(index=False):
            card["mechanism"].append({"row": r.row, "col": r.col, "far": _fmt(r.far_l2_live),
                                      "gn": _fmt(r.share_groupnorm), "att": _fmt(r.share_attention),
                                      "res": _fmt(r.share_residual), "inter": _fmt(r.interaction),
                                      "dominant": r.dominant})

    _image_cards(run, model, fill, "mechanism.parquet")


VIEWS = {
    "latents": JobView("Latent diagnostics", 0, _latents_section, ("images.parquet", "spots.parquet"), _latents_cards),
    "scan": JobView("Perturbation scan", 1, _scan_section, ("scan.parquet", "images.parquet"), _scan_cards),
    "mechanism": JobView("Mechanism (pathway attribution)", 2, _mechanism_section,
                         ("mechanism.parquet", "attention.parquet", "groupnorm.parquet"), _mechanism_cards),
    "pipeline": JobView("Diffusion pipeline (emergence, interventions, VAE swap)", 3, _pipeline_section,
                        ("emergence.parquet", "interventions.parquet", "swap.parquet", "compatibility.parquet"),
                        _pipeline_cards),
}
"""The report's view of each job, in the order runs are shown."""


def build_report(run_dirs: Sequence[str | Path], *, out: str | Path | None = None,
                 title: str = "vaeprobe report") -> dict:
    """Write the report of one or more finished run directories (files: see docs/outputs.md, section report).

    Parameters
    ----------
    run_dirs : sequence of str or pathlib.Path
        Run directories of ``latents``, ``scan``, ``mechanism`` and ``pipeline`` (any subset, any number of
        models).
    out : str or pathlib.Path, optional
        The report's folder (created if needed; default: ``report`` beside the first run directory).
    title : str, optional
        The report's title (escaped).

    Returns
    -------
    dict
        ``{"html", "markdown", "json", "tables", "headlines"}``: the paths of the HTML, Markdown and JSON files,
        the paths of the CSV tables, and the headline figures (dicts with ``model``, ``job``, ``what``, ``value``
        and ``run``).

    Raises
    ------
    ReportError
        When no run directory is given or one cannot be read (see :func:`load_run`).

    Examples
    --------
    >>> import tempfile
    >>> from vaeprobe.jobs.latents import run_latents
    >>> d = tempfile.mkdtemp()
    >>> _ = run_latents("builtin:tiny-random", "builtin:photos-heldout", d + "/lat", size=32, progress=False)
    >>> rep = build_report([d + "/lat"], out=d + "/report")
    >>> rep["html"].name, rep["headlines"][0]["what"]
    ('report.html', 'spot rate (images with a detected spot)')
    """
    if not run_dirs:
        raise ReportError("no run directories given")
    runs = [load_run(p) for p in run_dirs]
    out = Path(out) if out is not None else Path(run_dirs[0]).parent / "report"
    out.mkdir(parents=True, exist_ok=True)
    headlines, models, tables = [], {}, []
    for run in sorted(runs, key=lambda r: VIEWS[r.job].order):
        heads, summary = _headlines_and_summary(run)
        headlines += heads
        model = models.setdefault(run.spec, {"spec": run.spec, "summaries": [], "images": {}, "scan_done": set()})
        model["summaries"].append(summary)
        for name in VIEWS[run.job].tables:
            df = run.table(name)
            if len(df):
                target = out / "tables" / f"{len(tables):02d}-{run.job}-{Path(name).stem}.csv"
                target.parent.mkdir(exist_ok=True)
                write_text_atomic(target, df.to_csv(index=False))
                tables.append(target)
        VIEWS[run.job].cards(run, model)
    counter = 0
    model_list = []
    for m in models.values():
        cards = list(m["images"].values())
        for c in cards:
            c["id"] = counter
            counter += 1
        model_list.append({"spec": m["spec"], "summaries": m["summaries"], "images": cards})
    run_rows = [{"path": str(r.path), "job": r.job, "spec": r.spec, "command": r.info.get("command", "—"),
                 "settings": json.dumps({k: v for k, v in r.config.items() if k != "vae"}, sort_keys=True,
                                        default=str),
                 "versions": json.dumps(r.info.get("versions", {}), sort_keys=True),
                 "finished": r.info.get("finished", "—"), "seconds": r.info.get("seconds", "—")} for r in runs]
    generated = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    page = _environment().get_template("report.html.j2").render(
        title=title, generated=generated, version=_version(), runs=run_rows, headlines=headlines,
        models=model_list, blank=BLANK)
    html_path, md_path, json_path = out / "report.html", out / "report.md", out / "report.json"
    write_text_atomic(html_path, page)
    write_text_atomic(md_path, _markdown(title, generated, headlines, model_list, run_rows))
    write_text_atomic(json_path, json.dumps({"title": title, "generated": generated, "headlines": headlines,
                                             "runs": run_rows}, indent=1, default=str))
    return {"html": html_path, "markdown": md_path, "json": json_path, "tables": tables, "headlines": headlines}


def _markdown(title: str, generated: str, headlines: list[dict], models: list[dict], runs: list[dict]) -> str:
    """``report.md``: every user string through :func:`md_escape` or :func:`md_code`, the report's own text as is."""
    lines = [f"# {md_escape(title)}", "", f"Generated {generated}. The HTML report beside this file has the images.",
             "", "## Headline figures", ""]
    for h in headlines:
        lines.append(f"- {md_code(h['model'])}, {md_escape(h['job'])}: {md_escape(h['what'])}: "
                     f"**{md_escape(h['value'])}** (run {md_code(h['run'])})")
    for m in models:
        lines += ["", f"## Model {md_code(m['spec'])}", ""]
        for s in m["summaries"]:
            lines += [f"### {md_escape(s['title'])}", "", md_table(s["table"], ("quantity", "value")), ""]
        mech = [(c["name"], r) for c in m["images"] for r in c["mechanism"]]
        if mech:
            lines += ["### Pathway shares per position", "",
                      md_table([(n, f"({r['row']}, {r['col']})", r["gn"], r["att"], r["res"], r["dominant"])
                                for n, r in mech],
                               ("image", "cell", "GroupNorm", "attention", "residual", "dominant")), ""]
    lines += ["## Runs", ""]
    for r in runs:
        lines.append(f"- {md_code(r['path'])} ({md_escape(r['job'])}, {md_code(r['spec'])}): "
                     f"{md_code(r['command'])}, finished {md_escape(r['finished'])}, {md_escape(r['seconds'])} s")
    return "\n".join(lines) + "\n"


# -- comparison reports ------------------------------------------------------------------------------------------

def _pm(m: dict, key: str, digits: int = 3) -> str:
    return f"{_fmt(m[key + '_mean'], digits)} ± {_fmt(m[key + '_std'], digits)}"


def _model_row(m: dict) -> dict:
    """One VAE's row of the comparison report, formatted."""
    return {"model": m["model"], "role": m["role"], "psnr": _pm(m, "psnr", 2), "ssim": _pm(m, "ssim"),
            "lpips": _pm(m, "lpips"),
            "rfid": _fmt(m["rfid"]) if m.get("rfid") is not None and np.isfinite(m["rfid"]) else "—",
            "spot_rate": _fmt(m["spot_rate"]),
            "norm_ratio": f"{_fmt(m['median_norm_ratio'])} / {_fmt(m['max_norm_ratio'])}",
            "clamp": _fmt(m["clamp_hits_per_image"]), "global_rate": _fmt(m["global_rate"]),
            "top_ratio": _fmt(m["median_top_global_ratio"]), "dominant": m["dominant"],
            "latent_mean": _fmt(m["latent_mean"]), "latent_std": _fmt(m["latent_std"]),
            "shift": _fmt(m["suggested_shift_factor"]), "scale": _fmt(m["suggested_scaling_factor"]),
            "configured": _fmt(m["configured_scaling_factor"])}


def _candidate_row(c: dict) -> dict:
    """One candidate's assessment and compatibility row of the comparison report, formatted."""
    return {"model": c["model"], "verdict": c["verdict"],
            "shape": "same" if c["same_latent_shape"] else f"differs: {c['shape_note']}",
            "encoder_identical": _fmt(c["encoder_identical"]),
            "encoder_weights_identical": _fmt(c["encoder_weights_identical"]) if c["encoder_weights_identical"]
            is not None else "not comparable", "max_latent_diff": _fmt(c["max_latent_diff"]),
            "decoder_change": (f"{_fmt(c['decoder_psnr_on_shared_latents'], 2)} dB / "
                               f"{_fmt(c['decoder_lpips_on_shared_latents'])}" if c["encoder_identical"]
                               else "— (encoders differ)")}


def build_comparison_report(out: str | Path, summary: dict, *, title: str = "vaeprobe comparison") -> dict:
    """Write the comparison report of ``vaeprobe compare``, HTML and Markdown.

    Verdicts come first, then reconstruction, the spot and latent compatibility (files: see docs/outputs.md,
    section compare).

    Parameters
    ----------
    out : str or pathlib.Path
        The folder to write ``comparison.html`` and ``comparison.md`` into.
    summary : dict
        A :func:`~vaeprobe.jobs.compare.compare_vaes` summary: ``n_images``, ``images``, ``size``,
        ``reference``, ``rfid`` (a note), ``models`` (one dict of measures per VAE) and ``candidates`` (one dict
        per candidate: verdict and latent compatibility).
    title : str, optional
        The report's title (escaped).

    Returns
    -------
    dict
        ``{"html", "markdown"}``: the paths of the two files.

    Examples
    --------
    >>> import tempfile
    >>> ref = {"model": "builtin:tiny-random", "role": "reference", "rfid": None, "spot_rate": 0.0,
    ...        "median_norm_ratio": 2.0, "max_norm_ratio": 3.0, "clamp_hits_per_image": 0, "global_rate": 0.0,
    ...        "median_top_global_ratio": 1.0, "dominant": "residual", "latent_mean": 0.0, "latent_std": 1.0,
    ...        "suggested_shift_factor": 0.0, "suggested_scaling_factor": 1.0, "configured_scaling_factor": 1.0,
    ...        **{f"{k}_{s}": 0.5 for k in ("psnr", "ssim", "lpips") for s in ("mean", "std")}}
    >>> summary = {"n_images": 1, "images": "builtin:photos-heldout", "size": 64, "reference": ref["model"],
    ...            "rfid": "too few images", "models": [ref], "candidates": []}
    >>> rep = build_comparison_report(tempfile.mkdtemp(), summary, title="tiny")
    >>> rep["html"].name, rep["markdown"].read_text().splitlines()[0]
    ('comparison.html', '# tiny')
    """
    out = Path(out)
    models = [_model_row(m) for m in summary["models"]]
    cands = [_candidate_row(c) for c in summary["candidates"]]
    latent = [(name, [_fmt(m.get(name)) for m in summary["models"]]) for name in summary.get("latent_measures", [])]
    generated = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    page = _environment().get_template("compare.html.j2").render(
        title=title, generated=generated, version=_version(), n_images=summary["n_images"],
        images=summary["images"], size=summary.get("size"), reference=summary["reference"], models=models,
        candidates=cands, rfid_note=summary["rfid"], latent=latent)
    write_text_atomic(out / "comparison.html", page)
    lines = [f"# {md_escape(title)}", "", f"{md_escape(summary['n_images'])} images from "
             f"{md_code(summary['images'])}; reference {md_code(summary['reference'])}; run {md_code(out)}.", "",
             "## Verdicts", ""]
    lines += [f"- {md_code(c['model'])}: {md_escape(c['verdict'])}" for c in cands]
    lines += ["", "## Reconstruction (mean ± std)", "",
              md_table([(m["model"], m["psnr"], m["ssim"], m["lpips"], m["rfid"]) for m in models],
                       ("model", "PSNR", "SSIM", "LPIPS", "rFID"), code=("model",)),
              "", f"rFID: {md_escape(summary['rfid'])}", "", "## The spot", "",
              md_table([(m["model"], m["spot_rate"], m["norm_ratio"], m["clamp"], m["global_rate"], m["dominant"])
                        for m in models],
                       ("model", "spot rate", "norm ratio median / max", "clamp hits / image", "global rate",
                        "dominant pathway"), code=("model",)),
              "", "## Latent compatibility", "",
              md_table([(c["model"], c["shape"], c["encoder_identical"], c["max_latent_diff"], c["decoder_change"])
                        for c in cands],
                       ("candidate", "latent shape", "encoder identical", "max dz", "decoder change PSNR / LPIPS"),
                       code=("candidate",))]
    if latent:
        lines += ["", "## Latent measures (as vaeprobe evaluate, docs/evaluate.md; mean over images)", "",
                  md_table([(name, *vals) for name, vals in latent], ("measure", *[m["model"] for m in models]),
                           code=("measure",))]
    write_text_atomic(out / "comparison.md", "\n".join(lines) + "\n")
    return {"html": out / "comparison.html", "markdown": out / "comparison.md"}
