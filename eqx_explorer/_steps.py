"""StepRunner: real, jitted optax steps on the current spec, audited leaf by leaf.

```python
runner = eqx_explorer.StepRunner(model, spec, loss_fn, batch, optimizer=optax.adamw(1e-2),
                                 method="stop_gradient")
report = runner.step(5)
report.by_status("leaked")     # adamw's weight decay moved the "frozen" leaves
runner.set_spec(spec, method="partition")
runner.step(5).by_status("leaked")   # []
```

Methods (seed 000's comparison):

- `"partition"`: `eqx.partition(model, spec.tree)` outside the jit; gradients and optimizer state
  exist only for trainable leaves; frozen leaves never enter the optimizer.
- `"stop_gradient"`: the optimizer spans every float leaf; frozen leaves are wrapped in
  `jax.lax.stop_gradient` inside the loss, so their gradient is zero, not absent. Weight decay
  and momentum still move them: the report shows `leaked`.
- `"optax_mask"`: `optax.multi_transform({"trainable": opt, "frozen": optax.set_to_zero()}, ...)`
  over every float leaf: frozen leaves get a real gradient and a zero update.
- `"none"`: everything float trains; the baseline.

How it stays correct and fast:

- One `eqx.filter_jit` function per runner; the spec enters as the structure of its arguments
  (which leaves are `None`) or as a static tuple of flags, never through a closure, so a
  toggled spec cannot go stale. JAX's cache is keyed by (method, mask, optimizer, structure):
  returning to a spec seen before does not retrace (`compile_count` counts traces). It has
  two variants: the last step of a call also returns its gradients (`step(1)` only ever
  needs that one; `step(n > 1)` compiles the plain one too).
- `step(n)` dispatches its steps back to back like a hand-written loop, then one jitted
  audit compares the start and end of the call (bit-level changed flags, norms, finite
  flags) and sends a `(6, n_optimized_leaves)` matrix to the host. Arrays stay on device.
- A failure (an exception, a non-scalar or non-finite loss, NaN/inf parameters) makes the
  runner replay the call one checked step at a time from its start, and keep the last good
  step. Nothing is mutated in place, so rolling back is keeping references; nothing is
  donated, so the user's arrays stay valid.
- Weakly typed leaves (`jnp.full(shape, 0.05)`) are made strongly typed once, at construction:
  an optax update returns strong types, which would otherwise retrace the second step.
"""

from __future__ import annotations

import dataclasses
import inspect
import traceback
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax

from ._audit import (
    FROZEN,
    KEPT,
    LEAKED,
    LeafReport,
    StepReport,
    _check_spec,
    array_status,
    compare,
    stack,
    sumsq,
)
from ._constraints import apply_updates, constrain_grads
from ._errors import ExplorerError
from ._spec import FilterSpec

__all__ = ["StepRunner", "METHODS"]

PARTITION, STOP_GRADIENT, OPTAX_MASK, NONE = "partition", "stop_gradient", "optax_mask", "none"
METHODS = (PARTITION, STOP_GRADIENT, OPTAX_MASK, NONE)

# Rows of the per-call audit matrix (`_audit_call`).
_CHANGED, _DELTA, _UPDATE, _FINITE, _GRAD, _GRAD_FINITE = range(6)


class _StepFailure(Exception):
    """A failure detected while tracing the step, with a message meant for the user."""


# -- the jitted step and the per-call audit ---------------------------------------------


def _make_step(counter: list[int]) -> Callable:
    """A fresh `filter_jit` step: its cache (and `counter`) belong to one runner.

    It returns the new arrays and the loss, like a hand-written loop; with the static
    `with_grads=True` (the last step of a call: a second compilation) also the gradients,
    for `_audit_call`. Not every step: extra outputs are fresh buffers each step, and even
    one reduction over every gradient costs ~10% of a step.
    """

    def step(
        params,
        rest,
        opt_state,
        state,
        batch,
        *,
        loss_fn,
        optimizer,
        frozen,
        stateful,
        with_grads,
        rules,
        pins,
    ):
        treedef = jtu.tree_structure(params)

        def objective(p):
            if frozen is not None:  # "stop_gradient": zero gradients for frozen leaves
                p_leaves = jtu.tree_leaves(p)
                p_leaves = [jax.lax.stop_gradient(x) if f else x for x, f in zip(p_leaves, frozen)]
                p = jtu.tree_unflatten(treedef, p_leaves)
            model = eqx.combine(p, rest)
            if stateful:
                out = loss_fn(model, state, batch)
                if not (isinstance(out, tuple) and len(out) == 2):
                    raise _StepFailure(
                        "with `state=`, loss_fn(model, state, batch) must return "
                        f"(loss, new_state); it returned {type(out).__name__}."
                    )
                loss, new_state = out
            else:
                loss, new_state = loss_fn(model, batch), state
            if jnp.shape(loss) != () or not jnp.issubdtype(jnp.result_type(loss), jnp.floating):
                raise _StepFailure(
                    "loss_fn must return a float scalar; it returned "
                    f"{jnp.result_type(loss)}{list(jnp.shape(loss))}. Reduce it, e.g. "
                    "`jnp.mean(...)` over the batch."
                )
            return loss, new_state

        (loss, new_state), grads = jax.value_and_grad(objective, has_aux=True)(params)
        if rules:  # constrained leaves (FilterSpec.constrain): see _constraints
            updates, new_opt_state = optimizer.update(
                constrain_grads(params, grads, rules), opt_state, params
            )
            new_params = apply_updates(params, updates, rules)
        else:
            updates, new_opt_state = optimizer.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
        if pins is not None:  # sharded inputs: outputs keep exactly the inputs' shardings
            new_params, new_opt_state = _pin((new_params, new_opt_state), pins)
        counter[0] += 1  # runs only when JAX traces: counts compilations
        out_grads = grads if with_grads else None
        return new_params, new_opt_state, new_state, loss.astype(jnp.float32), out_grads

    return eqx.filter_jit(step)


@jax.jit
def _audit_call(start: list, prev: list | None, end: list, grads: list | None) -> jax.Array:
    """What a `step(n)` call did to its `k` optimized leaves: a `(6, k)` float32 matrix.

    Rows: changed (bit-level, end vs start); delta norm (end - start); update norm (end -
    prev: what the last step moved; `prev is None` means one step, so it equals delta);
    finite (no element that was finite at the start is NaN/inf at the end, so a frozen
    leaf that already holds an inf is not blamed); gradient norm and gradient finite flag
    of the last step attempted (NaN and True when `grads is None`).

    Cheap float sums decide most flags; the exact scans run under one `lax.cond` each,
    only when some sum is zero (changed?) or not finite (NaN/inf?).
    """
    k = len(start)
    changed, d = compare(start, end)
    u = d if prev is None else stack([sumsq(e - p) for p, e in zip(prev, end)], jnp.float32)
    finite = jax.lax.cond(
        jnp.all(jnp.isfinite(d)),
        lambda: jnp.ones(k, bool),
        lambda: stack(
            [~jnp.any(jnp.isfinite(s) & ~jnp.isfinite(e)) for s, e in zip(start, end)], bool
        ),
    )
    if grads is None:  # the last step failed at run time: its gradients are unusable
        gsq, g_finite = jnp.full(k, jnp.nan, jnp.float32), jnp.ones(k, bool)
    else:
        gsq = stack([sumsq(g) for g in grads], jnp.float32)
        # A non-finite sum of squares is a NaN/inf element or an overflow: check which.
        g_finite = jax.lax.cond(
            jnp.all(jnp.isfinite(gsq)),
            lambda: jnp.ones(k, bool),
            lambda: stack([jnp.all(jnp.isfinite(g)) for g in grads], bool),
        )
    rows = [changed, jnp.sqrt(d), jnp.sqrt(u), finite, jnp.sqrt(gsq), g_finite]
    return jnp.stack([r.astype(jnp.float32) for r in rows])


class _Attempt(NamedTuple):
    """The outcome of running steps: what is committed and what went wrong."""

    good: tuple  # (params, opt_state, state) after the last good step (or the start)
    losses: list
    audit: np.ndarray | None  # `_audit_call` of the call (None: no step ran)
    broken: np.ndarray | None  # "finite" row of the step that made NaN/inf parameters
    # ("exception", text) | ("loss", step, value) | ("update", step) | ("replay",): see _fast
    failure: tuple | None


# -- helpers ------------------------------------------------------------------------------


def _strong(tree: Any) -> Any:
    """The tree with weakly typed JAX arrays made strongly typed (same values, same sharding)."""

    def fix(x):
        if isinstance(x, jax.Array) and x.weak_type:
            return jax.lax.convert_element_type(x, x.dtype)
        return x

    return jtu.tree_map(fix, tree)


def _sharding_of(x: Any) -> Any:
    sharding = getattr(x, "sharding", None)
    return None if isinstance(sharding, jax.sharding.SingleDeviceSharding) else sharding


def _pins(tree: Any) -> tuple | None:
    """The shardings of `tree`'s leaves (hashable, static for the jit); None if unsharded."""
    pins = tuple(_sharding_of(x) for x in jtu.tree_leaves(tree))
    return pins if any(p is not None for p in pins) else None


def _pin(tree: Any, pins: tuple) -> Any:
    # XLA's propagation may pick another layout for an output (seen: a replicated bias
    # coming back sharded); a constraint per leaf keeps the model as the user laid it out.
    leaves, treedef = jtu.tree_flatten(tree)
    pinned = [
        x if p is None else jax.lax.with_sharding_constraint(x, p) for x, p in zip(leaves, pins)
    ]
    return jtu.tree_unflatten(treedef, pinned)


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise ExplorerError(
            f"unknown method {method!r}; use one of {', '.join(repr(m) for m in METHODS)}"
        )
    return method


# Methods whose optimizer state covers only the trainable leaves (see `_Layout.owned`).
STATE_ON_TRAINABLE = (PARTITION, OPTAX_MASK)
# Optimizer-state bytes per float byte of the default optimizer, Adam (mu and nu).
DEFAULT_SLOTS = 2.0


def optimizer_slots(model: Any, optimizer: Any = None) -> float:
    """Optimizer-state bytes per float-parameter byte of `optimizer` on `model`.

    Measured with `jax.eval_shape(optimizer.init, ...)` (nothing is allocated); `None` is the
    runner's default Adam, `DEFAULT_SLOTS`.
    """
    if optimizer is None:
        return DEFAULT_SLOTS
    params = eqx.filter(model, eqx.is_inexact_array)
    nbytes = lambda tree: sum(  # noqa: E731
        int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
        for x in jtu.tree_leaves(tree)
        if hasattr(x, "dtype")
    )
    total = nbytes(params)
    return nbytes(jax.eval_shape(optimizer.init, params)) / total if total else 0.0


def opt_state_bytes(spec: FilterSpec, method: str, slots: float) -> int:
    """Estimated optimizer-state bytes of a `StepRunner` under `method` (see `optimizer_slots`)."""
    c = spec.counts
    covered = c["trainable_bytes"]
    if _check_method(method) not in STATE_ON_TRAINABLE:
        covered += c["frozen_bytes"]
    return int(round(slots * covered))


def _check_loss_fn(loss_fn: Callable, model: Any, state: Any, batch: Any) -> None:
    if not callable(loss_fn):
        raise ExplorerError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    try:
        signature = inspect.signature(loss_fn)
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return
    args = (model, batch) if state is None else (model, state, batch)
    try:
        signature.bind(*args)
    except TypeError as e:
        wanted = "loss_fn(model, batch)" if state is None else "loss_fn(model, state, batch)"
        raise ExplorerError(
            f"loss_fn{signature} cannot be called as {wanted} ({e}). "
            + (
                "Stateful models (eqx.nn.make_with_state) pass `state=` and use "
                "loss_fn(model, state, batch) -> (loss, new_state)."
                if state is None
                else "Without `state=`, use loss_fn(model, batch) -> scalar."
            )
        ) from None


def _in_custom_jvp_rule(e: BaseException) -> bool:
    # JAX filters its own frames out of the traceback, but the innermost frame's callers
    # (`f_back`) are intact: a custom-JVP rule runs under these wrappers.
    frames = [frame for frame, _ in traceback.walk_tb(e.__traceback__)]
    frame = frames[-1] if frames else None
    while frame is not None:
        if frame.f_code.co_name in ("fn_jvp_wrapper", "_flatten_jvp"):
            return True
        frame = frame.f_back
    return False


def _explain(e: BaseException) -> str:
    """The report's `error` for an exception raised while tracing or running a step."""
    if isinstance(e, _StepFailure):
        return f"{e} The runner kept the last good model and optimizer state."
    lines = str(e).strip().splitlines()
    text = f"{type(e).__name__}: {lines[0] if lines else ''}"
    if isinstance(e, TypeError) and "NoneType" in str(e) and _in_custom_jvp_rule(e):
        return (
            f"a custom JVP rule failed on a `None` tangent ({text}). Tangents of inputs that "
            "are not differentiated, such as frozen leaves, arrive as `None` (a symbolic "
            "zero) in `eqx.filter_custom_jvp` rules. Handle them in the rule, e.g. "
            "`t_y = jnp.zeros_like(y) if t_y is None else t_y`, or skip their term. "
            "The runner kept the last good model and optimizer state."
        )
    return (
        f"the step raised {text}. The runner kept the last good model and optimizer state; "
        "fix the loss function (call it once outside the runner to see the full traceback)."
    )


class _Layout(NamedTuple):
    """How one (spec, method) maps the model's leaves onto the jitted step."""

    spec: FilterSpec
    method: str
    trainable: np.ndarray  # leaves that should train under this method
    diff: np.ndarray  # leaves passed to the optimizer (differentiated and updated)
    diff_index: np.ndarray
    frozen: tuple | None  # static stop_gradient flags over the diff leaves
    optimizer: Any
    owned: np.ndarray  # leaves with per-leaf optimizer state (Adam's mu/nu, momentum)
    rules: dict  # update rules of the leaves that train (frozen leaves are never touched)


# -- the runner ---------------------------------------------------------------------------


class StepRunner:
    """Runs jitted optimizer steps on a model under a spec and audits every leaf.

    ```python
    spec = eqx_explorer.FilterSpec(model).freeze("encoder")
    runner = eqx_explorer.StepRunner(model, spec, loss_fn, batch)   # adam(1e-3), "partition"
    report = runner.step(10)
    report.ok, report.loss[-1], report.by_status("frozen")
    trained = runner.model            # full structure; non-array leaves intact
    ```

    - `loss_fn(model, batch) -> scalar`; for stateful models (`eqx.nn.make_with_state`) pass
      `state=` and write `loss_fn(model, state, batch) -> (loss, new_state)`.
    - `runner.batch` may be reassigned between calls (same shapes: no retrace).
    - `set_spec(spec, method=None)` changes what is frozen between steps, as a user's own loop
      would: under `"partition"`/`"optax_mask"` the optimizer state is rebuilt for the new
      trainable set, keeping the state of leaves that stay trainable (and scalars such as
      Adam's step `count`, which belong to the optimizer, so newly trainable leaves start
      with zero moments but a later bias correction); newly trainable leaves start fresh and
      the next report says so. Under `"stop_gradient"`/`"none"` the state spans every float
      leaf and carries over unchanged: momentum keeps moving a newly frozen leaf (`leaked`).
    - `reset()` returns to the initial model, state and a fresh optimizer state.

    The user's model, state and arrays are never modified or donated.
    """

    def __init__(
        self,
        model: Any,
        spec: FilterSpec,
        loss_fn: Callable,
        batch: Any,
        optimizer: optax.GradientTransformation | None = None,
        method: str = PARTITION,
        state: Any = None,
    ):
        spec = _check_spec(spec, model, "StepRunner")
        tree = spec.model_tree
        _check_method(method)
        _check_loss_fn(loss_fn, model, state, batch)
        optimizer = optax.adam(1e-3) if optimizer is None else optimizer
        if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
            raise ExplorerError(
                f"optimizer must be an optax GradientTransformation (with .init and .update), "
                f"got {type(optimizer).__name__}; e.g. optax.adam(1e-3)"
            )
        self.loss_fn = loss_fn
        self.batch = batch
        self.optimizer = optimizer
        self._treedef = tree.treedef
        self._inexact = tree.inexact
        self._is_array = tree.is_array
        self._paths = tree.leaf_paths
        self._leaf_index = {p: i for i, p in enumerate(self._paths)}
        self._sharded = any(_sharding_of(x) is not None for x in tree.leaves)
        self._initial_leaves = [_strong(x) for x in tree.leaves]
        self._initial_state = _strong(state)
        self._stateful = state is not None
        self._counter = [0]
        self._step_fn = _make_step(self._counter)
        self._labelled: dict[bytes, Any] = {}  # mask -> multi_transform, reused on revisits
        self._leaves = list(self._initial_leaves)
        self._state = self._initial_state
        self._layout = self._layout_for(spec, method)
        self._opt_state = _strong(self._layout.optimizer.init(self._params(self._layout)))
        self._notes: list[str] = []
        self._fresh: set[int] = set()

    # -- public state -------------------------------------------------------------------
    @property
    def model(self) -> Any:
        """The model after the steps run so far (full structure, non-array leaves intact)."""
        return jtu.tree_unflatten(self._treedef, self._leaves)

    @property
    def state(self) -> Any:
        """The `eqx.nn.State` after the steps, or `None` for a stateless model."""
        return self._state

    @property
    def opt_state(self) -> Any:
        """The optimizer state (over the leaves the current method optimizes)."""
        return self._opt_state

    @property
    def spec(self) -> FilterSpec:
        return self._layout.spec

    @property
    def method(self) -> str:
        return self._layout.method

    @property
    def compile_count(self) -> int:
        """How many times the step function was traced (= compiled) by this runner."""
        return self._counter[0]

    # -- layouts and optimizer state -----------------------------------------------------
    def _layout_for(self, spec: FilterSpec, method: str) -> _Layout:
        mask = np.asarray(spec.mask, bool)
        trainable = self._inexact.copy() if method == NONE else mask.copy()
        diff = mask.copy() if method == PARTITION else self._inexact.copy()
        diff_index = np.flatnonzero(diff)
        frozen = tuple(not t for t in trainable[diff_index]) if method == STOP_GRADIENT else None
        optimizer = self.optimizer
        if method == OPTAX_MASK:
            key = mask.tobytes()
            if key not in self._labelled:
                labels = jtu.tree_unflatten(
                    self._treedef,
                    [
                        ("trainable" if m else "frozen") if f else None
                        for m, f in zip(mask, self._inexact)
                    ],
                )
                self._labelled[key] = optax.multi_transform(
                    {"trainable": self.optimizer, "frozen": optax.set_to_zero()},
                    lambda _: labels,  # a module as labels would be *called* by optax
                )
            optimizer = self._labelled[key]
        # multi_transform keeps state only under the "trainable" label.
        owned = trainable if method == OPTAX_MASK else diff
        train_paths = {self._paths[i] for i in np.flatnonzero(trainable)}
        rules = {p: r for p, r in spec.constraints.items() if p in train_paths}
        return _Layout(spec, method, trainable, diff, diff_index, frozen, optimizer, owned, rules)

    def _params(self, layout: _Layout) -> Any:
        return jtu.tree_unflatten(
            self._treedef, [x if d else None for x, d in zip(self._leaves, layout.diff)]
        )

    def _rest(self, layout: _Layout) -> Any:
        return jtu.tree_unflatten(
            self._treedef, [None if d else x for x, d in zip(self._leaves, layout.diff)]
        )

    def _carry_opt_state(self, old: _Layout, new: _Layout) -> None:
        """Move `self._opt_state` from layout `old` to `new`, as a user's loop would."""
        if old.optimizer is new.optimizer and np.array_equal(old.diff, new.diff):
            return  # same optimizer over the same leaves: the state carries over unchanged
        fresh_state = _strong(new.optimizer.init(self._params(new)))
        # Optimizer state leaves are keyed by their path (e.g. `[0].mu.layers[1].weight`),
        # which does not depend on which other leaves are None: equal paths = same slot.
        old_by_path = {tuple(p): x for p, x in jtu.tree_flatten_with_path(self._opt_state)[0]}
        flat, treedef = jtu.tree_flatten_with_path(fresh_state)
        leaves, carried, started = [], 0, 0
        for path, x in flat:
            prev = old_by_path.get(tuple(path))
            if (
                prev is not None
                and eqx.is_array(prev)
                and eqx.is_array(x)
                and (prev.shape, prev.dtype) == (x.shape, x.dtype)
            ):
                leaves.append(prev)
                carried += 1
            else:
                leaves.append(x)
                started += 1
        self._opt_state = jtu.tree_unflatten(treedef, leaves)

        paths = self._paths
        if carried == 0 and started and old_by_path:
            fresh = new.owned
            self._notes.append(
                "optimizer state rebuilt from scratch: its structure changed "
                f"({old.method} -> {new.method})"
            )
        else:
            # Slots are only started for newly optimized leaves (an optimizer without
            # per-leaf state, e.g. plain sgd, starts none) and only dropped for leaves
            # that left the optimizer.
            fresh = new.owned & ~old.owned if started else np.zeros_like(new.owned)
            dropped = np.flatnonzero(old.owned & ~new.owned)
            if carried < len(old_by_path) and len(dropped):
                self._notes.append(
                    "optimizer state dropped for newly frozen leaves: "
                    + ", ".join(paths[i] for i in dropped)
                )
        fresh_index = np.flatnonzero(fresh)
        if len(fresh_index):
            self._fresh |= set(fresh_index.tolist())
            self._notes.append(
                "optimizer state started fresh for: " + ", ".join(paths[i] for i in fresh_index)
            )

    def set_spec(self, spec: FilterSpec, method: str | None = None) -> None:
        """Change what is frozen (and optionally the method) before the next step.

        The optimizer state follows the rules in the class docstring; the next report's
        `notes` (and the `detail` of affected leaves) say which state started fresh.
        Raises `ExplorerError` for a spec of another model or an unknown method.
        """
        if not isinstance(spec, FilterSpec) or spec.model_tree.treedef != self._treedef:
            raise ExplorerError(
                "set_spec: this spec was built for another model, with another structure; "
                "build it from this runner's model, e.g. runner.spec.freeze(...)"
            )
        method = self._layout.method if method is None else _check_method(method)
        new = self._layout_for(spec, method)
        if method != self._layout.method:
            self._notes.append(f"method changed: {self._layout.method} -> {method}")
        self._carry_opt_state(self._layout, new)
        self._layout = new

    def reset(self) -> None:
        """Back to the initial model and state, with a fresh optimizer state (cache kept)."""
        self._leaves = list(self._initial_leaves)
        self._state = self._initial_state
        self._opt_state = _strong(self._layout.optimizer.init(self._params(self._layout)))
        self._notes = ["reset: initial model, fresh optimizer state"]
        self._fresh = set()

    # -- stepping -------------------------------------------------------------------------
    def step(self, n: int = 1) -> StepReport:
        """Run `n` optimizer steps on `runner.batch`; return the audit of the whole call.

        Statuses and `delta_norm` compare the model before and after the call; `grad_norm`
        is from the last step attempted; `update_norm` is what the last committed step
        moved. On a failure (the loss raises, is not a float scalar or is NaN/inf, or a step
        makes a parameter NaN/inf) the runner keeps the arrays of the last good step and
        `error` says what happened and where.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ExplorerError(f"step(n) needs a positive int number of steps, got {n!r}")
        layout = self._layout
        rest = self._rest(layout)
        begin = (self._params(layout), self._opt_state, self._state)
        compiles = self._counter[0]

        run = self._fast(layout, rest, begin, n)
        if run.failure == ("replay",):
            run = self._replay(layout, rest, begin, n)

        params, self._opt_state, self._state = run.good
        for i, x in zip(layout.diff_index, jtu.tree_leaves(params)):
            self._leaves[i] = x
        reports = self._leaf_reports(layout, run)
        for path, rule in layout.spec.constraints.items():
            i = self._leaf_index[path]
            reports[i] = dataclasses.replace(
                reports[i], violation=float(rule.violation(self._leaves[i]))
            )
        report = StepReport(
            reports,
            loss=run.losses,
            error=self._message(run),
            method=layout.method,
            steps=len(run.losses),
            notes=self._notes,
            compiles=self._counter[0] - compiles,
        )
        self._notes, self._fresh = [], set()
        return report

    def _call(self, layout: _Layout, rest: Any, arrays: tuple, with_grads: bool) -> tuple:
        params, opt_state, state = arrays
        return self._step_fn(
            params,
            rest,
            opt_state,
            state,
            self.batch,
            loss_fn=self.loss_fn,
            optimizer=layout.optimizer,
            frozen=layout.frozen,
            stateful=self._stateful,
            with_grads=with_grads,
            rules=layout.rules,
            pins=_pins((params, opt_state)) if self._sharded else None,
        )

    def _fast(self, layout: _Layout, rest: Any, begin: tuple, n: int) -> _Attempt:
        """`n` steps dispatched back to back, like a hand-written loop; checked at the end.

        Only `begin` is kept as the rollback target, so memory and speed match a plain
        loop. Any sign of trouble (an exception after the first step, a non-finite loss or
        parameter) returns `("replay",)`: `_replay` then finds the exact step.
        """
        replay = _Attempt(begin, [], None, None, ("replay",))
        current, prev, losses = begin, None, []
        for k in range(n):
            last = k == n - 1
            try:
                *arrays, loss, grads = self._call(layout, rest, current, with_grads=last)
            except Exception as e:
                if k == 0:  # tracing failed: no step ran, and a replay would fail the same way
                    return _Attempt(begin, [], None, None, ("exception", _explain(e)))
                return replay
            prev, current = (current[0] if last and k else None), tuple(arrays)
            losses.append(loss)
        try:  # the one wait of the call
            losses = [float(x) for x in jax.device_get(losses)]
            audit = self._audit(begin[0], prev, current[0], grads)
        except Exception:  # a runtime error (e.g. eqx.error_if) in some step
            return replay
        if not (np.isfinite(losses).all() and audit[_FINITE].all()):
            return replay
        return _Attempt(current, losses, audit, None, None)

    def _replay(self, layout: _Layout, rest: Any, begin: tuple, n: int) -> _Attempt:
        """Re-run up to `n` steps from `begin` one at a time, each checked.

        The slow path, taken only after the fast one saw trouble; steps are deterministic,
        so it stops at the step that broke and keeps everything before it.
        """
        good, prev, grads, losses, broken, failure = begin, None, None, [], None, None
        for k in range(n):
            try:
                *arrays, loss, grads = self._call(layout, rest, good, with_grads=True)
                loss = float(loss)
            except Exception as e:
                failure, grads = ("exception", _explain(e)), None
                break
            if not np.isfinite(loss):
                failure = ("loss", k + 1, loss)
                break
            finite = self._audit(good[0], None, arrays[0], grads)[_FINITE]
            if not finite.all():
                failure, broken = ("update", k + 1), finite
                break
            good, prev = tuple(arrays), good[0]
            losses.append(loss)
        if not losses and grads is None:
            return _Attempt(begin, [], None, None, failure)
        audit = self._audit(begin[0], prev if len(losses) > 1 else None, good[0], grads)
        return _Attempt(good, losses, audit, broken, failure)

    def _audit(self, start: Any, prev: Any, end: Any, grads: Any) -> np.ndarray:
        leaves = [None if t is None else jtu.tree_leaves(t) for t in (start, prev, end, grads)]
        return np.asarray(_audit_call(*leaves))

    def _message(self, run: _Attempt) -> str | None:
        if run.failure is None:
            return None
        kind, *info = run.failure
        if kind == "exception":
            return info[0]
        paths, diff_index = self._paths, self._layout.diff_index
        bad = [paths[i] for i, f in zip(diff_index, run.audit[_GRAD_FINITE]) if not f]
        grads = f"; non-finite gradients at: {', '.join(bad)}" if bad else ""
        if kind == "loss":
            step, loss = info
            what = f"non-finite loss ({loss}){grads}"
        else:
            step = info[0]
            broken = [paths[i] for i, f in zip(diff_index, run.broken) if not f]
            what = f"the update made NaN/inf values in: {', '.join(broken)}{grads}"
            if not bad:
                what += " (the gradients were finite: check the optimizer, e.g. its learning rate)"
        return (
            f"step {step} of this call: {what}. The runner rolled back to the last good model "
            "and optimizer state. Look for log(0), division by zero or overflow in the loss, "
            "or lower the learning rate."
        )

    def _leaf_reports(self, layout: _Layout, run: _Attempt) -> list[LeafReport]:
        column = {int(i): j for j, i in enumerate(layout.diff_index)}
        audit = run.audit
        reports = []
        for i, path in enumerate(self._paths):
            detail = "optimizer state started fresh" if i in self._fresh else ""
            if not self._is_array[i]:
                # Non-array leaves live in the static part: the same objects by construction.
                reports.append(LeafReport(path, KEPT, detail=detail))
                continue
            train = bool(layout.trainable[i])
            j = column.get(i)
            if j is None:
                # Never passed to the optimizer; the runner reuses the very same array
                # object, so it is bit-identical by construction.
                reports.append(LeafReport(path, FROZEN, trainable=train, detail=detail))
                continue
            if audit is None:  # no step ran
                status = array_status(train, False)
                reports.append(LeafReport(path, status, trainable=train, detail=detail))
                continue
            status = array_status(train, bool(audit[_CHANGED, j]))
            if status == LEAKED:
                detail = "frozen but changed" + (f"; {detail}" if detail else "")
            grad = float(audit[_GRAD, j])
            finite = bool(audit[_GRAD_FINITE, j]) and (run.broken is None or bool(run.broken[j]))
            reports.append(
                LeafReport(
                    path,
                    status,
                    grad_norm=None if np.isnan(grad) and finite else grad,
                    update_norm=float(audit[_UPDATE, j]),
                    delta_norm=float(audit[_DELTA, j]),
                    trainable=train,
                    finite=finite,
                    detail=detail,
                )
            )
        return reports
