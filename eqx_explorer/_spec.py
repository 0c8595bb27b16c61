"""FilterSpec: an immutable trainable/frozen mask over a model's leaves.

Polarity follows Equinox: `True` = trainable (the `filter_spec` of `eqx.partition`).
`optax.freeze` uses the opposite (`True` = frozen); `to_code("optax")` writes labels instead.
A spec also holds a learning-rate factor per leaf (`lr_factors`): 0 = frozen, 1 by default.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax.tree_util as jtu
import numpy as np

from ._codegen import STYLES, Style, to_code
from ._constraints import Rule, RuleLike, make_rule
from ._errors import ExplorerError, short_repr, shorten
from ._paths import format_path
from ._select import Selection, describe, is_bool, select
from ._tree import (
    FROZEN,
    LIST,
    MIXED,
    MODULE,
    STATES,
    STATIC,
    TRAINABLE,
    TUPLE,
    ModelTree,
    State,
)

__all__ = ["FilterSpec"]

_FORMAT = "eqx_explorer.FilterSpec"


# Saved-spec fields: name -> (type of the value, type of its entries, what it must be).
_SCHEMA = {
    "format": (str, None, f"be {_FORMAT!r}"),
    "version": (int, None, "be 1"),
    "model": (str, None, "be the model's class name"),
    "trainable": (list, str, "be a list of path strings"),
    "frozen": (list, str, "be a list of path strings"),
    "lr_factors": (dict, numbers.Real, "map paths to numbers"),
    "constraints": (dict, str | list, 'map paths to rules, e.g. "positive"'),
    "inference": (dict, bool, "map paths to true/false"),
}


def _no_constant(name: str) -> None:
    raise ExplorerError(f"the saved spec holds {name}, which is not strict JSON; write a number")


def _read_saved(text: Any) -> dict:
    """The document of a saved spec, checked against `_SCHEMA`; `ExplorerError` otherwise."""
    if not isinstance(text, str | bytes | bytearray):
        raise ExplorerError(
            f"from_json takes the text of spec.to_json(), got {type(text).__name__}; for a "
            "dict, pass json.dumps(d)"
        )
    try:
        doc = json.loads(text, parse_constant=_no_constant)
    except ExplorerError:
        raise
    except (ValueError, RecursionError) as e:  # bad JSON, a 5,000-digit int, deep nesting
        raise ExplorerError(
            f"not valid JSON ({type(e).__name__}: {shorten(str(e))}); pass the text of "
            "spec.to_json()"
        ) from None
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
        raise ExplorerError(f"this JSON is not a saved FilterSpec (no format {_FORMAT!r})")
    unknown = sorted(set(doc) - set(_SCHEMA))
    if unknown:
        raise ExplorerError(
            f"the saved spec has unknown field(s) {shorten(', '.join(map(repr, unknown)))}; "
            f"a saved spec has only {', '.join(_SCHEMA)}"
        )
    for name, (kind, entry, example) in _SCHEMA.items():
        value = doc.get(name)
        if value is None and name in ("model", "lr_factors", "constraints", "inference"):
            continue
        entries: Any = value.values() if isinstance(value, dict) else value
        if (
            not isinstance(value, kind)
            or isinstance(value, bool)
            or (isinstance(value, dict) and not all(isinstance(k, str) for k in value))
            or (entry is not None and not all(isinstance(v, entry) for v in entries))
            or (entry is numbers.Real and any(isinstance(v, bool) for v in entries))
        ):
            raise ExplorerError(
                f"the saved spec's `{name}` is {short_repr(value, 60)}; it must {example}, "
                "as spec.to_json() writes it"
            )
    if doc["version"] != 1:
        raise ExplorerError(
            f"the saved spec has version {short_repr(doc['version'])}; this eqx_explorer reads "
            "version 1. Save it again with this version's spec.to_json()"
        )
    seen: set[str] = set()
    for path in doc["trainable"] + doc["frozen"]:
        if path in seen:
            raise ExplorerError(
                f"the saved spec lists `{shorten(path)}` twice (under `trainable` and "
                "`frozen`, or twice in one); list each path once"
            )
        seen.add(path)
    return doc


def _read_flag(path: tuple, flag: Any, sub: Any) -> Any:
    """`sub` with every leaf replaced by what `flag` (a bool or a callable) says of it."""
    where = f"`{format_path(path)}`" if path else "the root"
    if isinstance(flag, bool | np.bool_):
        return jtu.tree_map(lambda _: bool(flag), sub)
    if not callable(flag):
        raise ExplorerError(
            f"the filter_spec holds {short_repr(flag, 40)} ({type(flag).__name__}) at {where}; "
            "as for eqx.partition, write True, False or a callable leaf -> bool there"
        )

    def call(leaf_path: tuple, leaf: Any) -> bool:
        at = f"`{format_path(path + leaf_path)}`"
        try:
            answer = flag(leaf)
        except Exception as e:
            raise ExplorerError(
                f"the filter_spec's {describe(flag)} at {where} raised "
                f"{type(e).__name__}: {shorten(str(e))} on the leaf at {at}; it is called on "
                "every leaf below it, non-arrays included: guard with eqx.is_array(leaf)"
            ) from None
        if not is_bool(answer):
            raise ExplorerError(
                f"the filter_spec's {describe(flag)} returned "
                f"{short_repr(answer, 40)} on the leaf at {at}; it must return True or False"
            )
        return bool(answer)

    return jtu.tree_map_with_path(call, sub)


def inference_leaves(tree: ModelTree) -> np.ndarray:
    """Bool array over leaves: the bool `inference` fields of Equinox modules."""
    flags = np.zeros(tree.num_leaves, bool)
    for i, (node, leaf) in enumerate(zip(tree.leaf_node, tree.leaves)):
        keys = tree.keys[node]
        flags[i] = (
            isinstance(leaf, bool)
            and bool(keys)  # not the root
            and isinstance(keys[-1], jtu.GetAttrKey)
            and keys[-1].name == "inference"
            and tree.kind[tree.parent[node]] == MODULE
        )
    return flags


_FACTOR_HINT = "0 freezes, 1 is the full learning rate, e.g. 0.1 trains at a tenth of it"
_DECAY_HINT = "each layer trains at `decay` times the rate of the one above it, e.g. 0.8"


def _factor(value: Any, where: str, name: str, upper: float, hint: str = _FACTOR_HINT) -> float:
    """`value` as a float in [0, upper], else an ExplorerError naming `where` it was passed."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ExplorerError(
            f"{where}: the {name} must be a number, got a {type(value).__name__}; "
            "pass a Python float, e.g. 0.1"
        )
    number = float(value)
    if not (math.isfinite(number) and 0 <= number <= upper):
        bounds = "a finite number >= 0" if math.isinf(upper) else f"a number in [0, {upper:g}]"
        raise ExplorerError(f"{where}: the {name} {number!r} is not {bounds}; {hint}")
    return number


class FilterSpec:
    """Which leaves of `model` train: a value, never changed in place.

    **Arguments:**

    - `model`: any pytree; the new spec trains every float/complex array of it.

    >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
    >>> spec = ex.FilterSpec(model).freeze("layers").unfreeze("layers[-1]")
    >>> params, static = eqx.partition(model, spec.tree)  # `tree`: bools, the model's structure
    >>> spec.trainable_paths()
    ['layers[1].weight', 'layers[1].bias']
    >>> spec.state("layers"), spec.state("activation")
    ('mixed', 'static')
    >>> ex.FilterSpec.from_json(model, spec.to_json()) == spec
    True

    `freeze`/`unfreeze` take targets: a path (`"blocks[3].attn"`), a glob (`"blocks[*].attn"`,
    `"**.bias"`), a `where` function (`lambda m: m.encoder`), a predicate on leaves
    (`lambda path, leaf: leaf.ndim == 2`), a module class (`eqx.nn.LayerNorm`), or a list of
    these. Later calls override earlier ones. Only inexact (float/complex) arrays can be
    trainable; int/bool arrays and non-array leaves (functions, floats, strings) are always
    `False` in `.tree` and have state `"static"`.

    A spec also says which layers run in inference mode (`spec.inference("bn1")`): the mask
    says what the optimizer moves, these flags what the layers do. They are stored as
    overrides, one bool per `inference` field the spec sets (leaf index -> value), read as
    `inference_overrides` (path -> value) and applied with `apply_inference(model)`.

    Learning-rate groups: every trainable leaf has a factor (1 by default) that scales its
    update, as `lr * factor` in a PyTorch parameter group; a frozen leaf has factor 0.
    `scale_lr(target, factor)` sets factors and `layerwise_decay("blocks", 0.8)` decays them
    down a list of layers; `lr_factors` reads them. A mask change keeps the factor of every
    leaf that stays trainable: `freeze` sets 0, `unfreeze` and `set_mask` give the leaves they
    turn on factor 1 (a frozen leaf remembers no factor) and leave trainable leaves' factors be.

    Edge cases: a stacked layer (`eqx.nn.MLP(..., scan=True)`) is one array leaf, so one bool
    freezes all its layers at once; `eqx.nn.Shared` ties arrays so only the source is a leaf:
    the tied place (a `SharedNode`) has its source's state, and editing it alone raises.
    """

    __slots__ = ("_model_tree", "_mask", "_factors", "_cum", "constraints", "_inference")

    def __init__(
        self,
        model: Any,
        *,
        _tree: ModelTree | None = None,
        _mask: np.ndarray | None = None,
        _factors: np.ndarray | None = None,
        _constraints: dict[str, Rule] | None = None,
        _inference: dict[int, bool] | None = None,
    ) -> None:
        self._model_tree = _tree if _tree is not None else ModelTree(model)
        mask = self._model_tree.inexact.copy() if _mask is None else _mask
        mask.setflags(write=False)
        self._mask = mask
        # Float64 per leaf, > 0 exactly where `mask` is True (callers keep that invariant).
        factors = mask.astype(np.float64) if _factors is None else _factors
        factors.setflags(write=False)
        self._factors = factors
        self._cum: tuple[np.ndarray, np.ndarray] | None = None
        self.constraints = dict(_constraints or {})
        # Leaf index of an `inference` field -> the value the spec sets, in leaf order.
        self._inference: dict[int, bool] = dict(sorted((_inference or {}).items()))

    # -- construction -------------------------------------------------------
    def _replace(
        self,
        mask: np.ndarray | None = None,
        constraints: dict | None = None,
        inference: dict | None = None,
        factors: np.ndarray | None = None,
    ) -> FilterSpec:
        if factors is None and mask is not None:
            # Leaves that stay trainable keep their factor, newly trainable ones get 1.
            kept = np.where(self._factors > 0, self._factors, 1.0)
            factors = np.where(mask, kept, 0.0)
        return FilterSpec(
            None,
            _tree=self._model_tree,
            _mask=self._mask if mask is None else mask,
            _factors=self._factors if factors is None else factors,
            _constraints=self.constraints if constraints is None else constraints,
            _inference=self._inference if inference is None else inference,
        )

    @classmethod
    def from_tree(cls, model: Any, filter_spec: Any) -> FilterSpec:
        """The spec of a hand-written `filter_spec`, read as `eqx.partition` reads it.

        **Arguments:**

        - `model`: the model.
        - `filter_spec`: a prefix of `model` with bools or callables (`True` on a non-float leaf
          is ignored, as in `eqx.partition`).

        **Returns:**

        A new `FilterSpec`.

        >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
        >>> filter_spec = jax.tree.map(lambda _: False, model)
        >>> filter_spec = eqx.tree_at(lambda m: m.layers[1].bias, filter_spec, True)
        >>> ex.FilterSpec.from_tree(model, filter_spec).trainable_paths()
        ['layers[1].bias']
        """
        spec = cls(model)
        try:
            full = jtu.tree_map_with_path(_read_flag, filter_spec, model)
            flags = jtu.tree_leaves(full)
        except ExplorerError:
            raise
        except (ValueError, TypeError) as e:
            raise ExplorerError(
                f"this filter_spec is not a prefix of the model's structure ({shorten(str(e))}); "
                "build it from the model, e.g. `jtu.tree_map(lambda _: False, model)` then "
                "`eqx.tree_at`"
            ) from None
        if len(flags) != spec._model_tree.num_leaves:
            raise ExplorerError("this filter_spec does not match the model's leaves")
        return spec._replace(np.asarray(flags, bool) & spec._model_tree.inexact)

    def for_model(self, model: Any) -> FilterSpec:
        """This spec (mask, factors, rules, inference flags) over `model`, of the same structure.

        Use it to apply a spec built on one model to another instance of the same architecture
        (e.g. freshly loaded weights).

        **Arguments:**

        - `model`: a model with this spec's structure.

        **Returns:**

        A new `FilterSpec` over `model` (`self` when `model` is the spec's own model).

        >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
        >>> spec = ex.FilterSpec(model).freeze("layers[0]")
        >>> other = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(1))
        >>> spec.for_model(other).frozen_paths()
        ['layers[0].weight', 'layers[0].bias']
        """
        if model is self.model:
            return self
        return self._onto(FilterSpec(model))

    def _onto(self, base: FilterSpec) -> FilterSpec:
        """This mask, factors, rules and inference flags over `base`'s tree (same leaf paths).

        Static fields may differ (a per-instance `cache_key = str(id(self))`): the spec is
        over leaves, so the same leaf paths are enough.
        """
        mine, theirs = self._model_tree.leaf_paths, base._model_tree.leaf_paths
        if base._model_tree.treedef != self._model_tree.treedef and mine != theirs:
            i = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), len(theirs))
            first = f"`{shorten(mine[i])}`" if i < len(mine) else "(none)"
            then = f"`{shorten(theirs[i])}`" if i < len(theirs) else "(none)"
            raise ExplorerError(
                "this spec was built for another model, with another structure ("
                f"{len(mine)} leaves there, {len(theirs)} here; leaf {i} is {first} there, "
                f"{then} here); build it from this model, e.g. FilterSpec(model).freeze(...), or "
                "FilterSpec.from_json(model, text)"
            )
        flips = np.flatnonzero(self._model_tree.inexact != base._model_tree.inexact)
        if len(flips):
            leaf = int(flips[0])
            there, here = (
                t.summary(int(t.leaf_node[leaf])) for t in (self._model_tree, base._model_tree)
            )
            more = f" (and {len(flips) - 1} more leaves changed so)" if len(flips) > 1 else ""
            raise ExplorerError(
                f"this spec was built for a model whose `{shorten(mine[leaf])}` is {there}; "
                f"here it is {here}{more}. A spec decides which float/complex arrays train, so "
                "it does not fit this model: cast the leaf back, or build a spec for this model, "
                "e.g. FilterSpec(model).freeze(...)"
            )
        other = base.set_mask(self._mask)
        tree = other._model_tree
        for path, rule in self.constraints.items():
            rule.check(path, tree.leaves[int(tree.lo[tree.find(path)])])
        self._check_inference_leaves(tree.leaves)
        return other._replace(
            constraints=dict(self.constraints), inference=self._inference, factors=self._factors
        )

    @property
    def model_tree(self) -> ModelTree:
        """The `ModelTree` of the spec's model (shared, read-only).

        >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
        >>> ex.FilterSpec(model).model_tree.num_leaves
        6
        """
        return self._model_tree

    @property
    def model(self) -> Any:
        """The model the spec was built on.

        >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
        >>> ex.FilterSpec(model).model is model
        True
        """
        return self._model_tree.model

    @property
    def mask(self) -> np.ndarray:
        """Read-only bool array over leaves (`jtu.tree_leaves(model)` order); True = trainable.

        >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
        >>> ex.FilterSpec(model).freeze("layers[0]").mask
        array([False, False,  True,  True, False, False])
        """
        return self._mask

    def select(self, target: Any) -> Selection:
        """The leaves `target` selects.

        **Arguments:**

        - `target`: any form `freeze` takes.

        **Returns:**

        A selection whose `mask` is a bool array over leaves.

        >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
        >>> ex.FilterSpec(model).select("layers[*].bias").mask
        array([False,  True, False,  True, False, False])
        """
        return select(self._model_tree, target)

    def freeze(self, *targets: Any) -> FilterSpec:
        """A new spec with every leaf under `targets` frozen (`self` is unchanged).

        A target that holds no leaf at all (a `None` field, an empty container) raises
        `ExplorerError`, as does one holding a tied place (`eqx.nn.Shared`) whose source stays
        trainable: it trains as its source does. Leaves that never train (int arrays, functions)
        are left as they are.

        **Arguments:**

        - `*targets`: paths, globs, `where` functions, `(path, leaf)` predicates, module classes,
          or lists of these (see the README's table).

        **Returns:**

        A new `FilterSpec`.

        >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
        >>> ex.FilterSpec(model).freeze("layers[0]", "**.bias").frozen_paths()
        ['layers[0].weight', 'layers[0].bias', 'layers[1].bias']
        """
        if not targets:
            raise ExplorerError("freeze() needs at least one target, e.g. spec.freeze('encoder')")
        sel = select(self._model_tree, list(targets) if len(targets) > 1 else targets[0], "freeze")
        mask = self._mask.copy()
        mask[sel.mask] = False
        spec = self._replace(mask)
        self._check_ties(sel, spec, "freeze", 0.0)
        return spec

    def unfreeze(self, *targets: Any) -> FilterSpec:
        """A new spec with every float/complex array under `targets` trainable.

        Raises `ExplorerError` if a target holds no float/complex array (an int/bool array, a
        function, a Python scalar, a `None` field): those can never train; or if it holds a
        tied place (`eqx.nn.Shared`) whose source stays frozen.

        **Arguments:**

        - `*targets`: the forms `freeze` takes.

        **Returns:**

        A new `FilterSpec`.

        >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
        >>> spec = ex.FilterSpec(model).freeze("layers").unfreeze("layers[-1].bias")
        >>> spec.trainable_paths()
        ['layers[1].bias']
        """
        if not targets:
            raise ExplorerError("unfreeze() needs at least one target, e.g. spec.unfreeze('head')")
        tree = self._model_tree
        mask = self._mask.copy()
        sels = [select(tree, target, "unfreeze") for target in targets]
        for sel in sels:
            hit = sel.mask & tree.inexact
            if not hit.any() and not self._tied_in(sel):
                raise ExplorerError(self._cannot_train_message(sel))
            mask[hit] = True
        spec = self._replace(mask)
        for sel in sels:
            self._check_ties(sel, spec, "unfreeze")
        return spec

    def _tied_in(self, sel: Selection) -> list[int]:
        """The tied places (`eqx.nn.Shared`) in `sel` whose traced sources hold float arrays."""
        tree = self._model_tree
        return [
            leaf
            for leaf, (_, sources) in tree.ties.items()
            if sel.mask[leaf] and sources and tree.inexact[list(sources)].any()
        ]

    def _check_ties(
        self, sel: Selection, spec: FilterSpec, verb: str, factor: float | None = None
    ) -> None:
        """`ExplorerError` if `spec` (`self` after `verb` on `sel`) leaves a tied place in `sel`
        otherwise than asked: a tied place trains at its sources' factor (`factor`, or any
        factor > 0 when None), so only editing the sources changes it."""
        tree = self._model_tree
        for leaf in self._tied_in(sel):
            owner, tied_to = tree.ties[leaf]
            sources = [k for k in tied_to or () if tree.inexact[k]]
            factors = spec.lr_factors[sources]
            if (factors > 0).all() if factor is None else (factors == factor).all():
                continue
            if not factors.any():
                now = "frozen"
            elif (factors == factors[0]).all():
                at = factors[0] != 1 or factor  # the factor matters when scaling
                now = "trainable" + (f" at factor {factors[0]:g}" if at else "")
            else:
                now = "partly frozen"
            source = tree.tie_source(leaf)
            shared = f"`{tree.paths[owner]}`" if owner else "the root"
            rest = np.flatnonzero(sel.mask & tree.inexact & (spec.lr_factors != factors[0]))
            others = (
                f", or {verb} only the rest, e.g. `{tree.paths[tree.leaf_node[rest[0]]]}`"
                if len(rest)
                else ""
            )
            raise ExplorerError(
                f"cannot {verb} {sel.label}: `{tree.paths[tree.leaf_node[leaf]]}` is tied to "
                f"{source} by the eqx.nn.Shared at {shared}, which stays {now}. Equinox keeps "
                "only the source as a parameter and rebuilds the tied place from it, so it "
                f"trains as its source does. {verb.capitalize()} {source} instead (that "
                f"{verb}s both){others}."
            )

    def _cannot_train_message(self, sel: Selection, verb: str = "unfreeze") -> str:
        tree = self._model_tree
        first = int(np.flatnonzero(sel.mask)[0])
        node = int(tree.leaf_node[first])
        what = tree.summary(node)
        return (
            f"cannot {verb} {sel.label}: it holds no floating-point array "
            f"(e.g. `{tree.paths[node]}` is {what}). Only float/complex arrays can train; "
            "int/bool arrays, functions and Python values stay as they are. "
            f"{verb.capitalize()} a module or array that has float weights."
        )

    # -- learning-rate groups ------------------------------------------------------
    @property
    def lr_factors(self) -> np.ndarray:
        """Read-only float64 array over leaves (as `mask`): each leaf's learning-rate factor.

        0 where the leaf does not train, 1 by default where it does; trainable = factor > 0.

        >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
        >>> ex.FilterSpec(model).scale_lr("layers[0]", 0.1).lr_factors
        array([0.1, 0.1, 1. , 1. , 0. , 0. ])
        """
        return self._factors

    def scale_lr(self, target: Any, factor: float) -> FilterSpec:
        """A new spec whose float arrays under `target` train at `factor` times the rate.

        Their updates are scaled by `factor`, as in a PyTorch parameter group with
        `lr * factor`. Later calls override earlier ones.

        **Arguments:**

        - `target`: any form `freeze` takes (a list of them too).
        - `factor`: a finite float >= 0; 0 freezes (as `freeze`).

        **Returns:**

        A new `FilterSpec`.

        >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
        >>> spec = ex.FilterSpec(model).scale_lr("layers[0]", 0.1)
        >>> spec.counts["lr_groups"]
        {1.0: {'params': 5, 'leaves': 2}, 0.1: {'params': 12, 'leaves': 2}}
        """
        tree = self._model_tree
        sel = select(tree, target, "scale")
        factor = _factor(factor, f"scale_lr({sel.label}, factor)", "factor", upper=math.inf)
        if factor == 0:
            return self.freeze(target)
        hit = sel.mask & tree.inexact
        if not hit.any() and not self._tied_in(sel):
            raise ExplorerError(self._cannot_train_message(sel, "scale the learning rate of"))
        mask = self._mask.copy()
        mask[hit] = True
        factors = self._factors.copy()
        factors[hit] = factor
        spec = self._replace(mask, factors=factors)
        self._check_ties(sel, spec, "scale", factor)
        return spec

    def layerwise_decay(self, target: Any, decay: float) -> FilterSpec:
        """A new spec with factors decaying down a list of layers (layer-wise LR decay, LLRD).

        The last child of `target` (the one closest to the head) gets factor 1, the one before
        `decay`, then `decay ** 2`, ...: child `j` of `n` gets `decay ** (n - 1 - j)`, as in BERT
        and ViT fine-tuning. Only trainable leaves get a factor: frozen ones stay frozen. The
        factors are set, not multiplied; leaves outside `target` keep theirs.

        **Arguments:**

        - `target`: one list or tuple node, e.g. `"blocks"` or an `eqx.nn.MLP`'s `"layers"`.
        - `decay`: a float in (0, 1].

        **Returns:**

        A new `FilterSpec`.

        >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
        >>> ex.FilterSpec(model).layerwise_decay("layers", 0.5).lr_factors
        array([0.5, 0.5, 1. , 1. , 0. , 0. ])
        """
        tree = self._model_tree
        node = self._sequence_node(target)
        where = f"layerwise_decay(`{tree.paths[node]}`, decay)"
        decay = _factor(decay, where, "decay", upper=1.0, hint=_DECAY_HINT)
        kids = tree.children[node]
        if decay == 0 or decay ** (len(kids) - 1) == 0:
            raise ExplorerError(
                f"{where}: decay {decay!r} gives the first of its {len(kids)} layers factor 0 "
                "(that is freezing); pass a decay in (0, 1], e.g. 0.8, and freeze layers with "
                "spec.freeze(...)"
            )
        lo, hi = tree.lo[node], tree.hi[node]
        if not self._mask[lo:hi].any():
            raise ExplorerError(
                f"{where}: nothing under `{tree.paths[node]}` trains, so no factor would be "
                f"set; unfreeze it first, e.g. spec.unfreeze({tree.paths[node]!r})"
            )
        factors = self._factors.copy()
        for j, kid in enumerate(kids):
            part = slice(tree.lo[kid], tree.hi[kid])
            factors[part] = np.where(self._mask[part], decay ** (len(kids) - 1 - j), 0.0)
        return self._replace(factors=factors)

    def _sequence_node(self, target: Any) -> int:
        """The one list/tuple node `target` names (a path, or a `where` returning the node)."""
        tree = self._model_tree
        sel = select(tree, target, "decay")
        nodes = sel.nodes
        picked = np.flatnonzero(sel.mask)
        if not nodes and len(picked) and picked[-1] + 1 - picked[0] == len(picked):
            # A `where` function names no node: take the highest list/tuple holding exactly
            # the leaves it picked.
            nodes = [
                n
                for n in range(len(tree))
                if (tree.lo[n], tree.hi[n]) == (picked[0], picked[-1] + 1)
                and tree.kind[n] in (LIST, TUPLE)
            ][:1]
        if len(nodes) == 1 and tree.kind[nodes[0]] in (LIST, TUPLE):
            return nodes[0]
        lists = [
            f"`{tree.paths[n]}`"
            for n in range(len(tree))
            if tree.kind[n] in (LIST, TUPLE) and len(tree.children[n]) > 1
        ]
        found = ", ".join(lists[:8]) + (", ..." if len(lists) > 8 else "")
        what = f"is a {tree.kind[nodes[0]]} node" if len(nodes) == 1 else "is not one node"
        raise ExplorerError(
            f"layerwise_decay needs one list or tuple of layers, but {sel.label} {what}. "
            + (f"Lists in this model: {found}." if lists else "This model has no list of layers.")
        )

    def constrain(self, where: Any, rule: RuleLike | Rule | None) -> FilterSpec:
        """A new spec whose selected float arrays follow an update `rule` when trained.

        See `eqx_explorer._constraints` for what each rule does.

        **Arguments:**

        - `where`: any form `freeze` takes.
        - `rule`: `"positive"`, `"orthogonal"`, `"unit_norm"`, `("interval", lo, hi)`, a
          callable `rule(param, update) -> new_param`, or `None` to remove constraints.

        **Returns:**

        A new `FilterSpec`.

        >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
        >>> spec = ex.FilterSpec(model).constrain("layers[1].bias", ("interval", -1.0, 1.0))
        >>> spec.constraints["layers[1].bias"].label
        'interval[-1, 1]'
        """
        tree = self._model_tree
        sel = select(tree, where, "constrain")
        hit = np.flatnonzero(sel.mask & tree.inexact)
        constraints = dict(self.constraints)
        if rule is None:
            for i in hit:
                constraints.pop(tree.paths[tree.leaf_node[i]], None)
            return self._replace(constraints=constraints)
        if not len(hit):
            raise ExplorerError(self._cannot_train_message(sel, "constrain"))
        made = make_rule(rule)
        for i in hit:
            path = tree.paths[tree.leaf_node[i]]
            made.check(path, tree.leaves[i])
            constraints[path] = made
        return self._replace(constraints=constraints)

    def inference(self, *targets: Any, on: bool = True) -> FilterSpec:
        """A new spec running the layers under `targets` in inference mode (`on=False`: training).

        Every Equinox module in the selected sub-trees with a bool `inference` field
        (`eqx.nn.BatchNorm`, `eqx.nn.Dropout`, your own) gets it set to `on` *in the spec*; the
        model is never changed. Later calls override earlier ones, and the spec keeps what it set
        even where the model already agrees, so it means the same over another instance
        (`for_model`). The flags are leaves, not trainable arrays: the mask and `tree` are
        unaffected. Apply them with `apply_inference(model)`.

        A frozen BatchNorm still updates its running statistics (in `state`) on every training
        step unless it runs in inference mode. Raises `ExplorerError` if a target holds no such
        field (e.g. a `Linear`), naming the layers of the model that have one.

        **Arguments:**

        - `*targets`: the forms `freeze` takes.
        - `on`: the value to set.

        **Returns:**

        A new `FilterSpec`.

        >>> class Net(eqx.Module):
        ...     linear: eqx.nn.Linear
        ...     dropout: eqx.nn.Dropout
        >>> net = Net(eqx.nn.Linear(2, 2, key=jax.random.key(0)), eqx.nn.Dropout(0.5))
        >>> spec = ex.FilterSpec(net).inference("dropout")
        >>> spec.inference_paths
        ('dropout.inference',)
        >>> spec.apply_inference(net).dropout.inference
        True
        """
        if not targets:
            raise ExplorerError("inference() needs at least one target, e.g. spec.inference('bn1')")
        if not isinstance(on, bool):
            raise ExplorerError(f"inference(..., on=) takes True or False, got {on!r}")
        tree = self._model_tree
        fields = inference_leaves(tree)
        overrides = dict(self._inference)
        for target in targets:
            sel = select(tree, target, "set to inference mode")
            hit = np.flatnonzero(sel.mask & fields)
            if not len(hit):
                layers = [
                    tree.paths[tree.parent[tree.leaf_node[i]]] for i in np.flatnonzero(fields)
                ]
                fix = (
                    "Select a sub-tree that has one; in this model: "
                    + ", ".join(f"`{p}`" for p in layers[:8])
                    + (", ..." if len(layers) > 8 else "")
                    if layers
                    else "This model has no such layer, so inference mode changes nothing in it."
                )
                raise ExplorerError(
                    f"{sel.label} has no layer with an `inference` field (BatchNorm, Dropout, "
                    f"...). {fix}"
                )
            overrides.update(dict.fromkeys(hit.tolist(), on))
        return self._replace(inference=overrides)

    def set_mask(self, mask: Any) -> FilterSpec:
        """A new spec from a bool array over leaves (True = trainable).

        **Arguments:**

        - `mask`: bools in `jtu.tree_leaves(model)` order; True only on float/complex arrays.

        **Returns:**

        A new `FilterSpec`.

        >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
        >>> mask = np.array([False, False, True, True, False, False])
        >>> ex.FilterSpec(model).set_mask(mask).frozen_paths()
        ['layers[0].weight', 'layers[0].bias']
        """
        try:
            array = np.asarray(mask)
        except ValueError:  # ragged nested lists
            array = None
        if array is None or array.dtype != bool:  # 0.5 or "no" must not read as True
            raise ExplorerError(
                f"set_mask takes a bool array over the model's {self._mask.shape[0]} leaves "
                f"(True = trainable), got {short_repr(mask, 40)}; e.g. edit spec.mask.copy()"
            )
        mask = array
        if mask.shape != self._mask.shape:
            raise ExplorerError(
                f"mask has shape {mask.shape} but the model has {self._mask.shape[0]} leaves"
            )
        bad = mask & ~self._model_tree.inexact
        if bad.any():
            node = int(self._model_tree.leaf_node[int(np.flatnonzero(bad)[0])])
            raise ExplorerError(
                f"leaf `{self._model_tree.paths[node]}` cannot be trainable: it is "
                f"{self._model_tree.summary(node)}, not a float/complex array"
            )
        return self._replace(mask.copy())

    def set_lr_factors(self, factors: Any) -> FilterSpec:
        """A new spec from a float array over leaves: each leaf's factor, 0 = frozen.

        The mask follows (trainable = factor > 0); only float/complex arrays can have a factor.

        **Arguments:**

        - `factors`: finite floats >= 0 in `jtu.tree_leaves(model)` order.

        **Returns:**

        A new `FilterSpec`.

        >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
        >>> spec = ex.FilterSpec(model).set_lr_factors(np.array([0, 0, 0.5, 0.5, 0, 0]))
        >>> spec.trainable_paths(), spec.counts["lr_groups"]
        (['layers[1].weight', 'layers[1].bias'], {0.5: {'params': 5, 'leaves': 2}})
        """
        values = np.asarray(factors)
        if values.shape != self._mask.shape or values.dtype.kind not in "iuf":
            raise ExplorerError(
                f"factors must be a real array of shape {self._mask.shape} (one per leaf, "
                f"in jtu.tree_leaves order), got {values.dtype} of shape {values.shape}"
            )
        values = values.astype(np.float64)
        bad = ~np.isfinite(values) | (values < 0)
        if bad.any():
            node = int(self._model_tree.leaf_node[int(np.flatnonzero(bad)[0])])
            raise ExplorerError(
                f"the factor of `{self._model_tree.paths[node]}` is "
                f"{float(values[bad][0])!r}; factors are finite and >= 0 (0 freezes)"
            )
        self.set_mask(values > 0)  # raises, naming the leaf, if a non-float leaf got one
        return self._replace(values > 0, factors=values)

    # -- reading ------------------------------------------------------------
    @property
    def tree(self) -> Any:
        """The filter spec: a pytree of Python bools with exactly the model's structure.

        Pass it to `eqx.partition`, `eqx.filter` or `eqx.filter_grad`.

        >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
        >>> tree = ex.FilterSpec(model).freeze("layers[0]").tree
        >>> tree.layers[0].weight, tree.layers[1].weight, tree.activation
        (False, True, False)
        """
        return jtu.tree_unflatten(self._model_tree.treedef, [bool(b) for b in self._mask])

    def _cumsum(self) -> tuple[np.ndarray, np.ndarray]:
        """Prefix sums over leaves of trainable and of float arrays, for node states.

        A tied place (`eqx.nn.Shared`) counts as its sources: it trains exactly as they do.
        """
        if self._cum is None:
            tree = self._model_tree
            if not tree.ties:
                self._cum = (np.concatenate([[0], np.cumsum(self._mask)]), tree.cum_inexact)
                return self._cum
            trainable, inexact = self._mask.astype(np.int64), tree.inexact.astype(np.int64)
            for leaf, (_, sources) in tree.ties.items():
                if sources:
                    trainable[leaf] = self._mask[list(sources)].sum()
                    inexact[leaf] = tree.inexact[list(sources)].sum()
            self._cum = (
                np.concatenate([[0], np.cumsum(trainable)]),
                np.concatenate([[0], np.cumsum(inexact)]),
            )
        return self._cum

    def node_state(self, node: int) -> State:
        """The state of the node at index `node` (see `state`), in O(1).

        **Arguments:**

        - `node`: a node index of `model_tree`.

        **Returns:**

        `"trainable"`, `"frozen"`, `"mixed"` or `"static"`.

        >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
        >>> spec = ex.FilterSpec(model).freeze("layers[0]")
        >>> spec.node_state(spec.model_tree.find("layers[0]"))
        'frozen'
        """
        tree = self._model_tree
        trainable, inexact = self._cumsum()
        lo, hi = tree.lo[node], tree.hi[node]
        n_inexact = int(inexact[hi] - inexact[lo])
        if n_inexact == 0:
            return STATIC
        n_true = int(trainable[hi] - trainable[lo])
        if n_true == n_inexact:
            return TRAINABLE
        return FROZEN if n_true == 0 else MIXED

    def state(self, path: str = "") -> State:
        """The state of the node at `path`.

        A tied place (`eqx.nn.Shared`) has its source's state, and so counts in the state of the
        nodes above it: a head tied to a trainable embedding is never `"frozen"`.

        **Arguments:**

        - `path`: a node's path; `""` (default) is the root.

        **Returns:**

        `"trainable"`, `"frozen"`, `"mixed"`, or `"static"` (no float array below).

        >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
        >>> spec = ex.FilterSpec(model).freeze("layers[0]")
        >>> spec.state(), spec.state("layers[0]"), spec.state("layers[1]"), spec.state("activation")
        ('mixed', 'frozen', 'trainable', 'static')
        """
        return self.node_state(self._model_tree.find(path))

    def state_codes(self) -> np.ndarray:
        """Every node's state at once, as uint8 indices into `STATES` (prefix sums, O(nodes)).

        `STATES` is `("static", "trainable", "frozen", "mixed")`.

        >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
        >>> ex.FilterSpec(model).freeze("layers[0]").state_codes()
        array([3, 3, 2, 2, 2, 1, 1, 1, 0, 0], dtype=uint8)
        """
        tree = self._model_tree
        trainable, inexact = self._cumsum()
        n_true = trainable[tree.hi] - trainable[tree.lo]
        n_inexact = inexact[tree.hi] - inexact[tree.lo]
        codes = np.where(n_true == n_inexact, 1, np.where(n_true == 0, 2, 3))
        return np.where(n_inexact == 0, 0, codes).astype(np.uint8)

    def node_states(self) -> list[State]:
        """Every node's state, in node order (as `state_codes`, as text).

        >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
        >>> ex.FilterSpec(model).freeze("layers[0]").node_states()[:3]
        ['mixed', 'mixed', 'frozen']
        """
        return [STATES[c] for c in self.state_codes()]

    @property
    def counts(self) -> dict:
        """Parameter and byte totals; tied (`eqx.nn.Shared`) arrays count once.

        `lr_groups` maps each learning-rate factor of trainable leaves (largest first) to
        `{"params": ..., "leaves": ...}`: `{1.0: {...}}` for a spec without groups.

        >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
        >>> counts = ex.FilterSpec(model).freeze("layers[0]").counts
        >>> counts["trainable_params"], counts["frozen_params"], counts["static_leaves"]
        (5, 12, 2)
        """
        tree = self._model_tree
        inexact = tree.inexact
        train = self._mask
        frozen = inexact & ~train
        return {
            "trainable_params": int(tree.size[train].sum()),
            "frozen_params": int(tree.size[frozen].sum()),
            "trainable_bytes": int(tree.nbytes[train].sum()),
            "frozen_bytes": int(tree.nbytes[frozen].sum()),
            "static_leaves": int((~inexact).sum()),
            "total_params": int(tree.size[inexact].sum()),
            "trainable_leaves": int(train.sum()),
            "frozen_leaves": int(frozen.sum()),
            "lr_groups": self._lr_groups(),
        }

    def _lr_groups(self) -> dict[float, dict[str, int]]:
        """Trainable leaves by factor, largest first: factor -> params and leaves."""
        size = self._model_tree.size[self._mask]
        values, group = np.unique(self._factors[self._mask], return_inverse=True)
        params = np.bincount(group, weights=size, minlength=len(values))
        leaves = np.bincount(group, minlength=len(values))
        return {
            float(f): {"params": int(p), "leaves": int(n)}
            for f, p, n in zip(values[::-1], params[::-1], leaves[::-1])
        }

    def frozen_paths(self) -> list[str]:
        """The paths of the frozen float/complex arrays, in leaf order.

        >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
        >>> ex.FilterSpec(model).freeze("layers[0]").frozen_paths()
        ['layers[0].weight', 'layers[0].bias']
        """
        tree = self._model_tree
        return [tree.paths[tree.leaf_node[i]] for i in np.flatnonzero(tree.inexact & ~self._mask)]

    def trainable_paths(self) -> list[str]:
        """The paths of the trainable arrays, in leaf order.

        >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
        >>> ex.FilterSpec(model).freeze("layers[0]").trainable_paths()
        ['layers[1].weight', 'layers[1].bias']
        """
        tree = self._model_tree
        return [tree.paths[tree.leaf_node[i]] for i in np.flatnonzero(self._mask)]

    # -- inference mode -------------------------------------------------------
    @property
    def inference_overrides(self) -> dict[str, bool]:
        """Every `inference` field the spec sets, path -> value, in leaf order.

        The spec's own record, including fields where the model already holds that value.

        >>> model = (eqx.nn.Dropout(0.5), eqx.nn.Dropout(0.1))
        >>> ex.FilterSpec(model).inference("[0]").inference("[1]", on=False).inference_overrides
        {'[0].inference': True, '[1].inference': False}
        """
        tree = self._model_tree
        return {tree.paths[tree.leaf_node[i]]: on for i, on in self._inference.items()}

    @property
    def inference_paths(self) -> tuple[str, ...]:
        """Paths of the `inference` fields the spec turns on (True here, False in the model).

        >>> model = (eqx.nn.Dropout(0.5), eqx.nn.Dropout(0.1))
        >>> ex.FilterSpec(model).inference("[0]").inference("[1]", on=False).inference_paths
        ('[0].inference',)
        """
        tree = self._model_tree
        return tuple(
            tree.paths[tree.leaf_node[i]]
            for i, on in self._inference.items()
            if on and not tree.leaves[i]
        )

    def _check_inference_leaves(self, leaves: Sequence[Any]) -> None:
        tree = self._model_tree
        for i in self._inference:
            if not isinstance(leaves[i], bool):
                raise ExplorerError(
                    f"`{tree.paths[tree.leaf_node[i]]}` is {leaves[i]!r} in this model, not a "
                    "bool, so the spec cannot set its inference mode; build the model with a "
                    "bool there (e.g. `inference=False`), or a spec for it: FilterSpec(model)"
                )

    def apply_inference(self, model: Any) -> Any:
        """`model` with the `inference` fields this spec sets (via `eqx.tree_at`).

        Every other leaf is the very same object; `model` itself is returned when the spec sets no
        field. Call it before training and evaluation.

        **Arguments:**

        - `model`: a model with this spec's structure (its own model or another instance of the
          architecture), else `ExplorerError`.

        **Returns:**

        The new model.

        >>> model = (eqx.nn.Linear(2, 2, key=jax.random.key(0)), eqx.nn.Dropout(0.5))
        >>> spec = ex.FilterSpec(model).inference(eqx.nn.Dropout)
        >>> spec.apply_inference(model)[1].inference
        True
        """
        if not self._inference:
            return model
        leaves, treedef = jtu.tree_flatten(model)
        if treedef != self._model_tree.treedef:
            raise ExplorerError(
                "apply_inference: this model has another structure than the spec's; use the "
                "spec's model or another instance of the same architecture, or build a spec "
                "for this one, e.g. FilterSpec(model).inference(...)"
            )
        self._check_inference_leaves(leaves)
        index = list(self._inference)
        return eqx.tree_at(
            lambda m: [jtu.tree_leaves(m)[i] for i in index],
            model,
            replace=list(self._inference.values()),
        )

    # -- comparison ---------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FilterSpec):
            return NotImplemented
        return (
            self._model_tree.treedef == other._model_tree.treedef
            and np.array_equal(self._mask, other._mask)
            and np.array_equal(self._factors, other._factors)
            and self.constraints == other.constraints
            and self._inference == other._inference
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        c = self.counts
        total = c["total_params"] or 1
        n_on = sum(self._inference.values())
        modes = [
            f"{n} {'layer' if n == 1 else 'layers'} set to {mode} mode"
            for n, mode in ((n_on, "inference"), (len(self._inference) - n_on, "training"))
            if n
        ]
        groups = c["lr_groups"]
        if set(groups) - {1.0}:
            modes.insert(0, f"{len(groups)} learning-rate group{'s' * (len(groups) > 1)}")
        return (
            f"FilterSpec({self._model_tree.cls[0]}: {c['trainable_params']:,} trainable / "
            f"{c['total_params']:,} params ({100 * c['trainable_params'] / total:.1f}%), "
            f"{c['frozen_leaves']} frozen arrays{''.join(', ' + m for m in modes)})"
        )

    # -- export -----------------------------------------------------------
    def to_code(self, style: Style = "tree_at") -> str:
        """Python code that rebuilds this spec from a variable `model`.

        **Arguments:**

        - `style`: `"tree_at"` (default), `"path"`, `"optax"`, `"stop_gradient"`,
          `"train_step"` or `"custom_updates"` (see `eqx_explorer._codegen.to_code`).

        **Returns:**

        Self-contained source (its own imports) that defines `filter_spec` and the style's extras.

        >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
        >>> code = ex.FilterSpec(model).freeze("layers[0]").to_code()
        >>> namespace = {"model": model}
        >>> exec(code, namespace)
        >>> namespace["filter_spec"].layers[0].weight, namespace["filter_spec"].layers[1].weight
        (False, True)
        """
        if not isinstance(style, str) or style not in STYLES:
            raise ExplorerError(
                f"unknown code style {short_repr(style, 40)} ({type(style).__name__}); "
                f"to_code(style) takes one of {', '.join(map(repr, STYLES))}"
            )

        return to_code(self, style)

    # -- JSON ---------------------------------------------------------------
    def to_json(self) -> str:
        """The spec as strict JSON, which `from_json` reads back.

        Every float/complex leaf's path is under `trainable` or `frozen`. Update rules go under
        `constraints`, inference flags under `inference` (path -> bool) and learning-rate factors
        other than 1 under `lr_factors` (path -> factor), each only when the spec has some; JSON
        without them loads with every factor 1.

        >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
        >>> print(ex.FilterSpec(model).freeze("layers[1]").to_json())
        {
         "format": "eqx_explorer.FilterSpec",
         "version": 1,
         "model": "MLP",
         "trainable": [
          "layers[0].weight",
          "layers[0].bias"
         ],
         "frozen": [
          "layers[1].weight",
          "layers[1].bias"
         ]
        }
        """
        doc = {
            "format": _FORMAT,
            "version": 1,
            "model": self._model_tree.cls[0],
            "trainable": self.trainable_paths(),
            "frozen": self.frozen_paths(),
        }
        scaled = np.flatnonzero(self._mask & (self._factors != 1))
        if len(scaled):
            tree = self._model_tree
            doc["lr_factors"] = {
                tree.paths[tree.leaf_node[i]]: float(self._factors[i]) for i in scaled
            }
        if self.constraints:
            doc["constraints"] = {p: r.to_json() for p, r in self.constraints.items()}
        if self._inference:
            doc["inference"] = self.inference_overrides
        try:
            return json.dumps(doc, indent=1, ensure_ascii=False, allow_nan=False)
        except ValueError:  # strict JSON has no Infinity/NaN
            raise ExplorerError(
                "this spec holds a non-finite number (inf or NaN), which strict JSON cannot "
                "write; use finite learning-rate factors and interval bounds"
            ) from None

    @classmethod
    def from_json(cls, model: Any, text: str) -> FilterSpec:
        """The spec saved by `to_json`, for `model`; raises if the model's leaves changed.

        The text is checked against the saved format first: strict JSON, version 1, each field of
        its type, no path listed twice.

        **Arguments:**

        - `model`: the model (or another instance of its architecture).
        - `text`: what `to_json` wrote.

        **Returns:**

        A new `FilterSpec`.

        >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
        >>> text = ex.FilterSpec(model).freeze("layers[1]").to_json()
        >>> ex.FilterSpec.from_json(model, text).frozen_paths()
        ['layers[1].weight', 'layers[1].bias']
        """
        doc = _read_saved(text)
        spec = cls(model)
        tree = spec._model_tree
        inexact_paths = {tree.paths[tree.leaf_node[i]]: i for i in np.flatnonzero(tree.inexact)}
        trainable = list(doc.get("trainable", []))
        frozen = list(doc.get("frozen", []))
        saved = trainable + frozen
        gone = [p for p in saved if p not in inexact_paths]
        new = sorted(set(inexact_paths) - set(saved), key=lambda p: inexact_paths[p])
        if gone or new:
            parts = []
            if gone:
                parts.append(
                    f"{len(gone)} saved path(s) are not float arrays of this model: "
                    + ", ".join(f"`{p}`" for p in gone[:10])
                )
            if new:
                parts.append(
                    f"{len(new)} float array(s) of this model are not in the saved spec: "
                    + ", ".join(f"`{p}`" for p in new[:10])
                )
            raise ExplorerError(
                "the model's structure changed since this spec was saved; "
                + "; ".join(parts)
                + ". Rebuild the spec for the new model (e.g. FilterSpec(model).freeze(...))."
            )
        mask = np.zeros(tree.num_leaves, bool)
        mask[[inexact_paths[p] for p in trainable]] = True
        factors = mask.astype(np.float64)
        saved_factors = doc.get("lr_factors", {})
        trainable_set = set(trainable)
        for path, factor in saved_factors.items():
            if path not in trainable_set:
                raise ExplorerError(
                    f"the saved `lr_factors` gives `{path}` a factor, but it is not under "
                    "`trainable` in this JSON; list it there, or drop its factor"
                )
            where = f"the saved `lr_factors` of `{path}`"
            factors[inexact_paths[path]] = _factor(factor, where, "factor", upper=math.inf)
            if factors[inexact_paths[path]] == 0:
                raise ExplorerError(
                    f"{where} is 0 but the path is under `trainable`; move it to `frozen`"
                )
        spec = spec._replace(mask, factors=factors)
        for path, rule in doc.get("constraints", {}).items():
            spec = spec.constrain(path, tuple(rule) if isinstance(rule, list) else rule)
        inference = doc.get("inference", {})
        for on in (True, False):
            paths = [p for p, value in inference.items() if value is on]
            if paths:
                spec = spec.inference(*paths, on=on)
        return spec


def check_spec(spec: Any, model: Any, where: str) -> FilterSpec:
    """`spec` over `model` itself (the default spec if `None`), for the entry point `where`
    (e.g. `"summary(model, spec)"`); raises on a wrong type or structure."""
    if spec is None:
        return FilterSpec(model)
    if not isinstance(spec, FilterSpec):
        raise ExplorerError(
            f"{where} takes a FilterSpec (or None), got {type(spec).__name__} "
            f"{short_repr(spec, 40)}; build one with FilterSpec(model).freeze(...)"
        )
    try:
        return spec.for_model(model)
    except ExplorerError as e:
        raise ExplorerError(f"{where}: {e}") from None
