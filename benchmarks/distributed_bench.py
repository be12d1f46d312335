"""Wall time and load balance of sharded runs on CPU (gloo): 1 process against ``torchrun`` with 2 ranks.

    python benchmarks/distributed_bench.py [--out benchmarks/results/distributed_cpu.json] [--only many|few]

Two workloads, each run as separate processes (wall time includes start-up: importing torch and loading the
model, about 5 s per process here):

1. ``scan --mode exact`` of every position of ``builtin:mini-kl-f8`` at 128 px on the 7 held-out builtin photos
   (verdicts on): one process with 2 threads, one with 1 thread, and 2 ranks with 1 thread each;
2. one photo at 256 px, every second row and column (``--positions grid:2``, 256 of the 1 024 cells; "few large
   images"): 2 ranks without position blocks (one rank has nothing to do) and with ``--position-blocks 4``,
   against one process with 1 thread.

Per run: wall seconds, and from ``summary.json`` each rank's units and busy seconds; the imbalance is the largest
busy time over the mean. Every sharded table is checked against the one-process run with 1 thread (bitwise).
The machine has 2 cores: 2 ranks x 1 thread and 1 process x 2 threads use the same cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vaeprobe._io import write_text_atomic  # noqa: E402


def run(args: list[str], out: Path, *, ranks: int = 1, threads: int = 1) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "vaeprobe"] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "-m", "vaeprobe"]
    t0 = time.perf_counter()
    res = subprocess.run([*cmd, *args, "--out", str(out), "--quiet"], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode:
        raise SystemExit(f"{' '.join(args)} failed: {res.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    ranks_info = summary.get("ranks") or [{"rank": 0, "units": summary.get("n_images"),
                                           "seconds": summary.get("seconds")}]
    busy = [r["seconds"] for r in ranks_info]
    mean = sum(busy) / len(busy)
    row = {"ranks": ranks, "threads_per_process": threads, "wall_s": round(wall, 1), "per_rank": ranks_info,
           "imbalance": round(max(busy) / mean, 3) if mean > 0 else None, "decodes": summary["decodes"]}
    print(json.dumps({k: v for k, v in row.items() if k != "per_rank"}), [(r["units"], r["seconds"])
                                                                           for r in ranks_info], flush=True)
    return row


def same_tables(a: Path, b: Path) -> bool:
    return pd.read_parquet(a / "scan.parquet").equals(pd.read_parquet(b / "scan.parquet"))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distributed_cpu.json"))
    ap.add_argument("--only", choices=["many", "few"], help="run one workload; the other's figures are kept "
                    "from --out when it exists")
    a = ap.parse_args(argv)
    previous = json.loads(Path(a.out).read_text()) if a.only and Path(a.out).exists() else {}
    tmp = Path(tempfile.mkdtemp())
    many = ["scan", "--vae", "builtin:mini-kl-f8", "--images", "builtin:photos-heldout", "--size", "128",
            "--keep-images", "0"]
    result: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if a.only != "few":
        w1 = {"1 process, 2 threads": run(many, tmp / "a2", threads=2),
              "1 process, 1 thread": run(many, tmp / "a1", threads=1),
              "2 ranks, 1 thread each": run(many, tmp / "b", ranks=2)}
        w1["2 ranks, 1 thread each"]["bitwise_equal_to_1_process_1_thread"] = same_tables(tmp / "a1", tmp / "b")
        result["seven_images_128px"] = w1
    else:
        result["seven_images_128px"] = previous.get("seven_images_128px")
    if a.only == "many":
        result["one_image_256px"] = previous.get("one_image_256px")
        write_text_atomic(Path(a.out), json.dumps(result, indent=1) + "\n")
        return result
    one = tmp / "one"
    one.mkdir()
    from PIL import Image

    from vaeprobe.data.images import load_images

    img = load_images("builtin:photos-heldout", size=256)[0]
    Image.fromarray((img.array * 255).round().astype("uint8")).save(one / f"{img.name}.png")
    few = ["scan", "--vae", "builtin:mini-kl-f8", "--images", str(one), "--keep-images", "0", "--positions", "grid:2"]
    w2 = {"1 process, 1 thread": run(few, tmp / "c1", threads=1),
          "2 ranks, no blocks": run(few, tmp / "c2", ranks=2),
          "2 ranks, --position-blocks 4": run([*few, "--position-blocks", "4"], tmp / "c3", ranks=2)}
    w2["2 ranks, --position-blocks 4"]["bitwise_equal_to_1_process_1_thread"] = same_tables(tmp / "c1", tmp / "c3")
    result["one_image_256px"] = w2
    write_text_atomic(Path(a.out), json.dumps(result, indent=1) + "\n")
    print(f"written {a.out}")
    return result


if __name__ == "__main__":
    main()
