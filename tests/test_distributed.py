"""Sharded runs under torchrun (gloo, CPU): the tables equal a one-process run's, a killed rank's work resumes with
another world size, and bad launcher settings end in one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from vaeprobe.jobs import distributed
from vaeprobe.jobs.distributed import Context, DistributedError, env_world, rank_device

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
# torchrun gives each of several workers one thread; the one-process reference runs with the same, so that CPU
# float reductions happen in the same order and the tables can be compared bitwise
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# planted-direct: each image has a latent outlier with a global effect, so the swap test, the evidence of the
# unusual cells and the kept decodes all have something to do
SCAN = ["scan", "--vae", "builtin:planted-direct", "--images", "builtin:photos-heldout", "--size", "64", "--quiet",
        "--keep-images", "2", "--donors", "2", "--evidence", "2"]
LATENTS = ["latents", "--vae", "builtin:mini-kl-f8", "--images", "builtin:photos-heldout", "--size", "64", "--quiet"]


def _vaeprobe(args: list[str], *, ranks: int | None = None, **kw) -> subprocess.CompletedProcess:
    cmd = ([*TORCHRUN, f"--nproc_per_node={ranks}", "-m", "vaeprobe"] if ranks else [sys.executable, "-m", "vaeprobe"])
    return subprocess.run([*cmd, *args], env=ENV, capture_output=True, text=True, timeout=300, **kw)


def _tables(out: Path, names: list[str]) -> dict[str, pd.DataFrame]:
    got = {}
    for name in names:
        df = pd.read_parquet(out / name)
        got[name] = df.drop(columns=[c for c in ("seconds",) if c in df])  # wall time differs run to run
    return got


def _assert_same(a: dict, b: dict) -> None:
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name], check_exact=True, obj=name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted one-process runs of the scan and the latents job."""
    root = tmp_path_factory.mktemp("ref")
    for name, args in (("scan", SCAN), ("latents", LATENTS)):
        res = _vaeprobe([*args, "--out", str(root / name)])
        assert res.returncode == 0, res.stderr
    return root


def test_two_ranks_equal_one_process(reference, tmp_path):
    for name, args, tables in (("scan", SCAN, ["scan.parquet", "images.parquet"]),
                               ("latents", LATENTS, ["images.parquet", "positions.parquet", "spots.parquet"])):
        res = _vaeprobe([*args, "--out", str(tmp_path / name)], ranks=2)
        assert res.returncode == 0, res.stderr
        assert res.stdout.count("results in") == 1, res.stdout   # only rank 0 prints the results
        _assert_same(_tables(reference / name, tables), _tables(tmp_path / name, tables))
        import json

        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["n_images"] == 7 and summary["failed"] == []
    # the kept decodes of every image were written, by whichever rank owned it
    assert sorted(p.name for p in (tmp_path / "scan" / "images").iterdir()) == [f"{i:06d}" for i in range(7)]


def test_position_blocks_across_ranks_equal_an_unsplit_scan(reference, tmp_path):
    """--position-blocks 3 on 2 ranks: 21 units (7 images x 3 blocks), merged per image into the unsplit scan's
    table, bitwise; the evidence kept for the same cells, the same kept decodes; more decodes (each block redoes
    the image's clean decode and receptive field)."""
    out = tmp_path / "blocks"
    res = _vaeprobe([*SCAN, "--out", str(out), "--position-blocks", "3"], ranks=2)
    assert res.returncode == 0, res.stderr
    ref_scan = pd.read_parquet(reference / "scan" / "scan.parquet")
    pd.testing.assert_frame_equal(ref_scan, pd.read_parquet(out / "scan.parquet"), check_exact=True)
    assert ref_scan.matched_ratio.notna().sum() >= 7 and ref_scan.is_global.sum() >= 7
    a, b = pd.read_parquet(reference / "scan" / "images.parquet"), pd.read_parquet(out / "images.parquet")
    same = [c for c in a.columns if c not in ("decodes", "seconds")]
    pd.testing.assert_frame_equal(a[same], b[same], check_exact=True)
    assert (b.blocks == 3).all() and (b.decodes > a.decodes).all()
    for key in (f"{i:06d}" for i in range(7)):
        files = sorted(p.name for p in (out / "images" / key).iterdir())
        assert files == sorted(p.name for p in (reference / "scan" / "images" / key).iterdir()) and len(files) == 6
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_images"] == 7 and sum(r["units"] for r in summary["ranks"]) == 21
    # the report reads the merged parts, not the blocks
    rep = _vaeprobe(["report", str(out), "--out", str(tmp_path / "report")])
    assert rep.returncode == 0, rep.stderr
    html = (tmp_path / "report" / "report.html").read_text()
    assert all(name in html for name in a.image) and "-b01" not in html
    bad = _vaeprobe([*SCAN, "--out", str(tmp_path / "lin"), "--mode", "linear", "--position-blocks", "2"])
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(
        "vaeprobe: error: --position-blocks 2: use a positive number, and more than 1 only with --mode exact")


def _workers(parent: int) -> dict[int, int]:
    """``{rank: pid}`` of the worker processes under a torchrun process (Linux /proc)."""
    found, todo = {}, [parent]
    while todo:
        pid = todo.pop()
        try:
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        for kid in map(int, kids):
            todo.append(kid)
            try:
                env = dict(kv.split("=", 1) for kv in Path(f"/proc/{kid}/environ").read_text().split("\0") if "=" in kv)
            except OSError:
                continue
            if "RANK" in env and "TORCHELASTIC_RUN_ID" in env:
                found[int(env["RANK"])] = kid
    return found


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the worker processes through Linux /proc")
def test_killed_rank_resumes_with_one_process(reference, tmp_path):
    out = tmp_path / "scan"
    parts = out / "parts"
    proc = subprocess.Popen([*TORCHRUN, "--nproc_per_node=2", "-m", "vaeprobe", *SCAN, "--out", str(out)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed_at = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            # rank 1 owns the odd keys: kill it once it has finished its first image
            if (parts / "000001.json").exists():
                workers = _workers(proc.pid)
                if 1 in workers:
                    os.kill(workers[1], signal.SIGKILL)
                    killed_at = sorted(p.stem for p in parts.glob("*.json"))
                    break
            time.sleep(0.02)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed_at is not None, "rank 1 was not found running"
    assert proc.returncode != 0                                   # torchrun reports the dead rank
    done = {p.stem: (p.stat().st_ino, p.stat().st_mtime_ns) for p in parts.glob("*.json")}
    assert set(killed_at) <= set(done)                            # what was finished when it died stays finished
    assert "000001" in done and len(done) < 7, sorted(done)       # the kill landed mid-run
    assert not (out / "summary.json").exists()

    res = _vaeprobe([*SCAN, "--out", str(out), "--resume"])
    assert res.returncode == 0, res.stderr
    after = {p.stem: (p.stat().st_ino, p.stat().st_mtime_ns) for p in parts.glob("*.json")}
    assert len(after) == 7
    assert all(after[k] == v for k, v in done.items())            # no finished image was computed again
    _assert_same(_tables(reference / "scan", ["scan.parquet", "images.parquet"]),
                 _tables(out, ["scan.parquet", "images.parquet"]))


def test_launcher_environment(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert env_world() == (0, 1, 0) and rank_device("cuda") == "cuda"
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert env_world() == (2, 4, 1)
    assert rank_device("cuda") == "cuda:1" and rank_device("cuda:3") == "cuda:3" and rank_device("cpu") == "cpu"
    ctx = Context(rank=2, world=4)
    assert [i for i in range(10) if ctx.owns(i)] == [2, 6]
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(DistributedError, match="outside WORLD_SIZE=4"):
        env_world()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(DistributedError, match="not an integer"):
        env_world()


def test_missing_rendezvous_is_one_line(tmp_path):
    env = {k: v for k, v in ENV.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env.update(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0")
    res = subprocess.run([sys.executable, "-m", "vaeprobe", *LATENTS, "--out", str(tmp_path / "x")], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "vaeprobe: error: WORLD_SIZE=2 but MASTER_ADDR and MASTER_PORT not set; launch with torchrun, accelerate "
        "launch, or set the rendezvous variables (docs: README, many GPUs)"]
    distributed.close()


def test_gpu_check_runs_on_cpu_at_tiny_scale(tmp_path):
    """benchmarks/gpu_check.py is the code the GPU check runs; --quick runs it on the CPU (figures meaningless)."""
    import json

    out = tmp_path / "gpu_check.json"
    res = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--quick", "--out", str(out)],
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    got = json.loads(out.read_text())
    assert got["decode"]["fp32"]["batch1_ms"] > 0 and "skipped" in got["decode"]["fp16"]
    assert got["scan"]["decodes"] == got["scan"]["positions"] == 4 and got["scan"]["decodes_per_s"] > 0
    assert got["scan"]["linear"]["decode_equivalents"] > 0
    assert got["pipeline"]["samples"] == 4 and got["pipeline"]["emerged"] == "4/4"
    assert got["pipeline"]["config_device"] == "cpu"
