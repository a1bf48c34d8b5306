"""The package's console commands: each names a main() that exists and is the same as the
module's `python -m` form."""
from __future__ import annotations

import importlib
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

COMMANDS = {
    "imagefleet": "gui.__main__:main",
    "imagefleet-process": "scripts.process:main",
    "imagefleet-server": "server.__main__:main",
    "imagefleet-fleet": "fleet.__main__:main",
    "imagefleet-aws": "scripts.bootstrap_aws:main",
}


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def test_console_commands_are_declared():
    assert _project()["scripts"] == COMMANDS


def test_each_command_resolves_to_a_callable_main():
    for target in COMMANDS.values():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), target


def test_version_comes_from_server_version():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert 'version = {attr = "server.version.__version__"}' in text
    assert "version" in _project()["dynamic"]


def test_worker_base_does_not_need_tk():
    project = _project()
    base = " ".join(project["dependencies"])
    assert "customtkinter" not in base and "tkinterdnd2" not in base
    assert "paramiko" not in base
    assert {"app", "aws", "dev"} <= set(project["optional-dependencies"])


def test_process_command_help_runs():
    out = subprocess.run([sys.executable, "-c",
                          "import sys; from scripts.process import main; sys.exit(main())",
                          "--help"],
                         check=False, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "usage" in out.stdout.lower()


def _name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9_.-]+)", requirement)
    assert match, requirement
    return match.group(1).lower()


def test_every_requirement_is_declared_by_the_package_with_the_same_bounds():
    """requirements.txt (what `make` installs) and the package's dependencies and extras
    must not drift apart: a module that needs a new library names it in both."""
    project = _project()
    declared = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        declared += extra
    by_name = {_name(r): r.split(";")[0].strip() for r in declared}
    lines = (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
    wanted = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    missing = [r for r in wanted if _name(r) not in by_name]
    differ = [(r, by_name[_name(r)]) for r in wanted
              if _name(r) in by_name and by_name[_name(r)] != r]
    assert not missing, f"in requirements.txt, not in pyproject.toml: {missing}"
    assert not differ, f"bounds differ (requirements.txt, pyproject.toml): {differ}"


def test_the_command_line_needs_nothing_from_the_app_extra():
    """imagefleet-process is a base command: the libraries it imports are base ones."""
    base = {_name(r) for r in _project()["dependencies"]}
    assert {"pydantic", "platformdirs", "prometheus-client"} <= base
