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

from collections import Counter
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.tree_util as jtu
import numpy as np

from ._steps import DEFAULT_SLOTS

__all__ = ["optimizer_slots"]


def _nbytes(tree: Any) -> int:
    return sum(
        int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
        for x in jtu.tree_leaves(tree)
        if hasattr(x, "dtype")
    )


def _state_bytes(optimizer: Any, params: Any) -> int:
    return _nbytes(jax.eval_shape(optimizer.init, params))


def optimizer_slots(
    model: Any,
    optimizer: Any = None,
    leaves: Sequence[Any] | None = None,
    inexact: Sequence[bool] | np.ndarray | None = None,
) -> float:
    """Optimizer-state bytes per float-parameter byte of `optimizer` on `model`.

    Nothing is allocated (`jax.eval_shape`); `None` is the runner's default Adam,
    `DEFAULT_SLOTS`. `leaves` are the model's leaves when the caller has them already
    (`ModelTree.leaves`): flattening a big model costs more than the measurement; `inexact`
    (`ModelTree.inexact`) says which of them are float arrays, for the same reason.

    >>> import optax
    >>> from eqx_explorer._examples import example_model
    >>> round(optimizer_slots(example_model(), optax.adam(1e-3)), 3)  # two moments (+ a count)
    2.0
    """
    if optimizer is None:
        return DEFAULT_SLOTS
    if leaves is None:
        leaves = jtu.tree_leaves(model)
    if inexact is None:
        inexact = [eqx.is_inexact_array(x) for x in leaves]
    kinds = Counter((x.shape, x.dtype) for x, f in zip(leaves, inexact) if f)
    total = sum(n * _nbytes(jax.ShapeDtypeStruct(*kind)) for kind, n in kinds.items())
    if not total:
        return 0.0
    try:
        shared = _state_bytes(optimizer, [])
        state = shared + sum(
            n * (_state_bytes(optimizer, [jax.ShapeDtypeStruct(*kind)]) - shared)
            for kind, n in kinds.items()
        )
    except Exception:  # an init that needs the model's structure: trace the model itself
        state = _state_bytes(optimizer, eqx.filter(model, eqx.is_inexact_array))
    return state / total
