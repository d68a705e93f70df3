"""The code reads in one direction: kernels <- jobs <- orchestrator, and no import cycles
among the project's modules (function-level imports included: a cycle hidden in a function
is still a cycle a reader has to hold)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kernels", "jobs", "orchestrator", "hydra_plugins")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports, anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    named = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            named |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([base] if base else [])])
            named |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    found = set()
    for module in named:
        while module and module not in modules:  # `from orchestrator.plan import X` is orchestrator.plan
            module = module.rpartition(".")[0]
        if module and module != name:
            found.add(module)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_among_the_projects_modules():
    graph = _graph()
    assert len(graph) > 40 and "orchestrator.sweep" in graph["orchestrator.cli"], "the graph is read"
    assert _cycles(graph) == []


def test_kernels_import_neither_jobs_nor_the_orchestrator_and_jobs_not_the_orchestrator():
    upward = [(a, b) for a, targets in _graph().items() for b in targets
              if (a.startswith("kernels") and b.startswith(("jobs", "orchestrator")))
              or (a.startswith("jobs") and b.startswith("orchestrator"))]
    assert upward == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_script_shadows_a_package():
    """A script's folder comes first on sys.path, and Ray workers inherit the driver's: a
    ``benchmarks/kernels.py`` made ``import kernels`` load the benchmark in every trial."""
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    scripts = {p.stem for folder in ("benchmarks", "cluster") for p in (ROOT / folder).glob("*.py")}
    assert packages >= {"orchestrator", "jobs", "kernels"} and not scripts & packages
