"""The project's packages import each other without cycles.

Module-level imports (outside ``if TYPE_CHECKING:``) of ``server``, ``fleet``, ``gui`` and
``scripts`` form a graph that must have no cycle. Function-level imports are walked too (they
keep heavy modules off start-up paths and may close a loop safely).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("server", "fleet", "gui", "scripts")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest project module that ``name`` (a module or a module's attribute) names."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        parts = module.split(".")
        if not is_package:
            parts = parts[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join([*parts, base] if base else parts)
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def _imports(modules: dict[str, Path]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Module-level and function-level project imports of each module."""
    top: dict[str, set[str]] = {m: set() for m in modules}
    inner: dict[str, set[str]] = {m: set() for m in modules}

    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"

        def walk(nodes, in_function, module=module, is_package=is_package):
            for node in nodes:
                if isinstance(node, ast.If) and _is_type_checking(node):
                    walk(node.orelse, in_function)
                    continue
                if isinstance(node, ast.Import | ast.ImportFrom):
                    for name in _targets(node, module, is_package):
                        target = _resolve(name, modules)
                        if target and target != module:
                            (inner if in_function else top)[module].add(target)
                    continue
                nested = in_function or isinstance(
                    node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
                walk(ast.iter_child_nodes(node), nested)

        walk(tree.body, False)
    return top, inner


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle in ``graph``, as the list of its modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_walk_finds_the_project_modules():
    modules = _modules()
    assert {"server", "server.app", "fleet.aws.main", "gui.app", "scripts.process"} <= set(
        modules)
    top, inner = _imports(modules)
    assert "fleet.model" in top["fleet.aws.provider"]
    assert "fleet.aws.provider" in inner["fleet.aws.main"]


def test_cycle_finder_names_the_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_cycle_among_module_level_imports():
    top, _ = _imports(_modules())
    cycle = _cycle(top)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


LIGHT_MODULES = ("server", "server.version", "server.tokens", "server.config", "server.errors",
                 "server.signing", "server.api", "fleet", "fleet.model", "gui")


def test_light_modules_import_neither_flask_nor_opencv():
    """The package roots and the modules the manager and the app use alone stay light."""
    import subprocess
    import sys

    for module in LIGHT_MODULES:
        code = (f"import {module}, sys; heavy = [m for m in ('flask', 'cv2') "
                "if m in sys.modules]; assert not heavy, heavy")
        out = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, f"import {module}: {out.stderr}"


def test_no_controller_imports_the_window_class():
    """The controllers depend on the small protocols of gui.host, not on gui.app (which
    builds them): not at module level, not in functions, not for type checking."""
    for path in sorted((ROOT / "gui").glob("*_controller.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                assert node.module != "gui.app", f"{path.name} imports gui.app"
                assert not (node.module == "gui" and any(a.name == "app" for a in node.names))
            elif isinstance(node, ast.Import):
                assert all(a.name != "gui.app" for a in node.names), path.name


def test_the_wire_contract_imports_nothing_heavy():
    """server.api is shared by the server, the fleet manager, the client and the command
    line: no Flask, OpenCV, numpy or Tk behind it."""
    import subprocess
    import sys

    code = ("import server.api, sys; heavy = [m for m in ('flask', 'werkzeug', 'cv2', 'numpy', "
            "'tkinter', 'customtkinter', 'aiohttp') if m in sys.modules]; "
            "assert not heavy, heavy")
    out = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"import server.api: {out.stderr}"
