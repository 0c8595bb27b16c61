"""Leaf-by-leaf audit of a training step: what changed, what stayed frozen, what survived.

Statuses, per leaf of the model (`jtu.tree_leaves` order):

- `updated`: a trainable array that changed.
- `stalled`: a trainable array that stayed bit-identical (no gradient, or a zero step, reached it).
- `frozen`: a frozen float array that stayed bit-identical.
- `leaked`: a frozen float array, or an int/bool array, that changed.
- `kept`: a leaf that can never train (`static` in the tree and the summary) that came back
  the same: a non-array leaf (the same object, or an equal one) or an int/bool array.
- `lost`: a leaf that became `None` or changed type (dtype/shape for arrays), or a non-array
  leaf whose value changed.
- `unchanged`: an array of the model's state (`eqx.nn.State`, `StepReport.state_leaves`)
  that stayed bit-identical; one that changed is `updated`.

Array comparisons are bit-level (`-0.0` vs `0.0` differs, a NaN that stays NaN is unchanged)
and run inside one `jax.jit`; only one flag and one norm per leaf come back to the host.

`audit_step` runs any step function; `assert_frozen_safe` is its pytest helper.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from ._errors import ExplorerError
from ._spec import FilterSpec

__all__ = [
    "LeafReport",
    "StepReport",
    "audit_step",
    "assert_frozen_safe",
    "STATUSES",
]

UPDATED, STALLED, FROZEN, LEAKED, KEPT, LOST, UNCHANGED = (
    "updated",
    "stalled",
    "frozen",
    "leaked",
    "kept",
    "lost",
    "unchanged",
)
STATUSES = (UPDATED, STALLED, FROZEN, LEAKED, KEPT, LOST, UNCHANGED)
BAD_STATUSES = frozenset({LEAKED, LOST})


def listed(paths: list[str], most: int = 10) -> str:
    """`paths` joined, the first `most` of them (a message stays readable on big models)."""
    more = f" and {len(paths) - most} more" if len(paths) > most else ""
    return ", ".join(paths[:most]) + more


def _json_float(x: float | None) -> float | None:
    # JSON has no NaN/inf (a browser's JSON.parse rejects them): send None, `finite` says why.
    return x if x is not None and math.isfinite(x) else None


@dataclasses.dataclass(frozen=True)
class LeafReport:
    """What one step (or one `step(n)` call) did to one leaf.

    `grad_norm`/`update_norm` are those of the last step attempted (`None`: no gradient or
    update exists for this leaf, e.g. a frozen leaf under `"partition"`, whose gradient is
    `None`, unlike `"stop_gradient"`, whose gradient is `0.0`). `delta_norm` is the norm of
    the change committed by the call (`None` for non-float leaves). `finite` is `False` when
    the leaf's gradient or update held a NaN/inf. `detail` explains `lost`/`leaked` and notes
    such as a fresh optimizer state. `violation` is measured on constrained leaves
    (`FilterSpec.constrain`) after the call's last step: the minimum value for `positive`,
    `‖QᵀQ − I‖` for `orthogonal`, `|‖p‖ − 1|` for `unit_norm`, the distance outside the
    interval for `interval`; `None` on unconstrained leaves. `lr_factor` is the multiplier of
    the leaf's updates (`FilterSpec.scale_lr`): 0 for a leaf that does not train, `None` for
    non-float leaves; the same gradient with a 10x smaller factor makes a 10x smaller
    `update_norm` under SGD (with momentum too).
    """

    path: str
    status: str
    grad_norm: float | None = None
    update_norm: float | None = None
    delta_norm: float | None = None
    trainable: bool = False
    finite: bool = True
    detail: str = ""
    violation: float | None = None
    lr_factor: float | None = None

    def to_dict(self) -> dict:
        """JSON-ready: non-finite norms become `None` (see `finite`)."""
        return {
            "path": self.path,
            "status": self.status,
            "grad_norm": _json_float(self.grad_norm),
            "update_norm": _json_float(self.update_norm),
            "delta_norm": _json_float(self.delta_norm),
            "trainable": self.trainable,
            "finite": self.finite,
            "detail": self.detail,
            "violation": _json_float(self.violation),
            "lr_factor": _json_float(self.lr_factor),
        }


@dataclasses.dataclass(frozen=True)
class StepReport:
    """The audit of one `StepRunner.step(n)` call or one `audit_step` run.

    ```python
    report = runner.step(3)
    report.ok                   # no leaked, no lost, no error
    report.by_status("leaked")  # ['encoder.weight', ...]
    report.loss                 # [0.91, 0.87, 0.85]: the losses of the steps committed
    print(report.table())       # one row per leaf
    ```

    `state_leaves` audits the model's state (`eqx.nn.State`: BatchNorm's running statistics)
    the same way, each array `updated` or `unchanged`, named by the layer that owns it
    (`bn1.ema_state_index[0]`). `stopped` is True when `StepRunner.stop()` ended the call
    early; `steps` and `loss` then cover the steps that ran.
    """

    leaves: list[LeafReport]
    loss: list[float] = dataclasses.field(default_factory=list)
    error: str | None = None
    method: str | None = None
    steps: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)
    compiles: int = 0
    state_leaves: list[LeafReport] = dataclasses.field(default_factory=list)
    stopped: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and not any(leaf.status in BAD_STATUSES for leaf in self.leaves)

    def by_status(self, status: str) -> list[str]:
        """Paths of the leaves with `status` (one of `STATUSES`)."""
        if status not in STATUSES:
            raise ExplorerError(f"unknown status {status!r}; expected one of {', '.join(STATUSES)}")
        return [leaf.path for leaf in self.leaves if leaf.status == status]

    @property
    def counts(self) -> dict[str, int]:
        """Number of leaves per status (every status present, zeros included)."""
        out = dict.fromkeys(STATUSES, 0)
        for leaf in self.leaves:
            out[leaf.status] += 1
        return out

    def statuses(self) -> dict[str, str]:
        """The compact form: `{path: status}`."""
        return {leaf.path: leaf.status for leaf in self.leaves}

    def leaf(self, path: str) -> LeafReport:
        """The report of the parameter leaf at `path` (e.g. `"layers[0].weight"`)."""
        for leaf in self.leaves:
            if leaf.path == path:
                return leaf
        paths = listed([x.path for x in self.leaves])
        raise ExplorerError(f"no leaf at `{path[:80]}` in this report; its leaves are {paths}")

    def to_dict(self) -> dict:
        """JSON-ready summary: statuses, per-leaf norms (floats or `None`), losses, error."""
        return {
            "ok": self.ok,
            "method": self.method,
            "steps": self.steps,
            "loss": [_json_float(x) for x in self.loss],
            "error": self.error,
            "notes": list(self.notes),
            "compiles": self.compiles,
            "counts": self.counts,
            "statuses": self.statuses(),
            "leaves": [leaf.to_dict() for leaf in self.leaves],
            "state_leaves": [leaf.to_dict() for leaf in self.state_leaves],
            "stopped": self.stopped,
        }

    def table(self, only: Any = None) -> str:
        """A readable table, parameters then state; `only` = a status or statuses to show."""
        if isinstance(only, str):
            only = {only}
        rows = [
            leaf
            for leaf in [*self.leaves, *self.state_leaves]
            if only is None or leaf.status in only
        ]

        def num(x: float | None) -> str:
            return "-" if x is None else f"{x:.3g}"

        # The factor column appears with learning-rate groups (some trainable factor != 1).
        grouped = any(r.lr_factor not in (None, 0.0, 1.0) for r in rows)

        def factor(r: LeafReport) -> str:
            return f" {num(r.lr_factor):>6}" if grouped else ""

        width = max([4] + [len(r.path) for r in rows])
        head = f"{'path':<{width}}  {'status':<9}" + (f" {'lr x':>6}" if grouped else "")
        lines = [head + f" {'grad':>9} {'update':>9} {'delta':>9}  detail"]
        lines += [
            f"{r.path:<{width}}  {r.status:<9}{factor(r)} {num(r.grad_norm):>9} "
            f"{num(r.update_norm):>9} {num(r.delta_norm):>9}  {r.detail}".rstrip()
            for r in rows
        ]
        return "\n".join(lines)

    def __str__(self) -> str:
        counts = ", ".join(f"{n} {s}" for s, n in self.counts.items() if n)
        head = f"StepReport({self.method or 'audit'}: {self.steps} step(s), {counts or 'no leaves'}"
        if self.loss:
            head += f", loss {self.loss[-1]:.4g}"
        head += ")"
        if self.error:
            head += f"\nerror: {self.error}"
        return head + "\n" + self.table()


# -- in-jit comparison helpers (shared with _steps) --------------------------------------


def sumsq(x: jax.Array) -> jax.Array:
    """Sum of squares in float32 (low-precision leaves are summed in float32)."""
    y = jnp.abs(x)
    if y.dtype.itemsize < 4:
        y = y.astype(jnp.float32)
    return jnp.sum(y * y).astype(jnp.float32)


def differs(old: jax.Array, new: jax.Array) -> jax.Array:
    """Bit-level "any element differs": NaN == NaN here, `-0.0 != 0.0`."""
    if jax.dtypes.issubdtype(old.dtype, jax.dtypes.prng_key):
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


def non_array_status(old: Any, new: Any) -> tuple[str, str]:
    """`kept` or `lost` (with why) for a leaf that was not an array."""
    if new is None:
        return LOST, f"became None (was {_describe(old)})"
    if _same_value(old, new):
        return KEPT, ""
    if type(old) is not type(new):
        return LOST, f"changed type: {_describe(old)} -> {_describe(new)}"
    return LOST, f"changed value: {_describe(old)} -> {_describe(new)}"


def array_status(trainable: bool, changed: bool) -> str:
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
    # a tuple is recognised by its structure (None counts as a leaf so seed-003 damage
    # does not change it).
    if not isinstance(out, tuple):
        return out
    as_leaf = {"is_leaf": lambda x: x is None}
    if jtu.tree_structure(out, **as_leaf) == jtu.tree_structure(model, **as_leaf):
        return out
    if not out:
        raise ExplorerError("the step function returned an empty tuple; return the new model")
    return out[0]


def _check_spec(spec: FilterSpec | None, model: Any, where: str) -> FilterSpec:
    """`spec` over `model` itself (the default spec if `None`); raises on a wrong type or
    structure."""
    if spec is None:
        return FilterSpec(model)
    if not isinstance(spec, FilterSpec):
        raise ExplorerError(
            f"{where}: `spec` must be an eqx_explorer.FilterSpec, got {type(spec).__name__}; "
            "build one with FilterSpec(model).freeze(...)"
        )
    try:
        return spec.for_model(model)
    except ExplorerError as e:
        raise ExplorerError(f"{where}: {e}") from None


def audit_step(
    step_fn: Callable, model: Any, *args: Any, spec: FilterSpec | None = None, **kwargs: Any
) -> StepReport:
    """Run `step_fn(model, *args, **kwargs)` once and audit the model it returns, leaf by leaf.

    `step_fn` is any user step (jitted or not) returning the new model or a tuple whose first
    element is the model. With `spec`, frozen arrays that changed are `leaked`; without one,
    every float array counts as trainable (`updated`/`stalled`). Int/bool arrays are `kept`
    or `leaked`; non-array leaves `kept` or `lost`. Neither `model` nor the
    arguments are changed by the audit.

    ```python
    def bad_step(model, opt_state, grads):        # seed 003: filter before apply_updates
        updates, opt_state = optim.update(grads, opt_state)
        return eqx.apply_updates(eqx.filter(model, eqx.is_array), updates), opt_state

    report = eqx_explorer.audit_step(bad_step, model, opt_state, grads)
    report.by_status("lost")    # ['layers[0].activation', ...]: activations became None
    ```

    If `step_fn` raises, the report has no leaves and `error` holds the exception.
    """
    if not callable(step_fn):
        raise ExplorerError(
            f"audit_step(step_fn, model, ...) takes your step function first, got "
            f"{type(step_fn).__name__}; e.g. audit_step(train_step, model, opt_state, batch)"
        )
    checked = _check_spec(spec, model, "audit_step")
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
            leaves.append(LeafReport(path, LOST, trainable=train, detail=array_lost(old, new)))
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

    ```python
    def test_my_step_keeps_the_encoder_frozen():
        spec = eqx_explorer.FilterSpec(model).freeze("encoder")
        eqx_explorer.assert_frozen_safe(my_step, model, opt_state, batch, spec=spec)
    ```

    Returns the report when the step is safe, for further checks.
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
