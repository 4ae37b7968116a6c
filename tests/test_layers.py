"""The one-way architecture (docs/design.md#layering), held by an AST walk over every module.

Layers, bottom first: contract <- runtime <- dmm_train <- calibration <- export <- cli.py, bench/.
A module may import its own layer and the layers below, at module level and lazily alike. The
one upward edge: the PyTorch reference backend loads a checkpoint through dmm_train inside a
function (runtime/torch_backend.py). The runtime and the contract are torch-free at module
level, and no two modules import each other, directly or around a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

LAYERS = {"contract": 0, "runtime": 1, "dmm_train": 2, "calibration": 3, "export": 4, "cli": 5, "bench": 5}
ALLOWED_UPWARD = {("runtime.torch_backend", "dmm_train")}  # lazy only: the reference backend's load()
TORCH_FREE = ("contract", "runtime")
HEAVY = ("torch", "onnx", "gymnasium", "minari", "tensorrt", "pycuda", "cuda")


def project_modules() -> dict[str, Path]:
    modules = {"cli": REPO_ROOT / "cli.py"}
    for package in ("contract", "runtime", "dmm_train", "calibration", "export", "bench"):
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            parts = path.relative_to(REPO_ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


MODULES = project_modules()


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """(imported module, lazy) for every import in ``path``; lazy: inside a function or class, or for type
    checkers only."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []

    def visit(node, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            # Inside a function or class, or under ``if TYPE_CHECKING:`` (never run: for type checkers only).
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)) or (
                isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING")
            if isinstance(child, ast.Import):
                found.extend((alias.name, lazy) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                for alias in child.names:
                    submodule = f"{child.module}.{alias.name}"
                    found.append((submodule if submodule in MODULES else child.module, lazy))
            visit(child, inner)

    visit(tree, False)
    return found


def project_edges() -> list[tuple[str, str, bool]]:
    edges = []
    for module, path in MODULES.items():
        for target, lazy in imports_of(path):
            while target not in MODULES and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in MODULES and target != module:
                edges.append((module, target, lazy))
    return edges


def layer(module: str) -> int:
    return LAYERS[module.split(".")[0]]


def test_every_package_is_walked():
    assert {m.split(".")[0] for m in MODULES} == set(LAYERS)
    assert len(MODULES) > 40 and all(project_edges())


def test_imports_flow_one_way():
    back_edges = []
    for source, target, lazy in project_edges():
        if layer(target) <= layer(source):
            continue
        if lazy and (source, target.split(".")[0]) in ALLOWED_UPWARD:
            continue
        back_edges.append(f"{source} -> {target}{' (lazy)' if lazy else ''}")
    assert not back_edges, "imports against the layering:\n" + "\n".join(back_edges)


def test_the_one_upward_edge_is_lazy_and_only_into_dmm_train():
    edges = [(s, t, lazy) for s, t, lazy in project_edges() if s == "runtime.torch_backend" and layer(t) > 1]
    assert edges and all(lazy and t.startswith("dmm_train") for _, t, lazy in edges), edges


def test_no_module_cycles():
    graph: dict[str, set[str]] = {module: set() for module in MODULES}
    for source, target, _ in project_edges():
        graph[source].add(target)
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def strongconnect(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for successor in graph[node]:
            if successor not in index:
                strongconnect(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in graph:
        if module not in index:
            strongconnect(module)
    assert not cycles, f"module cycles: {cycles}"


@pytest.mark.parametrize("package", TORCH_FREE)
def test_bottom_layers_import_no_heavy_library_at_module_level(package):
    offenders = [f"{module} imports {name}" for module, path in MODULES.items() if module.split(".")[0] == package
                 for name, lazy in imports_of(path) if not lazy and name.split(".")[0] in HEAVY]
    assert not offenders, offenders


def test_contract_imports_nothing_else_of_the_project():
    offenders = [(s, t) for s, t, _ in project_edges() if s.startswith("contract") and not t.startswith("contract")]
    assert not offenders, offenders


def test_the_walk_sees_a_back_edge(tmp_path):
    # The checker itself can fail: a lazy runtime -> export import is reported.
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from export.onnx_export import export_checkpoint\n")
    assert ("export.onnx_export", True) in imports_of(source)
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import tensorrt\nimport torch\n")
    assert ("tensorrt", True) in imports_of(source) and ("torch", False) in imports_of(source)
