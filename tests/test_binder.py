"""binder/ works on Binder, checked without Docker.

1. `repo2docker --no-build` reads the repository as Binder would: it must pick binder/, the
   Python version of binder/runtime.txt (its default is too old for current JAX) and install
   binder/requirements.txt after copying the repository (the `.` line is the repo itself).
2. Its pins are this venv's versions. tests/test_notebooks.py runs every notebook in a fresh
   venv made only from binder/requirements.txt, installed from the repository root as
   repo2docker runs pip (`notebook_helpers.binder_python`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from tests.notebook_helpers import ROOT

BINDER = ROOT / "binder"
IN_CI = bool(os.environ.get("CI"))


def _requirements() -> list[str]:
    lines = (BINDER / "requirements.txt").read_text().splitlines()
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


def _runtime_version() -> str:
    text = (BINDER / "runtime.txt").read_text().strip()
    match = re.fullmatch(r"python-(3\.\d+)", text)
    assert match, f"binder/runtime.txt should read like python-3.11, not {text!r}"
    return match.group(1)


def _repo2docker() -> str:
    exe = Path(sys.executable).parent / "repo2docker"
    if exe.exists():
        return str(exe)
    found = shutil.which("repo2docker")
    if found:
        return found
    message = "repo2docker is not installed: add jupyter-repo2docker to the test extras"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def test_readme_links_binder_to_the_tour_in_jupyterlab():
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"https://mybinder\.org/v2/gh/[^)\s]+", readme)
    assert links, "README.md has no Binder link"
    assert any(link.endswith("?urlpath=lab/tree/notebooks/00_tour.ipynb") for link in links)
    assert (ROOT / "notebooks" / "00_tour.ipynb").exists()


def test_binder_folder_has_only_environment_files():
    names = sorted(p.name for p in BINDER.iterdir())
    assert names == ["requirements.txt", "runtime.txt"]  # nothing Docker-specific


def test_requirements_are_pinned_cpu_and_install_the_repo():
    reqs = _requirements()
    assert "." in reqs, "binder/requirements.txt must install the package itself with `.`"
    pinned = [r for r in reqs if r != "."]
    for req in pinned:
        assert re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][A-Za-z0-9.]*", req), f"not pinned: {req}"
    names = {r.split("==")[0].lower().replace("_", "-") for r in pinned}
    assert {"jax", "jaxlib", "equinox", "optax", "anywidget", "jupyterlab"} <= names
    assert not any(n.startswith(("jax-cuda", "jax-tpu", "nvidia-")) for n in names)
    assert not any("[cuda" in r or "[tpu" in r for r in reqs)


def test_runtime_python_suits_the_pins():
    """runtime.txt names a Python the pinned JAX supports; repo2docker's default does not."""
    version = Version(_runtime_version())
    for dist in ("jax", "jaxlib", "numpy"):
        requires = metadata.metadata(dist)["Requires-Python"] or ""
        assert version in SpecifierSet(requires), f"{dist} needs Python {requires}"


def test_pins_match_the_tested_venv():
    """The notebooks are tested in this venv, so Binder must install exactly its versions."""
    drift = []
    for req in _requirements():
        if req == ".":
            continue
        name, version = req.split("==")
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = "nothing"
        if installed != version:
            drift.append(f"{name}: pinned {version}, venv has {installed}")
    assert not drift, "update binder/requirements.txt to the tested venv: " + "; ".join(drift)


def _dry_run(repo: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [_repo2docker(), "--no-build", "--no-run", str(repo)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=repo,
    )


def test_repo2docker_accepts_the_binder_folder():
    result = _dry_run(ROOT)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    version = _runtime_version()
    match = re.search(r"Building conda environment for python=(\S+)", log)
    assert match, log
    print(f"repo2docker would build Python {match.group(1)}")
    assert match.group(1) == version
    dockerfile = result.stdout
    # the environment comes from binder/, after the whole repository is copied in (so `.` is
    # the repository root, the directory pip runs in)
    install = 'pip install --no-cache-dir -r "binder/requirements.txt"'
    assert install in dockerfile
    assert dockerfile.index("COPY --chown=0:0 src/ ${REPO_DIR}/") < dockerfile.index(install)
    assert "pip install --no-cache-dir ." not in dockerfile.replace(install, "")
