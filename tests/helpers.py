"""Helpers shared by the test modules (tests import helpers from here, never from each other)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import equinox as eqx
import jax
import jax.tree_util as jtu
import nbformat
import numpy as np
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from eqx_explorer import FilterSpec

RUFF = str(Path(sys.executable).parent / "ruff")
ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
ARTIFACTS = ROOT / "test-artifacts"
BUDGET_S = 60.0  # the per-notebook budget on 2 cores
CELL_TIMEOUT_S = 300


def assert_rebuilds(code: str, spec: FilterSpec) -> dict:
    """`code` builds `spec`'s filter spec exactly (and `set_inference` iff the spec sets flags)."""
    namespace = {"model": spec.model}
    exec(code, namespace)
    built = namespace["filter_spec"]
    assert jtu.tree_structure(built) == jtu.tree_structure(spec.tree)
    leaves = jtu.tree_leaves(built)
    assert all(type(b) is bool for b in leaves)
    assert leaves == jtu.tree_leaves(spec.tree)
    # `set_inference` exactly when the spec sets inference flags, setting exactly those.
    assert ("set_inference" in namespace) == bool(spec.inference_overrides)
    if spec.inference_overrides:
        got = namespace["set_inference"](spec.model)
        want = spec.apply_inference(spec.model)
        assert jtu.tree_structure(got) == jtu.tree_structure(want)
        assert all(a is b for a, b in zip(jtu.tree_leaves(got), jtu.tree_leaves(want), strict=True))
    return namespace


def assert_ruff_clean(codes: list[str], tmp_dir: Path) -> None:
    """`ruff check --select E,F,W` (with `model` a builtin) and `ruff format --check`, at once."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for i, code in enumerate(dict.fromkeys(codes)):
        path = tmp_dir / f"out_{i}.py"
        path.write_text(code)
        files.append(str(path))
    common = ["--isolated", "--line-length", "100", "--no-cache"]
    check = [RUFF, "check", *common, "--select", "E,F,W", "--config", 'builtins = ["model"]']
    lint = subprocess.run([*check, *files], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = subprocess.run(
        [RUFF, "format", "--check", "--diff", *common, *files], capture_output=True, text=True
    )
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


class Deep(eqx.Module):
    """A deep stack of small blocks: the shape of a large model without its compile time."""

    blocks: list
    head: np.ndarray


def deep_model(n_leaves: int) -> Deep:
    """A `Deep` of about `n_leaves` leaves: blocks of four float arrays and an activation."""
    blocks = [
        {"w1": np.full((2, 2), i, np.float32), "b1": np.zeros(2, np.float32)}
        | {"w2": np.eye(2, dtype=np.float32), "b2": np.ones(2, np.float32), "act": jax.nn.relu}
        for i in range(max(1, (n_leaves - 1) // 5))
    ]
    return Deep(blocks, np.ones(2, np.float32))


# -- notebooks (tests/test_notebooks.py, and tests/test_binder.py in a Binder venv) ---------
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
