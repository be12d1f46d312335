"""The package's layering: the import-linter contract in pyproject.toml, an independent check of the import graph
written with ``ast`` (imports inside functions included), and what a bare ``import vaeprobe`` loads."""

import ast
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "vaeprobe"
CORE = {"vaeprobe.errors", "vaeprobe._io", "vaeprobe.schema"}
# what a module of each part of the package may import (inside the package); see pyproject.toml's contract
ORDER = ["core", "data", "models", "probes"]
ALLOWED = {part: set(ORDER[:i + 1]) for i, part in enumerate(ORDER)}
ALLOWED["reports"] = {"core", "data", "reports"}  # figures and tables: never the models or probes
ALLOWED["jobs"] = {"core", "data", "models", "probes", "reports", "jobs", "root"}  # anything but cli
ALLOWED["root"] = {"core", "data", "models", "probes", "reports", "root"}  # jobs load lazily, on use
ALLOWED["cli"] = {"core", "data", "models", "probes", "reports", "jobs", "root", "cli"}
ALLOWED["__main__"] = ALLOWED["cli"]                                                  # the only importer of cli


def part_of(module: str) -> str:
    """The part of the package a module belongs to: core, data, models, probes, reports, jobs, cli,
    __main__ or root (``vaeprobe`` itself)."""
    if module in CORE:
        return "core"
    if module == "vaeprobe":
        return "root"
    return module.split(".")[1]


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, list[tuple[str, str]]]:
    """``{module: [(imported module, "file:line"), ...]}`` for every import of a module of the package ``root``
    by a module of it, at any depth (functions, methods, ``try`` blocks). ``from pkg import name`` counts as an
    import of ``pkg.name`` when that is a module, else of ``pkg``."""
    pkg = root.name
    files = {module_name(root, p): p for p in sorted(root.rglob("*.py"))}
    graph = {}
    for mod, path in files.items():
        edges = graph.setdefault(mod, [])
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                src = node.module or ""
                if node.level:  # relative: from the module's package, up level - 1 packages
                    base = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
                    base = base[:len(base) - node.level + 1]
                    src = ".".join(base + ([node.module] if node.module else []))
                targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in files else src for a in node.names]
            else:
                continue
            for target in targets:
                if target != pkg and not target.startswith(pkg + "."):
                    continue
                while target not in files and "." in target:  # an attribute path: its module
                    target = target.rsplit(".", 1)[0]
                edges.append((target, f"{path.relative_to(root.parent)}:{node.lineno}"))
    return graph


def layer_violations(root: Path) -> list[str]:
    """One line per import that breaks the order, naming the file, the line and the import."""
    bad = []
    for mod, edges in import_graph(root).items():
        allowed = ALLOWED[part_of(mod)]
        for target, where in edges:
            if target == "vaeprobe.cli" and part_of(mod) != "__main__":
                bad.append(f"{where}: {mod} imports {target} (only vaeprobe/__main__.py may import the CLI)")
            elif part_of(target) not in allowed:
                bad.append(f"{where}: {mod} imports {target} ({part_of(mod)} may import only "
                           f"{', '.join(sorted(allowed))})")
    return sorted(set(bad))


def import_cycles(root: Path) -> list[str]:
    """One line per cycle of the module import graph: ``a -> b -> a`` with where each import is."""
    graph = import_graph(root)
    where = {}
    for m, edges in graph.items():
        for t, w in edges:
            where.setdefault((m, t), w)  # the first import of t in m
    succ = {m: sorted({t for t, _ in edges}) for m, edges in graph.items()}
    # Tarjan's strongly connected components, iteratively
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]
    for start in succ:
        if start in index:
            continue
        work = [(start, iter(succ[start]))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on.add(start)
        while work:
            node, it = work[-1]
            for nxt in it:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]
                    counter[0] += 1
                    stack.append(nxt)
                    on.add(nxt)
                    work.append((nxt, iter(succ[nxt])))
                    break
                if nxt in on:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        m = stack.pop()
                        on.discard(m)
                        comp.append(m)
                        if m == node:
                            break
                    comps.append(comp)
    cycles = []
    for comp in comps:
        members = set(comp)
        first = min(comp)
        if len(comp) == 1 and first not in succ[first]:
            continue
        # the shortest way from `first` back to itself inside the component
        paths, seen, path = [[first]], {first}, None
        while paths and path is None:
            nxt_paths = []
            for p in paths:
                for t in succ[p[-1]]:
                    if t == first:
                        path = p + [first]
                        break
                    if t in members and t not in seen:
                        seen.add(t)
                        nxt_paths.append(p + [t])
                if path:
                    break
            paths = nxt_paths
        cycles.append(" -> ".join(path) + " (" + "; ".join(where[a, b] for a, b in zip(path, path[1:])) + ")")
    return sorted(cycles)


# -- import-linter -------------------------------------------------------------------------------------------------

@pytest.fixture
def _keep_logging():
    """import-linter's CLI reconfigures logging with dictConfig (which disables every existing logger): undo it."""
    loggers = {name: lg for name, lg in logging.Logger.manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    saved = {name: (lg.disabled, lg.level, list(lg.handlers), lg.propagate) for name, lg in loggers.items()}
    root = logging.getLogger()
    root_saved = (root.level, list(root.handlers))
    yield
    for name, lg in logging.Logger.manager.loggerDict.items():
        if not isinstance(lg, logging.Logger):
            continue
        disabled, level, handlers, propagate = saved.get(name, (False, logging.NOTSET, [], True))
        lg.disabled, lg.propagate, lg.handlers[:] = disabled, propagate, handlers
        lg.setLevel(level)
    root.setLevel(root_saved[0])
    root.handlers[:] = root_saved[1]


def test_import_linter_contract_is_kept(monkeypatch, capsys, _keep_logging):
    from importlinter.cli import lint_imports

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "path", list(sys.path))  # lint_imports puts the cwd on sys.path
    rc = lint_imports(config_filename=str(REPO / "pyproject.toml"), no_cache=True, no_logo=True)
    out = capsys.readouterr().out
    assert rc == 0, out
    assert " 0 broken" in out and " kept" in out, out


# -- the same order, checked independently with ast ----------------------------------------------------------------

def test_every_module_has_a_part_and_the_graph_is_seen():
    graph = import_graph(PACKAGE)
    assert {part_of(m) for m in graph} == set(ALLOWED), sorted(graph)
    # imports inside functions are in the graph (cli imports the job specs and the demo inside its functions)
    assert {"vaeprobe.jobs.spec", "vaeprobe.jobs.demo"} <= {t for t, _ in graph["vaeprobe.cli"]}
    assert [t for t, _ in graph["vaeprobe.__main__"]] == ["vaeprobe.cli"]


def test_the_layers_hold():
    bad = layer_violations(PACKAGE)
    assert not bad, "imports that break the layer order:\n" + "\n".join(bad)


def test_the_import_graph_has_no_cycle():
    cycles = import_cycles(PACKAGE)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checks_fail_on_a_bad_import(tmp_path):
    """The checks can fail: on a scratch copy of the tree, each added bad line is named (file, line, import), and
    nothing else is added to what the tree already gives."""
    copy = tmp_path / "vaeprobe"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    base_layers, base_cycles = set(layer_violations(copy)), set(import_cycles(copy))

    def append(rel: str, text: str) -> int:
        """Append ``text`` at the end of the copy's ``rel`` (earlier line numbers stay); the line of its import."""
        f = copy / rel
        src = f.read_text().rstrip("\n") + "\n\n"
        f.write_text(src + text)
        lines = text.splitlines()
        return src.count("\n") + 1 + next(i for i, ln in enumerate(lines) if "import " in ln)

    line = append("data/images.py", "def _late():\n    from ..models import loading  # a lower layer reaching up\n")
    assert set(layer_violations(copy)) - base_layers == {
        f"vaeprobe/data/images.py:{line}: vaeprobe.data.images imports vaeprobe.models.loading "
        f"(data may import only core, data)"}
    assert set(import_cycles(copy)) == base_cycles
    line = append("jobs/runner.py", "import vaeprobe.cli\n")
    new = set(layer_violations(copy)) - base_layers
    assert f"vaeprobe/jobs/runner.py:{line}: vaeprobe.jobs.runner imports vaeprobe.cli (only vaeprobe/__main__.py " \
           f"may import the CLI)" in new and len(new) == 2
    cycles = set(import_cycles(copy)) - base_cycles  # the CLI imports the runner
    assert len(cycles) == 1, cycles
    cycle = cycles.pop()
    assert cycle.startswith("vaeprobe.cli -> vaeprobe.jobs.runner -> vaeprobe.cli (vaeprobe/cli.py:"), cycle
    assert cycle.endswith(f"; vaeprobe/jobs/runner.py:{line})"), cycle
    line = append("models/adapter.py", "def _late():\n    from vaeprobe.models.loading import load_vae\n")
    assert set(layer_violations(copy)) - base_layers == new  # inside models the order allows it, not the cycle
    cycles = {c for c in set(import_cycles(copy)) - base_cycles if "adapter" in c}
    assert len(cycles) == 1, cycles
    cycle = cycles.pop()
    assert cycle.startswith("vaeprobe.models.adapter -> vaeprobe.models.loading -> vaeprobe.models.adapter "
                            f"(vaeprobe/models/adapter.py:{line}; vaeprobe/models/loading.py:"), cycle


# -- what `import vaeprobe` loads ----------------------------------------------------------------------------------

def test_import_vaeprobe_stays_light():
    """In a fresh interpreter: the package root loads neither diffusers' UNets, the jobs nor transformers (the
    diffusion pipeline and the jobs load on first use)."""
    heavy = ("diffusers.models.unets", "vaeprobe.jobs", "transformers", "vaeprobe.cli")
    code = f"import vaeprobe, sys, json; print(json.dumps({{m: m in sys.modules for m in {heavy!r}}}))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded == {m: False for m in heavy}, loaded
