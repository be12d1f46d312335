"""The spot through a diffusion pipeline, from a config (issue 9).

    python experiments/pipeline_downstream.py experiments/configs/pipeline_sd15.json   # on a GPU with SD 1.5
    python experiments/pipeline_downstream.py experiments/configs/pipeline_tiny.json   # offline, CPU, a minute

Runs :func:`vaeprobe.jobs.pipeline.run_pipeline` with the config's settings into ``runs/<name>`` (resuming a killed
run), then the report (``runs/<name>/report/report.html``), and prints the summary. The config's keys are the
arguments of ``run_pipeline`` (``prompts`` is a file, relative to the repository).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vaeprobe.jobs.pipeline import run_pipeline
from vaeprobe.reports.report import build_report

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--out", default=None, help="run directory (default runs/<name>)")
    args = ap.parse_args()
    cfg = json.loads(Path(args.config).read_text())
    name = cfg.pop("name")
    out = Path(args.out or REPO / "runs" / name)
    prompts = cfg.pop("prompts")
    cfg["prompts"] = str(REPO / prompts) if not Path(prompts).is_absolute() else prompts
    summary = run_pipeline(out=out, resume=True, **cfg).summary
    rep = build_report([out], out=out / "report", title=f"vaeprobe pipeline: {name}")
    print(json.dumps(summary, indent=1, default=str))
    print(f"report: {rep['html']}")


if __name__ == "__main__":
    main()
