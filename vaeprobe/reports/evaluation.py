"""The report of ``vaeprobe evaluate``: ``evaluate.html`` (self-contained) and ``evaluate.md``, with the figures
as PNG files under ``figures/``.

It reads only the run's summary (``summary.json`` as :func:`~vaeprobe.jobs.evaluate.evaluate_vaes` returns it)
and the PCA pictures the job wrote; every number shown comes from there. Metric definitions: docs/evaluate.md.
"""

from __future__ import annotations

import datetime
import io
import math
from pathlib import Path

import numpy as np

from vaeprobe._io import atomic_path, write_text_atomic
from vaeprobe.reports.report import _environment, _file_uri, _fmt, _plt, _uri, _version, md_code, md_escape, md_table

GROUPS = (("Reconstruction", ("psnr", "ssim", "lpips")),
          ("Equivariance: decode(τ(z)) against τ(x)", None),
          ("Spectrum: power share above half the latent grid's Nyquist frequency", ("latent_hf_share",
                                                                                    "image_hf_share")),
          ("Robustness to latent noise of std S in diffusion units", None),
          ("Latent statistics (diffusion units; KL in raw units, per latent cell)",
           ("latent_mean_abs", "latent_std", "latent_outlier_share", "latent_eff_rank", "latent_channel_corr", "kl")),
          ("The spot", ("spot_rate", "norm_ratio_max")))


def metric_groups(summary: dict) -> list[tuple[str, list[str]]]:
    """The report's sections and the metrics of each, in order (the equivariance and noise metrics from the
    summary's ``transforms`` and ``noise_stds``).

    Parameters
    ----------
    summary : dict
        An evaluate summary (``transforms``, ``noise_stds``).

    Returns
    -------
    list of (str, list of str)

    Examples
    --------
    >>> [len(m) for _, m in metric_groups({"transforms": ["rot90"], "noise_stds": [0.1, 0.5]})]
    [3, 2, 2, 4, 6, 2]
    """
    out = []
    for title, names in GROUPS:
        if title.startswith("Equivariance"):
            names = [f"eq_{t}_{m}" for t in summary["transforms"] for m in ("psnr", "lpips")]
        elif title.startswith("Robustness"):
            names = [f"noise{s:g}_{m}" for s in summary["noise_stds"] for m in ("rms", "lpips")]
        out.append((title, list(names)))
    return out


def _cell(vae: dict, metric: str) -> str:
    m = vae["metrics"].get(metric)
    if m is None:
        return "—"
    if m["n"] == 0 and not (isinstance(m["mean"], float) and math.isinf(m["mean"])):
        return "nan"
    std = m["std"]
    return f"{_fmt(m['mean'])} ± {_fmt(std)}" if std is not None and np.isfinite(std) else _fmt(m["mean"])


def _save(fig, plt, path: Path) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())
    return _uri(buf.getvalue())


def _finish(fig, plt, path: Path, axes, *, title: str | None = None, xlabel: str | None = None,
            ylabels=()) -> str:
    """Label every axis of ``axes`` in the report's small type (``ylabels`` one per axis), lay out and save."""
    for ax, ylabel in zip(axes, ylabels):
        if xlabel:
            ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    if title:
        axes[0].set_title(title, fontsize=8)
    fig.tight_layout()
    return _save(fig, plt, path)


def _mean(vae: dict, metric: str) -> float:
    m = vae["metrics"].get(metric)
    return float(m["mean"]) if m is not None and m["mean"] is not None else math.nan


def _spectra_figure(summary: dict, path: Path) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    for k, v in enumerate(summary["vaes"]):
        colour = f"C{k % 10}"
        for source, style in (("latent", "-"), ("image", "--")):
            c = v["spectrum"][source]
            dens = np.asarray(c["density"], float)
            if dens.size:
                ax.plot(c["freq"], np.where(dens > 0, dens, np.nan), style, color=colour, marker=".",
                        label=f"{v['vae']}: {'latent' if source == 'latent' else 'image at latent size'}")
    ax.axvline(0.25, color="grey", lw=0.8, ls=":", label="half the Nyquist frequency")
    ax.set_yscale("log")
    return _finish(fig, plt, path, [ax], title="radial spectra (mean over images)",
                   xlabel="radial frequency (cycles per latent cell)", ylabels=["relative power density (white noise: 1)"])


def _equivariance_figure(summary: dict, path: Path) -> str:
    plt = _plt()
    labels = ["reconstruction", *summary["transforms"]]
    fig, ax = plt.subplots(figsize=(max(4.5, 0.9 * len(labels) + 1.5), 3.2))
    vaes = summary["vaes"]
    width = 0.8 / max(1, len(vaes))
    x = np.arange(len(labels))
    for k, v in enumerate(vaes):
        vals = [_mean(v, "psnr")] + [_mean(v, f"eq_{t}_psnr") for t in summary["transforms"]]
        vals = np.asarray(vals, float)
        ax.bar(x + (k - (len(vaes) - 1) / 2) * width, np.where(np.isfinite(vals), vals, 0), width, label=v["vae"])
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=30, fontsize=7)
    return _finish(fig, plt, path, [ax], title="equivariance: decode(τ(z)) vs τ(x), beside the reconstruction",
                   ylabels=["PSNR (dB), mean over images"])


def _noise_figure(summary: dict, path: Path) -> str:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(7.6, 3.0))
    stds = np.asarray(summary["noise_stds"], float)
    for k, v in enumerate(summary["vaes"]):
        for ax, what in zip(axes, ("rms", "lpips")):
            ax.plot(stds, [_mean(v, f"noise{s:g}_{what}") for s in summary["noise_stds"]], marker="o",
                    color=f"C{k % 10}", label=v["vae"])
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks(stds, [f"{s:g}" for s in stds])
        ax.minorticks_off()
    return _finish(fig, plt, path, list(axes), xlabel="latent noise std S (diffusion units)",
                   ylabels=["RMS change of the decode ([-1, 1] units)", "LPIPS against the clean decode"])


def build_evaluation_report(out: str | Path, summary: dict, *, title: str = "vaeprobe evaluate") -> dict:
    """Write ``evaluate.html`` and ``evaluate.md`` (and ``figures/*.png``) of an evaluate run.

    Parameters
    ----------
    out : str or pathlib.Path
        The run directory.
    summary : dict
        Its summary: ``images``, ``n_images``, ``size``, ``transforms``, ``noise_stds``, ``pca_image`` and
        ``vaes`` (per VAE ``vae``, ``channels``, ``factor``, ``scaling_factor``, ``shift_factor``, ``metrics``:
        name to ``{"mean", "std", "n"}``, ``spectrum``: ``latent`` and ``image`` curves, ``pca``: ``file`` and
        ``shares`` or ``None``).
    title : str, optional
        The report's title (escaped).

    Returns
    -------
    dict
        ``{"html", "markdown", "figures"}``: the two files' paths and the figures' paths.

    Examples
    --------
    >>> import tempfile
    >>> vae = {"vae": "a|b", "channels": 4, "factor": 8, "scaling_factor": 1.0, "shift_factor": 0.0, "pca": None,
    ...        "metrics": {"psnr": {"mean": 30.0, "std": 1.0, "n": 2}},
    ...        "spectrum": {"latent": {"freq": [0.1, 0.3], "density": [1.6, 0.4]},
    ...                     "image": {"freq": [0.1, 0.3], "density": [1.9, 0.1]}}}
    >>> s = {"images": "imgs", "n_images": 2, "size": 64, "transforms": ["rot90"], "noise_stds": [0.1],
    ...      "pca_image": "x", "vaes": [vae]}
    >>> rep = build_evaluation_report(tempfile.mkdtemp(), s)
    >>> rep["html"].name, [p.name for p in rep["figures"]]
    ('evaluate.html', ['spectra.png', 'equivariance.png', 'noise.png'])
    >>> "| `psnr` | 30 ± 1 |" in rep["markdown"].read_text().replace("  ", " ").replace("  ", " ")
    True
    """
    out = Path(out)
    vaes = summary["vaes"]
    figures = [(out / "figures" / "spectra.png", _spectra_figure,
                "Radial power spectra of each VAE's latent (solid) and of the image downsampled to the latent's "
                "size (dashed): each bin's share of the power over its share of the frequencies (white noise: 1); "
                "mean over images."),
               (out / "figures" / "equivariance.png", _equivariance_figure,
                "Equivariance PSNR per transform beside the reconstruction PSNR."),
               (out / "figures" / "noise.png", _noise_figure,
                "The decode's change under Gaussian latent noise of std S in diffusion units.")]
    shown = [{"src": fn(summary, path), "caption": caption, "file": path.relative_to(out).as_posix()}
             for path, fn, caption in figures]
    pca = []
    inp = _file_uri(out / "figures" / "pca-input.png")
    if inp:
        pca.append({"src": inp, "caption": f"input: {summary.get('pca_image')}"})
    for v in vaes:
        p = v.get("pca")
        uri = _file_uri(out / p["file"]) if p else None
        if uri:
            pca.append({"src": uri, "caption": f"{v['vae']}: PC1-3 as RGB, "
                                               f"{' / '.join(_fmt(s, 2) for s in p['shares'])} of the variance"})
    groups = [(t, [(m, [_cell(v, m) for v in vaes]) for m in names]) for t, names in metric_groups(summary)]
    generated = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    facts = [{"vae": v["vae"], "channels": v["channels"], "factor": v["factor"], "scale": _fmt(v["scaling_factor"]),
              "shift": _fmt(v["shift_factor"])} for v in vaes]
    page = _environment().get_template("evaluate.html.j2").render(
        title=title, generated=generated, version=_version(), n_images=summary["n_images"],
        images=summary["images"], size=summary.get("size"), vaes=facts, groups=groups, figures=shown, pca=pca)
    write_text_atomic(out / "evaluate.html", page)
    lines = [f"# {md_escape(title)}", "", f"{md_escape(summary['n_images'])} images from {md_code(summary['images'])}"
             + (f" at {md_escape(summary['size'])} px" if summary.get("size") else "") + "; mean ± std over images "
             "(definitions: docs/evaluate.md).", "",
             md_table([(f["vae"], f["channels"], f["factor"], f["scale"], f["shift"]) for f in facts],
                      ("VAE", "latent channels", "factor", "scaling_factor", "shift_factor"), code=("VAE",))]
    for t, rows in groups:
        lines += ["", f"## {md_escape(t)}", "",
                  md_table([(m, *cells) for m, cells in rows], ("metric", *[v["vae"] for v in vaes]), code=("metric",))]
    lines += ["", "## Figures", ""]
    lines += [f"![{md_escape(f['caption'])}]({f['file']})" for f in shown]
    write_text_atomic(out / "evaluate.md", "\n".join(lines) + "\n")
    return {"html": out / "evaluate.html", "markdown": out / "evaluate.md", "figures": [p for p, _, _ in figures]}
