"""The console script: help, metrics, info, demo, and one-line errors."""

import json
import subprocess
import sys

import pandas as pd

from conftest import DATA, REPO, run_cli


def test_help_lists_subcommands():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for sub in ("setup", "info", "metrics", "demo"):
        assert sub in proc.stdout


def test_python_m_vaeprobe_is_the_console_entry_point():
    """The one CLI test in a fresh interpreter: ``python -m vaeprobe`` (README) works as a module entry point."""
    proc = subprocess.run([sys.executable, "-m", "vaeprobe", "--help"], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: vaeprobe ")
    for sub in ("setup", "info", "metrics", "latents", "scan", "mechanism", "report", "compare", "pipeline", "demo"):
        assert sub in proc.stdout
    assert "Traceback" not in proc.stderr


def test_usage_errors_exit_2_like_a_process():
    proc = run_cli("scan", "--no-such-flag")
    assert proc.returncode == 2 and "vaeprobe scan: error:" in proc.stderr and proc.stdout == ""


def test_metrics_command():
    proc = run_cli("metrics", DATA / "ex_ref.png", DATA / "ex_p1.png", "--json")
    assert proc.returncode == 0, proc.stderr
    values = json.loads(proc.stdout)
    assert round(values["lpips"], 4) == 0.1376 and values["psnr"] > 10 and 0 < values["ssim"] < 1


def test_metrics_bad_file_is_one_line(tmp_path):
    bad = tmp_path / "x.png"
    bad.write_text("nope")
    proc = run_cli("metrics", bad, DATA / "ex_p1.png")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "not an image" in proc.stderr


def test_internal_error_is_one_line_and_debug_shows_the_traceback(monkeypatch):
    """An internal error ends in one line and exit 1; VAEPROBE_DEBUG=1 re-raises it (a process prints the
    traceback); the variable is set for that call only."""
    from vaeprobe import cli

    def boom(args):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(cli, "cmd_info", boom)
    monkeypatch.delenv("VAEPROBE_DEBUG", raising=False)
    proc = run_cli("info")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("vaeprobe: internal error: RuntimeError")
    proc = run_cli("info", env={"VAEPROBE_DEBUG": "1"})
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "simulated bug" in proc.stderr
    import os

    assert "VAEPROBE_DEBUG" not in os.environ


def test_info_and_demo_on_tiny_model(tmp_path):
    from vaeprobe.jobs import runner

    before = runner.COMMAND
    proc = run_cli("info", "--vae", "builtin:tiny-random")
    assert proc.returncode == 0 and json.loads(proc.stdout)["factor"] == 8
    out = tmp_path / "demo"
    proc = run_cli("demo", "--vae", "builtin:tiny-random", "--control", "none", "--extra", "none", "--out", out,
                   "--size", "32", "--quiet", "--limit", "0")  # 0: every image, not the default first 4
    assert proc.returncode == 0, proc.stderr
    assert (out / "report" / "report.html").exists() and "report:" in proc.stdout
    for job, table in (("latents", "images.parquet"), ("scan", "scan.parquet"), ("mechanism", "mechanism.parquet")):
        df = pd.read_parquet(out / "builtin-tiny-random" / job / table)
        assert df.image.nunique() == 7, job
    run = json.loads((out / "builtin-tiny-random" / "latents" / "run.json").read_text())
    assert run["command"].startswith("vaeprobe demo --vae builtin:tiny-random")
    assert runner.COMMAND == before  # the in-process call leaves the runner's command line as it found it


def test_limit_takes_the_first_readable_images_and_is_recorded(tmp_path):
    from vaeprobe.data.images import iter_images
    from vaeprobe.jobs.latents import run_latents

    run = run_latents("builtin:tiny-random", "builtin:photos-heldout", tmp_path / "lat", size=32, limit=2,
                      progress=False)
    first = [item.name for item in iter_images("builtin:photos-heldout", factor=8, size=32)][:2]
    assert [m["image"] for _, m in run.metas()] == first
    assert json.loads((run.path / "config.json").read_text())["limit"] == 2
    proc = run_cli("latents", "--vae", "builtin:tiny-random", "--images", "builtin:photos-heldout", "--out",
                   tmp_path / "cli", "--size", "32", "--limit", "3", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert pd.read_parquet(tmp_path / "cli" / "images.parquet").image.nunique() == 3
