"""The package layout, read from the source with `ast` (nothing is imported): the import graph between flexrank's
modules and between bench/'s scripts has no cycle, the launcher sits on top (only flexrank/launcher/ imports
flexrank.launcher* and flexrank.run), flexrank never imports bench, packages stay small and say what they hold.

The graph counts every `import` / `from ... import` statement wherever it is (module level, in functions, in
try/except), except those under `if TYPE_CHECKING:` (never executed). `from pkg import name` is an edge to
`pkg.name` when that is a module, else to `pkg` (its __init__); `import a.b.c` is an edge to the longest existing
module prefix. bench/ is not a package: its scripts import each other as top-level modules (`import stock`,
`from measure import ...`), which resolve to bench/<name>.py (from any importer: no flexrank module has a
top-level dependency named like a bench script); its nodes are named `bench.<name>`.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
from dist_helpers import ROOT

PACKAGE, SCRIPTS = "flexrank", "bench"
LAUNCHER = "flexrank.launcher"
ENTRY_POINTS = ("flexrank.__main__",)  # `python -m flexrank`: the console script's twin, runs launcher.cli.main
RUN_MODULES = ("flexrank.run", "flexrank.trainer.run")  # the current one, and its place before the restructuring
MAX_MODULES_PER_PACKAGE = 11


# ------------------------------------------------------------------------------------------------ graph helpers

def module_files(root: Path, package: str = PACKAGE, scripts: str | None = SCRIPTS) -> dict[str, Path]:
    """Module name -> file, for every .py file of `package` (a package's __init__.py is the package's name) and,
    when given, of the `scripts` folder (top-level scripts, named `<scripts>.<stem>`). Symlinked folders (the
    shipped data folders) are not followed."""
    found: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root / package):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        rel = Path(dirpath).relative_to(root)
        for name in sorted(filenames):
            if name.endswith(".py"):
                parts = list(rel.parts) + ([] if name == "__init__.py" else [name[:-3]])
                found[".".join(parts)] = Path(dirpath) / name
    if scripts and (root / scripts).is_dir():
        for path in sorted((root / scripts).glob("*.py")):
            found[f"{scripts}.{path.stem}"] = path
    return found


def _under_type_checking(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside `if TYPE_CHECKING:` / `if typing.TYPE_CHECKING:` bodies."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else None
            if name == "TYPE_CHECKING":
                for stmt in node.body:
                    skipped.update(id(n) for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return skipped


def _is_package(module: str, files: dict[str, Path]) -> bool:
    return files[module].name == "__init__.py"


def _longest_module(name: str, files: dict[str, Path]) -> str | None:
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in files:
            return ".".join(parts[:n])
    return None


def imports_of(module: str, files: dict[str, Path], scripts: str | None = SCRIPTS) -> list[tuple[str, int]]:
    """(imported module, line) for each import statement of `module` that names a module of the graph."""
    tree = ast.parse(files[module].read_text(), filename=str(files[module]))
    skipped = _under_type_checking(tree)
    # A package's own name is its __init__; relative imports resolve against the package the module is in.
    here = module if _is_package(module, files) else module.rpartition(".")[0]
    out: list[tuple[str, int]] = []

    def absolute(name: str) -> str | None:
        """The graph's module a top-level dotted name imports: `stock` is bench/stock.py (bench puts its folder on
        sys.path; from flexrank, such an import could only reach bench the same way)."""
        if scripts and f"{scripts}.{name.split('.')[0]}" in files:
            return _longest_module(f"{scripts}.{name}", files)
        return _longest_module(name, files)

    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = absolute(alias.name)
                if target:
                    out.append((target, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = here.split(".")
                base_parts = base_parts[:len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
                resolve = lambda name: _longest_module(name, files)  # noqa: E731
            else:
                base = node.module
                resolve = absolute
            for alias in node.names:
                # `from pkg import module` imports that module; `from pkg import name` runs pkg's __init__.
                full = f"{base}.{alias.name}"
                target = resolve(full) if alias.name != "*" else None
                if target is None or not (target == full or target.endswith("." + full)):  # bench.<full>
                    target = resolve(base)
                if target:
                    out.append((target, node.lineno))
    return sorted(out, key=lambda t: t[1])


def import_graph(root: Path, package: str = PACKAGE, scripts: str | None = SCRIPTS):
    """(graph, where): graph maps each module to the set of graph modules it imports (itself excluded); where
    maps (importer, imported) to the first `file:line` of that import, relative to root."""
    files = module_files(root, package, scripts)
    graph: dict[str, set[str]] = {m: set() for m in files}
    where: dict[tuple[str, str], str] = {}
    for module in files:
        for target, line in imports_of(module, files, scripts):
            if target != module:
                graph[module].add(target)
                where.setdefault((module, target), f"{files[module].relative_to(root)}:{line}")
    return graph, where


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (each sorted, the list sorted)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # recursion depth is bounded by the module count (~100)
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(comps)


def simple_cycles(graph: dict[str, set[str]], limit: int = 10_000) -> list[list[str]]:
    """Every elementary cycle (as a module list starting at its smallest module), up to `limit` of them."""
    cycles: list[list[str]] = []
    for comp in strongly_connected(graph):
        members = set(comp)
        for start in comp:  # cycles through `start` whose other modules all sort after it: each found once
            allowed = {m for m in members if m > start}
            path, stack = [start], [iter(sorted(graph[start] & (allowed | {start})))]
            while stack:
                nxt = next(stack[-1], None)
                if nxt is None:
                    stack.pop()
                    path.pop()
                elif nxt == start:
                    cycles.append(list(path))
                    if len(cycles) >= limit:
                        return cycles
                elif nxt not in path:
                    path.append(nxt)
                    stack.append(iter(sorted(graph[nxt] & (allowed | {start}))))
    return sorted(cycles)


def describe_cycle(cycle: list[str], where: dict[tuple[str, str], str]) -> str:
    hops = zip(cycle, cycle[1:] + cycle[:1])
    return " -> ".join(f"{a} ({where[a, b]})" for a, b in hops) + f" -> {cycle[0]}"


def cycles_in(graph: dict[str, set[str]], prefix: str) -> list[list[str]]:
    """The simple cycles of the subgraph of the modules named `prefix` or `prefix.*`."""
    inside = lambda m: m == prefix or m.startswith(prefix + ".")  # noqa: E731
    return simple_cycles({m: {t for t in ts if inside(t)} for m, ts in graph.items() if inside(m)})


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def upward_edges(graph: dict[str, set[str]], where: dict[tuple[str, str], str], package: str = PACKAGE,
                 scripts: str = SCRIPTS, launcher: str = LAUNCHER, run_modules=RUN_MODULES) -> dict[str, list[str]]:
    """The imports against the layering, by rule, as 'importer -> imported (file:line)'. The launcher and run
    rules apply to the package's modules (flexrank.__main__, the `python -m flexrank` entry point, may import
    the launcher); bench is a client of flexrank (above it), so its imports of the
    launcher and of flexrank.run are allowed and not listed here (see bench_into_launcher_or_run)."""
    found: dict[str, list[str]] = {"into launcher": [], "into run": [], "package -> scripts": []}
    for module in sorted(graph):
        for target in sorted(graph[module]):
            edge = f"{module} -> {target} ({where[module, target]})"
            if _within(module, package):
                if _within(target, launcher) and not _within(module, launcher) and module not in ENTRY_POINTS:
                    found["into launcher"].append(edge)
                if target in run_modules and not _within(module, launcher):
                    found["into run"].append(edge)
                if _within(target, scripts):
                    found["package -> scripts"].append(edge)
    return found


def bench_into_launcher_or_run(graph, where, scripts: str = SCRIPTS, launcher: str = LAUNCHER,
                               run_modules=RUN_MODULES) -> list[str]:
    return [f"{m} -> {t} ({where[m, t]})" for m in sorted(graph) if _within(m, scripts)
            for t in sorted(graph[m]) if _within(t, launcher) or t in run_modules]


# ------------------------------------------------------------------------------------------------------ the tests

@pytest.fixture(scope="module")
def repo_graph():
    return import_graph(ROOT)


def test_graph_sees_the_known_imports(repo_graph):
    """The resolver finds relative, absolute, `from pkg import module`, function-level and bench imports (a
    graph that silently missed them would pass every test below)."""
    graph, _ = repo_graph
    assert "flexrank.controllers.elastic" in graph["flexrank.controllers"]  # from .elastic import ...
    assert "flexrank.log_filters" in graph["flexrank"]  # from . import log_filters as _log_filters
    assert "flexrank.models.assets" in graph["bench.eval_time"]  # function-level import
    assert {"bench.corpus", "bench.stock", "flexrank.io"} <= graph["bench.measure"]  # import corpus / stock
    assert {"bench.flops", "bench.run"} <= graph["bench.gpu"]  # import flops; from run import ...
    assert "flexrank.launcher.cli" in graph["flexrank.__main__"]
    assert len([m for m in graph if m.startswith("flexrank.")]) > 40


def test_no_import_cycle_among_flexrank_modules(repo_graph):
    graph, where = repo_graph
    cycles = cycles_in(graph, PACKAGE)
    assert not cycles, "import cycles:\n" + "\n".join(describe_cycle(c, where) for c in cycles)


def test_no_import_cycle_among_bench_scripts(repo_graph):
    graph, where = repo_graph
    cycles = cycles_in(graph, SCRIPTS)
    assert not cycles, "import cycles:\n" + "\n".join(describe_cycle(c, where) for c in cycles)


def test_only_the_launcher_imports_the_launcher(repo_graph):
    edges = upward_edges(*repo_graph)["into launcher"]
    assert not edges, "flexrank.launcher imported from below it:\n" + "\n".join(edges)


def test_only_the_launcher_imports_run(repo_graph):
    edges = upward_edges(*repo_graph)["into run"]
    assert not edges, "flexrank.run imported from below the launcher:\n" + "\n".join(edges)


def test_flexrank_never_imports_bench(repo_graph):
    edges = upward_edges(*repo_graph)["package -> scripts"]
    assert not edges, "flexrank imports bench:\n" + "\n".join(edges)


def _packages(root: Path, package: str = PACKAGE) -> list[Path]:
    return sorted(Path(d) for d, dirnames, names in os.walk(root / package) if "__init__.py" in names
                  and "__pycache__" not in Path(d).parts)


def test_no_package_holds_more_than_11_modules():
    counts = {str(p.relative_to(ROOT)): len(list(p.glob("*.py"))) for p in _packages(ROOT)}
    assert "flexrank" in counts and len(counts) > 1
    over = {p: n for p, n in counts.items() if n > MAX_MODULES_PER_PACKAGE}
    assert not over, f"packages with more than {MAX_MODULES_PER_PACKAGE} .py modules: {over}"


def test_every_package_init_has_a_docstring():
    missing = [str(p.relative_to(ROOT)) for p in _packages(ROOT)
               if not (ast.get_docstring(ast.parse((p / "__init__.py").read_text())) or "").strip()]
    assert not missing, f"__init__.py without a docstring: {missing}"


# ------------------------------------------------------------------------------- the checker catches what it must

def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_checker_catches_a_planted_cycle_and_planted_upward_imports(tmp_path):
    clean = {
        "flexrank/__init__.py": '"""doc"""\nfrom . import io\n',
        "flexrank/io.py": "import os\n",
        "flexrank/__main__.py": "from .launcher.cli import main\n",
        "flexrank/run.py": "from .models import hub\nfrom flexrank.io import write\n",
        "flexrank/launcher/__init__.py": '"""doc"""\n',
        "flexrank/launcher/cli.py": "from .. import run\nfrom flexrank.launcher.launch import x\n",
        "flexrank/launcher/launch.py": "def f():\n    from flexrank import run\n",
        "flexrank/models/__init__.py": '"""doc"""\n',
        "flexrank/models/hub.py": "from . import assets\nfrom typing import TYPE_CHECKING\n"
                                  "if TYPE_CHECKING:\n    from .loading import Model\n",
        "flexrank/models/assets.py": "import json\n",
        "flexrank/models/loading.py": "from .hub import snapshot\n",  # hub -> loading only for type checkers
        "bench/measure.py": "import stock\nfrom flexrank.run import train\nfrom flexrank.launcher import launch\n",
        "bench/stock.py": "from flexrank.models.loading import load\n",
    }
    _write(tmp_path, clean)
    graph, where = import_graph(tmp_path)
    assert graph["flexrank.launcher.cli"] == {"flexrank.run", "flexrank.launcher.launch"}
    assert graph["flexrank.models.hub"] == {"flexrank.models.assets"}
    assert graph["bench.measure"] == {"bench.stock", "flexrank.run", "flexrank.launcher.launch"}
    assert cycles_in(graph, PACKAGE) == [] and cycles_in(graph, SCRIPTS) == []
    assert upward_edges(graph, where) == {"into launcher": [], "into run": [], "package -> scripts": []}

    _write(tmp_path, {
        "flexrank/models/assets.py": "def f():\n    from flexrank.models.hub import snapshot\n",  # cycle
        "flexrank/io.py": "from .launcher.launch import free_port\n",  # upward, relative
        "flexrank/models/loading.py": "from flexrank import run\n",  # run from below the launcher
        "flexrank/models/__init__.py": '"""doc"""\ntry:\n    import stock\nexcept ImportError:\n    pass\n',
        "bench/stock.py": "from measure import X\n",  # bench cycle
    })
    (tmp_path / "flexrank/models/extra.py").write_text("import bench.measure\n")
    graph, where = import_graph(tmp_path)
    # the planted cycle, and the run -> io -> launcher -> run loop that the planted upward import closes
    assert [describe_cycle(c, where) for c in cycles_in(graph, PACKAGE)] == [
        "flexrank.io (flexrank/io.py:1) -> flexrank.launcher.launch (flexrank/launcher/launch.py:2) -> "
        "flexrank.run (flexrank/run.py:2) -> flexrank.io",
        "flexrank.models.assets (flexrank/models/assets.py:2) -> flexrank.models.hub (flexrank/models/hub.py:1) "
        "-> flexrank.models.assets"]
    assert cycles_in(graph, SCRIPTS) == [["bench.measure", "bench.stock"]]
    up = upward_edges(graph, where)
    assert up["into launcher"] == ["flexrank.io -> flexrank.launcher.launch (flexrank/io.py:1)"]
    assert up["into run"] == ["flexrank.models.loading -> flexrank.run (flexrank/models/loading.py:1)"]
    assert up["package -> scripts"] == ["flexrank.models -> bench.stock (flexrank/models/__init__.py:3)",
                                        "flexrank.models.extra -> bench.measure (flexrank/models/extra.py:1)"]

    # the size and docstring rules
    for i in range(MAX_MODULES_PER_PACKAGE):
        (tmp_path / f"flexrank/models/m{i}.py").write_text("")
    (tmp_path / "flexrank/launcher/__init__.py").write_text("import os\n")
    sizes = {str(p.relative_to(tmp_path)): len(list(p.glob("*.py"))) for p in _packages(tmp_path)}
    assert sizes["flexrank/models"] > MAX_MODULES_PER_PACKAGE >= sizes["flexrank/launcher"]
    assert [p.name for p in _packages(tmp_path) if not ast.get_docstring(ast.parse((p / "__init__.py").read_text()))] \
        == ["launcher"]
