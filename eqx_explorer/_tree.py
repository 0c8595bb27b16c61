"""A flat node table over any pytree: the one walk every other module reads.

Nodes are numbered in pre-order; the leaves under a node are the contiguous range
`[lo, hi)` of `jax.tree_util.tree_leaves(model)` (flatten order is pre-order), which makes
sub-tree questions (state, counts) O(1) with prefix sums.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import sys
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final, Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from equinox.nn._shared import SharedNode  # not exported; what `Shared` leaves in place
from jax.extend.core import Var

from ._errors import ExplorerError, short_repr, shorten
from ._paths import MAX_PATH_CHARS, format_key, format_path, is_glob, parse_path

__all__ = ["ModelTree", "Node", "Tie", "State", "STATES", "array_summary"]

# Node kinds.
MODULE, LIST, TUPLE, NAMEDTUPLE, DICT, NODE = (
    "module",
    "list",
    "tuple",
    "namedtuple",
    "dict",
    "node",
)
ARRAY, LEAF, NONE = "array", "leaf", "none"
CONTAINER_KINDS = frozenset({MODULE, LIST, TUPLE, NAMEDTUPLE, DICT, NODE})

# A node's state under a `FilterSpec`: what the float arrays below it do.
State = Literal["trainable", "frozen", "mixed", "static"]
TRAINABLE: Final = "trainable"
FROZEN: Final = "frozen"
MIXED: Final = "mixed"
STATIC: Final = "static"  # no float array below
STATES: tuple[State, ...] = (STATIC, TRAINABLE, FROZEN, MIXED)  # `FilterSpec.state_codes()`

_NO_STATIC: Mapping[str, str] = MappingProxyType({})

# Types that are always leaves: skip the (raising) one-level flatten for them.
_ATOMS = (jax.Array, np.ndarray, np.generic, int, float, complex, str, bytes, bool)


@dataclasses.dataclass(frozen=True)
class Node:
    """One row of the node table (a read-only view; the table itself is columnar)."""

    index: int
    path: str
    parent: int
    kind: str
    cls: str
    depth: int
    lo: int
    hi: int
    shape: tuple | None
    dtype: str | None
    size: int
    nbytes: int
    sharding: str | None
    trainable: bool
    static: Mapping[str, str]
    summary: str
    tied: str | None  # a tied leaf (`eqx.nn.Shared`): the path of its source


class Tie(NamedTuple):
    """A leaf that `eqx.nn.Shared` ties to another part of the model.

    Equinox keeps only the source as a leaf: the tied place holds a `SharedNode` and is
    rebuilt from the source by `get` on every call, so it trains exactly as its source does.
    """

    owner: int  # node index of the `eqx.nn.Shared`
    sources: tuple[int, ...] | None  # leaf indices `get` reads; None if it could not be traced


@functools.lru_cache(maxsize=4096)
def _summary_of(dtype: Any, shape: tuple) -> str:
    return f"{np.dtype(dtype).name}{list(shape)}"


def array_summary(x: Any) -> str:
    """An array's dtype and shape as a row shows them: `float32[4, 3]`."""
    # Cached by (dtype, shape): a model repeats a few of them over thousands of leaves.
    return _summary_of(x.dtype, tuple(np.shape(x)))


@functools.lru_cache(maxsize=256)
def _dtype_facts(dtype: Any) -> tuple[bool, int]:
    """Whether arrays of `dtype` can train (float/complex), and its item size."""
    return bool(jnp.issubdtype(dtype, jnp.inexact)), np.dtype(dtype).itemsize


def _short_repr(x: Any, limit: int = 40) -> str:
    if callable(x) and hasattr(x, "__name__"):
        text = getattr(x, "__qualname__", x.__name__)
        return text if "<lambda>" not in text else "lambda"
    if type(x).__name__ == "custom_jvp" and hasattr(x, "fun"):
        return getattr(x.fun, "__name__", "custom_jvp")
    text = short_repr(x, 10 * limit)  # a leaf's own __repr__ may raise: the row still shows
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _describe_sharding(x: Any) -> str | None:
    sharding = getattr(x, "sharding", None)
    if sharding is None or isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return None
    if isinstance(sharding, jax.sharding.NamedSharding):
        axes = ", ".join(f"{name}={size}" for name, size in sharding.mesh.shape.items())
        return f"{sharding.spec} on mesh({axes})"
    return type(sharding).__name__


# Per class seen (plain dicts: a lookup per node must cost nanoseconds):
# a Module class's children as (name, key) fields, read from the instance's `__dict__` (a
# generic one-level flatten goes through Module.__getattribute__ per field), or None when its
# flatten is not exactly its fields; the kind of a class whose instances are always leaves.
_MODULE_FIELDS: dict[type, tuple | None] = {}
_ATOM_KIND: dict[type, str] = {}


def _module_fields(obj: Any, children: list) -> tuple | None:
    """`(name, key)` per child if `children` (the flatten of `obj`) are its `__dict__` fields."""
    values = getattr(obj, "__dict__", {})
    if all(
        isinstance(k, jtu.GetAttrKey) and k.name in values and values[k.name] is c
        for k, c in children
    ):
        return tuple((k.name, k) for k, _ in children)
    return None


def _kind_of(obj: Any) -> tuple[str, list | None]:
    """Kind of `obj` and, for containers, its `(key, child)` pairs."""
    if obj is None:
        return NONE, None
    cls = type(obj)
    atom = _ATOM_KIND.get(cls)
    if atom is not None:
        return atom, None
    fields = _MODULE_FIELDS.get(cls)
    if fields is not None:
        values = obj.__dict__
        try:
            return MODULE, [(key, values[name]) for name, key in fields]
        except KeyError:  # a field this instance does not hold: the generic path decides
            pass
    if cls is list or cls is tuple:  # exactly, as JAX flattens them (not subclasses)
        return (LIST if cls is list else TUPLE), [
            (jtu.SequenceKey(i), x) for i, x in enumerate(obj)
        ]
    if isinstance(obj, _ATOMS) and not isinstance(obj, tuple):
        kind = _ATOM_KIND[cls] = ARRAY if eqx.is_array(obj) else LEAF
        return kind, None
    try:
        children, _ = jtu.flatten_one_level_with_keys(obj)
    except ValueError:
        return (ARRAY if eqx.is_array(obj) else LEAF), None
    if isinstance(obj, eqx.Module):
        kind = MODULE
        if cls not in _MODULE_FIELDS:
            _MODULE_FIELDS[cls] = _module_fields(obj, children)
    elif isinstance(obj, tuple) and hasattr(obj, "_fields"):
        kind = NAMEDTUPLE
        # jax 0.10's one-level flatten repeats the first field's key for namedtuples.
        children = [(jtu.GetAttrKey(f), c) for f, (_, c) in zip(obj._fields, children)]
    elif isinstance(obj, tuple):
        kind = TUPLE
    elif isinstance(obj, list):
        kind = LIST
    elif isinstance(obj, dict):
        kind = DICT
    else:
        kind = NODE
    return kind, list(children)


_STATIC_NAMES: dict[type, tuple[str, ...]] = {}  # per dataclass: its static fields


def _static_fields(obj: Any) -> dict:
    cls = type(obj)
    names = _STATIC_NAMES.get(cls)
    if names is None:
        fields = dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ()
        names = _STATIC_NAMES[cls] = tuple(f.name for f in fields if f.metadata.get("static"))
    return {name: _short_repr(getattr(obj, name, None)) for name in names}


class _Marker:
    __slots__ = ("leaf",)

    def __init__(self, leaf: int):
        self.leaf = leaf


def _depends_on(get: Any, pytree: Any, leaves: Sequence[Any], groups: int | None) -> list[set[int]]:
    """For each value `get(pytree)` returns (`groups` of them, or one if None), the positions
    in `leaves` (the leaves of `pytree`) of the arrays it is computed from.

    Read from the jaxpr of `get` over the arrays, so a transposing `get` finds its source too.
    """
    at = [k for k, x in enumerate(leaves) if eqx.is_array(x)]
    sizes: list[int] = []

    def arrays_out(*arrays: jax.Array) -> list[jax.Array]:
        xs = list(leaves)
        for k, a in zip(at, arrays):
            xs[k] = a
        out = get(jtu.tree_unflatten(jtu.tree_structure(pytree), xs))
        parts = [out] if groups is None else list(out)
        flat = [[x for x in jtu.tree_leaves(part) if eqx.is_array(x)] for part in parts]
        sizes[:] = [len(f) for f in flat]
        return [x for f in flat for x in f]

    jaxpr = jax.make_jaxpr(arrays_out)(*[leaves[k] for k in at]).jaxpr
    deps: dict[Any, frozenset[int]] = {v: frozenset([k]) for v, k in zip(jaxpr.invars, at)}
    for eqn in jaxpr.eqns:
        reads = frozenset().union(*(deps.get(v, ()) for v in eqn.invars if isinstance(v, Var)))
        deps.update(dict.fromkeys(eqn.outvars, reads))
    outs = [deps.get(v, frozenset()) if isinstance(v, Var) else frozenset() for v in jaxpr.outvars]
    bounds = np.cumsum([0, *sizes])
    return [set().union(*outs[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def _shared_ties(tree: ModelTree, node: int) -> list[tuple[int, Tie]]:
    """The tied places under the `eqx.nn.Shared` at `node`, each with the leaves it reads.

    Its `where` run on the stored pytree (as `Shared.__call__` does) names the `SharedNode`
    places in order, and its `get` gives their values in the same order.
    """
    shared = tree.objects[node]
    (inner,) = [c for c in tree.children[node] if tree.keys[c][-1] == jtu.GetAttrKey("pytree")]
    lo, hi = int(tree.lo[inner]), int(tree.hi[inner])
    leaves = tree.leaves[lo:hi]
    places = [lo + k for k, x in enumerate(leaves) if isinstance(x, SharedNode)]
    try:
        skeleton = jtu.tree_unflatten(
            jtu.tree_structure(shared.pytree), [_Marker(lo + k) for k in range(hi - lo)]
        )
        picked = shared.where(skeleton)
        single = isinstance(picked, _Marker)
        order = [picked.leaf] if single else [m.leaf for m in picked]
        reads = _depends_on(shared.get, shared.pytree, leaves, None if single else len(order))
        if sorted(order) != places or len(reads) != len(order):
            raise ValueError("`where` and `get` do not name the SharedNode places")
    except Exception:  # a user's `where`/`get` the tracer cannot follow: tied, source unknown
        return [(leaf, Tie(node, None)) for leaf in places]
    return [(leaf, Tie(node, tuple(sorted(lo + k for k in r)))) for leaf, r in zip(order, reads)]


class ModelTree:
    """The node table of a pytree: every module, container and leaf with its path.

    **Arguments:**

    - `model`: any pytree.

    >>> tree = ex.ModelTree(eqx.nn.MLP(2, 2, 8, 2, key=jax.random.key(0)))
    >>> tree.node(tree.find("layers[0].weight")).shape
    (8, 2)
    >>> tree.leaf_paths[:2], tree.num_leaves
    (['layers[0].weight', 'layers[0].bias'], 8)

    Static fields (`eqx.field(static=True)`) are listed in `node.static` of their module,
    not as leaves. `None` fields are nodes of kind `"none"` with no leaves. A place tied by
    `eqx.nn.Shared` is a `SharedNode` leaf: `ties` maps its leaf index to the leaves its
    `get` reads, and its row says `tied to <source path>`. Each array leaf has a type,
    `array_types[array_type[leaf]]` (its shape and dtype; -1 for a non-array), so per-type
    work (row texts, an optimizer's state on a proxy) runs once per type. The model is only
    read, never copied or changed.
    """

    def __init__(self, model: Any):
        self.model = model
        try:
            self.treedef = jtu.tree_structure(model)
        except (TypeError, ValueError, RecursionError, SystemError) as e:
            # Mixed dict key types cannot be sorted; a container holding itself recurses (and
            # jaxlib reports that as a SystemError wrapping the RecursionError).
            cause = e.__context__ if isinstance(e, SystemError) and e.__context__ else e
            first_line = (str(cause).splitlines() or [""])[0]
            raise ExplorerError(
                f"JAX cannot flatten this {type(model).__name__} ({type(cause).__name__}: "
                f"{shorten(first_line)}); a model must be a "
                "pytree: each dict's keys of one sortable type (all str or all int), no "
                "container inside itself, and fewer nested levels than Python's recursion "
                f"limit ({sys.getrecursionlimit():,})"
            ) from None
        paths: list[str] = []
        keys: list[tuple] = []
        parent: list[int] = []
        kinds: list[str] = []
        classes: list[str] = []
        depth: list[int] = []
        lo: list[int] = []
        statics: list[dict] = []
        objects: list[Any] = []
        leaves: list[Any] = []
        leaf_node: list[int] = []
        children: list[list[int]] = []
        shared: list[int] = []

        stack: list[tuple[Any, tuple, str, int, int]] = [(model, (), "", -1, 0)]
        while stack:
            obj, key_path, text, par, d = stack.pop()
            index = len(paths)
            kind, kids = _kind_of(obj)
            paths.append(text)
            keys.append(key_path)
            parent.append(par)
            kinds.append(kind)
            classes.append(
                "Array" if kind == ARRAY and isinstance(obj, jax.Array) else type(obj).__name__
            )
            depth.append(d)
            lo.append(len(leaves))
            statics.append(_static_fields(obj) if kind == MODULE else {})
            objects.append(obj)
            children.append([])
            if par >= 0:
                children[par].append(index)
            if kind == MODULE and isinstance(obj, eqx.nn.Shared):
                shared.append(index)
            if kids is None:
                if kind != NONE:
                    leaves.append(obj)
                    leaf_node.append(index)
                continue
            for key, child in reversed(kids):
                step = format_key(key)
                child_text = text + step if text else step.removeprefix(".")
                stack.append((child, key_path + (key,), child_text, index, d + 1))

        n = len(paths)
        hi = list(lo)
        for i in range(n - 1, -1, -1):
            if kinds[i] in (ARRAY, LEAF):
                hi[i] = lo[i] + 1
            elif children[i]:
                hi[i] = hi[children[i][-1]]

        # Columns: tuples and read-only arrays (specs, runners and widgets share one tree).
        self.paths: tuple[str, ...] = tuple(paths)
        self.keys: tuple[tuple, ...] = tuple(keys)
        self.parent: tuple[int, ...] = tuple(parent)
        self.kind: tuple[str, ...] = tuple(kinds)
        self.cls: tuple[str, ...] = tuple(classes)
        self.depth: tuple[int, ...] = tuple(depth)
        self.lo = np.asarray(lo, dtype=np.int64)
        self.hi = np.asarray(hi, dtype=np.int64)
        self.static: tuple[Mapping[str, str], ...] = tuple(
            MappingProxyType(s) if s else _NO_STATIC for s in statics
        )
        self.objects: tuple[Any, ...] = tuple(objects)
        self.children: tuple[tuple[int, ...], ...] = tuple(map(tuple, children))
        self.leaves: tuple[Any, ...] = tuple(leaves)
        self.leaf_node = np.asarray(leaf_node, dtype=np.int64)
        self._index = {p: i for i, p in enumerate(paths)}
        self._steps: dict[int, dict[str, int]] = {}  # node -> {child's key text: child}
        if len(self._index) != n:
            raise ExplorerError(
                "two nodes of this pytree print the same path; give dict keys distinct "
                "printed forms (e.g. not both 1 and True)"
            )

        nl = len(leaves)
        # A leaf's kind is ARRAY exactly when `eqx.is_array` holds (`_kind_of`).
        self.is_array = np.fromiter((kinds[i] == ARRAY for i in leaf_node), bool, nl)
        at = np.flatnonzero(self.is_array)
        # One pass over the arrays: each gets its type, (shape, dtype); the facts of a type
        # (float or not, as `eqx.is_inexact_array` decides; size; bytes) are looked up once.
        types: dict[tuple, int] = {}
        type_of = [
            types.setdefault((x.shape, x.dtype), len(types)) for x in map(leaves.__getitem__, at)
        ]
        self.array_types: tuple[tuple[tuple[int, ...], Any], ...] = tuple(types)
        self.array_type = np.full(nl, -1, np.int32)
        self.array_type[at] = type_of
        facts = [(*_dtype_facts(dtype), math.prod(shape)) for shape, dtype in types]
        per_type = np.asarray(facts, np.int64).reshape(len(facts), 3)
        self.inexact = np.zeros(nl, bool)
        self.size = np.zeros(nl, np.int64)
        self.nbytes = np.zeros(nl, np.int64)
        self.inexact[at] = per_type[type_of, 0]
        self.size[at] = per_type[type_of, 2]
        self.nbytes[at] = per_type[type_of, 1] * per_type[type_of, 2]
        # Prefix sums over leaves: sub-tree totals in O(1).
        self._cum_inexact = np.concatenate([[0], np.cumsum(self.inexact)])
        self._cum_params = np.concatenate([[0], np.cumsum(np.where(self.inexact, self.size, 0))])
        # Leaf index of each tied place -> its Tie, in leaf order.
        self.ties: Mapping[int, Tie] = MappingProxyType(
            dict(sorted(tie for node in shared for tie in _shared_ties(self, node)))
        )
        # Specs, runners and widgets share one tree: its arrays are read-only.
        for table in (self.lo, self.hi, self.leaf_node, self.is_array, self.inexact, self.size):
            table.setflags(write=False)
        self.array_type.setflags(write=False)
        for table in (self.nbytes, self._cum_inexact, self._cum_params):
            table.setflags(write=False)
        self._built = True

    def __setattr__(self, name: str, value: Any) -> None:
        if getattr(self, "_built", False) and not name.startswith("_"):
            raise AttributeError(
                f"ModelTree is read-only: build a new ModelTree(model) instead of setting {name!r}"
            )
        object.__setattr__(self, name, value)

    @property
    def cum_inexact(self) -> np.ndarray:
        """Prefix sums of `inexact` (length `num_leaves + 1`), read-only.

        The float arrays below node `i` are `cum_inexact[hi[i]] - cum_inexact[lo[i]]`.

        >>> tree = ex.ModelTree(eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0)))
        >>> tree.cum_inexact
        array([0, 1, 2, 3, 4, 4, 4])
        """
        return self._cum_inexact

    # -- sizes --------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_leaves(self) -> int:
        """The number of leaves (`len(jtu.tree_leaves(model))`).

        >>> tree = ex.ModelTree(eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0)))
        >>> tree.num_leaves
        6
        """
        return len(self.leaves)

    @property
    def leaf_paths(self) -> list[str]:
        """The path of every leaf, in leaf order.

        >>> tree = ex.ModelTree(eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0)))
        >>> tree.leaf_paths[-2:]
        ['activation', 'final_activation']
        """
        return [self.paths[i] for i in self.leaf_node]

    def n_inexact(self, node: int) -> int:
        """The number of float/complex arrays under `node` (a node index).

        >>> tree = ex.ModelTree(eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0)))
        >>> tree.n_inexact(tree.find("layers[0]"))
        2
        """
        return int(self._cum_inexact[self.hi[node]] - self._cum_inexact[self.lo[node]])

    def all_params(self) -> np.ndarray:
        """`params(i)` for every node at once, in node order.

        >>> tree = ex.ModelTree(eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0)))
        >>> tree.all_params()
        array([17, 17, 12,  8,  4,  5,  4,  1,  0,  0])
        """
        out: np.ndarray = self._cum_params[self.hi] - self._cum_params[self.lo]
        return out

    def params(self, node: int) -> int:
        """The number of float/complex array elements under `node` (a node index).

        >>> tree = ex.ModelTree(eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0)))
        >>> tree.params(0), tree.params(tree.find("layers[1]"))
        (17, 5)
        """
        return int(self._cum_params[self.hi[node]] - self._cum_params[self.lo[node]])

    # -- rows ---------------------------------------------------------------
    def is_leaf(self, node: int) -> bool:
        """Whether node `node` (an index) is a leaf (an array or another leaf), not a container.

        >>> tree = ex.ModelTree(eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0)))
        >>> tree.is_leaf(tree.find("activation")), tree.is_leaf(tree.find("layers"))
        (True, False)
        """
        return self.kind[node] in (ARRAY, LEAF)

    def node(self, index: int) -> Node:
        """The row of node `index`: a read-only `Node` with its path, kind, shape, size, ...

        >>> tree = ex.ModelTree(eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0)))
        >>> node = tree.node(tree.find("layers[1].bias"))
        >>> node.kind, node.shape, node.dtype, node.size
        ('array', (1,), 'float32', 1)
        """
        if isinstance(index, bool) or not isinstance(index, int | np.integer):
            raise ExplorerError(
                f"node(index) takes an int node index, got {type(index).__name__}; for a path "
                "use tree.node(tree.find(path))"
            )
        if not 0 <= index < len(self.paths):
            raise ExplorerError(
                f"node index {index} is out of range: this tree has {len(self.paths)} nodes, "
                f"numbered 0 to {len(self.paths) - 1}"
            )
        index = int(index)
        kind = self.kind[index]
        obj = self.objects[index]
        leaf = kind in (ARRAY, LEAF)
        li = int(self.lo[index]) if leaf else -1
        is_arr = kind == ARRAY
        return Node(
            index=index,
            path=self.paths[index],
            parent=self.parent[index],
            kind=kind,
            cls=self.cls[index],
            depth=self.depth[index],
            lo=int(self.lo[index]),
            hi=int(self.hi[index]),
            shape=tuple(np.shape(obj)) if is_arr else None,
            dtype=str(obj.dtype) if is_arr else None,
            size=int(self.size[li]) if is_arr else self.params(index) if not leaf else 0,
            nbytes=int(self.nbytes[li]) if is_arr else 0,
            sharding=_describe_sharding(obj) if is_arr else None,
            trainable=bool(self.inexact[li]) if leaf else self.n_inexact(index) > 0,
            static=self.static[index],
            summary=self.summary(index),
            tied=self.tie_source(li) if li in self.ties else None,
        )

    def summary(self, index: int) -> str:
        """Short text for node `index`'s row: shape/dtype for arrays, a repr for other leaves.

        >>> tree = ex.ModelTree(eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0)))
        >>> tree.summary(tree.find("layers[0].weight")), tree.summary(tree.find("activation"))
        ('float32[4, 2]', 'relu')
        """
        kind, obj = self.kind[index], self.objects[index]
        if kind == ARRAY:
            return array_summary(obj)
        if kind == LEAF:
            leaf = int(self.lo[index])
            return f"tied to {self.tie_source(leaf)}" if leaf in self.ties else _short_repr(obj)
        if kind == NONE:
            return "None"
        return f"{len(self.children[index])} children"

    def tie_source(self, leaf: int) -> str:
        """What the tied place at leaf index `leaf` is tied to, as text.

        Sources forming one sub-tree are named by its path (the lowest node holding exactly
        them); a `get` that reads no array ties to a constant.

        >>> a = eqx.nn.Linear(2, 2, key=jax.random.key(0))
        >>> shared = eqx.nn.Shared((a, a), lambda p: p[1].weight, lambda p: p[0].weight)
        >>> tree = ex.ModelTree(shared)
        >>> [tree.tie_source(leaf) for leaf in tree.ties]
        ['`pytree[0].weight`']
        """
        owner, sources = self.ties[leaf]
        shared = f"the eqx.nn.Shared at {f'`{self.paths[owner]}`' if owner else 'the root'}"
        if sources is None:
            return f"a value of {shared}, whose `get` could not be traced"
        if not sources:
            return f"a constant (the `get` of {shared} reads no array)"
        first, last = sources[0], sources[-1]
        if last - first + 1 == len(sources):  # one run of leaves: the lowest node holding it
            node = int(self.leaf_node[first])
            while self.hi[node] <= last and self.parent[node] >= 0:
                node = self.parent[node]
            if (self.lo[node], self.hi[node]) == (first, last + 1):
                return f"`{self.paths[node]}`"
        named = [f"`{self.paths[self.leaf_node[k]]}`" for k in sources[:3]]
        return ", ".join(named) + (", …" if len(sources) > 3 else "")

    def sharding(self, index: int) -> str | None:
        """How node `index`'s array is sharded, as text; `None` on one device or for a non-array.

        >>> tree = ex.ModelTree(eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0)))
        >>> tree.sharding(tree.find("layers[0].weight")) is None
        True
        """
        return _describe_sharding(self.objects[index]) if self.kind[index] == ARRAY else None

    # -- lookup -------------------------------------------------------------
    def find(self, path: str) -> int:
        """The index of the node at `path` (leading dot optional); `ExplorerError` if none.

        Every path this tree prints is found (by its text, whatever its keys); other text is
        parsed and walked down key by key, in time linear in its length.

        >>> tree = ex.ModelTree(eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0)))
        >>> tree.find("layers[1]"), tree.find(".layers[-1]")
        (5, 5)
        """
        if isinstance(path, str) and path in self._index:
            return self._index[path]
        try:
            keys = parse_path(path)
            glob = is_glob(keys)
        except ExplorerError:
            # `norm*` is no path text, but a glob `freeze` and `select` read.
            if not (isinstance(path, str) and "*" in path and len(path) <= MAX_PATH_CHARS):
                raise
            glob = True
        if glob:
            raise ExplorerError(
                f"`{shorten(path)}` is a glob (`*` within a key, `**` for any keys), not the "
                "path of one node: globs are accepted by freeze/unfreeze/select, e.g. "
                f"spec.freeze({shorten(path)!r}); here name one node, e.g. "
                f"`{self.paths[self.children[0][0]] if self.children[0] else ''}`"
            )
        node, depth, keys = self._walk(keys)
        if depth == len(keys):
            return node
        raise ExplorerError(self._unknown_path_message(keys, node, depth))

    def index_of(self, path: str) -> int | None:
        """The index of the node this tree prints as `path` exactly, else `None` (no parsing).

        >>> tree = ex.ModelTree(eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0)))
        >>> tree.index_of("layers[1]"), tree.index_of("layers[-1]")
        (5, None)
        """
        return self._index.get(path)

    def _walk(self, keys: tuple) -> tuple[int, int, tuple]:
        """The deepest node along `keys`, how many keys lead to it, and the keys with
        negative indices into lists and tuples (`layers[-1]`) counted from the end."""
        node, out = 0, list(keys)
        for depth, key in enumerate(keys):
            index = key.key if isinstance(key, jtu.DictKey) else None
            n_kids = len(self.children[node])
            if (
                type(index) is int
                and -n_kids <= index < 0
                and self.kind[node] in (LIST, TUPLE, NAMEDTUPLE)
            ):
                key = out[depth] = jtu.SequenceKey(n_kids + index)
            steps = self._steps.get(node)
            if steps is None:
                kids = self.children[node]
                steps = self._steps[node] = {format_key(self.keys[c][-1]): c for c in kids}
            child = steps.get(format_key(key))
            if child is None:
                return node, depth, tuple(out)
            node = child
        return node, len(keys), tuple(out)

    def _unknown_path_message(self, keys: tuple, node: int, depth: int) -> str:
        # Suggest among the children of the deepest existing node, by the first missing key.
        missing = format_path(keys[: depth + 1])
        names = [self.paths[c] for c in self.children[node]]
        close = difflib.get_close_matches(missing, names, n=3, cutoff=0.5) or names[:5]
        where = f"`{self.paths[node]}`" if depth else "the model root"
        hint = ", ".join(f"`{p}`" for p in close) if close else "(it has no children)"
        return (
            f"no node at path `{shorten(format_path(keys))}` in this {self.cls[0]}: the longest "
            f"existing prefix is {where}. Closest existing paths: {hint}."
        )
