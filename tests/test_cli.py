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
    proc = run("demo", "--vae", "builtin:tiny-random", "--out", str(out), "--size", "64")
    assert proc.returncode == 0, proc.stderr
    table = pd.read_parquet(out / "reconstruction.parquet")
    summary = json.loads((out / "summary.json").read_text())
    assert len(table) == summary["n_images"] >= 5
    assert set(table.columns) >= {"image", "psnr", "ssim", "lpips", "norm_ratio", "clamp_hits"}
    assert (table["norm_ratio"] >= 1).all()
