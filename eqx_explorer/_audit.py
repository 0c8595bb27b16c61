"""Leaf-by-leaf audit of a training step: what changed, what stayed frozen, what survived.

Statuses (`updated`, `frozen`, `leaked`, ...): see `eqx_explorer._report`.

Array comparisons are bit-level (`-0.0` vs `0.0` differs, a NaN that stays NaN is unchanged)
and run inside one `jax.jit`; only one flag and one norm per leaf come back to the host.

`audit_step` runs any step function; `assert_frozen_safe` is its pytest helper.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from ._errors import ExplorerError
from ._report import (
    BAD_STATUSES,
    FROZEN,
    KEPT,
    LEAKED,
    LOST,
    STALLED,
    UPDATED,
    LeafReport,
    Status,
    StepReport,
)
from ._spec import FilterSpec, check_spec

__all__ = ["audit_step", "assert_frozen_safe"]

# -- in-jit comparison helpers (shared with _steps) --------------------------------------


def sumsq(x: jax.Array) -> jax.Array:
    """Sum of squares in float32 (low-precision leaves are summed in float32)."""
    y = jnp.abs(x)
    if y.dtype.itemsize < 4:
        y = y.astype(jnp.float32)
    return jnp.sum(y * y).astype(jnp.float32)


def differs(old: jax.Array, new: jax.Array) -> jax.Array:
    """Bit-level "any element differs": NaN == NaN here, `-0.0 != 0.0`."""
    if jnp.issubdtype(old.dtype, jax.dtypes.prng_key):
        old, new = jax.random.key_data(old), jax.random.key_data(new)
    if jnp.issubdtype(old.dtype, jnp.complexfloating):
        return differs(old.real, new.real) | differs(old.imag, new.imag)
    if jnp.issubdtype(old.dtype, jnp.floating):
        bits = jnp.dtype(f"uint{8 * old.dtype.itemsize}")
        old, new = jax.lax.bitcast_convert_type(old, bits), jax.lax.bitcast_convert_type(new, bits)
    return jnp.any(old != new)


def stack(values: list, dtype: Any) -> jax.Array:
    return jnp.stack(values) if values else jnp.zeros((0,), dtype)


def compare(olds: list, news: list) -> tuple[jax.Array, jax.Array]:
    """Inside a jit: `(changed, sum of squared differences)`, one entry per array pair.

    A nonzero difference proves a change, so the slower bit-level comparison runs (under
    one `lax.cond` for all pairs, not one per pair: thousands of conds take seconds to
    compile) only when some difference is zero or NaN, e.g. a frozen leaf. The sum is NaN
    for non-float arrays, which are always compared bit by bit.
    """
    d = stack(
        [
            sumsq(n - o) if jnp.issubdtype(o.dtype, jnp.inexact) else jnp.float32(jnp.nan)
            for o, n in zip(olds, news)
        ],
        jnp.float32,
    )
    exact = jax.lax.cond(
        jnp.all(d > 0),
        lambda: jnp.zeros(len(olds), bool),
        lambda: stack([differs(o, n) for o, n in zip(olds, news)], bool),
    )
    return (d > 0) | exact, d


@jax.jit
def _compare_all(olds: list, news: list) -> tuple[jax.Array, jax.Array]:
    changed, d = compare(olds, news)
    return changed, jnp.sqrt(d)


# -- host-side statuses ------------------------------------------------------------------


def _describe(x: Any) -> str:
    if x is None:
        return "None"
    if eqx.is_array(x):
        return f"{x.dtype}{list(x.shape)}"
    name = getattr(x, "__qualname__", None) or getattr(x, "__name__", None)
    if callable(x) and name:
        return f"{type(x).__name__} {name}"
    text = repr(x)
    return text if len(text) <= 30 else text[:29] + "…"


def _same_value(old: Any, new: Any) -> bool:
    if old is new:
        return True
    if type(old) is not type(new):
        return False
    try:
        return bool(old == new)
    except Exception:  # an `==` that raises or returns an array: not provably equal
        return False


def non_array_status(old: Any, new: Any) -> tuple[Status, str]:
    """`kept` or `lost` (with why) for a leaf that was not an array."""
    if new is None:
        return LOST, f"became None (was {_describe(old)})"
    if _same_value(old, new):
        return KEPT, ""
    if type(old) is not type(new):
        return LOST, f"changed type: {_describe(old)} -> {_describe(new)}"
    return LOST, f"changed value: {_describe(old)} -> {_describe(new)}"


def array_status(trainable: bool, changed: bool) -> Status:
    if trainable:
        return UPDATED if changed else STALLED
    return LEAKED if changed else FROZEN


def array_lost(old: Any, new: Any) -> str | None:
    """Why an array leaf counts as `lost` (None, not an array, other dtype/shape), or None."""
    if new is None:
        return f"became None (was {_describe(old)})"
    if not eqx.is_array(new):
        return f"became {_describe(new)} (was {_describe(old)})"
    if new.dtype != old.dtype or new.shape != old.shape:
        return f"changed {_describe(old)} -> {_describe(new)}"
    return None


# -- audit_step ----------------------------------------------------------------------------


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()  # a leaf whose key path is gone from the returned model


def _leaves_by_key(tree: Any) -> dict:
    flat, _ = jtu.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)
    return {tuple(path): leaf for path, leaf in flat}


def _model_of(out: Any, model: Any) -> Any:
    # A step returns the model, or a tuple `(model, opt_state, ...)`. A model that is itself
    # a tuple is recognised by its structure (None counts as a leaf, so the damage of filtering
    # before `eqx.apply_updates`, activations turned to None, does not change it).
    if not isinstance(out, tuple):
        return out
    as_leaf = {"is_leaf": lambda x: x is None}
    if jtu.tree_structure(out, **as_leaf) == jtu.tree_structure(model, **as_leaf):
        return out
    if not out:
        raise ExplorerError("the step function returned an empty tuple; return the new model")
    return out[0]


def audit_step(
    step_fn: Callable, model: Any, *args: Any, spec: FilterSpec | None = None, **kwargs: Any
) -> StepReport:
    """Run `step_fn(model, *args, **kwargs)` once and audit the model it returns, leaf by leaf.

    With `spec`, frozen arrays that changed are `leaked`; without one, every float array
    counts as trainable (`updated`/`stalled`). Int/bool arrays are `kept` or `leaked`;
    non-array leaves `kept` or `lost`. Neither `model` nor the arguments are changed.

    **Arguments:**

    - `step_fn`: any step function (jitted or not) returning the new model, or a tuple whose
      first element is the new model.
    - `model`: the model passed to `step_fn` first.
    - `*args`, `**kwargs`: the rest of `step_fn`'s arguments (optimizer state, batch, ...).
    - `spec`: the `FilterSpec` the step should respect; default: every float array trains.

    **Returns:**

    A `StepReport` with one `LeafReport` per leaf of `model`. If `step_fn` raises, the report
    has no leaves and `error` holds the exception.

    The classic bug, filtering the model before `eqx.apply_updates`, turns the activation
    functions into `None`:

    >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
    >>> def bad_step(model, updates):
    ...     return eqx.apply_updates(eqx.filter(model, eqx.is_array), updates)
    >>> updates = jax.tree.map(jnp.ones_like, eqx.filter(model, eqx.is_array))
    >>> report = ex.audit_step(bad_step, model, updates)
    >>> report.by_status("lost")
    ['activation', 'final_activation']
    """
    if not callable(step_fn):
        raise ExplorerError(
            f"audit_step(step_fn, model, ...) takes your step function first, got "
            f"{type(step_fn).__name__}; e.g. audit_step(train_step, model, opt_state, batch)"
        )
    checked = check_spec(spec, model, "audit_step(step_fn, model, ..., spec=)")
    tree = checked.model_tree
    trainable = checked.mask
    try:
        out = step_fn(model, *args, **kwargs)
    except Exception as e:  # a failing user step is a finding, not a crash of the audit
        return StepReport([], error=f"the step function raised {type(e).__name__}: {e}")
    new_model = _model_of(out, model)

    new_by_key = _leaves_by_key(new_model)
    news: list[Any] = []
    for i in range(tree.num_leaves):
        key = tuple(tree.keys[tree.leaf_node[i]])
        news.append(new_by_key.get(key, _MISSING))

    olds = tree.leaves
    pairs = [
        i
        for i in range(tree.num_leaves)
        if tree.is_array[i] and news[i] is not _MISSING and array_lost(olds[i], news[i]) is None
    ]
    changed, delta = jax.device_get(
        _compare_all([jnp.asarray(olds[i]) for i in pairs], [jnp.asarray(news[i]) for i in pairs])
    )
    by_index = {i: (bool(c), float(d)) for i, c, d in zip(pairs, changed, delta)}

    leaves = []
    for i in range(tree.num_leaves):
        path = tree.paths[tree.leaf_node[i]]
        old, new = olds[i], news[i]
        train = bool(trainable[i])
        if new is _MISSING:
            leaves.append(LeafReport(path, LOST, trainable=train, detail="no longer in the model"))
        elif not tree.is_array[i]:
            status, detail = non_array_status(old, new)
            leaves.append(LeafReport(path, status, detail=detail))
        elif i not in by_index:
            leaves.append(
                LeafReport(path, LOST, trainable=train, detail=array_lost(old, new) or "")
            )
        else:
            was_changed, d = by_index[i]
            status = array_status(train, was_changed)
            if status == FROZEN and not tree.inexact[i]:
                status = KEPT  # an int/bool array: never trainable
            detail = ""
            if status == LEAKED:
                detail = "frozen but changed" if tree.inexact[i] else f"{old.dtype} array changed"
            leaves.append(
                LeafReport(
                    path,
                    status,
                    delta_norm=d if tree.inexact[i] else None,
                    trainable=train,
                    finite=bool(np.isfinite(d)) if tree.inexact[i] else True,
                    detail=detail,
                )
            )
    return StepReport(leaves, steps=1)


def assert_frozen_safe(
    step_fn: Callable, model: Any, *args: Any, spec: FilterSpec | None = None, **kwargs: Any
) -> StepReport:
    """`audit_step`, raising `AssertionError` (with a table) on a `leaked`/`lost` leaf or error.

    A pytest helper: `assert_frozen_safe(my_step, model, opt_state, batch, spec=spec)`.

    **Arguments:**

    As `audit_step`: `step_fn`, `model`, the rest of the step's arguments, and `spec`.

    **Returns:**

    The `StepReport` when the step is safe, for further checks.

    >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
    >>> spec = ex.FilterSpec(model).freeze("layers[0]")
    >>> def step(model, updates):  # None-safe, and it applies only the trainable updates
    ...     return eqx.apply_updates(model, eqx.filter(updates, spec.tree))
    >>> updates = jax.tree.map(jnp.ones_like, eqx.filter(model, eqx.is_array))
    >>> ex.assert_frozen_safe(step, model, updates, spec=spec).by_status("frozen")
    ['layers[0].weight', 'layers[0].bias']
    """
    report = audit_step(step_fn, model, *args, spec=spec, **kwargs)
    if report.ok:
        return report
    counts = report.counts
    parts = [f"{counts[s]} {s}" for s in (LEAKED, LOST) if counts[s]]
    lines = [f"step is not frozen-safe: {', '.join(parts) or 'it failed'}"]
    if report.error:
        lines.append(f"error: {report.error}")
    if parts:
        lines.append(report.table(only=BAD_STATUSES))
    lines += [  # one line each, readable in a terminal or a notebook
        "leaked = a frozen leaf changed: freeze by eqx.partition or optax.partition with",
        "  set_to_zero, not stop_gradient or optax.masked.",
        "lost = a leaf became None or changed type: apply the updates to the full model,",
        "  not to eqx.filter(model, eqx.is_array).",
    ]
    raise AssertionError("\n".join(lines))
