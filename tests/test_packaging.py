"""Packaging: console commands against the ``python -m`` shims, one version source, the licence,
and a real wheel (built without torch importable, installed outside the repository, run)."""

from __future__ import annotations

import ast
import email
import importlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from helpers import PROGRAMS, REPO, run_python
import split_alexnet

try:
    import tomllib  # Python 3.11+
except ModuleNotFoundError:  # Python 3.10: the tomli dependency
    import tomli as tomllib  # type: ignore[no-redef]

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]
PREFIX = "split-alexnet-"


def _shim_name(script: str) -> str:
    """split-alexnet-demo-data -> demo_data (the module split_alexnet/demo_data.py)."""
    return script.removeprefix(PREFIX).replace("-", "_")


def test_every_shim_has_a_console_command():
    shims = {p.stem for p in (REPO / "split_alexnet").glob("*.py") if p.stem != "__init__"}
    assert all(name.startswith(PREFIX) for name in SCRIPTS)
    assert {_shim_name(name) for name in SCRIPTS} == shims
    assert len(SCRIPTS) == 12


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_command_is_the_shims_callable(script):
    """The target imports and is callable, and ``python -m split_alexnet.<x>`` calls the same."""
    module, _, attr = SCRIPTS[script].partition(":")
    target = getattr(importlib.import_module(module), attr)
    assert callable(target)
    shim = importlib.import_module(f"split_alexnet.{_shim_name(script)}")
    assert shim.cli is target, f"{script} -> {SCRIPTS[script]}, but the shim calls {shim.cli}"


def _literal_versions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    return [node.value.value for node in tree.body
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
            and any(isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets)]


def test_one_version_source():
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "split_alexnet.__version__"}
    # A plain string literal, which setuptools reads without importing the package.
    assert _literal_versions(REPO / "split_alexnet" / "__init__.py") == [split_alexnet.__version__]


def test_licence_and_pytest_settings():
    assert PYPROJECT["project"]["license"] == "MIT"
    assert PYPROJECT["project"]["license-files"] == ["LICENSE"]
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License\n")
    assert "Copyright (c) 2026 split_alexnet contributors" in text
    ini = PYPROJECT["tool"]["pytest"]["ini_options"]
    assert any(m.startswith("slow:") for m in ini["markers"])
    assert ini["tmp_path_retention_policy"] == "failed"


def _lower_bounds() -> dict[str, Version]:
    """pyproject's dependencies with a ``>=`` bound: name -> that version."""
    bounds = {}
    for dep in PYPROJECT["project"]["dependencies"]:
        req = Requirement(dep)
        for spec in req.specifier:
            if spec.operator == ">=":
                bounds[canonicalize_name(req.name)] = Version(spec.version)
    return bounds


def test_the_floor_pins_are_the_lower_bounds_of_pyproject():
    """.ci/floor.txt, the constraints of .ci/run's second environment, pins torch, torchvision
    and numpy to exactly the lowest versions pyproject.toml accepts: the claimed floor is the
    tested one, and neither file can move without the other."""
    pins = {}
    for line in (REPO / ".ci" / "floor.txt").read_text().splitlines():
        line = line.partition("#")[0].strip()
        if not line:
            continue
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==" and "*" not in spec.version, f"not an exact pin: {line}"
        pins[canonicalize_name(req.name)] = Version(spec.version)
    assert set(pins) == {"torch", "torchvision", "numpy"}
    bounds = _lower_bounds()
    assert {name: bounds.get(name) for name in pins} == pins


def _copy_sources(dest: Path) -> None:
    """What the sdist holds: pyproject, README, LICENSE and the package (no caches)."""
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, dest / name)
    shutil.copytree(REPO / "split_alexnet", dest / "split_alexnet",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


@pytest.fixture(scope="module")
def wheel(module_tmp) -> Path:
    """A wheel built from a copy of the tree, with an ``import torch`` that fails (the build
    must read the version statically, never import the package)."""
    setuptools = importlib.metadata.version("setuptools")
    if int(setuptools.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools} < 77 (PEP 639 licence fields)")
    tmp = module_tmp("wheel")
    src = tmp / "src"
    src.mkdir()
    _copy_sources(src)
    no_torch = tmp / "no_torch" / "torch"
    no_torch.mkdir(parents=True)
    (no_torch / "__init__.py").write_text('raise ImportError("torch imported while building")\n')
    env = {**os.environ, "PYTHONPATH": str(no_torch.parent), "PIP_NO_INPUT": "1"}
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "--no-index", "-q", "-w", str(tmp / "dist"), str(src)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    (whl,) = (tmp / "dist").glob("split_alexnet-*.whl")
    return whl


def test_wheel_contents_and_metadata(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        info = f"split_alexnet-{split_alexnet.__version__}.dist-info"
        meta = email.message_from_bytes(z.read(f"{info}/METADATA"))
        entry_points = z.read(f"{info}/entry_points.txt").decode()
        cpp = z.read("split_alexnet/csrc/lrn.cpp")
    assert cpp == (REPO / "split_alexnet" / "csrc" / "lrn.cpp").read_bytes()
    assert f"{info}/licenses/LICENSE" in names
    assert not any(n.startswith(("tests/", "launch/")) or "__pycache__" in n for n in names)
    assert meta["Version"] == split_alexnet.__version__
    assert meta["License-Expression"] == "MIT"
    requires = meta.get_all("Requires-Dist")
    for req in ("ninja", "pillow>=9.1", 'tomli; python_version < "3.11"', "torch>=2.4.1",
                "torchvision>=0.19.1", "numpy>=2.0"):
        assert req in requires, requires
    for script, target in SCRIPTS.items():
        assert f"{script} = {target}" in entry_points


def test_installed_wheel_runs_outside_the_repository(wheel, tmp_path):
    """Installed (not editable) elsewhere: the commands run and the C++ source is found."""
    target = tmp_path / "site"
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                        "--target", str(target), str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    env = {**os.environ, "PYTHONPATH": str(target)}
    p = subprocess.run([str(target / "bin" / "split-alexnet-demo-data"), "--help"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("usage: ")
    p = run_python(PROGRAMS / "where_installed.py", cwd=tmp_path, env=env, timeout=120,
                   fresh=True)
    assert p.returncode == 0, p.stderr
    where, found = p.stdout.split()
    assert Path(where).is_relative_to(target) and found == "True"
