"""StepRunner: real, jitted optax steps on the current spec, audited leaf by leaf.

```python
runner = eqx_explorer.StepRunner(model, spec, loss_fn, batch, optimizer=optax.adamw(1e-2),
                                 method="stop_gradient")
report = runner.step(5)
report.by_status("leaked")     # adamw's weight decay moved the "frozen" leaves
runner.set_spec(spec, method="partition")      # no recompilation
runner.step(5).by_status("leaked")   # []
```

Methods:

- `"partition"`: as `eqx.partition(model, spec.tree)`: frozen leaves get no gradient, no
  update and no optimizer state; they never move.
- `"stop_gradient"`: the optimizer spans every float leaf; frozen leaves get a zero gradient
  (as `jax.lax.stop_gradient` in the loss). Weight decay and momentum still move them:
  the report shows `leaked`.
- `"optax_mask"`: as `optax.partition({"trainable": opt, "frozen": optax.set_to_zero()}, ...)`:
  frozen leaves get a real gradient and a zero update, and no optimizer state.
- `"none"`: everything float trains; the baseline.

What is compiled, and when (the `layout`):

- `"masked"` (default): one step program serves every spec. The spec and the method enter
  it as data, per-leaf masks (which gradients reach the optimizer, which updates apply,
  which leaves move, which optimizer slots advance), and `n` is how often the host
  dispatches it. So a click, a method switch or another `n` never recompiles;
  `compile_count` stays at 1. The price: every float leaf is differentiated (a frozen
  leaf's gradient is computed, then masked), the optimizer state spans every float leaf,
  and every array is an output of each step. So the runner also uses the same program with
  a spec's masks baked in (XLA drops the frozen leaves' gradients; unchanged leaves are no
  outputs), which builds as fast as a hand-written step (`specialise=True`): the first
  answer compiles it for the spec at hand. The masked program builds in the background
  once the spec or method changes (`set_spec`), or at once after `warm()` (which the widget
  calls after its first answer, as a click is likely); a step before it is built waits for
  it, with progress. A script that never changes the spec never builds it. A spec that
  runs `SPECIALISE_AFTER` steps gets its own, built in the background and swapped in
  between chunks. `report.notes` says when a specialised program ran.
- `"structural"`: the spec is the structure of the program's arguments, as in a
  hand-written loop: `"partition"` passes only trainable leaves, so the optimizer state
  covers only them (for models whose frozen leaves' optimizer state would not fit in
  memory), and frozen leaves are not differentiated at all (a custom JVP rule then sees
  `None` tangents, as the exported code will). Each new (spec, method) compiles once.

Either way a call dispatches its steps back to back, like a hand-written loop, in chunks of
about `CHUNK_SECONDS` (the `progress` callback reports after each, `stop()` ends the call
between two). After each chunk one wait brings back its losses and the audit of the call so
far (bit-level changed flags, norms, finite flags, for the parameters and the model's state),
computed on device by a small program of its own; until that program is built (in the
background) NumPy computes the same on the host, where CPU arrays already are. On CPU, calls
that audit fewer than `AUDIT_COMPILE_ELEMENTS` elements stay with NumPy: there the build
would cost more than it ever saves.

A failure (an exception, a non-scalar or non-finite loss, NaN/inf parameters) keeps the last
good step: a chunk that saw one is replayed one checked step at a time, with the same
program, from the chunk's first arrays, which no step overwrites. Once a spec has run
`SPECIALISE_AFTER` steps, its program also gets a recycling variant (built in the
background): a step writes its new arrays into the buffers of an earlier step that only the
runner held (donated to XLA, so nothing is allocated), and a call of one step gets its audit
from the same program. The user's arrays, and any array read from `model` or `opt_state`,
are never written into. Between calls the runner keeps one such set of buffers (the
trainable leaves and their optimizer slots). Weakly typed leaves
(`jnp.full(shape, 0.05)`) are made strongly typed once, at construction: an optax update
returns strong types, which would otherwise retrace.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import inspect
import math
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax

from ._audit import array_status, compare, stack, sumsq
from ._errors import ExplorerError, short_repr, shorten
from ._report import FROZEN, KEPT, LEAKED, UNCHANGED, UPDATED, LeafReport, StepReport, listed
from ._spec import FilterSpec, check_spec
from ._state import has_state, state_entries
from ._tree import FROZEN as FROZEN_STATE
from ._tree import STATIC as STATIC_STATE

__all__ = ["StepRunner", "StepProgress", "Method", "Layout", "METHODS", "LAYOUTS"]

Method = Literal["partition", "stop_gradient", "optax_mask", "none"]
Layout = Literal["masked", "structural"]
PARTITION: Method = "partition"
STOP_GRADIENT: Method = "stop_gradient"
OPTAX_MASK: Method = "optax_mask"
NONE: Method = "none"
METHODS: tuple[Method, ...] = (PARTITION, STOP_GRADIENT, OPTAX_MASK, NONE)
MASKED: Layout = "masked"
STRUCTURAL: Layout = "structural"
LAYOUTS: tuple[Layout, ...] = (MASKED, STRUCTURAL)

# Rows of the per-leaf masks: the gradient reaches the optimizer; the raw gradient is
# computed (and reported); the update applies; the leaf is written at all; its optimizer
# slots advance.
_GRAD, _SEEN, _UPD, _TOUCH, _SLOT = range(5)
# Rows of the per-call audit matrix.
_CHANGED, _DELTA, _UPDATE, _FINITE, _GRAD_NORM, _GRAD_FINITE = range(6)

CHUNK_SECONDS = 0.25  # a chunk's wall time when someone watches (`progress`)
QUIET_CHUNK_SECONDS = 2.0  # without `progress`: fewer audits, `stop()` still answers
SPECIALISE_AFTER = 16  # steps on one (spec, method) before a specialised program pays
# On CPU, NumPy audits smaller calls for good. Measured on 2 cores: NumPy's audit of 2M
# float32 elements costs ~8 ms more than the compiled one's, whose build takes 0.4-0.9 s of a
# core per set of leaves (2 s for 100 leaves, 35 s for 1000, where NumPy spends ~50 us a
# leaf): it would pay back after a hundred calls or more, and it competes with the steps.
AUDIT_COMPILE_ELEMENTS = 1 << 21

Phase = Literal["compiling", "running"]


class StepProgress(NamedTuple):
    """What a running `StepRunner.step` reports to its `progress` callback.

    `phase` is `"compiling"` (once, before a compilation starts) or `"running"` (after
    each chunk); `done` of `total` steps are committed; `loss` is the latest loss;
    `elapsed` the seconds since the call started.

    >>> progress = ex.StepProgress("running", done=2, total=10, loss=0.5, elapsed=0.3)
    >>> f"{progress.done}/{progress.total}"
    '2/10'
    """

    phase: Phase
    done: int
    total: int
    loss: float | None
    elapsed: float


class _StepFailure(Exception):
    """A failure detected while tracing the step, with a message meant for the user."""


@dataclasses.dataclass(frozen=True)
class _Failure:
    """Why a call stopped early: the step raised (`message`), or step `step` of the call
    made a non-finite `loss` or (`loss` None) NaN/inf parameters."""

    step: int = 0
    loss: float | None = None
    message: str | None = None


def _method_masks(method: Method, trainable: np.ndarray) -> np.ndarray:
    """The `(5, k)` masks of `method` over `k` float leaves (`trainable`: the spec's mask)."""
    t, every = trainable, np.ones_like(trainable)
    rows = {
        PARTITION: (t, t, t, t, t),
        OPTAX_MASK: (t, every, t, every, t),
        STOP_GRADIENT: (t, t, every, every, every),
        NONE: (every,) * 5,
    }[method]
    return np.stack(rows).astype(bool)


# -- the program: n steps and the audit, one jitted function -------------------------


def _select(flag: Any, a: Any, b: Any) -> Any:
    # A Python bool (masks baked into a specialised program) picks at trace time, so XLA
    # never sees the other branch; an array picks per leaf at run time.
    if isinstance(flag, bool | np.bool_):
        return a if flag else b
    return jnp.where(flag, a, b)


def _zero_unless(flag: Any, x: jax.Array) -> Any:
    return _select(flag, x, jnp.zeros_like(x))


def _times(factor: Any, u: jax.Array) -> Any:
    # A baked factor of 1 is no operation; as data, `u * 1.0` is `u` bit for bit.
    if isinstance(factor, float):
        return u if factor == 1.0 else u * jnp.asarray(factor, u.dtype)
    return u * factor.astype(u.dtype)


def _split(leaves: list) -> tuple[list, tuple]:
    """The arrays of `leaves` (a jit's data) and the rest (static; `None` where an array was:
    no pytree leaf is `None`)."""
    arrays = [x for x in leaves if eqx.is_array(x)]
    return arrays, tuple(None if eqx.is_array(x) else x for x in leaves)


def _join(arrays: list, static: tuple) -> list:
    """`_split` undone."""
    it = iter(arrays)
    return [next(it) if x is None else x for x in static]


class _Static:
    """Everything the program is specialised on; a change recompiles.

    One opaque, hashable object (its hash computed once per call of `_run`), not a pytree:
    the program's data are flat lists of arrays, so a dispatch flattens no module (an
    Equinox module flattens in Python: on a BERT, flattening the arguments cost a third of
    a warm step's overhead), and the static parts are hashed here once, not per part.
    `treedef`, `diff` (the optimized leaves' indices) and `rest` (the other leaves, `None`
    for arrays) rebuild the model; `opt`, `state` and `batch` are (treedef, static leaves).
    """

    __slots__ = (
        *("loss_fn", "optimizer", "rules", "masks", "factors", "slot_cols", "pins"),
        *("treedef", "diff", "rest", "opt", "state", "batch", "_key", "_hash"),
    )

    def __init__(
        self,
        loss_fn: Callable,
        optimizer: Any,
        rules: tuple,
        masks: tuple | None,
        factors: tuple | None,
        slot_cols: tuple,
        pins: Any,
        parts: Any,
    ) -> None:
        self.loss_fn: Callable = loss_fn
        self.optimizer: Any = optimizer
        self.rules: tuple = rules  # one `Rule` or None per optimized leaf
        self.masks: tuple | None = masks  # baked-in masks, or None: an argument
        self.factors: tuple | None = factors  # baked-in learning-rate factors, or None
        self.slot_cols: tuple = slot_cols  # optimizer-state leaf -> its leaf (-1: shared)
        self.pins: tuple | None = pins  # output shardings of (params, opt_state), if sharded
        self.treedef, self.diff, self.rest, self.opt, self.state, self.batch = parts
        self._key = (loss_fn, optimizer, rules, masks, factors, slot_cols, pins, parts)
        self._hash = hash(self._key)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other or (
            isinstance(other, _Static) and self._hash == other._hash and self._key == other._key
        )


def _make_program(on_trace: Callable[[], None]) -> tuple[Callable, Callable]:
    """A fresh jitted step; its cache belongs to one runner.

    `program(params, rest, opt, state, batch, masks, factors, *, st)` takes flat lists of
    arrays (the optimized leaves, the model's other arrays, the optimizer state's, the
    model state's, the batch's; `st` rebuilds the trees), runs one step and returns the new
    arrays, the loss and the gradients, like a hand-written step (a call of `n` steps
    dispatches it `n` times back to back). The masks (`_method_masks`) are data, one uint8
    code per leaf, and so are the learning-rate factors (one float32 per leaf, the update's
    multiplier), unless `st` bakes them in; then the leaves the masks keep unchanged are
    `None` outputs (the caller keeps its arrays).
    """

    def program(
        params: list,
        rest: list,
        opt: list,
        state: list,
        batch: list,
        masks: Any,
        factors: Any,
        *,
        st: _Static,
    ) -> tuple:
        on_trace()  # runs only when JAX traces: counts compilations
        k, every = len(params), st.treedef.num_leaves
        rest_index = sorted(set(range(every)) - set(st.diff))

        def tree(optimized: list, others: list | None) -> Any:
            # The model (`others`: its other leaves), or the optimizer's view (None there).
            leaves = [None] * every
            for i, x in zip(rest_index, others or []):
                leaves[i] = x
            for i, x in zip(st.diff, optimized):
                leaves[i] = x
            return jtu.tree_unflatten(st.treedef, leaves)

        others = _join(rest, st.rest)
        opt_state = jtu.tree_unflatten(st.opt[0], _join(opt, st.opt[1]))
        batch = jtu.tree_unflatten(st.batch[0], _join(batch, st.batch[1]))
        if st.state is not None:
            state = jtu.tree_unflatten(st.state[0], _join(state, st.state[1]))
        m: Any
        if st.masks is not None:
            m = st.masks
        else:  # one uint8 code per leaf, bit r = row r (a mask array sliced per leaf
            # makes XLA's compilation several times slower)
            m = [[(c & (1 << r)) != 0 for c in masks] for r in range(5)]
        f = st.factors if st.factors is not None else factors
        # With baked masks, a gradient never seen is known zero: it is no output.
        seen = {j for j in range(k) if st.masks is None or m[_GRAD][j] or m[_SEEN][j]}

        def objective(p: list) -> Any:
            if st.masks is not None:  # not differentiated at all, as in a partition
                p = [
                    x if m[_GRAD][j] or m[_SEEN][j] else jax.lax.stop_gradient(x)
                    for j, x in enumerate(p)
                ]
            model = tree(p, others)
            if st.state is not None:
                out = st.loss_fn(model, state, batch)
                if not (isinstance(out, tuple) and len(out) == 2):
                    raise _StepFailure(
                        "with `state=`, loss_fn(model, state, batch) must return "
                        f"(loss, new_state); it returned {type(out).__name__}."
                    )
                loss, new_state = out
                if jtu.tree_structure(new_state) != st.state[0]:
                    raise _StepFailure(
                        "with `state=`, loss_fn(model, state, batch) must return "
                        "(loss, new_state) with new_state an eqx.nn.State like the one it "
                        f"was given; it returned {type(new_state).__name__} as new_state."
                    )
            else:
                loss, new_state = st.loss_fn(model, batch), state
            if isinstance(loss, tuple | list):
                raise _StepFailure(
                    f"loss_fn returned a {type(loss).__name__} of {len(loss)} values; it must "
                    "return the loss alone, a float scalar"
                    + (
                        " (with `state=`, the pair (loss, new_state))."
                        if st.state is not None
                        else ". Drop auxiliary outputs, or, for a stateful model, pass "
                        "`state=` and return (loss, new_state)."
                    )
                )
            loss = jnp.asarray(loss)  # a constant Python float is a loss too
            if jnp.shape(loss) != () or not jnp.issubdtype(jnp.result_type(loss), jnp.floating):
                raise _StepFailure(
                    "loss_fn must return a float scalar; it returned "
                    f"{jnp.result_type(loss)}{list(jnp.shape(loss))}. Reduce it, e.g. "
                    "`jnp.mean(...)` over the batch."
                )
            return loss.astype(jnp.float32), new_state

        (loss, new_state), g = jax.value_and_grad(objective, has_aux=True)(list(params))
        old = params
        fed = [
            _zero_unless(m[_GRAD][j], g[j] if r is None else r.grad(x, g[j]))
            for j, (x, r) in enumerate(zip(old, st.rules))
        ]
        try:
            updates, new_opt = st.optimizer.update(tree(fed, None), opt_state, tree(old, None))
        except Exception as e:  # the user's optimizer, not their loss: say so
            raise _StepFailure(
                f"the optimizer's update raised {type(e).__name__}: {shorten(str(e), 300)}. "
                "Check the optimizer (call optimizer.update(grads, opt_state, params) once "
                "outside the runner to see the full traceback)."
            ) from e
        new = []
        for j, (x, u, r) in enumerate(zip(old, jtu.tree_leaves(updates), st.rules)):
            u = _zero_unless(m[_UPD][j], _times(f[j], u))
            moved = (x + u).astype(x.dtype)
            if r is not None:  # update rules apply to the leaves that train
                moved = _select(m[_GRAD][j], r.apply(x, u).astype(x.dtype), moved)
            new.append(_select(m[_TOUCH][j], moved, x))
        slots = [
            y if c < 0 else _select(m[_SLOT][c], y, x)
            for x, y, c in zip(jtu.tree_leaves(opt_state), jtu.tree_leaves(new_opt), st.slot_cols)
        ]
        # The optimizer state's arrays, and the optimized leaf each is a slot of.
        o_out, cols = _split(slots)[0], [c for c, x in zip(st.slot_cols, st.opt[1]) if x is None]
        if st.pins is not None:  # sharded inputs: outputs keep exactly the inputs' shardings
            pinned = _pin(new + o_out, st.pins)
            new, o_out = pinned[:k], pinned[k:]
        p_out = new
        if st.masks is not None:  # baked: leaves known unchanged are no outputs (a copy each)
            p_out = [x if m[_TOUCH][j] else None for j, x in enumerate(new)]
            o_out = [y if c < 0 or m[_SLOT][c] else None for y, c in zip(o_out, cols)]
        s_out = _split(jtu.tree_leaves(new_state))[0] if st.state is not None else []
        # The gradients are returned, not reduced here: reductions (and the finite check's
        # cond) made the first answer's program compile 1.6x as long as a hand-written
        # step; the audit reduces the last step's.
        g_out = [x if j in seen else None for j, x in enumerate(g)]
        return p_out, o_out, s_out, loss, g_out

    def recycled(
        scratch_p: list,
        scratch_o: list,
        params: list,
        rest: list,
        opt: list,
        state: list,
        batch: list,
        audit: Any,
        *,
        st: _Static,
    ) -> tuple:
        # A baked step that writes its new arrays into `scratch`, arrays of an earlier step
        # that nothing holds any more, donated: no allocation (a fifth of a step on a
        # 4M-parameter MLP), and its own inputs stay intact for a rollback. With `audit`
        # (the step is a whole call) the audit's rows come out of the same program: one
        # dispatch, and no gradients to return.
        assert st.masks is not None  # only baked programs recycle
        del scratch_p, scratch_o  # only their buffers serve: XLA writes the outputs there
        p_out, o_out, s_out, loss, g = program(params, rest, opt, state, batch, None, None, st=st)
        touched = [j for j, t in enumerate(st.masks[_TOUCH]) if t]
        grads = [x for x in g if x is not None]
        old, new = [params[j] for j in touched], [p_out[j] for j in touched]
        rows = jax.lax.cond(
            audit,
            lambda: _audit_rows(old, old, new, grads, state, s_out, True),
            lambda: (
                jnp.zeros((4, len(old)), jnp.float32),
                jnp.zeros((2, len(grads)), jnp.float32),
                jnp.zeros((2, len(state)), jnp.float32),
            ),
        )
        return p_out, o_out, s_out, loss, rows

    return (
        jax.jit(program, static_argnames="st"),
        jax.jit(recycled, static_argnames="st", donate_argnums=(0, 1), keep_unused=True),
    )


def _slots_written(slot_cols: tuple, opt_static: Any, slots: Any) -> list[bool]:
    """Per array of the optimizer state: whether a program baked with the `_SLOT` mask row
    `slots` writes it (shared state, e.g. Adam's count, or a slot of a leaf that advances)."""
    cols = [c for c, x in zip(slot_cols, opt_static) if x is None]
    return [c < 0 or bool(slots[c]) for c in cols]


def _picked(arrays: list, flags: Any) -> list:
    return [x for x, f in zip(arrays, flags) if f]


def _audit_rows(
    begin: list, before: list, end: list, grads: list, state0: list, state: list, first: Any
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """What a call did to the leaves it optimized, and to the model's state.

    Rows `_CHANGED`, `_DELTA`, `_UPDATE`, `_FINITE` over the given leaves: bit-level changed
    flag and delta norm of `end` vs the call's `begin`; update norm of the last step (`end`
    vs `before`, its inputs; with `first`, `before` is `begin` and one pass serves both);
    finite flag (no element that was finite at the start is NaN/inf at the end, so a frozen
    leaf that already holds an inf is not blamed). Then `_GRAD_NORM` and `_GRAD_FINITE` of
    `grads` (the last step's), and the state's changed flags and delta norms. A program of its
    own (`_audit_call`), compiled once per runner, beside the step, not inside it; or part of
    a recycling step's program.
    """
    # A call's first step compares with its own inputs: one comparison serves both rows.
    changed, d, usq = jax.lax.cond(
        first,
        lambda: (*compare(before, end), jnp.zeros(len(end), jnp.float32)),
        lambda: (
            *compare(begin, end),
            stack([sumsq(y - x) for x, y in zip(before, end)], jnp.float32),
        ),
    )
    usq = jnp.where(first, d, usq)
    finite = jax.lax.cond(
        jnp.all(jnp.isfinite(d)),
        lambda: jnp.ones(len(end), bool),
        lambda: stack(
            [~jnp.any(jnp.isfinite(a) & ~jnp.isfinite(b)) for a, b in zip(begin, end)], bool
        ),
    )
    gsq = stack([sumsq(g) for g in grads], jnp.float32)
    # A non-finite sum of squares is a NaN/inf element or an overflow: check which.
    g_finite = jax.lax.cond(
        jnp.all(jnp.isfinite(gsq)),
        lambda: jnp.ones(len(grads), bool),
        lambda: stack([jnp.all(jnp.isfinite(g)) for g in grads], bool),
    )
    s_changed, s_d = compare(state0, state)
    return (
        jnp.stack(
            [r.astype(jnp.float32) for r in (changed, jnp.sqrt(d), jnp.sqrt(usq), finite)]
        ).reshape(4, len(end)),
        jnp.stack([jnp.sqrt(gsq), g_finite.astype(jnp.float32)]).reshape(2, len(grads)),
        jnp.stack([s_changed.astype(jnp.float32), jnp.sqrt(s_d)]).reshape(2, len(state)),
    )


_audit_call = jax.jit(_audit_rows)


def _host_audit(
    begin: list, before: list, end: list, grads: list, state0: list, state: list, first: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`_audit_call` computed by NumPy, for calls that come before its program is built.

    On the CPU backend the arrays already live in host memory, so this costs a few passes
    over them and no compilation: a runner's first answer need not wait for the audit's.
    """

    def host(x: Any) -> np.ndarray:
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.ascontiguousarray(np.asarray(x))

    def sq(x: np.ndarray) -> float:
        y = np.abs(x)
        y = y.astype(np.float32) if y.dtype.itemsize < 4 else y
        return float(np.sum(y * y))

    def diff(a: np.ndarray, b: np.ndarray) -> tuple[bool, float]:
        d = sq(b - a) if np.issubdtype(a.dtype, np.inexact) else float("nan")
        # Bit-level, as `differs`: NaN == NaN here, -0.0 != 0.0.
        return bool(d > 0) or not np.array_equal(a.view(np.uint8), b.view(np.uint8)), d

    with np.errstate(all="ignore"):  # NaN/inf are findings here, not warnings
        return _host_rows(host, sq, diff, begin, before, end, grads, state0, state, first)


def _host_rows(
    host: Callable[[Any], np.ndarray],
    sq: Callable[[np.ndarray], float],
    diff: Callable[[np.ndarray, np.ndarray], tuple[bool, float]],
    begin: list,
    before: list,
    end: list,
    grads: list,
    state0: list,
    state: list,
    first: Any,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    b0, b1, b2 = ([host(x) for x in xs] for xs in (begin, before, end))
    rows = np.zeros((4, len(b2)), np.float32)
    for j, (a, p, e) in enumerate(zip(b0, b1, b2)):
        changed, d = diff(p if first else a, e)
        u = d if first else sq(e - p)
        rows[:, j] = changed, np.sqrt(d), np.sqrt(u), not np.any(np.isfinite(a) & ~np.isfinite(e))
    g = [host(x) for x in grads]
    grad_rows = np.array(
        [[np.sqrt(sq(x)) for x in g], [bool(np.all(np.isfinite(x))) for x in g]], np.float32
    ).reshape(2, len(g))
    pairs = [diff(host(a), host(b)) for a, b in zip(state0, state)]
    state_rows = np.array([[c for c, _ in pairs], [np.sqrt(d) for _, d in pairs]], np.float32)
    return rows, grad_rows, state_rows.reshape(2, len(pairs))


def _elements(args: tuple) -> int:
    """How many elements an audit of `_audit_rows(*args)` reads: its leaves, at the end of
    the call, the gradients and the state."""
    _, _, end, grads, _, state, _ = args
    return sum(math.prod(x.shape) for group in (end, grads, state) for x in group)


def _subset(leaves: list, index: np.ndarray | None) -> list:
    return leaves if index is None else [leaves[j] for j in index]


def _arrays(tree: Any) -> list:
    return [x for x in jtu.tree_leaves(tree) if eqx.is_array(x)]


class _Chunk(NamedTuple):
    """Steps dispatched back to back, on the host: where they ended and what they saw."""

    arrays: tuple  # (optimized leaves, optimizer state's arrays, state) after the last step
    losses: list
    audit: np.ndarray  # `_CHANGED`... of the call up to the last step
    state_audit: np.ndarray


# -- helpers ------------------------------------------------------------------------------


def _strong(tree: Any) -> Any:
    """The tree with weakly typed JAX arrays made strongly typed (same values, same sharding)."""

    def fix(x: Any) -> Any:
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


def _pin(arrays: list, pins: tuple) -> list:
    # XLA's propagation may pick another layout for an output (seen: a replicated bias
    # coming back sharded); a constraint per leaf keeps the model as the user laid it out.
    return [
        x if p is None else jax.lax.with_sharding_constraint(x, p) for x, p in zip(arrays, pins)
    ]


def check_optimizer(optimizer: Any) -> Any:
    """`optimizer`, if it is an optax `GradientTransformation` (anything with init/update)."""
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise ExplorerError(
            "optimizer must be an optax GradientTransformation (with .init and .update), "
            f"got {type(optimizer).__name__}; e.g. optax.adam(1e-3)"
        )
    return optimizer


def check_method(method: Any) -> Method:
    if not (isinstance(method, str) and method in METHODS):
        raise ExplorerError(
            f"unknown method {short_repr(method)}; use one of "
            + ", ".join(repr(m) for m in METHODS)
        )
    return method


def check_layout(layout: Any) -> Layout:
    if not (isinstance(layout, str) and layout in LAYOUTS):
        raise ExplorerError(
            f"unknown layout {short_repr(layout)}; use {MASKED!r} (one compilation for every "
            f"spec and method) or {STRUCTURAL!r} (optimizer state only for trainable leaves)"
        )
    return layout


def _check_loss_fn(loss_fn: Callable, model: Any, state: Any, batch: Any) -> None:
    if not callable(loss_fn):
        raise ExplorerError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if state is None and has_state(model):
        raise ExplorerError(
            "the model holds eqx.nn.StateIndex markers (a BatchNorm or another stateful "
            "layer), so it needs an eqx.nn.State: build it with "
            "`model, state = eqx.nn.make_with_state(Model)(...)`, pass `state=state`, and "
            "write loss_fn(model, state, batch) -> (loss, new_state)."
        )
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
    """How one (spec, method) maps the model's leaves onto the program."""

    spec: FilterSpec
    method: Method
    trainable: np.ndarray  # per model leaf: should train under this method
    diff: np.ndarray  # per model leaf: passed to the program as an optimized leaf
    diff_index: np.ndarray
    masks: np.ndarray  # (5, number of optimized leaves): see `_method_masks`
    factors: np.ndarray  # per optimized leaf: its updates' multiplier (float32)
    optimizer: Any
    rules: tuple  # per optimized leaf: its update rule or None
    rest_index: list  # the other model leaves, in order
    diff_key: tuple  # `diff_index` as a tuple of ints (hashable, for the program)
    baked: tuple  # `masks` as nested tuples of bools, to bake into a program
    key: bytes  # masks and factors: names the program specialised to this layout
    touched: np.ndarray  # the optimized leaves a baked program writes (their columns)
    seen: list  # the optimized leaves whose gradient a baked program returns


def _slot_cols(opt_state: Any, params: Any) -> tuple:
    """For each optimizer-state leaf, the optimized leaf whose slot it is, or -1 (shared).

    Per-leaf slots (Adam's mu and nu, momentum) are sub-trees with exactly the parameters'
    structure; anything else (a step count, a masked optimizer's state) is shared.
    """
    structure = jtu.tree_structure(params)
    if structure.num_nodes == 1:  # a bare array as the model: match slots by shape
        shape = np.shape(params)
        return tuple(0 if np.shape(x) == shape else -1 for x in jtu.tree_leaves(opt_state))
    is_mirror = lambda x: type(x) is type(params) and jtu.tree_structure(x) == structure  # noqa: E731
    cols: list[int] = []
    for x in jtu.tree_leaves(opt_state, is_leaf=is_mirror):
        cols.extend(range(structure.num_leaves) if is_mirror(x) else [-1])
    return tuple(cols)


def _layer_is_frozen(spec: FilterSpec, path: str) -> bool:
    """Whether the layer at `path` (or its nearest ancestor holding parameters) is frozen."""
    tree = spec.model_tree
    node = tree.find(path)
    while node >= 0:
        state = spec.node_state(node)
        if state != STATIC_STATE:
            return state == FROZEN_STATE
        node = tree.parent[node]
    return False


# -- the runner ---------------------------------------------------------------------------


class StepRunner:
    """Runs jitted optimizer steps on a model under a spec and audits every leaf.

    **Arguments:**

    - `model`: the model (any pytree); never modified or donated.
    - `spec`: the `FilterSpec` saying which leaves train.
    - `loss_fn`: `loss_fn(model, batch) -> scalar`, or with `state=`
      `loss_fn(model, state, batch) -> (loss, new_state)`.
    - `batch`: the batch every step uses (`runner.batch` may be reassigned between calls).
    - `optimizer`: an `optax.GradientTransformation`; default `optax.adam(1e-3)`.
    - `method`: how frozen leaves are kept: `"partition"` (default), `"stop_gradient"`,
      `"optax_mask"` or `"none"` (see the module docstring).
    - `state`: the `eqx.nn.State` of a stateful model (`eqx.nn.make_with_state`).
    - `layout`: `"masked"` (default) or `"structural"`, see below.
    - `specialise`: compile a program specialised to a (spec, method) that runs many steps.

    >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
    >>> def loss_fn(model, batch):
    ...     x, y = batch
    ...     return jnp.mean((jax.vmap(model)(x) - y) ** 2)
    >>> batch = (jnp.ones((8, 2)), jnp.zeros((8, 1)))
    >>> spec = ex.FilterSpec(model).freeze("layers[0]")
    >>> runner = ex.StepRunner(model, spec, loss_fn, batch)
    >>> report = runner.step(3)
    >>> report.ok, len(report.loss), report.by_status("frozen")
    (True, 3, ['layers[0].weight', 'layers[0].bias'])
    >>> runner.set_spec(spec.unfreeze("layers[0]"))  # no recompilation (layout="masked")
    >>> runner.step(1).by_status("updated")
    ['layers[0].weight', 'layers[0].bias', 'layers[1].weight', 'layers[1].bias']

    - `loss_fn(model, batch) -> scalar`; for stateful models (`eqx.nn.make_with_state`) pass
      `state=` and write `loss_fn(model, state, batch) -> (loss, new_state)`. Every array
      of the state is audited (`report.state_leaves`).
    - `layout="masked"` (default) compiles once for every spec, method and `n`;
      `layout="structural"` holds optimizer state only for the leaves it optimizes and
      compiles once per (spec, method). See the module docstring.
    - `runner.batch` may be reassigned between calls (same shapes: no retrace).
    - `set_spec(spec, method=None)` changes what is frozen between steps, as a user's own loop
      would: under `"partition"`/`"optax_mask"` leaves that stay trainable keep their
      optimizer state (and scalars such as Adam's step `count`, which belong to the
      optimizer, so newly trainable leaves start with zero moments but a later bias
      correction); newly trainable leaves start fresh and the next report says so.
      Under `"stop_gradient"`/`"none"` the state spans every float leaf and carries over
      unchanged: momentum keeps moving a newly frozen leaf (`leaked`). Switching to or
      from `"optax_mask"` rebuilds the state, as its structure differs in a user's loop.
    - `step(n, progress=...)` reports `StepProgress` after each chunk; `stop()`, from
      another thread, ends a running call after its current chunk (`report.stopped`).
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
        method: Method = PARTITION,
        state: Any = None,
        layout: Layout = MASKED,
        specialise: bool = True,
    ) -> None:
        spec = check_spec(spec, model, "StepRunner(model, spec, ...)")
        tree = spec.model_tree
        check_method(method)
        self._kind = check_layout(layout)
        _check_loss_fn(loss_fn, model, state, batch)
        optimizer = check_optimizer(optax.adam(1e-3) if optimizer is None else optimizer)
        self.loss_fn = loss_fn
        self.batch = batch
        self.optimizer = optimizer
        self.specialise = bool(specialise)
        self._treedef = tree.treedef
        self._inexact = tree.inexact
        self._is_array = tree.is_array
        self._paths = tree.leaf_paths
        self._leaf_index = {p: i for i, p in enumerate(self._paths)}
        self._sharded = any(_sharding_of(x) is not None for x in tree.leaves)
        self._initial_leaves = [_strong(x) for x in tree.leaves]
        self._initial_state = _strong(state)
        self._stateful = state is not None
        self._state_names = (
            [
                e
                for e, x in zip(state_entries(model, state), jtu.tree_leaves(state))
                if eqx.is_array(x)
            ]
            if self._stateful
            else []
        )
        self._counter = [0, 0]  # traces: [foreground, background (specialised)]
        self._local = threading.local()
        self._program, self._recycled = _make_program(self._on_trace)
        self._threads: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
        # Baked masks -> "compiling" | True: the recycling variant of its program is built.
        self._donors: dict[bytes, Any] = {}
        # Arrays a recycling step may write into: (masks, optimized leaves it writes, the
        # optimizer state's), of an earlier step, held by nothing else. What the runner
        # made and has not handed out: ids of current arrays (reading `model` or
        # `opt_state` hands them out).
        self._spare: tuple | None = None
        self._mine: set[int] = set()
        self._written_of: dict[tuple, list[bool]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._labelled: dict[bytes, Any] = {}  # mask -> optax.partition, reused on revisits
        # masks -> "compiling" | seconds it took | _Unbuilt (why it could not be built)
        self._special: dict[bytes, Any] = {}
        self._code_arrays: dict[int, jax.Array] = {}
        self._factor_arrays: dict[float, jax.Array] = {}
        self._step_seconds: dict[bool, float] = {}  # specialised? -> seconds per step
        self._init_fn: Callable | None = None
        self._leaves = list(self._initial_leaves)
        self._state = self._initial_state
        self._inference: set[int] = set()  # leaves whose `inference` flag a spec has set
        self._set_inference(spec)
        self._layout = self._layout_for(spec, method)
        self._opt_tree: Any = None  # the optimizer state as a tree, when built
        self._set_opt_state(self._fresh_opt_state(self._layout))
        self._slot_cols = _slot_cols(self.opt_state, self._params(self._layout))
        self._notes: list[str] = []
        self._fresh: set[int] = set()
        self._steps_on_layout = 0
        self._answered = False  # no step has run yet
        # The masked program: not started, built in the background (`_masked_ready` not
        # set yet), or used in the foreground, where it builds on its first call.
        self._masked_started = self._kind == STRUCTURAL or not self.specialise
        self._masked_ready = threading.Event()
        if self._masked_started:
            self._masked_ready.set()
        self._audits: dict[tuple, threading.Event] = {}  # leaves -> audit program built
        self._announced: set[bytes] = set()
        # Which program ran the last chunk: "masked", "specialised", "structural" (None: none).
        self.program: str | None = None

    # -- public state -------------------------------------------------------------------
    @property
    def model(self) -> Any:
        """The model after the steps run so far (full structure, non-array leaves intact).

        >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
        >>> loss_fn = lambda m, batch: jnp.mean((jax.vmap(m)(batch[0]) - batch[1]) ** 2)
        >>> batch = (jnp.ones((8, 2)), jnp.zeros((8, 1)))
        >>> runner = ex.StepRunner(model, ex.FilterSpec(model), loss_fn, batch)
        >>> _ = runner.step(2)
        >>> bool(eqx.tree_equal(runner.model, model))
        False
        """
        self._mine.clear()  # the caller may keep these arrays: never write into them
        return jtu.tree_unflatten(self._treedef, self._leaves)

    @property
    def state(self) -> Any:
        """The `eqx.nn.State` after the steps, or `None` for a stateless model.

        >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
        >>> loss_fn = lambda m, batch: jnp.mean((jax.vmap(m)(batch[0]) - batch[1]) ** 2)
        >>> batch = (jnp.ones((8, 2)), jnp.zeros((8, 1)))
        >>> runner = ex.StepRunner(model, ex.FilterSpec(model), loss_fn, batch)
        >>> runner.state is None
        True
        """
        return self._state

    @property
    def opt_state(self) -> Any:
        """The optimizer state: over every float leaf (masked layout), or over the leaves the
        current method optimizes (structural layout).

        >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
        >>> loss_fn = lambda m, batch: jnp.mean((jax.vmap(m)(batch[0]) - batch[1]) ** 2)
        >>> batch = (jnp.ones((8, 2)), jnp.zeros((8, 1)))
        >>> runner = ex.StepRunner(model, ex.FilterSpec(model), loss_fn, batch)
        >>> type(runner.opt_state)
        <class 'tuple'>
        """
        self._mine.clear()  # the caller may keep these arrays: never write into them
        if self._opt_tree is None:  # held flat between steps: built when read
            self._opt_tree = jtu.tree_unflatten(self._opt[0], _join(self._opt_arrays, self._opt[1]))
        return self._opt_tree

    def _set_opt_state(self, tree: Any) -> None:
        leaves, treedef = jtu.tree_flatten(tree)
        self._opt_arrays, static = _split(leaves)
        self._opt, self._opt_tree = (treedef, static), tree

    def _set_opt_arrays(self, arrays: list) -> None:
        self._opt_arrays, self._opt_tree = arrays, None

    @property
    def spec(self) -> FilterSpec:
        """The `FilterSpec` the next step runs with (see `set_spec`).

        >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
        >>> loss_fn = lambda m, batch: jnp.mean((jax.vmap(m)(batch[0]) - batch[1]) ** 2)
        >>> batch = (jnp.ones((8, 2)), jnp.zeros((8, 1)))
        >>> runner = ex.StepRunner(model, ex.FilterSpec(model), loss_fn, batch)
        >>> runner.spec.trainable_paths()[0]
        'layers[0].weight'
        """
        return self._layout.spec

    @property
    def method(self) -> Method:
        """The freezing method the next step uses (see `set_spec`).

        >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
        >>> loss_fn = lambda m, batch: jnp.mean((jax.vmap(m)(batch[0]) - batch[1]) ** 2)
        >>> batch = (jnp.ones((8, 2)), jnp.zeros((8, 1)))
        >>> runner = ex.StepRunner(model, ex.FilterSpec(model), loss_fn, batch)
        >>> runner.method
        'partition'
        """
        return self._layout.method

    @property
    def layout(self) -> Layout:
        """`"masked"` or `"structural"`: what the runner compiles (see the module docstring).

        >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
        >>> loss_fn = lambda m, batch: jnp.mean((jax.vmap(m)(batch[0]) - batch[1]) ** 2)
        >>> batch = (jnp.ones((8, 2)), jnp.zeros((8, 1)))
        >>> runner = ex.StepRunner(model, ex.FilterSpec(model), loss_fn, batch)
        >>> runner.layout
        'masked'
        """
        return self._kind

    @property
    def compile_count(self) -> int:
        """How many times the step program was traced (= compiled) for `step` calls.

        Specialised programs compiled in the background are counted apart, in
        `background_compile_count`.

        >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
        >>> loss_fn = lambda m, batch: jnp.mean((jax.vmap(m)(batch[0]) - batch[1]) ** 2)
        >>> batch = (jnp.ones((8, 2)), jnp.zeros((8, 1)))
        >>> runner = ex.StepRunner(model, ex.FilterSpec(model), loss_fn, batch)
        >>> _ = runner.step(1)
        >>> _ = runner.step(2)
        >>> runner.compile_count
        1
        """
        return self._counter[0]

    @property
    def background_compile_count(self) -> int:
        """How many programs were compiled in the background (see `wait_ready`).

        >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
        >>> loss_fn = lambda m, batch: jnp.mean((jax.vmap(m)(batch[0]) - batch[1]) ** 2)
        >>> batch = (jnp.ones((8, 2)), jnp.zeros((8, 1)))
        >>> runner = ex.StepRunner(model, ex.FilterSpec(model), loss_fn, batch)
        >>> runner.background_compile_count
        0
        """
        return self._counter[1]

    @property
    def busy(self) -> bool:
        """True while a `step` call runs (in any thread).

        >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
        >>> loss_fn = lambda m, batch: jnp.mean((jax.vmap(m)(batch[0]) - batch[1]) ** 2)
        >>> batch = (jnp.ones((8, 2)), jnp.zeros((8, 1)))
        >>> runner = ex.StepRunner(model, ex.FilterSpec(model), loss_fn, batch)
        >>> runner.busy
        False
        """
        return self._lock.locked()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until the programs being built in the background are ready.

        The masked program, which serves every spec and method, builds in the background
        after `warm()` or a `set_spec`; a `step` on another spec before then waits for it,
        with progress. A spec used for long runs gets its own programs in the background too.

        **Arguments:**

        - `timeout`: the most seconds to wait; default: no limit.

        **Returns:**

        True when ready, False on a timeout.

        >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
        >>> loss_fn = lambda m, batch: jnp.mean((jax.vmap(m)(batch[0]) - batch[1]) ** 2)
        >>> batch = (jnp.ones((8, 2)), jnp.zeros((8, 1)))
        >>> runner = ex.StepRunner(model, ex.FilterSpec(model), loss_fn, batch)
        >>> runner.wait_ready(timeout=60)
        True
        """
        end = None if timeout is None else time.perf_counter() + timeout
        left = lambda: None if end is None else max(0.0, end - time.perf_counter())  # noqa: E731
        if self._masked_started and not self._masked_ready.wait(left()):
            return False
        for thread in list(self._threads):
            thread.join(left())
        return not any(thread.is_alive() for thread in self._threads)

    def stop(self) -> None:
        """Ask a running `step` call to end after its current chunk (thread-safe).

        The call returns a report of the steps that ran, with `stopped=True`; a call that is
        not running is not affected.

        >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
        >>> loss_fn = lambda m, batch: jnp.mean((jax.vmap(m)(batch[0]) - batch[1]) ** 2)
        >>> batch = (jnp.ones((8, 2)), jnp.zeros((8, 1)))
        >>> runner = ex.StepRunner(model, ex.FilterSpec(model), loss_fn, batch)
        >>> runner.stop()  # no call runs: the next one runs in full
        >>> runner.step(2).stopped
        False
        """
        if self.busy:
            self._stop.set()

    def warm(self) -> None:
        """Start building, in the background, the program that serves every spec and method.

        A runner answers its first `step` with a program compiled for its spec alone (as fast
        to build as a hand-written step). Another spec or method needs the masked program,
        which `set_spec` starts building; call `warm()` after a first answer to build it
        while nobody waits, so the first step after a `set_spec` answers at the speed of a
        warm step (the widget does, as a click is likely). Without effect once started, for
        `layout="structural"` and for `specialise=False` (nothing to build apart). Raises
        `ExplorerError` while a `step` call runs.

        >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
        >>> loss_fn = lambda m, batch: jnp.mean((jax.vmap(m)(batch[0]) - batch[1]) ** 2)
        >>> batch = (jnp.ones((8, 2)), jnp.zeros((8, 1)))
        >>> runner = ex.StepRunner(model, ex.FilterSpec(model), loss_fn, batch)
        >>> _ = runner.step(1)  # on a program compiled for this spec
        >>> runner.warm()
        >>> runner.wait_ready(timeout=60)
        True
        >>> runner.set_spec(runner.spec.freeze("layers[0]"))
        >>> _ = runner.step(1)  # at the speed of a warm step: nothing compiles
        >>> runner.compile_count, runner.background_compile_count
        (1, 1)
        """
        with self._exclusive("warm"):
            self._start_masked()

    def _start_masked(self) -> None:
        # Called between steps, never beside one: tracing holds the GIL and XLA uses every
        # core, so a parallel build would slow the step down.
        if not self._masked_started:
            self._masked_started = True
            self._background(self._warm_masked, "masked")

    # -- layouts and optimizer state -----------------------------------------------------
    def _layout_for(self, spec: FilterSpec, method: Method) -> _Layout:
        mask = np.asarray(spec.mask, bool)
        trainable = self._inexact.copy() if method == NONE else mask.copy()
        optimizer = self.optimizer
        if self._kind == MASKED:
            diff = self._inexact.copy()
            masks = _method_masks(method, mask[diff])
        else:
            diff = mask.copy() if method == PARTITION else self._inexact.copy()
            masks = np.ones((5, int(diff.sum())), bool)
            if method == STOP_GRADIENT:
                masks = _method_masks(method, mask[diff])
            if method == OPTAX_MASK:
                optimizer = self._labelled_optimizer(mask)
        diff_index = np.flatnonzero(diff)
        rules = tuple(spec.constraints.get(self._paths[i]) for i in diff_index)
        # A frozen leaf keeps factor 1: what moves it anyway (a `stop_gradient` leaf under
        # weight decay, every leaf under "none") is the method's doing, shown as it is.
        factors = np.where(mask, spec.lr_factors, 1.0)[diff_index].astype(np.float32)
        return _Layout(
            spec,
            method,
            trainable,
            diff,
            diff_index,
            masks,
            factors,
            optimizer,
            rules,
            np.flatnonzero(~diff).tolist(),
            tuple(diff_index.tolist()),
            tuple(tuple(bool(b) for b in row) for row in masks),
            masks.tobytes() + factors.tobytes(),
            np.flatnonzero(masks[_TOUCH]),
            np.flatnonzero(masks[_GRAD] | masks[_SEEN]).tolist(),
        )

    def _labelled_optimizer(self, mask: np.ndarray) -> Any:
        key = mask.tobytes()
        if key not in self._labelled:
            labels = jtu.tree_unflatten(
                self._treedef,
                [
                    ("trainable" if m else "frozen") if f else None
                    for m, f in zip(mask, self._inexact)
                ],
            )
            self._labelled[key] = optax.partition(
                {"trainable": self.optimizer, "frozen": optax.set_to_zero()},
                lambda _: labels,  # a module as labels would be *called* by optax
            )
        return self._labelled[key]

    def _owned(self, layout: _Layout) -> np.ndarray:
        """Per model leaf: its optimizer slots advance under `layout`."""
        owned = np.zeros(len(self._paths), bool)
        if self._kind == STRUCTURAL and layout.method == OPTAX_MASK:
            owned[layout.diff_index] = layout.trainable[layout.diff_index]
        else:
            owned[layout.diff_index] = layout.masks[_SLOT]
        return owned

    def _arrays_of(self, layout: _Layout) -> tuple:
        """What a chunk carries: (the optimized leaves, the optimizer state's arrays, state)."""
        return [self._leaves[i] for i in layout.diff_index], self._opt_arrays, self._state

    def _params(self, layout: _Layout) -> Any:
        return jtu.tree_unflatten(
            self._treedef, [x if d else None for x, d in zip(self._leaves, layout.diff)]
        )

    def _fresh_opt_state(self, layout: _Layout) -> Any:
        if self._kind == MASKED:  # one structure for the runner's life: init is jitted once
            init = self._init_fn
            if init is None:
                init = self._init_fn = jax.jit(lambda p: _strong(self.optimizer.init(p)))
            return init(self._params(layout))
        return _strong(layout.optimizer.init(self._params(layout)))

    def _carry_masked(self, old: _Layout, new: _Layout) -> None:
        """Masked layout: reset the slots the structural version would have (re)started."""
        if not jtu.tree_leaves(self.opt_state):
            return  # a stateless optimizer: nothing to carry
        old_owned, new_owned = self._owned(old), self._owned(new)
        fresh_state = self._fresh_opt_state(new)
        shared = any(c < 0 for c in self._slot_cols)  # e.g. Adam's count
        slots = any(c >= 0 for c in self._slot_cols)  # e.g. momentum, per leaf
        if (old.method == OPTAX_MASK) != (new.method == OPTAX_MASK):
            # In a user's loop the state's structure changes (optax.partition wraps it):
            # all of it starts again, whatever it had and whatever it will hold.
            self._set_opt_state(fresh_state)
            had = shared or (slots and bool(old_owned.any()))
            has = shared or (slots and bool(new_owned.any()))
            self._tell_carry(old, new, rebuilt=had and has, had=had, has=has)
            return
        fresh, dropped = new_owned & ~old_owned, old_owned & ~new_owned
        if not slots or not (fresh.any() or dropped.any()):
            return
        # A dropped leaf's slots go back to their initial value too: a frozen leaf then
        # holds the state a partition would give it if it trained again.
        reset = {int(j) for j, i in enumerate(new.diff_index) if fresh[i] or dropped[i]}
        leaves = [
            y if c in reset else x
            for x, y, c in zip(
                jtu.tree_leaves(self.opt_state), jtu.tree_leaves(fresh_state), self._slot_cols
            )
        ]
        self._set_opt_state(jtu.tree_unflatten(jtu.tree_structure(self.opt_state), leaves))
        self._tell_carry(old, new, rebuilt=False, had=True, has=True)

    def _carry_structural(self, old: _Layout, new: _Layout) -> None:
        """Structural layout: move `self.opt_state` to `new`'s structure, by key path."""
        if old.optimizer is new.optimizer and np.array_equal(old.diff, new.diff):
            return  # same optimizer over the same leaves: the state carries over unchanged
        fresh_state = self._fresh_opt_state(new)
        # Optimizer state leaves are keyed by their path (e.g. `[0].mu.layers[1].weight`),
        # which does not depend on which other leaves are None: equal paths = same slot.
        old_by_path = {tuple(p): x for p, x in jtu.tree_flatten_with_path(self.opt_state)[0]}
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
        self._set_opt_state(jtu.tree_unflatten(treedef, leaves))
        regroup = (old.method == OPTAX_MASK) != (new.method == OPTAX_MASK)
        self._tell_carry(
            old,
            new,
            rebuilt=regroup and carried == 0 and bool(started) and bool(old_by_path),
            had=carried < len(old_by_path),
            has=bool(started),
        )

    def _tell_carry(self, old: _Layout, new: _Layout, rebuilt: bool, had: bool, has: bool) -> None:
        """The notes of a re-toggle, the same in both layouts: the state was `rebuilt` (its
        structure changed), or slots were dropped (if some `had` to be) for newly frozen
        leaves and started (if some `has` to be) for newly trained ones. Slots exist only
        for optimizers with per-leaf state (not plain sgd)."""
        old_owned, new_owned = self._owned(old), self._owned(new)
        if rebuilt:
            self._notes.append(
                "optimizer state rebuilt from scratch: its structure changed "
                f"({old.method} -> {new.method})"
            )
            self._started(new_owned)
            return
        dropped = np.flatnonzero(old_owned & ~new_owned)
        if had and len(dropped):
            self._notes.append(
                "optimizer state dropped for newly frozen leaves: "
                + listed([self._paths[i] for i in dropped])
            )
        if has:
            self._started(new_owned & ~old_owned)

    def _set_inference(self, spec: FilterSpec) -> None:
        """Layers' `inference` flags as `spec` sets them; flags it no longer sets go back to
        the model's. They are static to the program: a change here retraces it once."""
        overrides = {self._leaf_index[p]: on for p, on in spec.inference_overrides.items()}
        for i in self._inference | set(overrides):
            self._leaves[i] = overrides.get(i, self._initial_leaves[i])
        self._inference = set(overrides)

    def _started(self, fresh: np.ndarray) -> None:
        index = np.flatnonzero(fresh)
        if len(index):
            self._fresh |= set(index.tolist())
            self._notes.append(
                "optimizer state started fresh for: " + listed([self._paths[i] for i in index])
            )

    def set_spec(self, spec: FilterSpec, method: Method | None = None) -> None:
        """Change what is frozen (and optionally the method) before the next step.

        No recompilation in the masked layout. The optimizer state follows the rules in the
        class docstring; the next report's `notes` (and the `detail` of affected leaves) say
        which state started fresh. Raises `ExplorerError` for a spec of another model or an
        unknown method, and while a `step` call runs.

        **Arguments:**

        - `spec`: a `FilterSpec` of the runner's model.
        - `method`: the new method; default: keep the current one.

        >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
        >>> loss_fn = lambda m, batch: jnp.mean((jax.vmap(m)(batch[0]) - batch[1]) ** 2)
        >>> batch = (jnp.ones((8, 2)), jnp.zeros((8, 1)))
        >>> runner = ex.StepRunner(model, ex.FilterSpec(model), loss_fn, batch)
        >>> runner.set_spec(ex.FilterSpec(model).freeze("layers[0]"), method="stop_gradient")
        >>> runner.step(1).by_status("frozen")
        ['layers[0].weight', 'layers[0].bias']
        """
        if not isinstance(spec, FilterSpec) or spec.model_tree.treedef != self._treedef:
            raise ExplorerError(
                "set_spec: this spec was built for another model, with another structure; "
                "build it from this runner's model, e.g. runner.spec.freeze(...)"
            )
        method = self._layout.method if method is None else check_method(method)
        with self._exclusive("set_spec"):
            new = self._layout_for(spec, method)
            if method != self._layout.method:
                self._notes.append(f"method changed: {self._layout.method} -> {method}")
            if self._kind == MASKED:
                self._carry_masked(self._layout, new)
            else:
                self._carry_structural(self._layout, new)
                self._slot_cols = _slot_cols(self.opt_state, self._params(new))
            if not np.array_equal(new.masks, self._layout.masks):
                self._steps_on_layout = 0
                self._spare = None  # shaped for the old masks
            changed = new.key != self._layout.key or method != self._layout.method
            self._set_inference(spec)
            self._layout = new
            self._mine.clear()  # the carry may have replaced arrays: start the count again
            if changed and self._answered:  # before an answer, the first one compiles its own
                self._start_masked()

    def reset(self) -> None:
        """Back to the initial model and state, with a fresh optimizer state (compilations kept).

        >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
        >>> loss_fn = lambda m, batch: jnp.mean((jax.vmap(m)(batch[0]) - batch[1]) ** 2)
        >>> batch = (jnp.ones((8, 2)), jnp.zeros((8, 1)))
        >>> runner = ex.StepRunner(model, ex.FilterSpec(model), loss_fn, batch)
        >>> _ = runner.step(2)
        >>> runner.reset()
        >>> bool(eqx.tree_equal(runner.model, model))
        True
        """
        with self._exclusive("reset"):
            self._leaves = list(self._initial_leaves)
            self._inference = set()
            self._set_inference(self._layout.spec)
            self._state = self._initial_state
            self._set_opt_state(self._fresh_opt_state(self._layout))
            self._notes = ["reset: initial model, fresh optimizer state"]
            self._fresh = set()
            self._spare, self._mine = None, set()

    def _exclusive(self, what: str) -> Any:
        if not self._lock.acquire(blocking=False):
            raise ExplorerError(
                f"{what}: a step call is running; wait for it to finish or call runner.stop()"
            )
        return _Release(self._lock)

    # -- stepping -------------------------------------------------------------------------
    def step(
        self, n: int = 1, *, progress: Callable[[StepProgress], Any] | None = None
    ) -> StepReport:
        """Run `n` optimizer steps on `runner.batch`; return the audit of the whole call.

        Statuses and `delta_norm` compare the model before and after the call; `grad_norm` is
        from the last step attempted; `update_norm` is what the last committed step moved. On a
        failure (the loss raises, is not a float scalar or is NaN/inf, or a step makes a
        parameter NaN/inf) the runner keeps the arrays of the last good step and `error` says
        what happened and where. A second call while one runs raises `ExplorerError`.

        **Arguments:**

        - `n`: the number of steps.
        - `progress`: called with a `StepProgress` before a compilation and after each chunk
          (about 0.25 s of steps); `stop()` ends the call between chunks.

        **Returns:**

        A `StepReport`.

        >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
        >>> loss_fn = lambda m, batch: jnp.mean((jax.vmap(m)(batch[0]) - batch[1]) ** 2)
        >>> batch = (jnp.ones((8, 2)), jnp.zeros((8, 1)))
        >>> runner = ex.StepRunner(model, ex.FilterSpec(model), loss_fn, batch)
        >>> report = runner.step(3)
        >>> report.steps, len(report.loss), report.by_status("updated")[:1]
        (3, 3, ['layers[0].weight'])
        """
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
            raise ExplorerError(f"step(n) needs a positive int number of steps, got {n!r}")
        with self._exclusive("step"):
            self._stop.clear()
            try:
                return self._step(int(n), progress)
            finally:
                self._stop.clear()
                self._local.on_trace = None

    def _on_trace(self) -> None:
        hook = getattr(self._local, "on_trace", None)
        if getattr(self._local, "background", False):
            self._counter[1] += 1
            return
        self._counter[0] += 1
        if hook is not None:
            hook()

    def _step(self, n: int, progress: Callable | None) -> StepReport:
        layout = self._layout
        begin = self._arrays_of(layout)
        compiles, t0 = self._counter[0], time.perf_counter()

        def tell(phase: Phase, done: int, loss: float | None) -> None:
            if progress is not None:
                progress(StepProgress(phase, done, n, loss, time.perf_counter() - t0))

        self._local.on_trace = lambda: tell("compiling", 0, None)

        losses: list[float] = []
        current, moved, attempt = begin, None, None
        failure, broken, stopped, swapped = None, None, False, None
        while len(losses) < n:
            if losses and self._stop.is_set():
                stopped = True
                break
            baked = self._pick(layout, functools.partial(tell, "compiling", len(losses), None))
            if baked is not None and swapped is None and self._kind == MASKED:
                swapped = len(losses)
            size = self._chunk_size(n - len(losses), baked is not None, progress is not None)
            traces, tc = self._counter[0], time.perf_counter()
            try:
                chunk = self._run(layout, baked, begin, current, size, first=not losses)
            except _Traced as e:  # the program could not be built: nothing ran
                if baked is not None and self._kind == MASKED:  # the masked one may build
                    self._special[layout.key] = _Unbuilt(_explain(e.__cause__ or e))
                    swapped = None
                    continue
                failure = _Failure(message=_explain(e.__cause__ or e))
                break
            except _Ran:  # an error at run time (e.g. eqx.error_if): find the step
                chunk = None
            key = layout.key
            if baked is not None and not isinstance(self._special.get(key), float):
                self._special[key] = time.perf_counter() - tc  # built here, for a first answer
            if chunk is not None and np.isfinite(chunk.losses).all() and chunk.audit[_FINITE].all():
                if self._counter[0] == traces:
                    self._step_seconds[baked is not None] = (time.perf_counter() - tc) / size
                current, moved = chunk.arrays, chunk
                losses += chunk.losses
                self._answered = True
            else:  # a non-finite loss, NaN/inf parameters or a run-time error in this chunk
                current, steps, moved, attempt, broken, failure = self._replay(
                    layout, baked, begin, current, size, moved, first=not losses
                )
                losses += steps
                if failure is not None:
                    break
            self.program = (
                ("specialised" if baked is not None else MASKED)
                if self._kind == MASKED
                else STRUCTURAL
            )
            tell("running", len(losses), losses[-1] if losses else None)
            # After the first chunk, so the background compile never slows the first answer.
            if self._kind == MASKED and self.specialise:
                if self._steps_on_layout + n >= SPECIALISE_AFTER:
                    self._specialise(layout)

        self._steps_on_layout += len(losses)
        params, opt_arrays, self._state = current
        if losses:
            self._retire(layout, begin, params, opt_arrays)
        self._set_opt_arrays(opt_arrays)
        for i, x, touched in zip(layout.diff_index, params, layout.masks[_TOUCH]):
            if touched:  # an untouched leaf comes back bit-identical: keep the very object
                self._leaves[i] = x
        key = layout.key
        if swapped is not None and losses and key not in self._announced:
            self._announced.add(key)
            self._notes.append(
                f"steps {swapped + 1}-{len(losses)} ran on the program specialised to this spec "
                f"(masks compiled in, frozen leaves not differentiated; compiled in "
                f"{self._special[key]:.1f} s)"
            )
        unbuilt = self._special.get(layout.key)
        if isinstance(unbuilt, _Unbuilt) and not unbuilt.told:
            unbuilt.told = True
            self._notes.append(
                "the specialised program (frozen leaves not differentiated, as in a partition "
                "or the exported code) could not be built; steps stay on the masked one: "
                + unbuilt.why
            )
        audit = self._call_audit(layout, moved, attempt)
        report = StepReport(
            self._leaf_reports(layout, audit, broken),
            loss=losses,
            error=self._message(layout, failure, audit, broken),
            method=layout.method,
            steps=len(losses),
            notes=self._notes,
            compiles=self._counter[0] - compiles,
            state_leaves=self._state_reports(moved),
            stopped=stopped,
        )
        report.notes.extend(self._state_notes(layout, report))
        self._notes, self._fresh = [], set()
        return report

    def _chunk_size(self, remaining: int, baked: bool, watched: bool) -> int:
        seconds = self._step_seconds.get(baked) or self._step_seconds.get(not baked)
        if seconds is None:  # never timed: one step first, unless nobody watches
            return 1 if watched and remaining > 1 else remaining
        budget = CHUNK_SECONDS if watched else QUIET_CHUNK_SECONDS
        return int(max(1, min(remaining, budget // max(seconds, 1e-6))))

    def _run(
        self,
        layout: _Layout,
        baked: tuple | None,
        begin: tuple,
        arrays: tuple,
        n: int,
        first: bool,
    ) -> _Chunk:
        """`n` steps dispatched back to back, like a hand-written loop, then the audit of the
        call so far (`first`: `arrays` are the call's start). One wait, at the end."""
        p_leaves, o_leaves, state_tree = arrays
        st, rest, state, batch = self._static_for(layout, baked, p_leaves, o_leaves, state_tree)
        masks, factors = (None, None) if baked is not None else self._codes(layout)
        key = layout.key
        # Once its recycling variant is built, a baked step writes into the arrays of an
        # earlier step that nothing holds any more (`_spare`): never into the chunk's inputs
        # (a replay starts from them), nor before the audit has read the last step's.
        recycle = (
            baked is not None
            and self._donors.get(key) is True
            and not any(t.is_alive() for t in self._threads)  # may read a spare array
        )
        touched, written = layout.masks[_TOUCH], self._written(layout) if recycle else []
        losses, before, grads, audited = [], p_leaves, [], False
        rows: Any = None
        for k in range(n):
            before, o_before = p_leaves, o_leaves
            scratch = None
            if recycle and (k < n - 1 or (n == 1 and first)):
                scratch = self._take_spare(key, p_leaves, o_leaves)
            # A call of one step on a recycling program: its audit comes out of it.
            audited = scratch is not None and n == 1 and first
            try:
                if scratch is not None:
                    p_out, o_out, state, loss, rows = self._recycled(
                        *scratch, p_leaves, rest, o_leaves, state, batch, np.bool_(audited), st=st
                    )
                else:
                    p_out, o_out, state, loss, grads = self._program(
                        p_leaves, rest, o_leaves, state, batch, masks, factors, st=st
                    )
            except Exception as e:
                if k:  # the program was built: this is the run failing
                    raise _Ran() from e
                raise _Traced() from e
            if recycle and k > 0:  # made by this chunk's previous step; only this one read them
                self._spare = (key, _picked(before, touched), _picked(o_before, written))
            # `None`: a leaf the baked program knows unchanged; the very same array stays.
            p_leaves = [x if y is None else y for x, y in zip(p_leaves, p_out)]
            o_leaves = [x if y is None else y for x, y in zip(o_leaves, o_out)]
            losses.append(loss)
        if self._stateful:
            state_tree = jtu.tree_unflatten(st.state[0], _join(state, st.state[1]))
        # Leaves a baked program never writes are the very same arrays: nothing to compare;
        # gradients it never uses are zero: nothing to reduce. (The last step of a chunk of
        # several returns its gradients.)
        index = layout.touched if baked is not None else None
        seen = layout.seen if audited else [j for j, g in enumerate(grads) if g is not None]
        try:  # the one wait of the chunk
            if audited:
                audit, grad_rows, state_audit = rows
            else:
                args = (
                    _subset(begin[0], index),
                    _subset(before, index),
                    _subset(p_leaves, index),
                    [grads[j] for j in seen],
                    _arrays(begin[2]),
                    state,
                    np.bool_(first and n == 1),
                )
                audit, grad_rows, state_audit = self._auditor(index, seen, args)(*args)
            losses, audit, grad_rows, state_audit = jax.device_get(
                (losses, audit, grad_rows, state_audit)
            )
        except Exception as e:
            raise _Ran() from e
        full = np.zeros((6, len(layout.diff_index)), np.float32)
        full[_FINITE] = full[_GRAD_FINITE] = 1
        full[:4, slice(None) if index is None else index] = audit
        full[_GRAD_NORM:, seen] = grad_rows
        return _Chunk(
            (p_leaves, o_leaves, state_tree),
            [float(x) for x in losses],
            full,
            np.asarray(state_audit),
        )

    def _static_for(
        self, layout: _Layout, baked: tuple | None, p_leaves: list, o_leaves: list, state: Any
    ) -> tuple[_Static, list, list, list]:
        """The program's static part for this call, and its other data: the model's other
        arrays, the state's and the batch's."""
        rest, rest_static = _split([self._leaves[i] for i in layout.rest_index])
        batch, batch_static = _split(jtu.tree_leaves(self.batch))
        state_arrays, state_static = _split(jtu.tree_leaves(state))
        st = _Static(
            self.loss_fn,
            layout.optimizer,
            layout.rules,
            baked,
            None if baked is None else tuple(float(f) for f in layout.factors),
            self._slot_cols,
            _pins(p_leaves + o_leaves) if self._sharded else None,
            (
                self._treedef,
                layout.diff_key,
                rest_static,
                self._opt,
                (jtu.tree_structure(state), state_static) if self._stateful else None,
                (jtu.tree_structure(self.batch), batch_static),
            ),
        )
        return st, rest, state_arrays, batch

    def _codes(self, layout: _Layout) -> tuple[list, list]:
        """The masks as one uint8 code per optimized leaf (bit r = row r), and the factors,
        one float32 per leaf, on the device; each distinct value is placed once."""
        codes = (layout.masks * (1 << np.arange(5))[:, None]).sum(0).tolist()
        factors = layout.factors.tolist()
        for c in set(codes) - set(self._code_arrays):
            self._code_arrays[c] = jnp.uint8(c)
        for f in set(factors) - set(self._factor_arrays):
            self._factor_arrays[f] = jnp.float32(f)
        return [self._code_arrays[c] for c in codes], [self._factor_arrays[f] for f in factors]

    def _replay(
        self,
        layout: _Layout,
        baked: Any,
        begin: tuple,
        current: tuple,
        n: int,
        moved: Any,
        first: bool,
    ) -> tuple:
        """Re-run up to `n` steps from `current` one at a time, each checked.

        The slow path, taken only after a chunk saw trouble; steps are deterministic, so it
        stops at the step that broke and keeps everything before it. Returns (arrays, losses,
        last committed step, the failed step, broken, failure).
        """
        losses: list[float] = []
        broken, failure, attempt = None, None, None
        for _ in range(n):
            try:
                chunk = self._run(layout, baked, begin, current, 1, first=first and not losses)
            except (_Traced, _Ran) as e:
                failure = _Failure(message=_explain(e.__cause__ or e))
                break
            if not np.isfinite(chunk.losses[0]):
                failure, attempt = _Failure(len(losses) + 1, loss=chunk.losses[0]), chunk
                break
            if not chunk.audit[_FINITE].all():
                failure, attempt = _Failure(len(losses) + 1), chunk
                broken = chunk.audit[_FINITE]
                break
            current, moved = chunk.arrays, chunk
            losses += chunk.losses
        return current, losses, moved, attempt, broken, failure

    def _call_audit(self, layout: _Layout, moved: Any, attempt: Any) -> np.ndarray | None:
        """The call's audit: what the committed steps did (`moved`, the last committed
        chunk) and the gradients of the last step attempted (`attempt`, if it failed)."""
        if moved is None and attempt is None:
            return None  # no step ran
        if moved is None:
            audit = np.zeros((6, len(layout.diff_index)), np.float32)
            audit[_FINITE] = 1
        else:
            audit = moved.audit.copy()
        if attempt is not None:
            audit[[_GRAD_NORM, _GRAD_FINITE]] = attempt.audit[[_GRAD_NORM, _GRAD_FINITE]]
        return audit

    # -- specialised programs ---------------------------------------------------------------
    def _pick(self, layout: _Layout, waiting: Callable[[], None]) -> tuple | None:
        """The masks to bake into the next chunk's program, or None for the masked one.

        Structural layout: always baked. Masked layout: a program specialised to this spec
        once one is built; else the masked program. The first answer of a runner compiles
        this spec's specialised program (as fast to build as a hand-written step); the
        masked one builds in the background after `warm()` or a `set_spec`, and a spec
        without its own program waits for it (`waiting` reports that).
        """
        baked = layout.baked
        if self._kind == STRUCTURAL:
            return baked
        entry = self._special.get(layout.key)
        if isinstance(entry, float):
            return baked
        if self._masked_started and not self._masked_ready.is_set():
            waiting()  # the masked program is being built in the background
            self._masked_ready.wait()
        if self._masked_started or self._answered or isinstance(entry, _Unbuilt):
            self._masked_started = True  # built here, on its first call, if not built yet
            self._masked_ready.set()
            return None
        return baked

    def _background(self, work: Callable[[], None], what: str) -> threading.Thread:
        """Run `work` in a daemon thread marked as background (its traces are not
        `compile_count`'s); the process waits for it at exit (XLA aborts otherwise)."""

        def run() -> None:
            self._local.background = True
            work()

        thread = threading.Thread(target=run, name=f"eqx_explorer-{what}", daemon=True)
        thread.start()
        _BACKGROUND.add(thread)
        self._threads.add(thread)
        return thread

    def _auditor(self, index: np.ndarray | None, seen: list, args: tuple) -> Callable:
        """`_audit_call` once built for these leaves; until then (on CPU) `_host_audit`,
        while it builds in the background. Each set of leaves is its own program. On CPU,
        leaves of fewer than `AUDIT_COMPILE_ELEMENTS` elements are never compiled for."""
        on_cpu = jax.default_backend() == "cpu"
        if on_cpu and _elements(args) < AUDIT_COMPILE_ELEMENTS:
            return _host_audit
        key = (b"all" if index is None else index.tobytes(), tuple(seen))
        ready = self._audits.get(key)
        if ready is None:
            ready = self._audits[key] = threading.Event()
            self._background(functools.partial(self._warm_audit, index, seen, ready), "audit")
        if ready.is_set() or not on_cpu:
            return _audit_call
        return _host_audit

    def _warm_audit(self, index: np.ndarray | None, seen: list, ready: threading.Event) -> None:
        # Compiling the audit program by running it once on the current arrays.
        optimized = self._arrays_of(self._layout)[0]
        leaves = _subset(optimized, index)
        grads = [optimized[j] for j in seen]
        state = _arrays(self._state)
        try:  # waited for: a spare array is never written while a program reads it
            jax.block_until_ready(
                _audit_call(leaves, leaves, leaves, grads, state, state, np.bool_(True))
            )
        except Exception:  # noqa: BLE001 - the foreground will report any real problem
            pass
        finally:
            ready.set()

    def _warm_masked(self) -> None:
        # Builds the masked program (and the audit) by running one step, thrown away.
        layout = self._layout
        arrays = self._arrays_of(layout)
        try:
            self._run(layout, None, arrays, arrays, 1, first=True)
        except Exception:  # noqa: BLE001 - a step in the foreground will report it
            pass
        finally:
            self._masked_ready.set()

    def _specialise(self, layout: _Layout) -> None:
        """Build, in the background, the program specialised to `layout` (unless the first
        answer built it) and its recycling variant, for long runs."""
        key = layout.key
        if key in self._donors or isinstance(self._special.get(key), _Unbuilt | str):
            return
        self._donors[key] = "compiling"
        build = key not in self._special
        if build:
            self._special[key] = "compiling"
        baked = layout.baked
        arrays = self._arrays_of(layout)

        def work() -> None:
            start = time.perf_counter()
            if build:
                try:  # one step, thrown away: compiles the program
                    self._run(layout, baked, arrays, arrays, 1, first=True)
                except Exception as e:  # e.g. a custom JVP rule that fails on None tangents
                    self._special[key] = _Unbuilt(_explain(e.__cause__ or e))
                    return
                self._special[key] = time.perf_counter() - start
            try:
                self._warm_recycled(layout, baked, arrays)
            except Exception:  # noqa: BLE001 - steps then stay on the plain program
                return
            self._donors[key] = True

        self._background(work, "specialise")

    def _warm_recycled(self, layout: _Layout, baked: tuple, arrays: tuple) -> None:
        # Compiles the recycling variant by running it with copies as its scratch: the
        # runner's arrays (and the user's) are never given away.
        p_leaves, o_leaves, state_tree = arrays
        st, rest, state, batch = self._static_for(layout, baked, p_leaves, o_leaves, state_tree)
        scratch = [
            [jnp.copy(x) for x in _picked(p_leaves, layout.masks[_TOUCH])],
            [jnp.copy(x) for x in _picked(o_leaves, self._written(layout))],
        ]
        out = self._recycled(
            *scratch, p_leaves, rest, o_leaves, state, batch, np.bool_(True), st=st
        )
        jax.block_until_ready(out)

    def _written(self, layout: _Layout) -> list[bool]:
        """Per optimizer-state array: whether the program baked for `layout` writes it."""
        key = (layout.key, self._slot_cols)
        if key not in self._written_of:
            self._written_of[key] = _slots_written(
                self._slot_cols, self._opt[1], layout.masks[_SLOT]
            )
        return self._written_of[key]

    def _take_spare(self, key: bytes, p_leaves: list, o_leaves: list) -> tuple | None:
        """The spare arrays, if they fit this program and none is one of its inputs."""
        spare, self._spare = self._spare, None
        if spare is None or spare[0] != key:
            return None
        inputs = {id(x) for x in p_leaves} | {id(x) for x in o_leaves}
        if any(id(x) in inputs for x in spare[1] + spare[2]):
            return None
        return spare[1], spare[2]

    def _retire(self, layout: _Layout, begin: tuple, params: list, opt_arrays: list) -> None:
        """After a call that committed steps: which arrays the runner made and holds alone
        (`_mine`), and the call's first arrays as the next call's scratch if they were such."""
        old, new = begin[0] + begin[1], params + opt_arrays
        if self._spare is None and self._donors.get(layout.key) is True:
            flags = [*layout.masks[_TOUCH], *self._written(layout)]
            pairs = [(x, y) for x, y, f in zip(old, new, flags) if f]
            if all(id(x) in self._mine and x is not y for x, y in pairs):
                k = len(layout.touched)
                given = [x for x, _ in pairs]
                self._spare = (layout.key, given[:k], given[k:])
        self._mine = {id(y) for x, y in zip(old, new) if x is not y or id(x) in self._mine}

    # -- the report -------------------------------------------------------------------------
    def _message(
        self, layout: _Layout, failure: _Failure | None, audit: Any, broken: Any
    ) -> str | None:
        if failure is None or failure.message is not None:
            return None if failure is None else failure.message
        paths, diff_index = self._paths, layout.diff_index
        bad = [paths[i] for i, f in zip(diff_index, audit[_GRAD_FINITE]) if not f]
        grads = f"; non-finite gradients at: {listed(bad)}" if bad else ""
        if failure.loss is not None:
            what = f"non-finite loss ({failure.loss}){grads}"
        else:
            broken_paths = [paths[i] for i, f in zip(diff_index, broken) if not f]
            what = f"the update made NaN/inf values in: {listed(broken_paths)}{grads}"
            if not bad:
                what += " (the gradients were finite: check the optimizer, e.g. its learning rate)"
        return (
            f"step {failure.step} of this call: {what}. The runner rolled back to the last good "
            "model and optimizer state. Look for log(0), division by zero or overflow in the "
            "loss, or lower the learning rate."
        )

    def _leaf_reports(self, layout: _Layout, audit: Any, broken: Any) -> list[LeafReport]:
        column = {int(i): j for j, i in enumerate(layout.diff_index)}
        spec = layout.spec
        # Plain lists: a report is built after every call, element by element.
        active: list = np.asarray(layout.masks.any(0)).tolist()
        seen_row: list = layout.masks[_SEEN].tolist()
        rows = None if audit is None else audit.tolist()
        fine: list | None = None if broken is None else np.asarray(broken, bool).tolist()
        trainable = layout.trainable.tolist()
        lr = np.where(layout.trainable, np.where(spec.mask, spec.lr_factors, 1.0), 0.0).tolist()
        reports = []
        for i, path in enumerate(self._paths):
            detail = "optimizer state started fresh" if i in self._fresh else ""
            if not self._is_array[i] or not self._inexact[i]:
                # Non-array leaves live in the static part, and int/bool arrays are never
                # optimized: the same objects by construction.
                reports.append(LeafReport(path, KEPT, detail=detail))
                continue
            train, factor = trainable[i], lr[i]
            j = column.get(i)
            if j is None or not active[j]:
                # Never optimized (a partition's frozen leaf): the runner keeps the very
                # same array object, so it is bit-identical by construction.
                reports.append(
                    LeafReport(path, FROZEN, trainable=train, detail=detail, lr_factor=factor)
                )
                continue
            if rows is None:  # no step ran
                status = array_status(train, False)
                reports.append(
                    LeafReport(path, status, trainable=train, detail=detail, lr_factor=factor)
                )
                continue
            status = array_status(train, bool(rows[_CHANGED][j]))
            if status == LEAKED:
                detail = "frozen but changed" + (f"; {detail}" if detail else "")
            seen = seen_row[j]  # else the optimizer saw a zero gradient
            grad = rows[_GRAD_NORM][j] if seen else 0.0
            if status == UPDATED and grad == 0.0:  # e.g. an unused layer under weight decay
                note = "zero gradient: moved by the optimizer alone (weight decay?), not the loss"
                detail = note + (f"; {detail}" if detail else "")
            finite = (not seen or bool(rows[_GRAD_FINITE][j])) and (fine is None or fine[j])
            reports.append(
                LeafReport(
                    path,
                    status,
                    grad_norm=None if math.isnan(grad) and finite else grad,
                    update_norm=rows[_UPDATE][j],
                    delta_norm=rows[_DELTA][j],
                    trainable=train,
                    finite=finite,
                    detail=detail,
                    lr_factor=factor,
                )
            )
        for path, rule in layout.spec.constraints.items():
            i = self._leaf_index[path]
            reports[i] = dataclasses.replace(
                reports[i], violation=float(rule.violation(self._leaves[i]))
            )
        return reports

    def _state_reports(self, moved: Any) -> list[LeafReport]:
        reports = []
        for j, entry in enumerate(self._state_names):
            changed = moved is not None and bool(moved.state_audit[0, j])
            delta = None if moved is None else float(moved.state_audit[1, j])
            reports.append(
                LeafReport(
                    entry.path,
                    UPDATED if changed else UNCHANGED,
                    delta_norm=None if delta is None or np.isnan(delta) else delta,
                    detail=f"state of {entry.owner or 'the model'}",
                )
            )
        return reports

    def _state_notes(self, layout: _Layout, report: StepReport) -> list[str]:
        moved: dict[str, list[str]] = {}
        for entry, leaf in zip(self._state_names, report.state_leaves):
            if (
                leaf.status == UPDATED
                and entry.owner
                and _layer_is_frozen(layout.spec, entry.owner)
            ):
                moved.setdefault(entry.owner, []).append(entry.path)
        return [
            f"frozen layer `{owner}` still changed its state ({', '.join(paths)}): its state "
            f"(BatchNorm's running statistics, SpectralNorm's power-iteration vectors) moves with "
            f"every step unless the layer runs in inference mode, e.g. "
            f'spec.inference("{owner}") (the row menu\'s "inference mode" in the widget)'
            for owner, paths in moved.items()
        ]


# XLA aborts the process if it exits while a compilation runs in another thread.
_BACKGROUND: weakref.WeakSet[threading.Thread] = weakref.WeakSet()


@atexit.register
def _join_background() -> None:
    # A background build may start another one (the masked program, then its audit).
    while alive := [t for t in list(_BACKGROUND) if t.is_alive()]:
        for thread in alive:
            thread.join()


class _Release:
    def __init__(self, lock: threading.Lock):
        self._lock = lock

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        self._lock.release()


@dataclasses.dataclass
class _Unbuilt:
    why: str
    told: bool = False


class _Traced(Exception):
    """Building (tracing, compiling) the program failed; `__cause__` says why."""


class _Ran(Exception):
    """Running the program failed (e.g. `eqx.error_if`); `__cause__` says why."""
