"""Turn a user's target (path, glob, `where`, predicate, class, or a list of these) into leaves.

Every target form ends as a boolean mask over the model's leaves; selecting a node selects
its whole sub-tree. Errors name the target and say how to fix it.
"""

from __future__ import annotations

import inspect
from typing import Any

import equinox as eqx
import jax
import jax.tree_util as jtu
import numpy as np

from ._errors import ExplorerError, short_repr, shorten
from ._paths import STAR, STARSTAR, format_key, is_glob, parse_path
from ._tree import ModelTree

__all__ = ["Selection", "select", "describe"]


class Selection:
    """Leaves picked by one or more targets, with the nodes they were picked at."""

    __slots__ = ("mask", "nodes", "label")

    def __init__(self, mask: np.ndarray, nodes: list[int], label: str):
        self.mask = mask
        self.nodes = nodes
        self.label = label


def describe(target: Any) -> str:
    if isinstance(target, str):
        return f"`{shorten(target)}`"
    if isinstance(target, type):
        return f"class {target.__name__}"
    if callable(target) and hasattr(target, "__qualname__"):
        return f"callable {target.__qualname__}"
    return short_repr(target)


def _positional_arity(fn: Any) -> int | None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    kinds = [p.kind for p in sig.parameters.values()]
    if inspect.Parameter.VAR_POSITIONAL in kinds:
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(k in positional for k in kinds)


def _mask_of_nodes(tree: ModelTree, nodes: list[int]) -> np.ndarray:
    mask = np.zeros(tree.num_leaves, bool)
    for n in nodes:
        mask[tree.lo[n] : tree.hi[n]] = True
    return mask


def _glob_nodes(tree: ModelTree, pattern: tuple) -> list[int]:
    """Nodes whose key path matches `pattern`, by running the pattern as an NFA down the tree."""
    texts = [None if k is STAR or k is STARSTAR else format_key(k) for k in pattern]
    end = len(pattern)

    def closure(states: set[int]) -> frozenset[int]:
        out = set(states)
        todo = list(states)
        while todo:
            p = todo.pop()
            if p < end and pattern[p] is STARSTAR and p + 1 not in out:
                out.add(p + 1)
                todo.append(p + 1)
        return frozenset(out)

    states: list[frozenset[int]] = [frozenset()] * len(tree)
    states[0] = closure({0})
    matched = []
    if end in states[0]:
        return [0]
    for i in range(1, len(tree)):
        before = states[tree.parent[i]]
        if not before:
            continue
        step = format_key(tree.keys[i][-1])
        nxt = set()
        for p in before:
            if p == end:
                continue
            tok = pattern[p]
            if tok is STARSTAR:
                nxt.add(p)
            elif tok is STAR or texts[p] == step:
                nxt.add(p + 1)
        states[i] = closure(nxt) if nxt else frozenset()
        if end in states[i]:
            matched.append(i)
    # Keep only the highest matches: a node's sub-tree is selected with it.
    highest, covered_to = [], -1
    for n in matched:
        if tree.lo[n] >= covered_to or tree.hi[n] == tree.lo[n]:
            highest.append(n)
            covered_to = max(covered_to, int(tree.hi[n]))
    return highest


class _Marker:
    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


def _where_mask(tree: ModelTree, where: Any) -> np.ndarray:
    # As `eqx.tree_at` does: run `where` on a copy of the structure whose leaves are
    # unique markers, then read which markers it returned.
    markers = [_Marker(i) for i in range(tree.num_leaves)]
    try:
        skeleton = jtu.tree_unflatten(tree.treedef, markers)
        picked = where(skeleton)
    except Exception as e:
        raise ExplorerError(
            f"the `where` function {describe(where)} failed on the model's structure "
            f"({type(e).__name__}: {shorten(str(e))}). A `where` must only pick sub-trees, "
            "e.g. `lambda m: m.encoder` or `lambda m: (m.a, m.b[0])`; it cannot compute on "
            "arrays. A filter on leaves takes two parameters: "
            "`lambda path, leaf: eqx.is_array(leaf) and leaf.ndim == 2`."
        ) from None
    if isinstance(picked, bool | np.bool_):
        # A bool answer: a one-argument leaf filter such as `eqx.is_inexact_array`.
        return _predicate_mask(tree, lambda _path, leaf: where(leaf), describe(where))
    found = jtu.tree_leaves(picked, is_leaf=lambda x: isinstance(x, _Marker))
    if picked is None or not found:
        raise ExplorerError(
            f"the `where` function {describe(where)} selects no leaves (it returned "
            f"{short_repr(picked)}); a `None` field or an empty container cannot be frozen. "
            "Point it at a module or an array, e.g. `lambda m: m.encoder`."
        )
    bad = [x for x in found if not isinstance(x, _Marker)]
    if bad:
        raise ExplorerError(
            f"the `where` function {describe(where)} returned {short_repr(bad[0])}, which is not "
            "part of "
            "the model's pytree (a static field or a computed value?). Static fields "
            "(`eqx.field(static=True)`) cannot be trained or frozen."
        )
    mask = np.zeros(tree.num_leaves, bool)
    mask[[m.index for m in found]] = True
    return mask


def is_bool(answer: Any) -> bool:
    """A Python/NumPy bool or a scalar bool array (`jnp.all(leaf > 0)`)."""
    if isinstance(answer, bool | np.bool_):
        return True
    arrays = jax.Array | np.ndarray
    return isinstance(answer, arrays) and answer.shape == () and answer.dtype == bool


def _predicate_mask(tree: ModelTree, predicate: Any, label: str | None = None) -> np.ndarray:
    label = label or describe(predicate)
    mask = np.zeros(tree.num_leaves, bool)
    for i, (node, leaf) in enumerate(zip(tree.leaf_node, tree.leaves)):
        path = tree.paths[node]
        try:
            answer = predicate(path, leaf)
        except Exception as e:
            raise ExplorerError(
                f"the predicate {label} raised {type(e).__name__}: {shorten(str(e))} at leaf "
                f"`{path}`. A predicate `(path, leaf) -> bool` is called on every leaf, "
                "non-arrays included: guard with `eqx.is_array(leaf)`."
            ) from None
        if not is_bool(answer):
            # Truthiness would read "no" as True and an array as an error or a guess.
            raise ExplorerError(
                f"the predicate {label} returned {short_repr(answer, 40)} "
                f"({type(answer).__name__}) at leaf `{path}`; it must return True or False, "
                "e.g. `lambda path, leaf: eqx.is_array(leaf) and leaf.ndim == 2`"
            )
        mask[i] = bool(answer)
    return mask


def _class_nodes(tree: ModelTree, cls: type) -> list[int]:
    nodes, covered_to = [], -1
    for i, obj in enumerate(tree.objects):
        if tree.lo[i] < covered_to:
            continue
        if isinstance(obj, cls):
            nodes.append(i)
            covered_to = int(tree.hi[i])
    return nodes


def _instance_nodes(tree: ModelTree, target: Any) -> list[int]:
    """Nodes that are `target` itself (a sub-module or array of the model, by identity)."""
    nodes, covered_to = [], -1
    for i, obj in enumerate(tree.objects):
        if obj is target and tree.lo[i] >= covered_to:
            nodes.append(i)
            covered_to = int(tree.hi[i])
    return nodes


def select(tree: ModelTree, target: Any) -> Selection:
    """The leaves selected by `target`; raises `ExplorerError` when it selects nothing.

    A module or array of the model itself (`model.layers[0]`) selects where it sits.
    """
    if isinstance(target, list | tuple | set | frozenset) and not isinstance(target, str):
        if not target:
            raise ExplorerError("an empty list of targets selects nothing: name at least one")
        parts = [select(tree, t) for t in target]
        mask = np.logical_or.reduce([p.mask for p in parts])
        return Selection(mask, [n for p in parts for n in p.nodes], describe(list(target)))
    if isinstance(target, str):
        node = tree.index_of(target)  # every printed path, whatever its keys
        if node is not None:
            return Selection(_mask_of_nodes(tree, [node]), [node], f"`{shorten(target)}`")
        keys = parse_path(target)
        if is_glob(keys):
            nodes = _glob_nodes(tree, keys)
            if not nodes:
                raise ExplorerError(
                    f"the glob `{shorten(target)}` matches no node. `*` stands for exactly one "
                    "key and `**` for any number, e.g. `blocks[*].attn` or `**.bias`; "
                    f"top-level names are: {', '.join(tree.paths[c] for c in tree.children[0][:8])}"
                )
            return Selection(_mask_of_nodes(tree, nodes), nodes, f"`{shorten(target)}`")
        node = tree.find(target)
        return Selection(_mask_of_nodes(tree, [node]), [node], f"`{shorten(tree.paths[node])}`")
    if isinstance(target, type):
        nodes = _class_nodes(tree, target)
        if not nodes:
            raise ExplorerError(
                f"no node of class {target.__name__} in this model; pass a class the model "
                "contains, e.g. `eqx.nn.Linear`"
            )
        return Selection(_mask_of_nodes(tree, nodes), nodes, describe(target))
    if isinstance(target, eqx.Module | jax.Array | np.ndarray):
        nodes = _instance_nodes(tree, target)
        if not nodes:
            raise ExplorerError(
                f"{type(target).__name__} {short_repr(target, 60)} is not part of this model "
                '(a copy, or another model\'s); pass its path, e.g. `"layers[0]"`, or a '
                "`where` function, e.g. `lambda m: m.layers[0]`"
            )
        return Selection(_mask_of_nodes(tree, nodes), nodes, f"`{tree.paths[nodes[0]]}`")
    if callable(target):
        arity = _positional_arity(target)
        if arity == 1:
            return Selection(_where_mask(tree, target), [], describe(target))
        if arity == 2:
            return Selection(_predicate_mask(tree, target), [], describe(target))
        raise ExplorerError(
            f"cannot tell what {describe(target)} is: pass a `where` function with one "
            "parameter (`lambda m: m.encoder`) or a predicate with two (`lambda path, leaf: ...`)"
        )
    raise ExplorerError(
        f"cannot select with {short_repr(target)} ({type(target).__name__}): use a path "
        "string, a glob, a `where` function, a `(path, leaf)` predicate, a module class, "
        "or a list of these"
    )
