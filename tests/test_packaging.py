"""Packaging: ``passes/`` and ``targets/`` sit at the top of the repository but install as ``mpqc.passes`` and
``mpqc.targets`` (``[tool.setuptools.package-dir]`` in pyproject.toml). Check both the editable install the
developers use and a normal wheel, which is what a user gets."""
from __future__ import annotations

import configparser
import importlib
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("package, directory", [("mpqc.passes", "passes"), ("mpqc.targets", "targets")])
def test_remapped_packages_import_from_the_repository(package, directory):
    module = importlib.import_module(package)
    assert Path(module.__file__).resolve() == REPO / directory / "__init__.py"


def test_readme_named_in_pyproject_exists():
    readme = tomllib.loads((REPO / "pyproject.toml").read_text())["project"].get("readme")
    assert readme is None or (REPO / readme).is_file(), f"pyproject.toml names {readme}, which is missing"


def _copy_sources(destination: Path) -> None:
    """Copy what pyproject.toml says the wheel is built from (project files and package dirs), nothing else.

    Building in a copy keeps ``build/`` and ``*.egg-info`` out of the repository.
    """
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    project = pyproject["project"]
    files = ["pyproject.toml", project.get("readme")]
    files += [p.name for p in REPO.glob("LICEN[CS]E*")]
    for name in filter(None, files):
        if (REPO / name).is_file():  # a missing readme fails its own test above
            shutil.copy2(REPO / name, destination / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for directory in set(pyproject["tool"]["setuptools"]["package-dir"].values()):
        shutil.copytree(REPO / directory, destination / directory, ignore=ignore)


def test_wheel_contains_all_packages_and_the_console_script(tmp_path):
    source, wheels = tmp_path / "src", tmp_path / "wheels"
    source.mkdir()
    _copy_sources(source)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"pip wheel failed:\n{result.stdout}\n{result.stderr}"
    (wheel,) = wheels.glob("mpqc-*.whl")

    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for package in ("mpqc", "mpqc/passes", "mpqc/targets", "mpqc/targets/tvm", "mpqc/targets/tvm/kernels",
                        "mpqc/quantizers", "mpqc/ops", "mpqc/integer_kernels"):
            assert f"{package}/__init__.py" in names, f"{package}/__init__.py missing from {wheel.name}"
        assert "mpqc/targets/tvm/loader.py" in names  # copied into every TVM artifact
        (entry_points,) = [name for name in names if name.endswith(".dist-info/entry_points.txt")]
        parser = configparser.ConfigParser()
        parser.read_string(archive.read(entry_points).decode())

    assert parser["console_scripts"]["mpqc"].strip() == "mpqc.cli:main"
