"""forgetray's own import graph, read from the source with `ast`: no cycles, no private names taken
from another module, and imports of forgetray modules at module level unless the imported module would
bring a heavy or CUDA-only library into a module that is free of it (the style guide's rule 14). In the
manner of Ray's `python/ray/tests/test_circular_imports.py`. One test imports: each light module on
its own in a forked child of one fresh interpreter (about 6 s of CPU), checking the graph's claim that
it loads no heavy library."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "forgetray")

# Libraries that are slow to import, pull a deep learning stack or need CUDA. A module that is free of
# them at import time stays free: an import of a forgetray module that carries one of them may sit
# inside the function that needs it. numpy, pyarrow, yaml and fsspec are the package's light base.
HEAVY = frozenset(
    {
        "datasets",
        "deepspeed",
        "matplotlib",
        "mlflow",
        "numba",
        "pandas",
        "peft",
        "ray",
        "safetensors",
        "scipy",
        "sklearn",
        "tensorboardX",
        "tokenizers",
        "torch",
        "transformers",
        "wandb",
    }
)

# In-function imports of forgetray modules that the rule would move to module level but that stay
# where they are, each for the reason given: (importing module, imported module) -> reason. Keep it
# short; the test fails when an entry is no longer needed.
ALLOWED_IN_FUNCTION: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Import:
    """One import of a forgetray module found in `source` (a module name)."""

    source: str
    target: str  # the imported forgetray module
    names: tuple[str, ...]  # names taken from `target` by `from target import ...`
    line: int
    in_function: bool
    type_checking: bool  # under `if TYPE_CHECKING:` or `if __name__ == "__main__":`: no edge on import


def module_files() -> dict[str, str]:
    """Module name -> file, for every module under forgetray/."""
    modules = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, ROOT)[: -len(".py")].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                modules[".".join(parts)] = path
    return modules


def is_package(module: str, modules: dict[str, str]) -> bool:
    return modules[module].endswith("__init__.py")


def never_runs_on_import(test: ast.expr) -> bool:
    """`if TYPE_CHECKING:` or `if __name__ == "__main__":`."""
    if isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__":
        return any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators)
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def walk_imports(tree: ast.AST) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool, bool]]:
    """Every import statement with (in a function, in a block that never runs on import)."""

    def visit(node: ast.AST, in_function: bool, type_checking: bool) -> Iterator:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child, in_function, type_checking
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                yield from visit(child, True, type_checking)
            elif isinstance(child, ast.If) and never_runs_on_import(child.test):
                for statement in child.body:
                    yield from visit(ast.Module(body=[statement], type_ignores=[]), in_function, True)
                for statement in child.orelse:
                    yield from visit(ast.Module(body=[statement], type_ignores=[]), in_function, False)
            else:
                yield from visit(child, in_function, type_checking)

    yield from visit(tree, False, False)


def resolve_from(module: str, node: ast.ImportFrom, modules: dict[str, str]) -> str:
    """The absolute name `from ... import` reads from (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package(module, modules) else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


@dataclass(frozen=True)
class Scan:
    modules: dict[str, str]
    imports: tuple[Import, ...]
    heavy_direct: dict[str, frozenset[str]]  # module -> heavy libraries it imports itself at import time


def scan() -> Scan:
    modules = module_files()
    imports: list[Import] = []
    heavy_direct: dict[str, frozenset[str]] = {}
    for module, path in sorted(modules.items()):
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
        heavy: set[str] = set()
        for node, in_function, type_checking in walk_imports(tree):
            runs_at_import = not in_function and not type_checking
            if isinstance(node, ast.Import):
                for alias in node.names:
                    top = alias.name.split(".")[0]
                    if top == "forgetray":
                        imports.append(
                            Import(module, alias.name, (), node.lineno, in_function, type_checking)
                        )
                    elif top in HEAVY and runs_at_import:
                        heavy.add(top)
                continue
            source = resolve_from(module, node, modules)
            top = source.split(".")[0]
            if top in HEAVY and runs_at_import:
                heavy.add(top)
            if top != "forgetray":
                continue
            names = []
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in modules:  # `from forgetray.x import y` with y a module
                    imports.append(Import(module, submodule, (), node.lineno, in_function, type_checking))
                else:
                    names.append(alias.name)
            if names:
                imports.append(Import(module, source, tuple(names), node.lineno, in_function, type_checking))
        heavy_direct[module] = frozenset(heavy)
    unknown = sorted({(i.source, i.target) for i in imports if i.target not in modules})
    assert not unknown, f"imports of modules that are not in forgetray/: {unknown}"
    return Scan(modules, tuple(imports), heavy_direct)


def ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:n]) for n in range(1, len(parts))]


def runtime_targets(item: Import) -> list[str]:
    """The modules an import runs: the target and the packages above it that do not contain the
    importing module (those are being initialised already when it runs)."""
    return [m for m in [*ancestors(item.target), item.target] if not item.source.startswith(m + ".")]


def graph(imports: tuple[Import, ...], *, in_functions: bool) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for item in imports:
        if item.type_checking or (item.in_function and not in_functions):
            continue
        for target in runtime_targets(item):
            if target != item.source:
                edges.setdefault(item.source, set()).add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle through each strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            components.append(component)

    for node in sorted(edges):
        if node not in index:
            connect(node)
    found = []
    for component in components:
        if len(component) < 2:
            continue
        best: list[str] | None = None
        for start in sorted(component):  # breadth-first search back to start, inside the component
            paths = {start: [start]}
            queue = [start]
            while queue:
                node = queue.pop(0)
                for nxt in sorted(edges.get(node, ())):
                    if nxt == start and (best is None or len(paths[node]) < len(best) - 1):
                        best = [*paths[node], start]
                    if nxt in component and nxt not in paths:
                        paths[nxt] = [*paths[node], nxt]
                        queue.append(nxt)
        assert best is not None
        found.append(best)
    return sorted(found)


def heavy_at_import(scan_: Scan) -> dict[str, frozenset[str]]:
    """Module -> the heavy libraries that importing it loads (through forgetray modules too)."""
    edges = graph(scan_.imports, in_functions=False)
    memo: dict[str, frozenset[str]] = {}

    def heavy(module: str, seen: frozenset[str]) -> frozenset[str]:
        if module in memo:
            return memo[module]
        found = set(scan_.heavy_direct[module])
        for target in edges.get(module, ()):
            if target not in seen:
                found |= heavy(target, seen | {target})
        memo[module] = frozenset(found)
        return memo[module]

    # Importing a module runs the packages above it first (forgetray.stats.als loads forgetray.stats).
    return {
        module: frozenset().union(*(heavy(m, frozenset({m})) for m in [*ancestors(module), module]))
        for module in scan_.modules
    }


def in_function_imports_to_move(scan_: Scan) -> list[Import]:
    """In-function imports of forgetray modules that bring no heavy library the importing module does
    not load already: nothing justifies them, they belong at module level."""
    heavy = heavy_at_import(scan_)
    return [
        item
        for item in scan_.imports
        if item.in_function
        and item.source != "forgetray"  # the package's lazy names: `import forgetray` stays light
        and all(heavy[target] <= heavy[item.source] for target in runtime_targets(item))
    ]


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


SCAN = scan()


def test_scan_sees_the_package():
    # The graph is only worth its assertions if the scan finds modules and the edges between them.
    assert {"forgetray.config", "forgetray.score.nll", "forgetray.stats"} <= set(SCAN.modules)
    edges = graph(SCAN.imports, in_functions=True)
    assert "forgetray.stats.als" in edges["forgetray.stats"]
    assert "torch" in heavy_at_import(SCAN)["forgetray.studies.flatness.measure"]
    assert "ray" in heavy_at_import(SCAN)["forgetray.stats.als_ray"]
    assert not heavy_at_import(SCAN)["forgetray.errors"]


def test_cycle_finder_reports_chains():
    edges = {"a": {"b"}, "b": {"c", "a"}, "c": {"a"}, "d": {"e"}, "e": set(), "f": {"g"}, "g": {"f"}}
    assert cycles(edges) == [["a", "b", "a"], ["f", "g", "f"]]
    assert cycles({"a": {"b"}, "b": {"c"}}) == []


def test_no_import_cycles():
    # In-function imports count: they only postpone the cycle to the first call.
    found = cycles(graph(SCAN.imports, in_functions=True))
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in found)


def test_no_private_names_imported_across_modules():
    found = sorted(
        f"{item.source} imports {name} from {item.target} (line {item.line})"
        for item in SCAN.imports
        for name in item.names
        if is_private(name) and item.source != item.target
    )
    assert not found, "private names imported from another module:\n" + "\n".join(found)


def private_attributes_of_modules(module: str, path: str, modules: dict[str, str]) -> list[str]:
    """`alias._name` in `module` where `alias` is a forgetray module it imported by name."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    aliases = {}
    for node, _, _ in walk_imports(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname: a.name for a in node.names if a.asname and a.name.startswith("forgetray.")}
        elif resolve_from(module, node, modules).split(".")[0] == "forgetray":
            source = resolve_from(module, node, modules)
            for a in node.names:
                if f"{source}.{a.name}" in modules:
                    aliases[a.asname or a.name] = f"{source}.{a.name}"
    return sorted(
        f"{module} line {node.lineno}: {node.value.id}.{node.attr} of {aliases[node.value.id]}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in aliases
        and aliases[node.value.id] != module
        and is_private(node.attr)
    )


def test_no_private_attributes_of_other_modules():
    found = [
        line
        for m, path in SCAN.modules.items()
        for line in private_attributes_of_modules(m, path, SCAN.modules)
    ]
    assert not found, "private names read from another module:\n" + "\n".join(found)


def test_forgetray_imports_at_module_level():
    to_move = {(item.source, item.target): item for item in in_function_imports_to_move(SCAN)}
    unexplained = sorted(
        f"{item.source} line {item.line}: import of {item.target} inside a function"
        for key, item in to_move.items()
        if key not in ALLOWED_IN_FUNCTION
    )
    assert not unexplained, (
        "imports of forgetray modules that bring no heavy library, to move to module level:\n"
        + "\n".join(unexplained)
    )
    stale = sorted(set(ALLOWED_IN_FUNCTION) - set(to_move))
    assert not stale, f"ALLOWED_IN_FUNCTION entries no longer needed: {stale}"


# Run in a fresh interpreter: the light base is imported once, then each module is imported on its own
# in a forked child, which reports the heavy libraries that import loaded.
IMPORT_EACH = """
import os, sys
import numpy, pyarrow, pyarrow.parquet, yaml
heavy = set(sys.argv[1].split(","))
for module in sys.argv[2:]:
    read, write = os.pipe()
    if os.fork() == 0:
        os.close(read)
        try:
            __import__(module)
            message = ",".join(sorted(heavy & {name.split(".")[0] for name in sys.modules}))
        except BaseException as e:
            message = f"error {type(e).__name__}: {e}"
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        print(module, f.read() or "-", flush=True)
    os.wait()
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_light_modules_import_on_their_own_and_stay_light():
    # Each module that the graph says loads no heavy library imports on its own (a fresh import finds
    # what an import order hides: a cycle through a package __init__, a name used before it is
    # defined) and indeed loads none: an import the graph cannot see (importlib) would show here.
    heavy = heavy_at_import(SCAN)
    light = sorted(module for module in SCAN.modules if not heavy[module])
    assert len(light) > 40
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_EACH, ",".join(sorted(HEAVY)), *light],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    results = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert sorted(results) == light
    bad = {module: result for module, result in results.items() if result != "-"}
    assert not bad, f"light modules that fail to import or load a heavy library: {bad}"


def test_private_attribute_finder(tmp_path):
    path = tmp_path / "user.py"
    path.write_text(
        "from forgetray import storage\nimport forgetray.rundir as rd\n\n"
        "def f():\n    return storage._tmp_name, rd.RunDir, storage.__name__, rd._split\n"
    )
    modules = {"forgetray.storage": "", "forgetray.rundir": "", "forgetray.user": str(path)}
    assert private_attributes_of_modules("forgetray.user", str(path), modules) == [
        "forgetray.user line 5: rd._split of forgetray.rundir",
        "forgetray.user line 5: storage._tmp_name of forgetray.storage",
    ]


def test_the_rule_keeps_only_imports_that_bring_a_heavy_library():
    modules = {name: f"{name}.py" for name in ("forgetray", "forgetray.a", "forgetray.b", "forgetray.c")}
    imports = (
        Import("forgetray.a", "forgetray.b", ("f",), 3, in_function=True, type_checking=False),
        Import("forgetray.a", "forgetray.c", ("g",), 4, in_function=True, type_checking=False),
        Import("forgetray.b", "forgetray.c", ("g",), 5, in_function=True, type_checking=False),
        Import("forgetray.c", "forgetray.a", ("h",), 6, in_function=False, type_checking=True),
    )
    heavy = {name: frozenset() for name in modules} | {"forgetray.b": frozenset({"torch"})}
    to_move = in_function_imports_to_move(Scan(modules, imports, heavy))
    assert [(i.source, i.target) for i in to_move] == [
        ("forgetray.a", "forgetray.c"),
        ("forgetray.b", "forgetray.c"),
    ]
    assert cycles(graph(imports, in_functions=True)) == []  # the TYPE_CHECKING import runs never
