"""How much optimizer state an optimizer keeps per parameter byte, measured on a small proxy.

Tracing `optimizer.init` over a whole model costs seconds on thousands of leaves, and the
widget only needs the header's estimate. Optimizers keep per-leaf state whose size depends on
the leaf's shape and dtype alone (Adam's two moments, Adafactor's factored rows and columns),
plus a few scalars for the whole tree (a step count), so one array per distinct
(shape, dtype) tells the size of every leaf of that kind. An optimizer whose `init` needs the
model's own structure (`optax.multi_transform` or `optax.masked` given a pytree of labels)
fails on the proxy and is traced over the whole model instead; one given a labelling
*function* of paths is measured as it labels the proxy (an estimate, as the header says).
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.tree_util as jtu
import numpy as np

from ._spec import FilterSpec
from ._steps import MASKED, OPTAX_MASK, PARTITION, check_layout, check_method
from ._tree import ModelTree

__all__ = ["optimizer_slots", "opt_state_bytes", "DEFAULT_SLOTS", "STATE_ON_TRAINABLE"]

# Methods whose optimizer state covers only the trainable leaves (structural layout).
STATE_ON_TRAINABLE = (PARTITION, OPTAX_MASK)
# Optimizer-state bytes per float byte of the default optimizer, Adam (mu and nu).
DEFAULT_SLOTS = 2.0


def _nbytes(tree: Any) -> int:
    return sum(
        int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
        for x in jtu.tree_leaves(tree)
        if hasattr(x, "dtype")
    )


def _state_bytes(optimizer: Any, params: Any) -> int:
    return _nbytes(jax.eval_shape(optimizer.init, params))


def _states_bytes(optimizer: Any, proxies: list) -> list[int]:
    """`_state_bytes` of each of `proxies`, traced together (one `eval_shape`, not one each)."""
    states = jax.eval_shape(lambda ps: [optimizer.init(p) for p in ps], proxies)
    return [_nbytes(state) for state in states]


def optimizer_slots(model: Any, optimizer: Any = None, tree: ModelTree | None = None) -> float:
    """Optimizer-state bytes per float-parameter byte of `optimizer` on `model`.

    Nothing is allocated (`jax.eval_shape`); `None` is the runner's default Adam,
    `DEFAULT_SLOTS`. `tree` is the model's `ModelTree` when the caller has it already: its
    array types give the proxy without another pass over the leaves.

    >>> import optax
    >>> from eqx_explorer._examples import example_model
    >>> round(optimizer_slots(example_model(), optax.adam(1e-3)), 3)  # two moments (+ a count)
    2.0
    """
    if optimizer is None:
        return DEFAULT_SLOTS
    tree = ModelTree(model) if tree is None else tree
    count = np.bincount(tree.array_type[tree.inexact], minlength=len(tree.array_types))
    kinds = {tree.array_types[t]: int(n) for t, n in enumerate(count) if n}
    total = sum(n * _nbytes(jax.ShapeDtypeStruct(*kind)) for kind, n in kinds.items())
    if not total:
        return 0.0
    try:  # the shared state (no leaf), then one leaf of each kind
        shared, *each = _states_bytes(
            optimizer, [[], *([jax.ShapeDtypeStruct(*kind)] for kind in kinds)]
        )
        state = shared + sum(n * (b - shared) for n, b in zip(kinds.values(), each))
    except Exception:  # an init that needs the model's structure: trace the model itself
        state = _state_bytes(optimizer, eqx.filter(model, eqx.is_inexact_array))
    return state / total


def opt_state_bytes(spec: FilterSpec, method: str, slots: float, layout: str = MASKED) -> int:
    """Estimated optimizer-state bytes of a `StepRunner` (`slots` from `optimizer_slots`).

    The masked layout holds state for every float leaf; the structural one, under
    `"partition"` and `"optax_mask"`, only for the trainable ones.

    >>> from eqx_explorer._examples import example_model
    >>> spec = ex.FilterSpec(example_model()).freeze("embed")
    >>> opt_state_bytes(spec, "partition", 2.0, "structural") == 2 * spec.counts["trainable_bytes"]
    True
    """
    c = spec.counts
    covered = c["trainable_bytes"]
    if check_layout(layout) == MASKED or check_method(method) not in STATE_ON_TRAINABLE:
        covered += c["frozen_bytes"]
    return int(round(slots * covered))
