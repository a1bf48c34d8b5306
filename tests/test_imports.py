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


# --------------------------------------------------------------------------- what a host installs

def _third_party(modules: dict[str, Path], start: set[str], *, lazy: bool) -> dict[str, str]:
    """Top-level names of the non-project, non-stdlib modules imported by ``start`` and
    every project module they import (function-level imports too when ``lazy``), each
    with one project module that imports it."""
    import sys

    top, inner = _imports(modules)
    seen, todo, found = set(), list(start), {}
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo.extend(top[module] | (inner[module] if lazy else set()))
        tree = ast.parse(modules[module].read_text(encoding="utf-8"))
        for node in ast.walk(tree) if lazy else _module_level(tree.body):
            if isinstance(node, ast.Import | ast.ImportFrom) and not getattr(node, "level", 0):
                for name in ([a.name for a in node.names] if isinstance(node, ast.Import)
                             else [node.module or ""]):
                    head = name.split(".")[0]
                    if head and _resolve(name, modules) is None \
                            and head not in sys.stdlib_module_names:
                        found.setdefault(head, module)
    return found


def _module_level(nodes) -> list[ast.AST]:
    out = []
    for node in nodes:
        if isinstance(node, ast.If) and _is_type_checking(node):
            continue
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            continue
        out.extend(ast.walk(node))
    return out


def _installed_with(packages: tuple[str, ...]) -> set[str]:
    """The distributions installing ``packages`` brings (their requirements, transitively,
    extras left out), names normalised."""
    import re
    from importlib.metadata import PackageNotFoundError, requires

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    result, todo = set(), [norm(p) for p in packages]
    while todo:
        name = todo.pop()
        if name in result:
            continue
        result.add(name)
        try:
            needs = requires(name) or []
        except PackageNotFoundError:
            continue
        todo.extend(norm(re.split(r"[\s\[<>=!~;(]", r, maxsplit=1)[0])
                    for r in needs if "extra ==" not in r)
    return result


def _missing(imported: dict[str, str], packages: tuple[str, ...]) -> list[str]:
    import re
    from importlib.metadata import packages_distributions

    dists = packages_distributions()
    have = _installed_with(packages)
    return sorted(f"{name} (imported by {module}; distribution {', '.join(dists.get(name, ['?']))})"
                  for name, module in imported.items()
                  if not {re.sub(r"[-_.]+", "-", d).lower() for d in dists.get(name, [name])}
                  & have)


def test_a_workers_requirements_cover_everything_the_server_imports():
    """An EC2 worker installs SERVER_PACKAGES only (not the app's requirements): every
    module ``python -m server`` may import, lazily too, must come with them."""
    from fleet.aws.ssh_bootstrap import SERVER_PACKAGES

    modules = _modules()
    imported = _third_party(modules, {"server.__main__"}, lazy=True)
    assert "flask" in imported and "cv2" in imported  # the walk sees the lazy imports
    assert not _missing(imported, SERVER_PACKAGES), _missing(imported, SERVER_PACKAGES)


def test_the_managers_requirements_cover_what_python_m_fleet_run_imports():
    """The manager host installs MANAGER_PACKAGES: what ``python -m fleet run`` imports
    when it loads (the AWS entry point and the modules it loads at start)."""
    from fleet.aws.ssh_bootstrap import MANAGER_PACKAGES

    modules = _modules()
    imported = _third_party(modules, {"fleet.__main__", "fleet.aws.main"}, lazy=False)
    assert not _missing(imported, MANAGER_PACKAGES), _missing(imported, MANAGER_PACKAGES)
