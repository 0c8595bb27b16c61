"""Running the notebooks (tests/test_notebooks.py), in a venv made only from
binder/requirements.txt, as Binder makes it. Apart from tests/helpers.py because the Jupyter
client stack takes about 2 s to import, which the unit tests should not pay."""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
ARTIFACTS = ROOT / "test-artifacts"
BUDGET_S = 60.0  # the per-notebook budget on 2 cores
CELL_TIMEOUT_S = 300


def clean_env() -> dict[str, str]:
    """This process's environment without its venv, for another interpreter."""
    return {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PYTHONPATH"}}


def uv() -> str:
    """The uv executable beside this interpreter (the test extras install it), or on PATH."""
    exe = Path(sys.executable).parent / "uv"
    found = str(exe) if exe.exists() else shutil.which("uv")
    if found is None:
        raise RuntimeError("uv is not installed: add uv to the test extras")
    return found


@functools.cache
def binder_python() -> str:
    """The Python of a new venv with binder/requirements.txt installed from the repo root, as
    repo2docker runs pip there (so its `.` line installs this repository, not in editable mode).

    Made once per test process, by uv: every line but `.` is pinned, so it resolves exactly
    what repo2docker's pip does, in seconds rather than a minute.
    """
    root = Path(tempfile.mkdtemp(prefix="eqxe-binder-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    venv, start = root / "venv", time.perf_counter()
    steps = [  # on this interpreter (tests/test_binder.py checks it suits the pins)
        [uv(), "venv", "-q", "--python", sys.executable, str(venv)],
        [uv(), "pip", "install", "-q", "--python", str(venv / "bin" / "python")]
        + ["-r", "binder/requirements.txt"],
    ]
    for argv in steps:
        done = subprocess.run(
            argv,
            cwd=ROOT,
            env={**clean_env(), "UV_PYTHON_DOWNLOADS": "never"},
            capture_output=True,
            text=True,
            timeout=1200,
        )
        if done.returncode:
            output = done.stdout[-3000:] + done.stderr[-3000:]
            raise RuntimeError(f"{' '.join(argv)} failed:\n{output}")
    record_time("install binder/requirements.txt", time.perf_counter() - start, "binder")
    return str(venv / "bin" / "python")


def run_notebook(path: Path, python: str = sys.executable) -> tuple[nbformat.NotebookNode, float]:
    """Execute `path` in a new kernel started with `python`; return the notebook and seconds.

    The kernel is named `python3` (as the notebooks' metadata says) but defined here, in a
    temporary kernel directory, so it cannot resolve to some other interpreter.
    """
    nb = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory(prefix="eqxe-kernels-") as tmp:
        spec_dir = Path(tmp) / "kernels" / "python3"
        spec_dir.mkdir(parents=True)
        argv = [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        spec = {"argv": argv, "display_name": "Python 3", "language": "python"}
        (spec_dir / "kernel.json").write_text(json.dumps(spec))
        ksm = KernelSpecManager(kernel_dirs=[str(spec_dir.parent)], ensure_native_kernel=False)
        km = KernelManager(kernel_name="python3", kernel_spec_manager=ksm)
        client = NotebookClient(
            nb,
            km=km,
            timeout=CELL_TIMEOUT_S,
            startup_timeout=120,
            kernel_name="python3",
            resources={"metadata": {"path": str(path.parent)}},
        )
        start = time.perf_counter()
        client.execute()
        return nb, time.perf_counter() - start


def record_time(name: str, seconds: float, where: str = "venv") -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    log = ARTIFACTS / "notebook-times.json"
    try:
        times = json.loads(log.read_text())
    except (OSError, ValueError):
        times = {}
    times.setdefault(where, {})[name] = round(seconds, 2)
    log.write_text(json.dumps(times, indent=1, sort_keys=True))
    print(f"{where}: {name} ran in {seconds:.1f} s")
    if seconds > BUDGET_S:
        warnings.warn(
            f"{name} took {seconds:.0f} s ({where}); the notebooks should run in under "
            f"{BUDGET_S:.0f} s on 2 cores",
            stacklevel=2,
        )
