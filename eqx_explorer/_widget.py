"""The Explorer widget: a thin view over ModelTree + FilterSpec + StepRunner.

One anywidget model per explorer, not one widget per node. What goes over the wire:

- `_table` and `_table_columns` (traits, sent once, never changed): the node table. `_table`
  holds `step` (each node's last path key; the browser rebuilds paths, depths and leaf ranges
  from it and the parents), the texts `classes` and `summaries` (short text of leaves) that
  codes point into, and sparse `sharding` / `static` maps; `_table_columns` (bytes) the
  numeric columns, one value per node: int32 `parent`, `kind` (into `KINDS`), `cls` and
  `summary` codes, then float64 `params` (`_COLUMNS`, `table_columns` reads them back).
- `_options` (trait, constant): code styles, step methods, and the names behind the codes.
- `counts`, `code`, `code_style`, `method`, `error`, `losses`, `detail`: small traits, sent
  whole on change.
- `_constraints` (trait): the update rules (`FilterSpec.constrain`) of the constrained leaves
  only, so it stays small: `{node: [name, label]}`, `+ [lo, hi]` for an interval. A view
  displayed later reads it with the other traits.
- `_modes` (trait): `{node: true}` for the modules that run in inference mode (the spec's
  `inference` setting, else the model's own field).
- `_lr_factors` (bytes trait): the spec's learning-rate factor per model leaf (little-endian
  float32, `FilterSpec.lr_factors`), or empty while every trainable leaf has factor 1 (the
  page then reads 1 on trainable leaves from `_state_codes`), so a spec without groups sends
  nothing more. `counts["lr_groups"]` orders the groups (the page colours rows by it).
- `progress` (trait): `{}` when no steps run; else the running call's `phase` ("starting",
  "compiling", "running"), `done` / `total` steps, the latest `loss`, `started` (epoch ms:
  the page ticks the elapsed time), `stopping`, and `blocking` (started from Python, which
  the page cannot interrupt).
- per-node and per-leaf arrays as bytes traits (binary buffers on the wire, base64 in a saved
  notebook's widget state), never JSON lists: `_state_codes` (uint8 per model node, into
  `STATES`), `_leaf_status` (uint8 per leaf slot, into `STATUSES`, `NO_STATUS` before a
  step; model leaves then state arrays) and `_leaf_norms` (little-endian float32, three rows
  of slots: grad, update, change, and a fourth: the leaf's learning-rate factor in the
  steps, NaN where it has none). A per-leaf column added later is one more such trait.
- `_last_run` (trait): the last report's `notes`, per-slot `details` and `run` (steps,
  total, stopped, seconds, compiles); `_stale`: the spec or method changed since its steps
  started, so its badges are dimmed.

Every piece of state is a trait, so a view displayed later, a reopened saved notebook and an
nbconvert HTML export (no kernel) draw the current state. Custom messages carry events only:
from the browser, all validated in `_handle_message`: `toggle`, `glob`, `select`,
`constrain`, `inference`, `scale_lr`, `layerwise_decay`, `style`, `method`, `step`, `stop`,
`reset`, `dismiss`, each with an optional integer `id` answered by an `ack`; from Python,
`ack`. The search box matches in the browser, in the pattern language of `FilterSpec.select`
(`_select.match_nodes`).

Steps started from the page run in a worker thread, so the kernel keeps answering the page
(a toggle while steps run reaches the runner at the next Step); `w.step(n)` from Python runs
in the caller's thread. One lock orders the widget's own updates between the two threads.
"""

from __future__ import annotations

import html
import math
import numbers
import pathlib
import textwrap
import threading
import time
from typing import Any, cast

import anywidget
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import traitlets as t

from ._codegen import STYLES, Style, to_code
from ._constraints import RULE_NAMES
from ._errors import ExplorerError, short_repr
from ._report import STATUSES, json_float
from ._slots import DEFAULT_SLOTS, STATE_ON_TRAINABLE, opt_state_bytes, optimizer_slots
from ._spec import FilterSpec, inference_leaves
from ._state import state_entries
from ._steps import (
    METHODS,
    STRUCTURAL,
    Layout,
    Method,
    StepRunner,
    check_layout,
    check_method,
)
from ._summary import summary
from ._tree import STATES, ModelTree, array_summary

__all__ = ["Explorer"]

_STATIC = pathlib.Path(__file__).parent / "_static"

KINDS = ("module", "list", "tuple", "namedtuple", "dict", "node", "array", "leaf", "none", "state")
NO_STATUS = 255
MAX_STEPS = 10_000


def _is_rule(value: Any) -> bool:
    """A rule as the page sends it: a built-in name, "none", or ["interval", lo, hi]."""
    if isinstance(value, str):
        return value == "none" or (value in RULE_NAMES and value != "interval")
    return (
        isinstance(value, list)
        and len(value) == 3
        and value[0] == "interval"
        and all(
            isinstance(x, int | float) and not isinstance(x, bool) and -math.inf < x < math.inf
            for x in value[1:]
        )
    )


# Message type -> required fields and their checks (a tuple of allowed values, a type, or a
# predicate). Every message may also carry an int `id`.
_MESSAGES: dict[str, dict[str, Any]] = {
    "toggle": {"path": str, "frozen": bool},
    "glob": {"pattern": str, "action": ("freeze", "unfreeze")},
    "select": {"path": str},
    "constrain": {"path": str, "rule": _is_rule},
    "style": {"style": str},
    "method": {"method": str},
    "inference": {"path": str, "on": bool},
    # Any JSON value: the library checks the number, and its message names the target.
    "scale_lr": {"path": str, "factor": object},
    "layerwise_decay": {"path": str, "decay": object},
    "step": {"n": int},
    "stop": {},
    "reset": {},
    "dismiss": {},
}


_COLUMNS = ("parent", "kind", "cls", "summary")  # int32 rows of `_table_columns`; then params


def table_columns(table: dict, columns: bytes) -> dict[str, list]:
    """The numeric columns of the node table (`_table_columns`), as lists by name."""
    n = table["n"]
    ints = np.frombuffer(columns, "<i4", len(_COLUMNS) * n).reshape(len(_COLUMNS), n)
    out = {name: row.tolist() for name, row in zip(_COLUMNS, ints)}
    out["params"] = np.frombuffer(columns, "<f8", n, 4 * len(_COLUMNS) * n).tolist()
    return out


def _node_table(
    tree: ModelTree, entries: list, state_leaves: list, modes: list[int]
) -> tuple[dict, bytes]:
    """The columns the browser needs to draw every row: text and sparse maps as JSON, the
    numeric columns as bytes (a list per column would cost the kernel more than building it).

    Model nodes keep their `ModelTree` index. With a state (`entries` from `state_entries`),
    the state arrays follow as rows `n, n + 1, ...` under the layers that own them (`state`:
    parent node, path step, summary) and the `StateIndex` markers they replace, which hold no
    leaves, are `hidden` (their `_Sentinel` below them with them). `inference` lists `modes`,
    the modules with a bool `inference` field (the row menu offers inference mode for them).
    """
    paths, parent, kinds = tree.paths, tree.parent, tree.kind
    n = len(paths)
    steps = [""] + [paths[i][len(paths[parent[i]]) :] for i in range(1, n)]
    class_ids: dict[str, int] = {}
    cls = [class_ids.setdefault(c, len(class_ids)) for c in tree.cls]
    kind_code = {k: j for j, k in enumerate(KINDS)}
    summary_ids: dict[str, int] = {"": 0}
    texts, sharding = [0] * n, {}
    # An array's text is its type's (thousands of arrays, a few (shape, dtype) types).
    type_text = [
        summary_ids.setdefault(array_summary(jax.ShapeDtypeStruct(*kind)), len(summary_ids))
        for kind in tree.array_types
    ]
    arrays = np.flatnonzero(tree.is_array)
    for i, k in zip(tree.leaf_node[arrays].tolist(), tree.array_type[arrays].tolist()):
        texts[i] = type_text[k]
        placed = tree.sharding(i)
        if placed:
            sharding[str(i)] = placed
    for i, kind in enumerate(kinds):
        if kind in ("leaf", "none"):
            texts[i] = summary_ids.setdefault(tree.summary(i), len(summary_ids))
    static = {
        str(i): ", ".join(f"{k}={v}" for k, v in s.items()) for i, s in enumerate(tree.static) if s
    }
    owners = [tree.find(e.owner) for e in entries]
    state = {
        "parent": owners,
        "step": [e.path[len(paths[o]) :] for e, o in zip(entries, owners)],
        "summary": [
            summary_ids.setdefault(array_summary(x), len(summary_ids)) for x in state_leaves
        ],
    }
    hidden = [
        i
        for i in range(n)
        if entries and isinstance(tree.objects[i], eqx.nn.StateIndex) and tree.lo[i] == tree.hi[i]
    ]
    numbers = np.asarray([parent, [kind_code[k] for k in kinds], cls, texts], "<i4")
    columns = numbers.tobytes() + tree.all_params().astype("<f8").tobytes()
    return {
        "n": n,
        "step": steps,
        "classes": list(class_ids),
        "summaries": list(summary_ids),
        "sharding": sharding,
        "static": static,
        "state": state,
        "hidden": hidden,
        "inference": modes,
    }, columns


def _export(spec: FilterSpec, style: str) -> str:
    """The code of `spec` in `style`, or, when the style cannot express it, a comment saying why.

    A spec is always valid; only some export styles have limits (a `where` function cannot
    reach every key), so a click is never refused because of the selected style.
    """
    try:
        return to_code(spec, cast(Style, style))  # checked when the trait was set
    except ExplorerError as e:
        lines = textwrap.wrap(f"Cannot export this spec in style {style!r}: {e}", 96)
        return "\n".join("# " + line for line in lines) + "\n"


def _factor_bytes(spec: FilterSpec) -> bytes:
    """The `_lr_factors` trait: float32 factors per leaf, or b"" when all trainable ones are 1."""
    factors = spec.lr_factors
    if not (factors[spec.mask] != 1).any():
        return b""
    return factors.astype("<f4").tobytes()


def _render_array_html(x: Any, *, around_zero: bool | str = "auto") -> str:
    import treescope  # its array renderer loads on the first array shown

    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    figure = treescope.render_array(np.asarray(x), around_zero=around_zero, truncate=True)
    return str(figure._repr_html_())


class Explorer(anywidget.AnyWidget):
    """Click to freeze sub-networks, read the exported code, and run audited steps.

    ```python
    w = eqx_explorer.Explorer(model, loss_fn=loss, batch=(x, y), optimizer=optax.adam(1e-3))
    w                        # in Jupyter: the tree, the code and the step pane
    w.freeze("encoder")      # same as clicking the encoder's checkbox
    w.code                   # the export of w.spec in w.code_style ("tree_at" by default)
    report = w.step(10)      # ten steps; rows show each leaf's status
    w.inference("bn1")       # run a layer in inference mode (its running statistics stay)
    ```

    Every click is mirrored by a method and every method is shown in the page. In a terminal
    `repr(w)` is the text summary. The model passed in is never changed; `w.model` is the
    trained one after steps. For a stateful model (`eqx.nn.make_with_state`) pass `state=`:
    its arrays are rows under the layers that own them. `layout` is the runner's (see
    `StepRunner`).
    """

    _esm = _STATIC / "widget.js"
    _css = _STATIC / "widget.css"

    _table = t.Dict().tag(sync=True)
    _table_columns = t.Bytes(b"").tag(sync=True)
    _options = t.Dict().tag(sync=True)
    counts = t.Dict().tag(sync=True)
    code = t.Unicode("").tag(sync=True)
    code_style = t.Unicode("tree_at").tag(sync=True)
    method = t.Unicode("partition").tag(sync=True)
    error = t.Unicode("").tag(sync=True)
    losses: t.List[float | None] = t.List().tag(sync=True)
    detail = t.Dict().tag(sync=True)
    _constraints = t.Dict().tag(sync=True)
    _modes = t.Dict().tag(sync=True)
    _lr_factors = t.Bytes(b"").tag(sync=True)
    progress = t.Dict().tag(sync=True)
    _state_codes = t.Bytes(b"").tag(sync=True)
    _leaf_status = t.Bytes(b"").tag(sync=True)
    _leaf_norms = t.Bytes(b"").tag(sync=True)
    _last_run = t.Dict().tag(sync=True)
    _stale = t.Bool(False).tag(sync=True)

    def __init__(
        self,
        model: Any,
        loss_fn: Any = None,
        batch: Any = None,
        optimizer: Any = None,
        spec: FilterSpec | None = None,
        state: Any = None,
        *,
        code_style: Style = "tree_at",
        method: Method = "partition",
        layout: Layout = "masked",
    ):
        if spec is None:
            spec = FilterSpec(model)
        elif not isinstance(spec, FilterSpec):
            raise ExplorerError(
                f"spec must be an eqx_explorer.FilterSpec, not {type(spec).__name__}; build it "
                "with FilterSpec(model).freeze(...) or FilterSpec.from_tree(model, filter_spec)"
            )
        elif spec.model is not model:
            spec = spec.for_model(model)
        self._styles = tuple(STYLES)
        self._check_style(code_style)
        check_method(method)
        # Checked here, not at the first Step: the constructor measures the optimizer.
        if optimizer is not None and not (
            hasattr(optimizer, "init") and hasattr(optimizer, "update")
        ):
            raise ExplorerError(
                "optimizer must be an optax GradientTransformation (with .init and .update), "
                f"got {type(optimizer).__name__}; e.g. optax.adam(1e-3)"
            )
        if loss_fn is not None and not callable(loss_fn):
            raise ExplorerError(
                f"loss_fn must be a function loss_fn(model, batch) -> scalar, got "
                f"{type(loss_fn).__name__}; or leave it out to explore without steps"
            )
        self._model = model
        self._tree = spec.model_tree
        self._loss_fn = loss_fn
        self._batch = batch
        self._optimizer = optimizer
        self._state = state
        self._layout = check_layout(layout)
        self._runner: StepRunner | None = None
        self._runner_spec: FilterSpec | None = None
        self._runner_method: str | None = None
        self._report = None
        self._run_info: dict = {}
        self._before_last_step: tuple[list, list] | None = None
        self._selected: int | None = None
        self._lock = threading.RLock()
        self._worker: threading.Thread | None = None
        tree = self._tree
        self._slots = optimizer_slots(model, optimizer, tree)
        self._spec = spec
        self._codes = spec.state_codes()
        entries = state_entries(model, state) if state is not None else []
        self._entries = entries
        self._state_rows = {e.path: j for j, e in enumerate(entries)}
        # Modules with a bool `inference` field: module node -> the field's node.
        self._mode_fields = {
            tree.parent[tree.leaf_node[i]]: int(tree.leaf_node[i])
            for i in np.flatnonzero(inference_leaves(tree))
        }
        nl = tree.num_leaves + len(entries)  # model leaves, then state arrays
        self._status = np.full(nl, NO_STATUS, np.uint8)
        self._norms = np.full((4, nl), np.nan, np.float32)
        self._leaf_details: dict[str, str] = {}
        table, columns = _node_table(tree, entries, jtu.tree_leaves(state), list(self._mode_fields))
        super().__init__(
            _table=table,
            _table_columns=columns,
            _options={
                "styles": list(self._styles),
                "methods": list(METHODS),
                "states": list(STATES),
                "statuses": list(STATUSES),
                "kinds": list(KINDS),
                "rules": list(RULE_NAMES),
                "has_loss": loss_fn is not None,
                "max_steps": MAX_STEPS,
                "layout": self._layout,
            },
            code_style=code_style,
            method=method,
            code=_export(spec, code_style),
            counts=self._counts(method),
            _constraints=self._rule_map(spec),
            _modes=self._mode_map(spec),
            _lr_factors=_factor_bytes(spec),
            _state_codes=self._codes.tobytes(),
            **self._report_traits(),
        )
        self.on_msg(self._on_msg)

    # -- public API: every UI action ------------------------------------------
    @property
    def spec(self) -> FilterSpec:
        """The current FilterSpec (immutable; assign a new one to change the widget)."""
        return self._spec

    @spec.setter
    def spec(self, spec: FilterSpec) -> None:
        if not isinstance(spec, FilterSpec):
            raise ExplorerError(f"w.spec takes a FilterSpec, not {type(spec).__name__}")
        if spec.model_tree is not self._tree:
            spec = spec._onto(self._spec)  # the widget keeps its own node table
        self._apply_spec(spec)

    @property
    def filter_spec(self) -> Any:
        """The spec as a pytree of Python bools (`eqx.partition(model, w.filter_spec)`)."""
        return self._spec.tree

    @property
    def model(self) -> Any:
        """The model after the steps run so far (the original model before any step)."""
        return self._runner.model if self._runner is not None else self._model

    @property
    def state(self) -> Any:
        """The model state (`eqx.nn.State`) after the steps run so far, or the initial one."""
        return self._runner.state if self._runner is not None else self._state

    @property
    def report(self) -> Any:
        """The StepReport of the last `step` call (None before any step or after `reset`)."""
        return self._report

    def freeze(self, *targets: Any) -> FilterSpec:
        """Freeze `targets` (paths, globs, where-functions, ...); returns the new spec."""
        self._apply_spec(self._spec.freeze(*targets))
        return self._spec

    def unfreeze(self, *targets: Any) -> FilterSpec:
        """Make the float arrays under `targets` trainable; returns the new spec."""
        self._apply_spec(self._spec.unfreeze(*targets))
        return self._spec

    def constrain(self, where: Any, rule: Any) -> FilterSpec:
        """Give the float arrays under `where` an update `rule` (`None` removes it), as the
        row menu does; returns the new spec. See `FilterSpec.constrain` for the rules."""
        self._apply_spec(self._spec.constrain(where, rule))
        return self._spec

    def inference(self, *targets: Any, on: bool = True) -> FilterSpec:
        """Run the layers under `targets` in inference mode (`on=False`: training mode), as
        the row menu does; returns the new spec. See `FilterSpec.inference`."""
        self._apply_spec(self._spec.inference(*targets, on=on))
        return self._spec

    def scale_lr(self, target: Any, factor: float) -> FilterSpec:
        """Train the float arrays under `target` at `factor` times the learning rate (0
        freezes), as the row's lr menu does; returns the new spec. See `FilterSpec.scale_lr`."""
        self._apply_spec(self._spec.scale_lr(target, factor))
        return self._spec

    def layerwise_decay(self, target: Any, decay: float) -> FilterSpec:
        """Give the layers of the list/tuple `target` the factors `decay ** (depth from the
        top)`, as "Layer-wise decay" in a list row's lr menu does; returns the new spec. See
        `FilterSpec.layerwise_decay`."""
        self._apply_spec(self._spec.layerwise_decay(target, decay))
        return self._spec

    def select(self, path: str) -> dict:
        """Show the node (or state array) at `path` in the detail pane, with values and the
        last update of arrays."""
        with self._lock:
            row = self._state_rows.get(path)
            node = self._tree.find(path) if row is None else len(self._tree) + row
            self.detail = self._detail(node)
            self._selected = node
            return self.detail

    def step(self, n: int = 1) -> Any:
        """Run `n` training steps with the current spec and method; returns the StepReport.

        Blocks until the steps are done (the widget shows their progress); the page's Step
        button runs them in a worker thread instead, and its Stop button ends them.
        """
        runner, n = self._start(n, blocking=True)
        return self._run(runner, n)

    def stop(self) -> None:
        """End the steps started from the page after their current chunk, as Stop does; the
        report covers the steps that ran. Does nothing when no steps run."""
        with self._lock:
            if self.progress and not self.progress.get("stopping") and self._runner:
                self._runner.stop()
                self.progress = {**self.progress, "stopping": True}

    def reset(self) -> None:
        """Forget the steps: back to the original model, no report, an empty loss curve."""
        with self._lock:
            self._refuse_while_running("reset")
            if self._runner is not None:
                self._runner.reset()
            self._report = None
            self._run_info = {}
            self._before_last_step = None
            self._status[:] = NO_STATUS
            self._norms[:] = np.nan
            self._leaf_details = {}
            with self.hold_sync():
                self.losses = []
                self._refresh_detail()
                self.set_trait("_stale", False)
                for name, value in self._report_traits().items():
                    self.set_trait(name, value)

    def __repr__(self) -> str:
        return summary(self._spec.model, self._spec)

    # -- traits set from Python -----------------------------------------------
    @t.validate("code_style")
    def _valid_style(self, proposal: Any) -> Any:
        self._check_style(proposal["value"])
        return proposal["value"]

    @t.validate("method")
    def _valid_method(self, proposal: Any) -> Any:
        check_method(proposal["value"])
        return proposal["value"]

    @t.validate("losses")
    def _valid_losses(self, proposal: Any) -> list[float | None]:
        # The page draws these as a curve: anything else would break the chart.
        values = proposal["value"]
        for x in values:
            if x is not None and not (
                isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)
            ):
                raise ExplorerError(
                    f"losses must be finite numbers (None for a non-finite loss), got "
                    f"{short_repr(x)}; set w.losses = [] to clear the curve"
                )
        return [None if x is None else float(x) for x in values]

    @t.observe("code_style")
    def _style_changed(self, change: Any) -> None:
        self.code = _export(self._spec, change["new"])

    @t.observe("method")
    def _method_changed(self, change: Any) -> None:
        with self.hold_sync():
            self.counts = self._counts(change["new"])
            self._stale = self._is_stale()

    def _check_style(self, style: str) -> None:
        if style not in self._styles:
            raise ExplorerError(
                f"unknown code style {short_repr(style)}; choose one of {', '.join(self._styles)}"
            )

    # -- spec -> states, counts, code -----------------------------------------
    def _apply_spec(self, spec: FilterSpec) -> None:
        code = _export(spec, self.code_style)
        codes = spec.state_codes()
        with self._lock:
            self._spec = spec
            self._codes = codes
            with self.hold_sync():
                self.code = code
                self.counts = self._counts(self.method)
                self._constraints = self._rule_map(spec)
                self._modes = self._mode_map(spec)
                self._lr_factors = _factor_bytes(spec)
                self._state_codes = codes.tobytes()
                self._stale = self._is_stale()
                if self._selected is not None and self._selected < len(codes):
                    self.detail = {**self.detail, "state": STATES[codes[self._selected]]}

    def _rule_map(self, spec: FilterSpec) -> dict:
        """The `_constraints` trait: `{node: [name, label]}` (`+ [lo, hi]` for an interval)."""
        out = {}
        for path, rule in spec.constraints.items():
            bounds = (rule.lo, rule.hi) if rule.name == "interval" else ()
            row = [rule.name, rule.label, *map(json_float, bounds)]
            out[str(self._tree.find(path))] = row
        return out

    def _mode_map(self, spec: FilterSpec) -> dict:
        """The `_modes` trait: `{node: True}` for the modules that run in inference mode."""
        tree, overrides = self._tree, spec.inference_overrides
        return {
            str(node): True
            for node, field in self._mode_fields.items()
            if overrides.get(tree.paths[field], tree.objects[field])
        }

    def _counts(self, method: str) -> dict:
        c = dict(self._spec.counts)
        c["total_bytes"] = c["trainable_bytes"] + c["frozen_bytes"]
        on_trainable = self._layout == STRUCTURAL and method in STATE_ON_TRAINABLE
        c["opt_state_bytes"] = opt_state_bytes(self._spec, method, self._slots, self._layout)
        source = (
            f"{self._slots:.3g} (measured with optimizer.init)"
            if self._optimizer is not None
            else f"{DEFAULT_SLOTS:g} (Adam-like guess; pass optimizer= to measure)"
        )
        c["opt_state_note"] = f"{'trainable' if on_trainable else 'all float'} bytes × {source}"
        return c

    # -- steps ------------------------------------------------------------------
    def _start(self, n: Any, *, blocking: bool) -> tuple[Any, int]:
        """Claim the runner for `n` steps (refused while steps run) and show that they start."""
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or not 1 <= n <= MAX_STEPS:
            raise ExplorerError(f"step(n) takes an int n between 1 and {MAX_STEPS:,}, got {n!r}")
        with self._lock:
            self._refuse_while_running("another Step")
            runner = self._ready_runner()
            self.progress = {
                "phase": "starting",
                "done": 0,
                "total": int(n),
                "loss": None,
                "started": time.time() * 1000,
                "stopping": False,
                "blocking": blocking,
            }
        return runner, int(n)

    def _refuse_while_running(self, action: str) -> None:
        if self.progress:
            done, total = self.progress["done"], self.progress["total"]
            raise ExplorerError(
                f"steps are running ({done:,} / {total:,} done): wait for them to finish or "
                f"press Stop (w.stop()) before {action}"
            )

    def _run(self, runner: Any, n: int) -> Any:
        """Run the claimed steps in this thread, then show their report."""
        before = (jtu.tree_leaves(runner.model), jtu.tree_leaves(runner.state))
        started = time.monotonic()
        try:
            report = runner.step(n, progress=self._on_progress)
            if report.steps:  # a click is likely next: its program builds while nobody waits
                runner.warm()
            with self._lock, self.hold_sync():
                self._before_last_step = before
                self._run_info = {
                    "steps": report.steps,
                    "total": n,
                    "stopped": report.stopped,
                    "seconds": round(time.monotonic() - started, 3),
                    "compiles": report.compiles,
                }
                self._apply_report(report)
                self.progress = {}  # in the report's message: the page never shows both
        finally:
            with self._lock:
                self.progress = {}
        return report

    def _work(self, runner: Any, n: int) -> None:
        """The worker thread of a Step from the page: errors go to the banner."""
        self._to_banner(self._run, runner, n)

    def _on_progress(self, progress: Any) -> None:
        """The runner's `StepProgress`, called from the thread that runs the steps."""
        with self._lock:
            if self.progress["stopping"] and self._runner:  # Stop came before it started
                self._runner.stop()
            self.progress = {
                **self.progress,
                "phase": progress.phase,
                "done": progress.done,
                "total": progress.total,
                "loss": json_float(progress.loss),
            }

    def _ready_runner(self) -> StepRunner:
        if self._loss_fn is None:
            raise ExplorerError(
                "no loss function: create the widget with Explorer(model, loss_fn=..., "
                "batch=...) to run steps"
            )
        if self._runner is None:
            self._runner = StepRunner(
                self._model,
                self._spec,
                self._loss_fn,
                self._batch,
                optimizer=self._optimizer,
                method=cast(Method, self.method),  # checked when the trait was set
                state=self._state,
                layout=self._layout,
            )
        elif self._runner_spec is not self._spec or self._runner_method != self.method:
            self._runner.set_spec(self._spec, method=cast(Method, self.method))
        self._runner_spec, self._runner_method = self._spec, self.method
        return self._runner

    def _apply_report(self, report: Any) -> None:
        tree = self._tree
        self._status[:] = NO_STATUS
        self._norms[:] = np.nan
        self._leaf_details = {}
        slots = [int(tree.lo[tree.find(leaf.path)]) for leaf in report.leaves]
        slots += [tree.num_leaves + self._state_rows[leaf.path] for leaf in report.state_leaves]
        status_code = {s: j for j, s in enumerate(STATUSES)}
        for i, leaf in zip(slots, [*report.leaves, *report.state_leaves]):
            self._status[i] = status_code[leaf.status]
            values = (leaf.grad_norm, leaf.update_norm, leaf.delta_norm, leaf.lr_factor)
            for row, value in enumerate(values):
                self._norms[row, i] = np.nan if value is None else value
            if leaf.detail:
                self._leaf_details[str(i)] = leaf.detail
        self._report = report
        with self.hold_sync():
            self.losses = self.losses + [json_float(x) for x in report.loss]
            self.error = report.error or ""
            self._refresh_detail()
            self._stale = self._is_stale()
            for name, value in self._report_traits().items():
                self.set_trait(name, value)

    def _report_traits(self) -> dict:
        """The traits that show the last report: statuses and norms as bytes, and its notes."""
        notes: list[str] = list(self._report.notes) if self._report is not None else []
        return {
            "_leaf_status": self._status.tobytes(),
            "_leaf_norms": self._norms.astype("<f4").tobytes(),
            "_last_run": {"notes": notes, "details": self._leaf_details, "run": self._run_info},
        }

    def _is_stale(self) -> bool:
        """The spec or method changed since the last report's steps started."""
        return (
            self._report is not None
            and self._runner is not None
            and (self._runner_spec is not self._spec or self._runner_method != self.method)
        )

    # -- detail pane ----------------------------------------------------------------
    def _refresh_detail(self) -> None:
        if self._selected is not None:
            self.detail = self._detail(self._selected)

    def _detail(self, node: int) -> dict:
        tree = self._tree
        if node >= len(tree):
            return self._state_detail(node - len(tree))
        row = tree.node(node)
        detail = {
            "path": row.path,
            "cls": row.cls,
            "kind": row.kind,
            "summary": row.summary,
            "params": row.size if row.trainable else 0,
            "sharding": row.sharding or "",
            "static": row.static,
            "state": STATES[self._codes[node]],
        }
        factors = self._spec.lr_factors[tree.lo[node] : tree.hi[node]]
        trained = factors[factors > 0]
        if trained.size:  # the factors of its trainable leaves, as [lowest, highest]
            detail["lr"] = [float(trained.min()), float(trained.max())]
        if row.kind == "leaf":
            detail["repr"] = repr(tree.objects[node])[:2_000]
        if row.kind != "array":
            return detail
        leaf = int(tree.lo[node])
        old = None if self._before_last_step is None else self._before_last_step[0][leaf]
        return self._array_detail(detail, leaf, jtu.tree_leaves(self.model)[leaf], old)

    def _state_detail(self, j: int) -> dict:
        """A state array: its layer, status and norms of the last step, values and change."""
        value = jtu.tree_leaves(self.state)[j]
        detail = {
            "path": self._entries[j].path,
            "cls": "State",
            "kind": "state",
            "summary": array_summary(value),
            "state": "model state (eqx.nn.State): the layer updates it, not the optimizer",
            "owner": self._entries[j].owner,
        }
        old = None if self._before_last_step is None else self._before_last_step[1][j]
        return self._array_detail(detail, self._tree.num_leaves + j, value, old)

    def _array_detail(self, detail: dict, slot: int, value: Any, old: Any) -> dict:
        """`detail` plus the last step's status and norms at `slot`, values and change."""
        if self._status[slot] != NO_STATUS:
            detail["status"] = STATUSES[self._status[slot]]
            detail["norms"] = [json_float(v) for v in self._norms[:, slot]]
            detail["note"] = self._leaf_details.get(str(slot), "")
        detail["value_html"] = self._render(value)
        if old is not None and getattr(old, "shape", None) == getattr(value, "shape", None):
            update = np.asarray(value) - np.asarray(old)
            detail["update_html"] = self._render(update, around_zero=True)
        return detail

    @staticmethod
    def _render(x: Any, around_zero: bool | str = "auto") -> str:
        try:
            return _render_array_html(x, around_zero=around_zero)
        except Exception as e:  # treescope has no adapter for some dtypes; show why instead
            return f"<pre>treescope cannot render this array ({html.escape(str(e))})</pre>"

    # -- messages from the browser ------------------------------------------------------
    def _on_msg(self, _widget: Any, content: Any, _buffers: Any) -> None:
        self._handle_message(content)

    def _handle_message(self, msg: Any) -> None:
        """Validate and apply one message from the browser; errors go to the banner."""
        msg_id = msg.get("id") if isinstance(msg, dict) else None
        with self._lock:
            ok = self._to_banner(self._apply_message, msg)
            if isinstance(msg_id, int) and not isinstance(msg_id, bool):
                self.send({"type": "ack", "id": msg_id, "ok": ok})

    def _apply_message(self, msg: Any) -> None:
        kind, args = self._validate(msg)
        getattr(self, f"_on_{kind}")(**args)
        if kind != "step":
            self.error = ""

    def _to_banner(self, action: Any, *args: Any) -> bool:
        """Run `action(*args)`; an error goes to the banner (a bug too, not to the kernel log)."""
        try:
            action(*args)
            return True
        except ExplorerError as e:
            self.error = str(e)
        except Exception as e:
            self.error = f"internal error ({type(e).__name__}: {e}); the spec was not changed"
        return False

    @staticmethod
    def _validate(msg: Any) -> tuple[str, dict]:
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            raise ExplorerError(f"malformed message from the page: {msg!r:.200}")
        kind = msg["type"]
        if kind not in _MESSAGES:
            raise ExplorerError(f"unknown message type {short_repr(kind)} from the page")
        fields = _MESSAGES[kind]
        extra = set(msg) - set(fields) - {"type", "id"}
        if extra:
            raise ExplorerError(
                f"message {kind!r} has unexpected fields {short_repr(sorted(extra))}"
            )
        args = {}
        for name, check in fields.items():
            if name not in msg:
                raise ExplorerError(f"message {kind!r} lacks the field {name!r}")
            value = msg[name]
            if isinstance(check, tuple):
                good = value in check
            elif check is int:
                good = isinstance(value, int) and not isinstance(value, bool)
            elif isinstance(check, type):
                good = isinstance(value, check)
            else:
                good = check(value)
            if not good:
                raise ExplorerError(f"message {kind!r} has a bad {name!r}: {value!r:.100}")
            args[name] = value
        return kind, args

    def _on_toggle(self, path: str, frozen: bool) -> None:
        if path in self._state_rows:
            owner = self._entries[self._state_rows[path]].owner
            raise ExplorerError(
                f"`{path}` is model state (eqx.nn.State): its layer updates it, the optimizer "
                f"does not, so it cannot be frozen; run `{owner}` in inference mode to keep it"
            )
        # An exact path only: a glob typed into a toggle must not freeze its matches.
        node = self._tree.paths[self._tree.find(path)]
        self._apply_spec(self._spec.freeze(node) if frozen else self._spec.unfreeze(node))

    def _on_glob(self, pattern: str, action: str) -> None:
        self.freeze(pattern) if action == "freeze" else self.unfreeze(pattern)

    def _on_select(self, path: str) -> None:
        self.select(path)

    def _on_constrain(self, path: str, rule: Any) -> None:
        # An exact path, as for a toggle; "none" removes the rule (make_rule takes the list).
        node = self._tree.paths[self._tree.find(path)]
        self.constrain(node, None if rule == "none" else rule)

    def _on_scale_lr(self, path: str, factor: Any) -> None:
        # An exact path, as for a toggle.
        self.scale_lr(self._tree.paths[self._tree.find(path)], factor)

    def _on_layerwise_decay(self, path: str, decay: Any) -> None:
        self.layerwise_decay(self._tree.paths[self._tree.find(path)], decay)

    def _on_style(self, style: str) -> None:
        self.code_style = style  # validated by _valid_style

    def _on_method(self, method: str) -> None:
        self.method = method  # validated by _valid_method

    def _on_inference(self, path: str, on: bool) -> None:
        # An exact path, as for a toggle.
        self.inference(self._tree.paths[self._tree.find(path)], on=on)

    def _on_step(self, n: int) -> None:
        runner, n = self._start(n, blocking=False)
        self._worker = threading.Thread(
            target=self._work, args=(runner, n), name="eqx_explorer steps", daemon=True
        )
        self._worker.start()

    def _on_stop(self) -> None:
        self.stop()

    def _on_reset(self) -> None:
        self.reset()

    def _on_dismiss(self) -> None:
        self.error = ""
