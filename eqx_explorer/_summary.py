"""Text summary of a model and its spec: the widget's content for terminals and logs."""

from __future__ import annotations

from typing import Any

from ._errors import ExplorerError, short_repr
from ._spec import FilterSpec, check_spec
from ._tree import CONTAINER_KINDS, MIXED

__all__ = ["summary", "counts_line"]

_WIDTH = 100


def counts_line(spec: FilterSpec) -> str:
    """PEFT-style one-liner: `trainable params: 1,234 || all params: 5,678 || trainable%: 21.73`."""
    c = spec.counts
    total = c["total_params"]
    pct = 100 * c["trainable_params"] / total if total else 0.0
    return (
        f"trainable params: {c['trainable_params']:,} || all params: {total:,} || "
        f"trainable%: {pct:.2f}"
    )


def _factor_text(spec: FilterSpec, node: int) -> str:
    """The learning-rate factor of the trainable leaves under `node`: `0.5`, `0.25–1`, or ``."""
    tree = spec.model_tree
    part = slice(tree.lo[node], tree.hi[node])
    factors = spec.lr_factors[part][spec.mask[part]]
    if not len(factors):
        return ""
    lo, hi = factors.min(), factors.max()
    return f"{lo:.3g}" if lo == hi else f"{lo:.3g}–{hi:.3g}"


def _group_lines(spec: FilterSpec) -> list[str]:
    """One line per learning-rate group, largest factor first."""
    return [
        f"lr factor {f:.4g}: {g['params']:,} params in {g['leaves']} arrays"
        for f, g in spec.counts["lr_groups"].items()
    ]


def _ties_line(spec: FilterSpec) -> str:
    """The tied places (`eqx.nn.Shared`): each trains as its source and is counted there."""
    tree = spec.model_tree
    ties = [
        f"`{tree.paths[tree.leaf_node[leaf]]}` -> {tree.tie_source(leaf)}" for leaf in tree.ties
    ]
    more = f", and {len(ties) - 3} more" if len(ties) > 3 else ""
    return (
        "tied by eqx.nn.Shared (each trains as its source and is counted there): "
        + ", ".join(ties[:3])
        + more
    )


def _rows(spec: FilterSpec, max_rows: int) -> tuple[list[int], int]:
    tree = spec.model_tree
    if len(tree) <= max_rows:
        return list(range(len(tree))), 0
    # Too many rows: expand only mixed containers, so every row shown is uniform or mixed.
    shown = [0]
    stack = [0]
    while stack:
        node = stack.pop()
        if node != 0 and spec.node_state(node) != MIXED:
            continue
        kids = tree.children[node]
        shown.extend(kids)
        stack.extend(reversed([k for k in kids if tree.kind[k] in CONTAINER_KINDS]))
    shown.sort()
    hidden = len(shown) - max_rows
    return shown[:max_rows], max(hidden, 0)


def summary(model: Any, spec: FilterSpec | None = None, *, max_rows: int = 80) -> str:
    """A table of the model's nodes with shapes, parameter counts and train state.

    **Arguments:**

    - `model`: any pytree.
    - `spec`: a `FilterSpec` of `model` (or of another instance of its architecture);
      default: every float array trains.
    - `max_rows`: the most rows before uniform sub-trees fold into one row.

    **Returns:**

    The table as text, ending with PEFT's "trainable params" line.

    >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
    >>> print(ex.summary(model, ex.FilterSpec(model).freeze("layers[0]")))
    path                    class  ...  params  state
    ...
        layers[0]           Linear(...  12      frozen
    ...
    trainable params: 5 || all params: 17 || trainable%: 29.41
    frozen params: 12 (48 bytes) || trainable bytes: 20 || non-trainable leaves: 2

    Large models (more than `max_rows` nodes) show only what is needed to read the spec:
    sub-trees with one state are shown as one row. A spec with learning-rate groups (a
    trainable factor other than 1) adds an `lr` column (the factor, or its range below a
    node) and one line per group at the end. Places tied by `eqx.nn.Shared` show their
    source (`tied to ...`) and its state, and are listed in a last line.
    """
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise ExplorerError(
            f"summary(max_rows=) takes a positive int, got {short_repr(max_rows, 40)}; "
            "e.g. max_rows=80"
        )
    spec = check_spec(spec, model, "summary(model, spec)")
    tree = spec.model_tree
    rows, hidden = _rows(spec, max_rows)
    sharded = any(tree.sharding(i) for i in rows)
    grouped = bool((spec.lr_factors[spec.mask] != 1).any())
    table = []
    for i in rows:
        node = tree.node(i)
        indent = "  " * node.depth
        name = indent + (node.path or "(root)")
        kind_text = node.cls
        if node.static:
            kind_text += "(" + ", ".join(f"{k}={v}" for k, v in node.static.items()) + ")"
        shape = node.summary if node.kind in ("array", "leaf", "none") else ""
        params = f"{node.size:,}" if node.size and node.trainable else ""
        row = [name, kind_text, shape, params, spec.node_state(i)]
        if grouped:
            row.append(_factor_text(spec, i))
        if sharded:
            row.append(node.sharding or "")
        table.append(row)
    header = ["path", "class", "value", "params", "state"]
    header += (["lr"] if grouped else []) + (["sharding"] if sharded else [])
    widths = [min(max(len(r[j]) for r in table + [header]), 60) for j in range(len(header))]
    # Lines fit in 100 characters: the class column (the longest texts) gives way first.
    excess = sum(widths) + 2 * (len(widths) - 1) - _WIDTH
    widths[1] = max(widths[1] - max(excess, 0), min(widths[1], 16))

    def fmt(row: list[str]) -> str:
        cells = []
        for text, w in zip(row, widths):
            text = text if len(text) <= w else text[: w - 1] + "…"
            cells.append(text.ljust(w))
        return "  ".join(cells).rstrip()

    c = spec.counts
    lines = [fmt(header), "─" * len(fmt(header))]
    lines += [fmt(r) for r in table]
    if hidden:
        lines.append(f"… {hidden} more rows (pass max_rows= to see them)")
    lines.append("─" * len(fmt(header)))
    lines.append(counts_line(spec))
    lines.append(
        f"frozen params: {c['frozen_params']:,} ({c['frozen_bytes']:,} bytes) || "
        f"trainable bytes: {c['trainable_bytes']:,} || non-trainable leaves: {c['static_leaves']}"
    )
    if grouped:
        lines += _group_lines(spec)
    if tree.ties:
        lines.append(_ties_line(spec))
    return "\n".join(lines)
