"""Helpers shared by the test modules (tests import helpers from here, never from each other)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.tree_util as jtu
import numpy as np

from eqx_explorer import FilterSpec

RUFF = str(Path(sys.executable).parent / "ruff")


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
