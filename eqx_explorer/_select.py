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
from ._paths import STARSTAR, check_length, format_key, is_glob, parse_path
from ._tree import NONE, ModelTree

__all__ = ["Selection", "select", "describe", "match_nodes"]


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
    params = sig.parameters.values()
    if any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in params):
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    # Parameters with defaults are not part of the call: `lambda m, k=1: ...` is a `where`.
    return sum(p.kind in positional and p.default is p.empty for p in params)


def _mask_of_nodes(tree: ModelTree, nodes: list[int]) -> np.ndarray:
    mask = np.zeros(tree.num_leaves, bool)
    for n in nodes:
        mask[tree.lo[n] : tree.hi[n]] = True
    return mask


def _highest(tree: ModelTree, nodes: list[int]) -> list[int]:
    """The `nodes` (in tree order) not under another one: a node's sub-tree goes with it."""
    picked: set[int] = set()
    for n in nodes:
        p = tree.parent[n]
        while p >= 0 and p not in picked:
            p = tree.parent[p]
        if p < 0:
            picked.add(n)
    return [n for n in nodes if n in picked]


def _key_text(key: Any) -> str:
    """One key as a pattern token is written: `attn`, `[0]`, `['a']` (no leading dot)."""
    text = format_key(key)
    return text[1:] if text.startswith(".") else text


def _wildcard(text: str) -> Any:
    """A test of a key's text against `text` with `*` wildcards, in one left-to-right pass.

    Each part between stars is found leftmost in turn (enough for `*`-only globs); a regex
    `a.*b.*c` backtracks exponentially in the number of stars on a key that almost matches.
    """
    first, *middle, last = text.split("*")

    def test(key: str) -> bool:
        end = len(key) - len(last)
        if end < len(first) or not (key.startswith(first) and key.endswith(last)):
            return False
        i = len(first)
        for part in middle:
            i = key.find(part, i, end)
            if i < 0:
                return False
            i += len(part)
        return True

    return test


def _pattern_tokens(pattern: str) -> list[Any]:
    """The keys of a glob: `STARSTAR`, or a test on one key's text (`_key_text`)."""
    tokens: list[Any] = []
    i, n = 0, len(pattern)
    while i < n:
        if pattern[i] == ".":
            i += 1
            continue
        if pattern.startswith("**", i):
            tokens.append(STARSTAR)
            i += 2
            continue
        if pattern[i] == "[":  # to the closing bracket, skipping quoted text
            j, quote = i + 1, None
            while j < n and (quote or pattern[j] != "]"):
                if pattern[j] in "'\"" and (quote is None or quote == pattern[j]):
                    quote = None if quote else pattern[j]
                j += 1
            text, i = pattern[i : j + 1], j + 1
        else:
            j = i
            while j < n and pattern[j] not in ".[":
                j += 1
            text, i = pattern[i:j], j
        if "*" in text:
            tokens.append(_wildcard(text))
        else:  # a plain key, written as the user likes (`["a"]` for `['a']`)
            (key,) = parse_path(text)
            tokens.append(_key_text(key).__eq__)
    # One key alone matches at any depth: `norm*` finds `blocks[3].norm1`.
    if len(tokens) == 1 and tokens[0] is not STARSTAR:
        tokens.insert(0, STARSTAR)
    return tokens


def _glob_matches(tree: ModelTree, pattern: str) -> list[int]:
    """Every node whose key path matches the glob, by running it as an NFA down the tree."""
    tokens = _pattern_tokens(pattern)
    end = len(tokens)

    def closure(states: set[int]) -> frozenset[int]:
        out = set(states)
        todo = list(states)
        while todo:
            p = todo.pop()
            if p < end and tokens[p] is STARSTAR and p + 1 not in out:
                out.add(p + 1)
                todo.append(p + 1)
        return frozenset(out)

    states: list[frozenset[int]] = [frozenset()] * len(tree)
    states[0] = closure({0})
    matched = [0] if end in states[0] else []
    for i in range(1, len(tree)):
        before = states[tree.parent[i]]
        if not before:
            continue
        step = _key_text(tree.keys[i][-1])
        nxt = set()
        for p in before:
            if p == end:
                continue
            tok = tokens[p]
            if tok is STARSTAR:
                nxt.add(p)
            elif tok(step):
                nxt.add(p + 1)
        states[i] = closure(nxt) if nxt else frozenset()
        if end in states[i]:
            matched.append(i)
    return matched


def match_nodes(tree: ModelTree, pattern: str) -> list[int]:
    """Every node a search `pattern` matches, in tree order (the widget's search box).

    The pattern language, shared by `FilterSpec.freeze` / `unfreeze` / `select`:

    - a node's path (`blocks[0].attn`, `layers[-1]`) matches that node;
    - with `*`, a glob over keys: `*` within a key (`norm*`, `*attn*`, `blocks[*]`), `**`
      any number of keys (`**.bias`); a pattern of one key matches it at any depth;
    - other well-formed path text matches every path containing it, ignoring case (`attn`,
      `Norm`); malformed text (`layers[0`) is an error, though the search box, matching as
      one types, shows the paths containing it.

    >>> from eqx_explorer._examples import example_model
    >>> tree = ModelTree(example_model())
    >>> [tree.paths[i] for i in match_nodes(tree, "norm*")]
    ['blocks[0].norm', 'blocks[1].norm', 'blocks[2].norm']
    """
    pattern = pattern.strip()
    node = tree.index_of(pattern)
    if node is not None:
        return [node]
    check_length(pattern)  # before any glob work: a glob's cost grows with its length
    try:
        keys = parse_path(pattern)
    except ExplorerError:
        if "*" in pattern:  # `norm*`, `*attn*`: globs within a key are not path text
            return _glob_matches(tree, pattern)
        raise  # malformed path text is an error here, not a search
    if is_glob(keys):
        return _glob_matches(tree, pattern)
    try:
        return [tree.find(pattern)]
    except ExplorerError as not_a_path:
        needle = pattern.lower()
        found = [i for i, path in enumerate(tree.paths) if needle in path.lower()]
        if not found:
            raise not_a_path from None
        return found


class _Marker:
    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


def _where_mask(tree: ModelTree, where: Any, verb: str | None) -> np.ndarray:
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
            f"{short_repr(picked)}): a `None` field or an empty container holds nothing to "
            f"{verb or 'select'}. Point it at a module or an array, e.g. `lambda m: m.encoder`."
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


def _nothing_message(tree: ModelTree, nodes: list[int], label: str, verb: str) -> str:
    """Why `nodes` (picked by `label`, holding no leaf) leave nothing to `verb`, and a fix."""
    node = nodes[0]
    what = "None (an empty field)" if tree.kind[node] == NONE else f"an empty {tree.cls[node]}"
    also = f", as are the other {len(nodes) - 1} nodes it matches" if len(nodes) > 1 else ""
    kids = tree.children[0]
    example = next((c for c in kids if tree.n_inexact(c)), kids[0] if kids else 0)
    return (
        f"`{shorten(tree.paths[node])}` is {what}: nothing to {verb} ({label} selects no "
        f"leaves{also}); {verb} a module or an array instead, e.g. `{tree.paths[example]}`"
    )


def _of_nodes(tree: ModelTree, nodes: list[int], label: str, verb: str | None) -> Selection:
    mask = _mask_of_nodes(tree, nodes)
    if verb is not None and not mask.any():
        raise ExplorerError(_nothing_message(tree, nodes, label, verb))
    return Selection(mask, nodes, label)


def select(tree: ModelTree, target: Any, verb: str | None = None) -> Selection:
    """The leaves selected by `target`; raises `ExplorerError` when it names nothing.

    A module or array of the model itself (`model.layers[0]`) selects where it sits. With a
    `verb` (`"freeze"`, ...), a target naming only nodes without leaves (a `None` field, an
    empty container) raises too, saying there is nothing to `verb`; a `(path, leaf)`
    predicate is a filter and may select no leaf.
    """
    if isinstance(target, list | tuple | set | frozenset) and not isinstance(target, str):
        if not target:
            raise ExplorerError("an empty list of targets selects nothing: name at least one")
        parts = [select(tree, t, verb) for t in target]
        mask = np.logical_or.reduce([p.mask for p in parts])
        return Selection(mask, [n for p in parts for n in p.nodes], describe(list(target)))
    if isinstance(target, str):
        node = tree.index_of(target)  # every printed path, whatever its keys
        if node is not None:
            return _of_nodes(tree, [node], f"`{shorten(target)}`", verb)
        nodes = _highest(tree, match_nodes(tree, target))
        if not nodes:
            raise ExplorerError(
                f"the glob `{shorten(target)}` matches no node. `*` stands for any text within "
                "one key and `**` for any number of keys, e.g. `norm*`, `blocks[*].attn` or "
                f"`**.bias`; top-level names are: "
                f"{', '.join(tree.paths[c] for c in tree.children[0][:8])}"
            )
        label = tree.paths[nodes[0]] if len(nodes) == 1 and "*" not in target else target
        return _of_nodes(tree, nodes, f"`{shorten(label)}`", verb)
    if isinstance(target, type):
        nodes = _class_nodes(tree, target)
        if not nodes:
            raise ExplorerError(
                f"no node of class {target.__name__} in this model; pass a class the model "
                "contains, e.g. `eqx.nn.Linear`"
            )
        return _of_nodes(tree, nodes, describe(target), verb)
    if isinstance(target, eqx.Module | jax.Array | np.ndarray):
        nodes = _instance_nodes(tree, target)
        if not nodes:
            raise ExplorerError(
                f"{type(target).__name__} {short_repr(target, 60)} is not part of this model "
                '(a copy, or another model\'s); pass its path, e.g. `"layers[0]"`, or a '
                "`where` function, e.g. `lambda m: m.layers[0]`"
            )
        return _of_nodes(tree, nodes, f"`{tree.paths[nodes[0]]}`", verb)
    if callable(target):
        arity = _positional_arity(target)
        if arity == 1:
            return Selection(_where_mask(tree, target, verb), [], describe(target))
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
