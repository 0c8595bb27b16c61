"""JAX's persistent compilation cache keeps a StepRunner's compiled programs across processes.

README, "Compilation cache": with `jax_compilation_cache_dir` set (and the compile-time
threshold at 0, as small CPU programs compile in well under JAX's default 1 s), a second
process running the same step loads every program from disk instead of compiling it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# The events JAX 0.10 records (jax/_src/compiler.py, jax/_src/compilation_cache.py): a program
# loaded from the cache, and a program written to it after a compilation.
HIT = "/jax/compilation_cache/cache_hits"
WRITE = "/jax/compilation_cache/cache_misses"

STEP = f"""
import json, sys

import jax

jax.config.update("jax_compilation_cache_dir", sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
events = []
jax.monitoring.register_event_listener(lambda event, **_: events.append(event))

import equinox as eqx
import jax.numpy as jnp

import eqx_explorer as ex

model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
batch = jnp.linspace(-1.0, 1.0, 16).reshape(8, 2)


def loss_fn(m, x):
    return jnp.mean(jax.vmap(m)(x) ** 2)


spec = ex.FilterSpec(model).freeze("layers[0]")
runner = ex.StepRunner(model, spec, loss_fn, batch)
report = runner.step(1)
assert report.ok, report.error
runner.wait_ready()  # the programs built in the background are written too
out = {{"hits": events.count({HIT!r}), "writes": events.count({WRITE!r}), "loss": report.loss}}
print(json.dumps(out))
"""


def run_step(cache_dir: Path) -> dict:
    """One StepRunner step in a fresh interpreter using `cache_dir`; its cache events."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    done = subprocess.run(
        [sys.executable, "-c", STEP, str(cache_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_second_process_loads_the_compiled_step_from_the_cache(tmp_path):
    cache = tmp_path / "jax-cache"
    first = run_step(cache)
    assert first["hits"] == 0 and first["writes"] > 0  # compiled, then written
    assert len(list(cache.iterdir())) >= first["writes"]
    second = run_step(cache)
    # Every program of the first run comes back from disk; none is compiled again.
    assert second["hits"] == first["writes"] and second["writes"] == 0
    assert second["loss"] == first["loss"]  # the loaded programs compute the same step
