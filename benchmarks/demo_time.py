"""Wall time of ``vaeprobe demo`` as a new user runs it: one process, its defaults, from a warm install.

    python benchmarks/demo_time.py [--out benchmarks/results/demo_time.json] [--runs 1]

Each run starts ``vaeprobe demo --out TMP --quiet`` in a fresh process (so the time includes Python's start and
every import) and records its wall time and the time the demo printed. Times are on this machine; the issue's goal
is under 60 s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vaeprobe._io import write_text_atomic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/demo_time.json")
    ap.add_argument("--runs", type=int, default=1)
    args = ap.parse_args()
    runs = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "vaeprobe", "demo", "--out", tmp, "--quiet"],
                                  capture_output=True, text=True)
            wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"vaeprobe demo failed: {proc.stderr.strip().splitlines()[-1:]}")
        printed = re.search(r"demo finished in ([0-9.]+) s", proc.stdout)
        runs.append({"wall_s": round(wall, 2), "printed_s": float(printed.group(1)) if printed else None})
        print(runs[-1], flush=True)
    res = {"command": "vaeprobe demo --out TMP --quiet", "runs": runs, "cpus": os.cpu_count(),
           "python": platform.python_version(), "platform": platform.platform(),
           "benchmark": " ".join(["python", "benchmarks/demo_time.py", *sys.argv[1:]])}
    write_text_atomic(Path(args.out), json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
