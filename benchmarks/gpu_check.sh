#!/usr/bin/env bash
# The GPU check (issue 18): one short script for a CUDA machine, under 8 minutes on one GPU.
#   bash benchmarks/gpu_check.sh [OUTDIR]      (default benchmarks/results)
# 1. benchmarks/gpu_check.py: fp32/fp16 decode time of the SD-layout AutoencoderKL at 512 px, exact-scan
#    throughput (decodes/s, scan over batched decodes), the linear map in decode-equivalents, a tiny pipeline on
#    CUDA (--batch 2);  2. a sharded latents run on every GPU of the machine (NCCL when there are several), whose
#    tables must equal a one-process run's.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${1:-benchmarks/results}
mkdir -p "$OUT"
nvidia-smi -L
start=$SECONDS
timeout 420 "$PY" benchmarks/gpu_check.py --device cuda --out "$OUT/gpu_check.json"
N=$(nvidia-smi -L | wc -l)
TMP=$(mktemp -d)
common=(latents --vae builtin:mini-kl-f8 --images builtin:photos --size 256 --device cuda --quiet)
timeout 60 "$PY" -m vaeprobe "${common[@]}" --out "$TMP/one"
timeout 90 "$PY" -m torch.distributed.run --standalone --nproc_per_node="$N" -m vaeprobe "${common[@]}" --out "$TMP/many"
"$PY" - "$TMP" "$N" "$OUT/gpu_check_sharded.json" <<'PYEOF'
import json, sys
import pandas as pd
tmp, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
res = {"ranks": n}
for name in ("images.parquet", "positions.parquet"):
    a, b = pd.read_parquet(f"{tmp}/one/{name}"), pd.read_parquet(f"{tmp}/many/{name}")
    res[name] = {"bitwise_equal": bool(a.equals(b)),
                 "max_abs_diff": float((a.select_dtypes("number") - b.select_dtypes("number")).abs().max().max())}
res["summary_ranks"] = json.load(open(f"{tmp}/many/summary.json")).get("ranks")
json.dump(res, open(out, "w"), indent=1)
print(json.dumps(res))
PYEOF
echo "gpu_check.sh: done in $((SECONDS - start)) s; results in $OUT"
