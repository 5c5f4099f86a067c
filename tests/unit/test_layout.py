"""The layout stays true: the import graph of the whole project, read with `ast`
(imports inside functions included: an import hidden in a function to dodge a cycle
is still a cycle), has no cycle between files and follows the package direction of
the style guide (rollout <- rewards, learner <- cluster <- benchmarks)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("rollout", "rewards", "learner", "cluster", "benchmarks")
ALLOWED = {  # package -> the project packages it may import
    "rollout": set(),
    "rewards": {"rollout"},
    "learner": {"rollout"},
    "cluster": {"rollout", "rewards", "learner"},
    "benchmarks": {"rollout", "rewards", "learner", "cluster"},
}
# Inside cluster/: config -> actors -> flow -> commands -> CLI; artifacts are leaves
# that the layers above config use. A layer imports only the layers before it.
CLUSTER_LAYERS = {"config": 0, "data": 0, "artifacts": 1, "actors": 2, "flow": 3, "commands": 4, "cli": 5}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imports_of(path: Path, name: str, known: dict[str, Path]) -> set[str]:
    """Project modules that `path` imports anywhere in its body."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    known = project_modules()
    g = {name: imports_of(path, name, known) for name, path in known.items()}
    # a package's __init__ is not an edge of its own modules' imports
    for name, deps in g.items():
        deps.discard(name.rpartition(".")[0]) if not (ROOT / name.replace(".", "/") / "__init__.py").exists() else None
    return g


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_import_cycle_between_files():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_package_direction():
    bad = [f"{a} imports {b}" for a, deps in graph().items() for b in deps
           if b.split(".")[0] != a.split(".")[0] and b.split(".")[0] not in ALLOWED[a.split(".")[0]]]
    assert not bad, "\n".join(bad)


def layer(module: str) -> int | None:
    parts = module.split(".")
    return CLUSTER_LAYERS.get(parts[1]) if len(parts) > 1 and parts[0] == "cluster" else None


def test_cluster_layers_run_one_way():
    bad = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})" for a, deps in graph().items() for b in deps
           if layer(a) is not None and layer(b) is not None and layer(b) > layer(a)]
    assert not bad, "\n".join(bad)


def test_every_cluster_module_has_a_layer():
    assert [m for m in graph() if m.startswith("cluster.") and layer(m) is None] == []


def test_the_checker_finds_a_cycle_and_a_wrong_direction():
    """The checks above can fail: a made-up graph with a cycle and a bad edge."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer("cluster.flow.pipeline") > layer("cluster.actors.supervisor")


def test_no_file_over_600_lines_and_no_function_over_80():
    long_files = [str(p.relative_to(ROOT)) for p in project_modules().values() if len(p.read_text().splitlines()) > 600]
    assert not long_files
    long_functions = []
    for p in project_modules().values():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name not in ("_parser", "parser"):
                if node.end_lineno - node.lineno + 1 > 80:
                    long_functions.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not long_functions, long_functions


def test_no_private_name_crosses_a_module():
    bad = []
    for name, path in project_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PACKAGES:
                bad += [f"{name} imports {node.module}.{a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, bad
