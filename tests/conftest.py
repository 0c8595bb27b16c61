"""Session setup shared by every test process.

The test processes of one run (pytest-xdist workers) share a JAX persistent compilation cache
in a temporary directory of that run: many tests build the same small programs (the same
example models, the same optimizers), and compiling each once per run, not once per test and
worker, is a large part of the suite's CPU time. Compilations are still traced, so
`compile_count` (a count of traces) is unaffected; tests/test_cache.py checks the cache itself
in processes of its own. Kernels and servers the tests start keep their own settings.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

_CACHE_VAR = "EQXE_TESTS_JAX_CACHE"  # set by the controller, inherited by its workers


def pytest_configure(config: pytest.Config) -> None:
    import jax

    if not hasattr(config, "workerinput"):  # the controller (or a run without workers)
        os.environ[_CACHE_VAR] = tempfile.mkdtemp(prefix="eqxe-tests-jax-cache-")
    jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_VAR])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def pytest_unconfigure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):  # after every worker is done
        shutil.rmtree(os.environ.pop(_CACHE_VAR, ""), ignore_errors=True)
