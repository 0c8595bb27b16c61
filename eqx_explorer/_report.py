"""The reports of a training step: one `LeafReport` per leaf, gathered in a `StepReport`.

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

`StepRunner.step` and `audit_step` build them; they are plain frozen values.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection
from typing import Any, Final, Literal, get_args

from ._errors import ExplorerError

__all__ = ["LeafReport", "StepReport", "Status", "STATUSES", "BAD_STATUSES", "json_float"]

Status = Literal["updated", "stalled", "frozen", "leaked", "kept", "lost", "unchanged"]
UPDATED: Final = "updated"
STALLED: Final = "stalled"
FROZEN: Final = "frozen"
LEAKED: Final = "leaked"
KEPT: Final = "kept"
LOST: Final = "lost"
UNCHANGED: Final = "unchanged"
STATUSES: tuple[Status, ...] = get_args(Status)
BAD_STATUSES: frozenset[Status] = frozenset({LEAKED, LOST})


def listed(paths: list[str], most: int = 10) -> str:
    """`paths` joined, the first `most` of them (a message stays readable on big models)."""
    more = f" and {len(paths) - most} more" if len(paths) > most else ""
    return ", ".join(paths[:most]) + more


def json_float(x: Any) -> float | None:
    """`x` as a float for strict JSON: `None` for `None`, NaN and ±inf (JSON has none of them,
    and a browser's `JSON.parse` rejects them); a report's `finite` says why."""
    return float(x) if x is not None and math.isfinite(x) else None


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

    >>> leaf = ex.LeafReport("head.weight", "leaked", delta_norm=0.1, detail="frozen but changed")
    >>> leaf.status, leaf.to_dict()["delta_norm"]
    ('leaked', 0.1)
    """

    path: str
    status: Status
    grad_norm: float | None = None
    update_norm: float | None = None
    delta_norm: float | None = None
    trainable: bool = False
    finite: bool = True
    detail: str = ""
    violation: float | None = None
    lr_factor: float | None = None

    def to_dict(self) -> dict:
        """JSON-ready: non-finite norms become `None` (see `finite`).

        >>> ex.LeafReport("head.bias", "updated", grad_norm=float("nan"), finite=False).to_dict()
        {'path': 'head.bias', 'status': 'updated', 'grad_norm': None, ..., 'finite': False, ...}
        """
        return {
            "path": self.path,
            "status": self.status,
            "grad_norm": json_float(self.grad_norm),
            "update_norm": json_float(self.update_norm),
            "delta_norm": json_float(self.delta_norm),
            "trainable": self.trainable,
            "finite": self.finite,
            "detail": self.detail,
            "violation": json_float(self.violation),
            "lr_factor": json_float(self.lr_factor),
        }


@dataclasses.dataclass(frozen=True)
class StepReport:
    """The audit of one `StepRunner.step(n)` call or one `audit_step` run.

    >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
    >>> spec = ex.FilterSpec(model).freeze("layers[0]")
    >>> def step(model):  # a step that moves every array: the frozen ones leak
    ...     return jax.tree.map(lambda x: x + 1 if eqx.is_array(x) else x, model)
    >>> report = ex.audit_step(step, model, spec=spec)
    >>> report.ok, report.by_status("leaked")
    (False, ['layers[0].weight', 'layers[0].bias'])
    >>> report.leaf("layers[0].bias").detail
    'frozen but changed'
    >>> print(report.table(only="leaked"))
    path              status         grad    update     delta  detail
    layers[0].weight  leaked            -         -      ...  frozen but changed
    layers[0].bias    leaked            -         -         2  frozen but changed

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
        """No `leaked` or `lost` leaf and no error.

        >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
        >>> spec = ex.FilterSpec(model).freeze("layers[0]")
        >>> ones = lambda m: jax.tree.map(jnp.ones_like, eqx.filter(m, spec.tree))
        >>> report = ex.audit_step(lambda m: eqx.apply_updates(m, ones(m)), model, spec=spec)
        >>> report.ok
        True
        """
        return self.error is None and not any(leaf.status in BAD_STATUSES for leaf in self.leaves)

    def by_status(self, status: Status) -> list[str]:
        """The paths of the leaves with `status`.

        **Arguments:**

        - `status`: one of `"updated"`, `"stalled"`, `"frozen"`, `"leaked"`, `"kept"`, `"lost"`,
          `"unchanged"`.

        **Returns:**

        The paths, in leaf order.

        >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
        >>> spec = ex.FilterSpec(model).freeze("layers[0]")
        >>> ones = lambda m: jax.tree.map(jnp.ones_like, eqx.filter(m, spec.tree))
        >>> report = ex.audit_step(lambda m: eqx.apply_updates(m, ones(m)), model, spec=spec)
        >>> report.by_status("updated")
        ['layers[1].weight', 'layers[1].bias']
        """
        if status not in STATUSES:
            raise ExplorerError(f"unknown status {status!r}; expected one of {', '.join(STATUSES)}")
        return [leaf.path for leaf in self.leaves if leaf.status == status]

    @property
    def counts(self) -> dict[Status, int]:
        """The number of leaves per status (every status present, zeros included).

        >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
        >>> spec = ex.FilterSpec(model).freeze("layers[0]")
        >>> ones = lambda m: jax.tree.map(jnp.ones_like, eqx.filter(m, spec.tree))
        >>> report = ex.audit_step(lambda m: eqx.apply_updates(m, ones(m)), model, spec=spec)
        >>> {status: n for status, n in report.counts.items() if n}
        {'updated': 2, 'frozen': 2, 'kept': 2}
        """
        out = dict.fromkeys(STATUSES, 0)
        for leaf in self.leaves:
            out[leaf.status] += 1
        return out

    def statuses(self) -> dict[str, str]:
        """The compact form: `{path: status}`.

        >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
        >>> spec = ex.FilterSpec(model).freeze("layers[0]")
        >>> ones = lambda m: jax.tree.map(jnp.ones_like, eqx.filter(m, spec.tree))
        >>> report = ex.audit_step(lambda m: eqx.apply_updates(m, ones(m)), model, spec=spec)
        >>> report.statuses()["layers[0].bias"]
        'frozen'
        """
        return {leaf.path: leaf.status for leaf in self.leaves}

    def leaf(self, path: str) -> LeafReport:
        """The report of one leaf.

        **Arguments:**

        - `path`: the leaf's path, e.g. `"layers[0].weight"`.

        **Returns:**

        Its `LeafReport`; `ExplorerError` if the report has no such leaf.

        >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
        >>> spec = ex.FilterSpec(model).freeze("layers[0]")
        >>> ones = lambda m: jax.tree.map(jnp.ones_like, eqx.filter(m, spec.tree))
        >>> report = ex.audit_step(lambda m: eqx.apply_updates(m, ones(m)), model, spec=spec)
        >>> report.leaf("layers[1].bias").delta_norm
        1.0
        """
        for leaf in self.leaves:
            if leaf.path == path:
                return leaf
        paths = listed([x.path for x in self.leaves])
        raise ExplorerError(f"no leaf at `{path[:80]}` in this report; its leaves are {paths}")

    def to_dict(self) -> dict:
        """A JSON-ready summary: statuses, per-leaf norms (floats or `None`), losses, error.

        >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
        >>> spec = ex.FilterSpec(model).freeze("layers[0]")
        >>> ones = lambda m: jax.tree.map(jnp.ones_like, eqx.filter(m, spec.tree))
        >>> report = ex.audit_step(lambda m: eqx.apply_updates(m, ones(m)), model, spec=spec)
        >>> import json
        >>> json.loads(json.dumps(report.to_dict()))["statuses"]["layers[1].bias"]
        'updated'
        """
        return {
            "ok": self.ok,
            "method": self.method,
            "steps": self.steps,
            "loss": [json_float(x) for x in self.loss],
            "error": self.error,
            "notes": list(self.notes),
            "compiles": self.compiles,
            "counts": self.counts,
            "statuses": self.statuses(),
            "leaves": [leaf.to_dict() for leaf in self.leaves],
            "state_leaves": [leaf.to_dict() for leaf in self.state_leaves],
            "stopped": self.stopped,
        }

    def table(self, only: Status | Collection[Status] | None = None) -> str:
        """A readable table, parameters then state.

        **Arguments:**

        - `only`: a status, or a collection of statuses, to show; default: every row.

        **Returns:**

        The table as text.

        >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
        >>> spec = ex.FilterSpec(model).freeze("layers[0]")
        >>> ones = lambda m: jax.tree.map(jnp.ones_like, eqx.filter(m, spec.tree))
        >>> report = ex.audit_step(lambda m: eqx.apply_updates(m, ones(m)), model, spec=spec)
        >>> print(report.table(only="updated"))
        path              status         grad    update     delta  detail
        layers[1].weight  updated           -         -         2
        layers[1].bias    updated           -         -         1
        """
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
