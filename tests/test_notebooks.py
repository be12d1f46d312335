"""The notebooks execute, and their committed outputs come from their code (notebooks/build.py writes them)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
sys.path.insert(0, str(NOTEBOOKS))

import build  # noqa: E402  (notebooks/build.py)

NUMBER = re.compile(r"-?\d+(\.\d+)?(e[+-]?\d+)?")


def _texts(nb) -> list[list[str]]:
    """Per code cell, its text outputs (stdout and text/plain), numbers masked: a re-execution on another CPU
    may round a float differently, the words and the table shapes may not change."""
    cells = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        texts = []
        for o in cell.get("outputs", []):
            if o.output_type == "stream" and o.name == "stdout":   # stderr: library warnings, paths
                texts.append(o.text)
            elif "text/plain" in o.get("data", {}) and "image/png" not in o.get("data", {}):
                texts.append(o["data"]["text/plain"])
        cells.append([NUMBER.sub("#", t) for t in texts])
    return cells


@pytest.mark.parametrize("name", list(build.NOTEBOOKS))
def test_notebook_executes_and_matches_its_committed_outputs(name):
    committed = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    fresh = build.make(build.NOTEBOOKS[name])
    # the committed cells are the builder's cells: nobody edited one without the other
    assert [c.source for c in committed.cells] == [c.source for c in fresh.cells]
    code = [c for c in committed.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))   # executed, in order, once
    assert not any(o.output_type == "error" for c in code for o in c.outputs)
    build.execute(fresh)
    assert _texts(fresh) == _texts(committed)
    images = [o for c in fresh.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert images or name == "compare_vaes"
