"""Session setup shared by every test process.

The test processes of one run (pytest-xdist workers) share a JAX persistent compilation cache
in a temporary directory of that run: many tests build the same small programs (the same
example models, the same optimizers), and compiling each once per run, not once per test and
worker, is a large part of the suite's CPU time. Compilations are still traced, so
`compile_count` (a count of traces) is unaffected; tests/test_cache.py checks the cache itself
in processes of its own. Kernels and servers the tests start keep their own cache settings.

In the test processes XLA compiles with LLVM's optimizations off
(`--xla_backend_optimization_level=0`): these tests check what small programs compute, and
compiling them is most of their time (a sixth less with the flag). XLA's graph passes, which
decide what a program computes, still run. The browser tests' JupyterLab kernels compile with
the flag too: they compile large programs and run short loops (in five runs with the flag and
four without, those kernels spent 46-66 s of CPU against 68-78 s). The notebooks and scripts
the tests run in the Binder venv run long loops, which the flag slows more than it speeds
their compiles (notebook 06 took three times as long), so they, like `make bench`,
compile at XLA's default level.

Workers (`--dist loadfile`) take the browser tests as one unit, and first (a custom
scheduler): one JupyterLab server and one Chromium then serve them all, where each worker
started its own.
"""

from __future__ import annotations

import collections
import os
import shutil
import sys
import tempfile

import pytest

# jsonschema (under nbformat) imports rfc3987_syntax when it is installed (jupyter-events asks
# for it), and that module builds a lark grammar at import: it took a test process's collection
# from 4 s to 8 s. It serves only the "iri" formats, which no schema here uses; marked absent,
# jsonschema skips those two format checkers. Servers and kernels the tests start keep it.
sys.modules.setdefault("rfc3987_syntax", None)

_CACHE_VAR = "EQXE_TESTS_JAX_CACHE"  # set by the controller, inherited by its workers
FAST_COMPILE = "--xla_backend_optimization_level=0"  # also the browser tests' kernels


def pytest_configure(config: pytest.Config) -> None:
    import jax

    if not hasattr(config, "workerinput"):  # the controller (or a run without workers)
        os.environ[_CACHE_VAR] = tempfile.mkdtemp(prefix="eqxe-tests-jax-cache-")
    # XLA reads its flags once, when the backend starts: start it with the flag, then give
    # the environment back, so that processes started by the tests do not inherit it.
    flags = os.environ.get("XLA_FLAGS")
    os.environ["XLA_FLAGS"] = f"{flags or ''} {FAST_COMPILE}".strip()
    try:
        jax.devices()
    finally:
        if flags is None:
            del os.environ["XLA_FLAGS"]
        else:
            os.environ["XLA_FLAGS"] = flags
    jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_VAR])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: unknown without it
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """With `--dist loadfile`, workers take whole files, so that module-level caches are
    built once, and the browser tests (tests/e2e) as one unit, first: one JupyterLab server
    and one Chromium serve them all, not one per worker, and the longest unit starts first."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class _Scheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return "tests/e2e" if scope.startswith("tests/e2e/") else scope

    config.option.loadscopereorder = False  # keep the order `pytest_collection_modifyitems` set
    return _Scheduling(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Longest units first, so that none starts near the end: the browser tests, then the
    # files with the most tests marked slow (the notebooks), then those with the most tests.
    counts = collections.Counter(item.path for item in items)
    slow = collections.Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(
        key=lambda item: ("e2e" not in item.path.parts, -slow[item.path], -counts[item.path])
    )


def pytest_unconfigure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):  # after every worker is done
        shutil.rmtree(os.environ.pop(_CACHE_VAR, ""), ignore_errors=True)
