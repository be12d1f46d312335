"""The console script: help, metrics, info, demo, and one-line errors."""

import json
import subprocess
import sys

import pandas as pd

from conftest import DATA


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "vaeprobe.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_help_lists_subcommands():
    proc = run("--help")
    assert proc.returncode == 0
    for sub in ("setup", "info", "metrics", "demo"):
        assert sub in proc.stdout


def test_metrics_command():
    proc = run("metrics", str(DATA / "ex_ref.png"), str(DATA / "ex_p1.png"), "--json")
    assert proc.returncode == 0, proc.stderr
    values = json.loads(proc.stdout)
    assert round(values["lpips"], 4) == 0.1376 and values["psnr"] > 10 and 0 < values["ssim"] < 1


def test_metrics_bad_file_is_one_line(tmp_path):
    bad = tmp_path / "x.png"
    bad.write_text("nope")
    proc = run("metrics", str(bad), str(DATA / "ex_p1.png"))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "not an image" in proc.stderr


def test_info_and_demo_on_tiny_model(tmp_path):
    proc = run("info", "--vae", "builtin:tiny-random")
    assert proc.returncode == 0 and json.loads(proc.stdout)["factor"] == 8
    out = tmp_path / "demo"
    proc = run("demo", "--vae", "builtin:tiny-random", "--control", "none", "--extra", "none", "--out", str(out),
               "--size", "32", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert (out / "report" / "report.html").exists() and "report:" in proc.stdout
    for job, table in (("latents", "images.parquet"), ("scan", "scan.parquet"), ("mechanism", "mechanism.parquet")):
        df = pd.read_parquet(out / "builtin-tiny-random" / job / table)
        assert df.image.nunique() == 7, job
