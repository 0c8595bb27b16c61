"""Hypothesis strategies for random Equinox models and random specs."""

from __future__ import annotations

import collections
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

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
