"""Helpers shared by the test modules (tests import helpers from here, never from each other)."""

from __future__ import annotations

import collections
import subprocess
import sys
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from hypothesis import strategies as st

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


# -- hypothesis strategies: random Equinox models and random specs ----------------------
Pair = collections.namedtuple("Pair", ["left", "right"])


class Box(eqx.Module):
    first: Any
    second: Any
    label: str = eqx.field(static=True, default="box")


class Solo(eqx.Module):
    only: Any


_counter = iter(range(10**9))


def _float_array(shape):
    return jnp.full(shape, float(next(_counter) % 7) + 0.5, jnp.float32)


leaf = st.one_of(
    st.tuples(st.integers(0, 3), st.integers(1, 3)).map(
        lambda s: _float_array(s[:1] if s[0] == 0 else s)
    ),
    st.just(None).map(lambda _: jnp.zeros((2,), jnp.int32)),
    st.just(None).map(lambda _: np.ones((2,), np.float32)),
    st.just(None).map(lambda _: jnp.ones((2,), jnp.complex64)),
    st.just(None).map(lambda _: jnp.array([True, False])),
    st.sampled_from([jax.nn.relu, jnp.tanh, 0.5, 3, "gelu", True, None]),
)

dict_keys = st.one_of(
    st.text(max_size=5),  # quotes, backslashes, newlines, unicode
    st.sampled_from(["it's", 'say "hi"', "a\\b", "line\nbreak", "ключ", "**", "x.y[0]"]),
)


def _containers(children: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(
        st.lists(children, min_size=1, max_size=3),
        st.lists(children, min_size=1, max_size=3).map(tuple),
        st.dictionaries(dict_keys, children, min_size=1, max_size=3),
        st.dictionaries(st.integers(0, 50), children, min_size=1, max_size=2),
        st.tuples(children, children).map(lambda t: Pair(*t)),
        st.tuples(children, children).map(lambda t: Box(*t)),
        children.map(Solo),
    )


models = st.recursive(leaf, _containers, max_leaves=12).map(Solo)


def random_edits(tree) -> st.SearchStrategy:
    """A list of (action, path) over the model's nodes."""
    return st.lists(
        st.tuples(st.sampled_from(["freeze", "unfreeze"]), st.sampled_from(tree.paths)),
        max_size=5,
    )


# Learning-rate factors a user picks: frozen, fractions (one not a short decimal), full, above.
lr_factor = st.sampled_from([0.0, 0.1, 0.5, 1 / 3, 1.0, 2.0])


def random_lr_factors(tree) -> st.SearchStrategy:
    """A factor per leaf, 0 wherever the leaf cannot train (for `FilterSpec.set_lr_factors`)."""
    return st.lists(lr_factor, min_size=tree.num_leaves, max_size=tree.num_leaves).map(
        lambda factors: np.where(tree.inexact, factors, 0.0)
    )
