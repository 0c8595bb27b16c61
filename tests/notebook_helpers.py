"""Running the notebooks, shared by tests/test_notebooks.py and tests/test_binder.py (the latter
in a venv made from binder/requirements.txt). Apart from tests/helpers.py because the Jupyter
client stack takes about 2 s to import, which the unit tests should not pay."""

from __future__ import annotations

import json
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
