"""Packaging: every package folder is listed in pyproject; a regular (non-editable) install works.

The install test takes about 5 s on an idle machine (30 s with the other core busy), so it is not marked slow.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO = Path(__file__).resolve().parents[2]


def _setuptools() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_folder_is_listed_in_pyproject():
    config = _setuptools()
    listed, package_dir = set(config["packages"]), config["package-dir"]
    folder_of = {Path(folder): name for name, folder in package_dir.items()}
    found = set()
    for root, top in folder_of.items():
        for init in (REPO / root).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO / root)
            if "__pycache__" in relative.parts:
                continue
            found.add(".".join([top, *relative.parts]))
    assert found, "no packages found"
    missing = sorted(found - listed)
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {missing}"
    stale = sorted(listed - found)
    assert not stale, f"listed in pyproject.toml but no folder with __init__.py: {stale}"


def test_package_dir_maps_the_top_level_folders():
    package_dir = _setuptools()["package-dir"]
    assert package_dir == {"zoo": "zoo", "zoo.modules": "modules", "zoo.datamodules": "datamodules",
                           "zoo.kernels": "kernels"}


def test_bench_provenance_checks_every_mapped_folder():
    """The bench's '+mixed' check (records.foreign_code) looks at the packages pyproject maps to folders."""
    from zoo.harness.bench.records import CODE_PACKAGES

    assert set(CODE_PACKAGES) == set(_setuptools()["package-dir"])


def test_regular_install_imports_zoo_modules_and_no_top_level_modules(tmp_path):
    target = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "--target", str(target), str(REPO)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    assert (target / "zoo" / "modules" / "base.py").exists()
    assert (target / "zoo" / "kernels" / "selected_ce.py").exists()
    for shadow in ("modules", "datamodules", "kernels"):
        assert not (target / shadow).exists(), f"{shadow}/ installed as a top-level package"
    probe = ("import importlib.util, zoo.modules.base as b, zoo.datamodules.sft, zoo.kernels;"
             "print(b.__file__);"
             "print(importlib.util.find_spec('modules'), importlib.util.find_spec('datamodules'))")
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    path, specs = result.stdout.strip().splitlines()[-2:]
    assert path.startswith(str(target))  # the installed copy, not the editable checkout
    assert specs == "None None"
