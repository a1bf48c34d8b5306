"""Build the project's wheel (``imagefleet-<version>-py3-none-any.whl``) for the EC2 set-up.

The wheel is built from a temporary copy of ``pyproject.toml``, the files it names
(readme, licence) and the packages it lists, so the checkout never gains a ``build/`` or
``*.egg-info`` folder; offline (``pip wheel --no-deps --no-build-isolation``: this
interpreter's setuptools and ``wheel``, nothing downloaded); and reproducibly:
``SOURCE_DATE_EPOCH`` fixes the zip entries' timestamps and the copy's file modes are
normalised, so the same sources give the same bytes on any machine.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

log = logging.getLogger(__name__)

WHEEL_GLOB = "imagefleet-*-py3-none-any.whl"
# 1980-01-01T00:00:00Z, the earliest time a zip entry can hold.
SOURCE_DATE_EPOCH = 315532800
BUILD_TIMEOUT_S = 300


class WheelBuildError(RuntimeError):
    """The wheel could not be built (the message carries pip's output)."""


def _named_files(project: dict) -> list[str]:
    """The readme and licence files ``[project]`` names (setuptools reads them)."""
    names: list[str] = []
    readme = project.get("readme")
    if isinstance(readme, str):
        names.append(readme)
    elif isinstance(readme, dict) and "file" in readme:
        names.append(readme["file"])
    licence = project.get("license")
    if isinstance(licence, dict) and "file" in licence:
        names.append(licence["file"])
    names += project.get("license-files", [])
    return names


def _package_dirs(root: Path, pyproject: dict) -> list[str]:
    """The top-level packages ``[tool.setuptools.packages.find] include`` selects."""
    find = pyproject.get("tool", {}).get("setuptools", {}).get("packages", {}).get("find", {})
    patterns = find.get("include", [])
    tops = sorted({p.split(".")[0].rstrip("*") for p in patterns})
    found = [top for top in tops if (root / top / "__init__.py").is_file()]
    if not found:
        raise WheelBuildError(f"no packages to build: {patterns!r} match nothing in {root}")
    return found


def _source_files(root: Path) -> list[str]:
    """What the build reads, relative to ``root``: pyproject.toml, the files it names and
    the packages' files."""
    pyproject = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    files = ["pyproject.toml", *_named_files(pyproject.get("project", {}))]
    for package in _package_dirs(root, pyproject):
        files += [path.relative_to(root).as_posix()
                  for path in sorted((root / package).rglob("*"))
                  if path.is_file() and "__pycache__" not in path.parts
                  and path.suffix not in (".pyc", ".pyo")]
    for name in files:
        if not (root / name).is_file():
            raise WheelBuildError(f"pyproject.toml names {name}, which is not in {root}")
    return files


def _digest(root: Path, files: list[str]) -> str:
    digest = hashlib.sha256(sys.executable.encode())
    for name in files:
        digest.update(name.encode() + b"\0" + (root / name).read_bytes() + b"\0")
    return digest.hexdigest()


def _copy_sources(root: Path, files: list[str], dest: Path) -> None:
    for name in files:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / name, target)
        # The zip records each file's mode: fixed here, not the checkout's umask.
        target.chmod(0o755 if name.endswith(".sh") else 0o644)


def build_wheel(root: Path) -> tuple[str, bytes]:
    """Build the project's wheel from the sources under ``root``; (file name, bytes)."""
    files = _source_files(root)
    return _build(root, _digest(root, files))


# Keyed by the sources' digest, so it can only answer for the very same sources, and the
# build is reproducible, so its answer is what a new build would give: a second bundle
# in one process (``up`` builds two; the test suite dozens) costs no 3 s pip run.
# A failed build raises, and is not remembered.
@functools.lru_cache(maxsize=4)
def _build(root: Path, digest: str) -> tuple[str, bytes]:
    files = _source_files(root)
    with tempfile.TemporaryDirectory(prefix="imagefleet-wheel.") as tmp:
        source, out = Path(tmp) / "src", Path(tmp) / "dist"
        _copy_sources(root, files, source)
        if _digest(source, files) != digest:  # changed between the digest and the copy
            raise WheelBuildError(f"the sources under {root} changed while being copied")
        env = {**os.environ, "SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH),
               "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                   "--no-cache-dir", "--quiet", "--wheel-dir", str(out), str(source)]
        log.info("building the project's wheel from %s", root)
        try:
            result = subprocess.run(command, cwd=tmp, env=env, capture_output=True,
                                    text=True, timeout=BUILD_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired as exc:
            raise WheelBuildError(f"building the wheel took over {BUILD_TIMEOUT_S}s") from exc
        wheels = sorted(out.glob(WHEEL_GLOB)) if out.is_dir() else []
        if result.returncode != 0 or len(wheels) != 1:
            output = (result.stderr or result.stdout).strip()[-2000:]
            raise WheelBuildError(
                f"pip wheel failed (exit code {result.returncode}, wheels {len(wheels)}); "
                f"it needs setuptools and the 'wheel' package in {sys.executable}: {output}")
        wheel = wheels[0]
        log.info("built %s (%d bytes)", wheel.name, wheel.stat().st_size)
        return wheel.name, wheel.read_bytes()


def prebuilt_wheel(root: Path) -> Path | None:
    """The wheel the manager's set-up keeps next to its installed code, if any."""
    wheels = sorted(root.glob(WHEEL_GLOB))
    if len(wheels) > 1:
        raise WheelBuildError(f"more than one prebuilt wheel in {root}: "
                              f"{[w.name for w in wheels]}")
    return wheels[0] if wheels else None


def project_wheel(root: Path) -> tuple[str, bytes]:
    """The prebuilt wheel in ``root`` (a manager host: no sources, no setuptools), else one
    built from the sources there."""
    wheel = prebuilt_wheel(root)
    if wheel is not None:
        if (root / "pyproject.toml").is_file():
            # A source checkout with a wheel at its top: likely left there by hand and
            # possibly older than the sources, yet it wins; say so.
            log.warning("using the prebuilt %s, not the sources beside it", wheel)
        else:
            log.info("using the prebuilt %s", wheel)
        return wheel.name, wheel.read_bytes()
    return build_wheel(root)
