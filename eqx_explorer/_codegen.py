"""Export a FilterSpec as the Python code a careful Equinox user would write by hand.

```python
spec = eqx_explorer.FilterSpec(model).freeze("embed", "blocks[*].attn")
code = spec.to_code("tree_at")     # or "path", "optax", "stop_gradient", "train_step"
namespace = {"model": model}
exec(code, namespace)              # defines `filter_spec` (and the style's extras)
```

Every style renders one decomposition of the spec: the *highest* sub-trees whose float arrays
are all trainable or all frozen, found by walking from the root into mixed nodes only. The code
starts from whichever of "everything frozen" / "every float array trains" needs fewer of these
sub-trees changed, then changes them all in one `eqx.tree_at` (or lists them as key-path
prefixes). Sub-trees without float arrays (ints, functions, `None`) are `False` either way, so
they are never targeted; that also keeps `eqx.tree_at` away from `None`, which it cannot target.

Learning-rate groups (`FilterSpec.lr_factors`) take the same walk over factors: the highest
sub-trees whose trainable leaves share one factor other than 1, listed by key path.

The code is exact (it rebuilds `spec.tree` leaf for leaf), self-contained, deterministic, and
already in `ruff format` layout (line length 100). Dict keys are written as literals built here,
never copied from user text, so no key can inject code.
"""

from __future__ import annotations

import ast
import inspect
import keyword
import math
import unicodedata
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, get_args

import jax.tree_util as jtu
import numpy as np

from ._constraints import retract
from ._errors import ExplorerError
from ._state import has_state
from ._tree import FROZEN, LIST, MIXED, STATES, TRAINABLE, TUPLE, ModelTree

if TYPE_CHECKING:  # for annotations only: `FilterSpec.to_code` calls this module
    from ._spec import FilterSpec

__all__ = ["STYLES", "Style", "to_code"]

Style = Literal["tree_at", "path", "optax", "stop_gradient", "train_step", "custom_updates"]
STYLES: tuple[Style, ...] = get_args(Style)  # the widget's style selector reads these

_WIDTH = 100  # the repo's ruff line length; emitted code is laid out for it
_INDENT = "    "
_ROOTS = ("m", "float_arrays", "model")  # names the emitted `where` code reads


# -- the decomposition ------------------------------------------------------------------------
class _Plan(NamedTuple):
    """The highest uniform sub-trees of a spec, and which start needs fewer of them changed."""

    spec: FilterSpec
    trainable: list[int]  # node indices, pre-order
    frozen: list[int]

    @property
    def tree(self) -> ModelTree:
        return self.spec.model_tree

    @property
    def start_trainable(self) -> bool:
        # Ties go to the Equinox default (`eqx.is_inexact_array`): it reads as "freeze these".
        return len(self.frozen) <= len(self.trainable)

    @property
    def changed(self) -> list[int]:
        return self.frozen if self.start_trainable else self.trainable


def _plan(spec: FilterSpec) -> _Plan:
    tree = spec.model_tree
    trainable: list[int] = []
    frozen: list[int] = []
    codes = spec.state_codes().tolist()  # every node's state in one pass, as `STATES` codes
    on, off, mixed = (STATES.index(s) for s in (TRAINABLE, FROZEN, MIXED))
    stack = [0]
    while stack:
        node = stack.pop()
        code = codes[node]
        if code == on:
            trainable.append(node)
        elif code == off:
            frozen.append(node)
        elif code == mixed:
            stack.extend(reversed(tree.children[node]))
        # STATIC: no float array below, `False` from either start; never targeted.
    return _Plan(spec, trainable, frozen)


# -- literals and accessors -------------------------------------------------------------------
class _Unwritable(Exception):
    """A node that a `where` function cannot reach; carries the reason."""


def _quoted(body: str, doubles: int, singles: int, prefix: str = "") -> str:
    # ruff's quote rule: double quotes unless that needs more escapes than single quotes.
    quote = "'" if doubles > singles else '"'
    escaped = body.replace(quote, "\\" + quote)
    return f"{prefix}{quote}{escaped}{quote}"


def _literal(key: Any) -> str:
    """Python source for a dict key: a literal that evaluates back to `key`, in ruff's style."""
    if key is None or isinstance(key, bool):
        return repr(key)
    if isinstance(key, int):
        return repr(int(key))
    if isinstance(key, float):
        if not math.isfinite(key):
            raise _Unwritable(f"the dict key {key!r} has no Python literal")
        # float's own repr (numpy's would print `np.float64(...)`); ruff writes 1e16, not 1e+16.
        return float.__repr__(float(key)).replace("e+", "e")
    if isinstance(key, str):
        # repr of one character escapes it (backslash, newline, non-printables) but leaves both
        # quote characters bare; `_quoted` escapes the quote it picks.
        body = "".join(repr(c)[1:-1] for c in key)
        return _quoted(body, key.count('"'), key.count("'"))
    if isinstance(key, bytes):
        body = "".join(repr(bytes([b]))[2:-1] for b in key)
        return _quoted(body, key.count(b'"'), key.count(b"'"), prefix="b")
    if isinstance(key, tuple):
        items = [_literal(k) for k in key]
        return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"
    raise _Unwritable(f"the dict key {key!r} ({type(key).__name__}) has no Python literal")


def _render_keys(keys: tuple, root: str) -> str:
    """`root.blocks[3]["k"]`: Python that follows `keys` from `root`."""
    text = root
    for key in keys:
        if isinstance(key, jtu.GetAttrKey):
            name = key.name
            if name.isidentifier() and not keyword.iskeyword(name):
                text += f".{name}"
            else:
                text = f"getattr({text}, {_literal(name)})"
        elif isinstance(key, jtu.SequenceKey):
            text += f"[{key.idx}]"
        elif isinstance(key, jtu.DictKey):
            text += f"[{_literal(key.key)}]"
        elif isinstance(key, jtu.FlattenedIndexKey):
            raise _Unwritable(
                f"its key `[<flat index {key.key}>]` is a position in a flattened node "
                "(e.g. an `eqx.nn.State`), which Python cannot index"
            )
        else:
            raise _Unwritable(f"its key {key!r} ({type(key).__name__}) has no Python accessor")
    return text


class _Run(NamedTuple):
    """Targets `container[j] + suffix` for a contiguous range of `j`: one comprehension."""

    container: int
    start: int
    stop: int
    suffix: tuple


def _list_ancestor(tree: ModelTree, node: int) -> tuple[int, int] | None:
    """The outermost list/tuple above `node`, and the index of its child on the way down."""
    found = None
    child, parent = node, tree.parent[node]
    while parent >= 0:
        if tree.kind[parent] in (LIST, TUPLE):
            found = (parent, tree.keys[child][-1].idx)
        child, parent = parent, tree.parent[parent]
    return found


def _group(tree: ModelTree, nodes: list[int]) -> list[int | _Run]:
    """`nodes` in order, with 3+ consecutive siblings reached by the same suffix folded."""
    runs: dict[tuple, list[tuple[int, int]]] = {}
    for node in nodes:
        found = _list_ancestor(tree, node)
        if found is not None:
            container, j = found
            suffix = tree.keys[node][len(tree.keys[container]) + 1 :]
            runs.setdefault((container, suffix), []).append((j, node))
    folded: dict[int, _Run] = {}  # first node of a run -> the run
    inside: set[int] = set()  # the run's other nodes
    for (container, suffix), members in runs.items():
        start = 0
        while start < len(members):
            stop = start + 1
            while stop < len(members) and members[stop][0] == members[stop - 1][0] + 1:
                stop += 1
            if stop - start >= 3:
                first, last = members[start][0], members[stop - 1][0]
                folded[members[start][1]] = _Run(container, first, last + 1, suffix)
                inside.update(node for _, node in members[start + 1 : stop])
            start = stop
    return [folded.get(n, n) for n in nodes if n not in inside]


def _loop_name(tree: ModelTree, container: int) -> str:
    """`block` for `m.blocks`: the list's field name without its plural `s`, else `x`."""
    keys = tree.keys[container]
    name = keys[-1].name if keys and isinstance(keys[-1], jtu.GetAttrKey) else ""
    single = name[:-1] if name.endswith("s") else ""
    ok = single.isidentifier() and not keyword.iskeyword(single)
    ok = ok and single not in _ROOTS and single not in ("l", "O", "I")  # E741: ambiguous
    return single if ok else "x"


def _run_expr(tree: ModelTree, run: _Run, root: str) -> str:
    source = _render_keys(tree.keys[run.container], root)
    size = len(tree.children[run.container])
    if (run.start, run.stop) != (0, size):
        lo = "" if run.start == 0 else str(run.start)
        hi = "" if run.stop == size else str(run.stop)
        source += f"[{lo}:{hi}]"
    if not run.suffix:
        return f"*{source}"
    var = _loop_name(tree, run.container)
    return f"*[{_render_keys(run.suffix, var)} for {var} in {source}]"


def _targets(tree: ModelTree, nodes: list[int], root: str) -> Any:
    """What a `where` function returns for `nodes`: one node, or a tuple/list of them."""
    items = [
        _run_expr(tree, item, root)
        if isinstance(item, _Run)
        else _render_keys(tree.keys[item], root)
        for item in _group(tree, nodes)
    ]
    if len(items) == 1:
        # A lone `*[b.attn for b in m.blocks]` is just the list; `*m.blocks[:6]` the slice.
        return items[0].removeprefix("*")
    return _Seq("(", items, ")")


def _unwritable(tree: ModelTree, nodes: list[int]) -> tuple[int, str] | None:
    """The first node a `where` function cannot reach, and why; `None` if all can be."""
    for node in nodes:
        try:
            _render_keys(tree.keys[node], "m")
        except _Unwritable as e:
            return node, str(e)
    return None


def _check_writable(tree: ModelTree, nodes: list[int], style: str, instead: str) -> None:
    failure = _unwritable(tree, nodes)
    if failure is not None:
        node, why = failure
        raise ExplorerError(
            f"style {style!r} cannot write a `where` function reaching `{tree.paths[node]}`: "
            f"{why}. {instead}"
        )


# -- layout -----------------------------------------------------------------------------------
class _Seq(NamedTuple):
    """A bracketed, comma-separated group: one line if it fits, else one item per line."""

    open: str
    items: list  # of str | _Seq | _Arg
    close: str


class _Arg(NamedTuple):
    """`lead` glued to a value that may itself be laid out: `replace=(...)`, `lambda m: (...)`."""

    lead: str
    value: Any


def _flat(x: Any) -> str:
    if isinstance(x, str):
        return x
    if isinstance(x, _Arg):
        return x.lead + _flat(x.value)
    inner = ", ".join(_flat(i) for i in x.items)
    comma = "," if x.open == "(" and len(x.items) == 1 else ""  # a one-element tuple
    return f"{x.open}{inner}{comma}{x.close}"


def _width(text: str) -> int:
    """`text`'s width in columns as ruff measures a line: wide (CJK) characters take two,
    combining marks and format characters none."""
    return sum(
        0
        if unicodedata.category(c) in ("Mn", "Me", "Cf")
        else 2
        if unicodedata.east_asian_width(c) in "WF"
        else 1
        for c in text
    )


def _layout(x: Any, indent: str, lead: str = "", tail: str = "") -> list[str]:
    """Lines of `lead + x + tail` as `ruff format` leaves them.

    A group that does not fit goes one item per line with a trailing comma, which ruff keeps
    (the magic trailing comma) rather than trying other splits.
    """
    if isinstance(x, _Arg):
        return _layout(x.value, indent, lead + x.lead, tail)
    flat = _flat(x)
    if isinstance(x, str) or _width(indent + lead + flat + tail) <= _WIDTH:
        return [f"{indent}{lead}{flat}{tail}"]
    lines = [f"{indent}{lead}{x.open}"]
    for item in x.items:
        lines += _layout(item, indent + _INDENT, "", ",")
    lines.append(f"{indent}{x.close}{tail}")
    return lines


def _statement(x: Any, lead: str = "", indent: str = "") -> str:
    return "\n".join(_layout(x, indent, lead))


# -- the filter_spec block --------------------------------------------------------------------
_IMPORTS = {
    "eqx": "import equinox as eqx",
    "jax": "import jax",
    "jnp": "import jax.numpy as jnp",
    "jtu": "import jax.tree_util as jtu",
    "optax": "import optax",
}

_USE_PATH = 'Use style "path": it matches key paths as text and handles every key.'


def _with_header(plan: _Plan, body: str) -> str:
    """A title comment and the imports `body` uses (read from its names, never its comments)."""
    used = {node.id for node in ast.walk(ast.parse(body)) if isinstance(node, ast.Name)}
    counts = plan.spec.counts
    name = plan.tree.cls[0] if plan.tree.cls[0].isidentifier() else "this model"  # no newlines
    return "\n".join(
        [
            f"# Filter spec for {name}: {counts['trainable_params']:,} of "
            f"{counts['total_params']:,} parameters train. Generated by eqx_explorer.",
            "",
            *(line for name, line in _IMPORTS.items() if name in used),
            "",
            body,
        ]
    )


def _start(start_trainable: bool) -> str:
    if start_trainable:
        return "filter_spec = jtu.tree_map(eqx.is_inexact_array, model)"
    return "filter_spec = jtu.tree_map(lambda _: False, model)"


def _uniform_block(plan: _Plan) -> list[str]:
    if plan.start_trainable:
        note = "# Every float array trains (the Equinox default); ints, functions and flags do not."
    else:
        note = "# Everything is frozen."
    return [note, _start(plan.start_trainable)]


def _tree_at_block(plan: _Plan) -> list[str]:
    if not plan.changed:
        return _uniform_block(plan)
    tree = plan.tree
    where = _Arg("lambda m: ", _targets(tree, plan.changed, "m"))
    if plan.start_trainable:
        lines = [
            "# Start from the Equinox default (every float array trains), then freeze sub-trees.",
            _start(True),
        ]
        replace = _Arg("replace_fn=", "lambda sub: jtu.tree_map(lambda _: False, sub)")
    else:
        lines = [
            "# Start with everything frozen, then train the float arrays of whole sub-trees",
            "# (read from `float_arrays`, so int arrays and functions in them stay False).",
            "float_arrays = jtu.tree_map(eqx.is_inexact_array, model)",
            _start(False),
        ]
        replace = _Arg("replace=", _targets(tree, plan.changed, "float_arrays"))
    call = _Seq("eqx.tree_at(", [where, "filter_spec", replace], ")")
    return [*lines, _statement(call, "filter_spec = ")]


def _path_block(plan: _Plan) -> list[str]:
    if not plan.changed:
        return _uniform_block(plan)
    tree = plan.tree
    if plan.start_trainable:
        name, polarity, test = "FROZEN", "frozen", "prefixes.isdisjoint(FROZEN)"
    else:
        name, polarity, test = "TRAINABLE", "trainable", "not prefixes.isdisjoint(TRAINABLE)"
    listed = _Seq("(", [_literal(jtu.keystr(tree.keys[n])) for n in plan.changed], ")")
    return [
        f"# Sub-trees that are {polarity}, as `jtu.keystr` of their key paths. A leaf is in",
        "# one when its path cut at a key boundary is listed: `.b[1]` never matches `.b[10]`.",
        _statement(listed, f"{name} = "),
        "",
        "",
        "def is_trainable(path, leaf):",
        "    prefixes = {jtu.keystr(path[:n]) for n in range(len(path) + 1)}",
        f"    return eqx.is_inexact_array(leaf) and {test}",
        "",
        "",
        "filter_spec = jtu.tree_map_with_path(is_trainable, model)",
    ]


_SET_INFERENCE = '''

def set_inference(model):
    """`model` with the `inference` flags this spec sets (BatchNorm, Dropout, ...).

    Train and evaluate the model it returns: a frozen BatchNorm still updates its running
    statistics (in `state`) on every step unless it runs in inference mode.
    """'''


def _inference_block(plan: _Plan, by_path: bool = False) -> list[str]:
    """`set_inference(model)` for the spec's inference flags; nothing when it sets none.

    `eqx.tree_at` on the flags (one call per value), or with `by_path` (style "path", or a
    flag no `where` can reach) a table of `jtu.keystr` key paths, which handles every key.
    It comes last in the code: every style's other parts end in a way it can follow.
    """
    overrides = plan.spec.inference_overrides
    if not overrides:
        return []
    tree = plan.tree
    nodes = {on: [tree.find(p) for p, v in overrides.items() if v is on] for on in (True, False)}
    if by_path or _unwritable(tree, nodes[True] + nodes[False]) is not None:
        table = [
            f"{_literal(jtu.keystr(tree.keys[tree.find(p)]))}: {v}" for p, v in overrides.items()
        ]
        return [
            "\n\n# `inference` flags set by the spec, by `jtu.keystr` of their key paths.",
            _statement(_Seq("{", table, "}"), "INFERENCE = "),
            _SET_INFERENCE,
            "    return jtu.tree_map_with_path("
            "lambda path, x: INFERENCE.get(jtu.keystr(path), x), model)",
        ]
    calls = [
        _Seq(
            "eqx.tree_at(",
            [_Arg("lambda m: ", _targets(tree, n, "m")), "model", f"replace_fn=lambda _: {on}"],
            ")",
        )
        for on, n in nodes.items()
        if n
    ]
    body = [_statement(call, "model = ", _INDENT) for call in calls[:-1]]
    return [_SET_INFERENCE, *body, _statement(calls[-1], "return ", _INDENT)]


def _spec_block(plan: _Plan) -> list[str]:
    """`tree_at` when every changed sub-tree can be reached by a `where`, else `path`."""
    if _unwritable(plan.tree, plan.changed) is not None:
        return _path_block(plan)
    return _tree_at_block(plan)


# -- learning-rate groups ---------------------------------------------------------------------
def _has_groups(spec: FilterSpec) -> bool:
    return bool((spec.lr_factors[spec.mask] != 1).any())


def _factor_nodes(spec: FilterSpec) -> list[tuple[int, float]]:
    """The highest sub-trees whose trainable leaves share one factor other than 1, pre-order."""
    tree = spec.model_tree
    factors = np.where(spec.mask, spec.lr_factors, np.nan)  # NaN: no factor to write
    found = []
    stack = [0]
    while stack:
        node = stack.pop()
        part = factors[tree.lo[node] : tree.hi[node]]
        part = part[~np.isnan(part)]
        if not len(part):
            continue  # nothing trains below: factor 0 from `filter_spec`
        if part.min() == part.max():
            if part[0] != 1:
                found.append((node, float(part[0])))
            continue
        stack.extend(reversed(tree.children[node]))
    return found


_WITH_LR_FACTORS = '''

def lr_factor(path, trainable):
    prefixes = [jtu.keystr(path[:n]) for n in range(len(path) + 1)]
    listed = [LR_FACTORS[p] for p in prefixes if p in LR_FACTORS]
    # Listed sub-trees never nest; were they edited to, the deepest one would win.
    return (listed[-1] if listed else 1.0) if trainable else 0.0


lr_factors = jtu.tree_map_with_path(lr_factor, filter_spec)


def with_lr_factors(optimizer):
    """`optimizer`, then each leaf's update scaled by its factor: one optimizer state.

    The step of PyTorch parameter groups at `lr * factor` for adam, adamw (its weight decay
    scales with the rate too) and sgd with momentum; clipping by global norm inside
    `optimizer` sees every parameter at once, as `clip_grad_norm_` does.
    """
    groups = jtu.tree_map(lambda f: f"lr*{f}" if f else "frozen", lr_factors)
    scales = {f"lr*{f}": optax.scale(f) for f in set(jtu.tree_leaves(lr_factors)) if f}
    return optax.chain(
        optimizer,
        optax.partition({**scales, "frozen": optax.set_to_zero()}, lambda _: groups),
    )'''


def _groups_block(plan: _Plan) -> list[str]:
    """`LR_FACTORS` by key path, the `lr_factors` tree and `with_lr_factors(optimizer)`."""
    tree = plan.tree
    table = _Seq(
        "{",
        [
            f"{_literal(jtu.keystr(tree.keys[n]))}: {_literal(f)}"
            for n, f in _factor_nodes(plan.spec)
        ],
        "}",
    )
    return [
        "",
        "# Learning-rate groups: each trainable leaf's update is scaled by its factor, as in",
        "# PyTorch parameter groups with `lr * factor`. Factors of sub-trees by `jtu.keystr` of",
        "# their key paths; other trainable leaves have factor 1, frozen leaves 0.",
        _statement(table, "LR_FACTORS = "),
        _WITH_LR_FACTORS,
    ]


def _groups_note(spec: FilterSpec) -> list[str]:
    """The warning on styles that write on/off only, for a spec with groups."""
    groups = spec.counts["lr_groups"]
    return [
        f"# NOTE: this spec trains {len(groups)} learning-rate group(s) (factors "
        f"{min(groups):.4g} to {max(groups):.4g}),",
        '# which this style, on/off only, does not write: export with style "optax" or',
        '# "train_step" to train them.',
        "",
    ]


# -- styles -------------------------------------------------------------------------------------
# Fixed parts of the emitted code, exactly as they appear in it.

_OPTAX = '''
# Polarity: `filter_spec` says True = trainable (Equinox); `optax.freeze` masks say
# True = frozen. Named labels cannot be read the wrong way round.
labels = jtu.tree_map(lambda t: "trainable" if t else "frozen", filter_spec)


def make_optimizer(inner):
    """`inner` on trainable leaves; frozen leaves never move and hold no optimizer state.

    Initialise with `optimizer.init(eqx.filter(model, eqx.is_inexact_array))`.
    """
    # `optax.set_to_zero()` is stateless: frozen leaves get no Adam moments, so neither
    # momentum nor weight decay can move them. `optax.masked(inner, mask)` alone is not a
    # freeze: it passes masked-out leaves their raw gradient as the update.
    # `lambda _: labels`: optax calls a callable `labels`, and an Equinox module is one.
'''

_OPTAX_RETURN = """\
    return optax.partition({"trainable": inner, "frozen": optax.set_to_zero()}, lambda _: labels)"""

_OPTAX_RETURN_GROUPS = """\
    frozen_apart = optax.partition(
        {"trainable": inner, "frozen": optax.set_to_zero()}, lambda _: labels
    )
    return with_lr_factors(frozen_apart)"""

_STOP_GRADIENT = '''

def _stop_gradient(x):
    # Only float arrays carry gradients; int arrays, functions and flags pass through.
    return jax.lax.stop_gradient(x) if eqx.is_inexact_array(x) else x


def apply_freeze(model):
    """Call inside the loss, on every step: frozen leaves then get zero gradients.

    Zero gradients are not a freeze: weight decay (e.g. `optax.adamw`) and momentum
    from earlier steps still move these leaves. `stop_gradient` applied once at
    initialisation, outside the loss, does nothing. To keep leaves fixed, train only
    `eqx.partition(model, filter_spec)[0]` (style "train_step").
    """
'''

# `{groups}`: `_GROUPS` when the spec has learning-rate groups, else nothing.
_INIT_OPT_STATE = """

def init_opt_state(optimizer, model):
{groups}    # Exactly the part that gets gradients, by the same filter_spec as the step. (Built
    # with `eqx.is_array`, int arrays would get state but no gradient: a structure error.)
    params, _ = eqx.partition(model, filter_spec)
    return optimizer.init(params)"""

_GROUPS = "    optimizer = with_lr_factors(optimizer)  # the spec's learning-rate groups\n"

# `{prepare}`: `_PREPARE` when the spec sets inference flags, else nothing.
_MAKE_TRAIN_STEP = '''

def make_train_step(loss_fn, optimizer):
    """`step(model, opt_state, batch) -> (model, opt_state, loss)` training `filter_spec`."""
{groups}
    @eqx.filter_jit
    def _step(params, static, opt_state, batch):
        def loss_of(trainable):
            return loss_fn(eqx.combine(trainable, static), batch)

        loss, grads = eqx.filter_value_and_grad(loss_of)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        # Onto the whole trainable part: `static` keeps frozen arrays, ints, functions
        # and flags as they are, so none of them comes back as None.
        params = eqx.apply_updates(params, updates)
        return params, opt_state, loss

    def step(model, opt_state, batch):
{prepare}        # Split outside the jit, reading `filter_spec` on every call: a spec captured
        # inside a jitted function goes stale when it changes. (A new spec also needs a
        # new `init_opt_state`.)
        params, static = eqx.partition(model, filter_spec)
        params, opt_state, loss = _step(params, static, opt_state, batch)
        return eqx.combine(params, static), opt_state, loss

    return step'''

# For a model made with `eqx.nn.make_with_state`: its state goes in and out of every step.
_MAKE_STATEFUL_TRAIN_STEP = '''

def make_train_step(loss_fn, optimizer):
    """`step(model, state, opt_state, batch) -> (model, state, opt_state, loss)`.

    Trains `filter_spec` with `loss_fn(model, state, batch) -> (loss, new_state)`, where
    `state` is the `eqx.nn.State` of `eqx.nn.make_with_state` (e.g. BatchNorm statistics).
    """
{groups}
    @eqx.filter_jit
    def _step(params, static, state, opt_state, batch):
        def loss_of(trainable):
            return loss_fn(eqx.combine(trainable, static), state, batch)

        # `has_aux`: the new state comes out beside the loss and is never differentiated.
        (loss, state), grads = eqx.filter_value_and_grad(loss_of, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        # Onto the whole trainable part: `static` keeps frozen arrays, ints, functions
        # and flags as they are, so none of them comes back as None.
        params = eqx.apply_updates(params, updates)
        return params, state, opt_state, loss

    def step(model, state, opt_state, batch):
{prepare}        # Split outside the jit, reading `filter_spec` on every call: a spec captured
        # inside a jitted function goes stale when it changes. (A new spec also needs a
        # new `init_opt_state`.)
        params, static = eqx.partition(model, filter_spec)
        params, state, opt_state, loss = _step(params, static, state, opt_state, batch)
        return eqx.combine(params, static), state, opt_state, loss

    return step'''

_PREPARE = "        model = set_inference(model)  # the spec's inference flags, on every call\n"

_NO_WHERE = (
    'Use style "train_step" or "optax": they freeze through `filter_spec`, which they write '
    'with key paths (as style "path" does) when a `where` cannot reach a sub-tree.'
)


def _tree_at(plan: _Plan) -> list[str]:
    _check_writable(plan.tree, plan.changed, "tree_at", _USE_PATH)
    return _tree_at_block(plan)


def _path(plan: _Plan) -> list[str]:
    return _path_block(plan)


def _optax(plan: _Plan) -> list[str]:
    if _has_groups(plan.spec):
        # "": two blank lines after `with_lr_factors`, as ruff puts them after a function.
        return [*_spec_block(plan), *_groups_block(plan), "", _OPTAX + _OPTAX_RETURN_GROUPS]
    return [*_spec_block(plan), _OPTAX + _OPTAX_RETURN]


def _apply_freeze_body(plan: _Plan) -> str:
    if not plan.frozen:
        return "    return model  # nothing is frozen"
    if plan.frozen == [0]:
        return "    return jtu.tree_map(_stop_gradient, model)"
    where = _Arg("lambda m: ", _targets(plan.tree, plan.frozen, "m"))
    replace = _Arg("replace_fn=", "lambda sub: jtu.tree_map(_stop_gradient, sub)")
    return _statement(_Seq("eqx.tree_at(", [where, "model", replace], ")"), "return ", _INDENT)


def _stop_gradient(plan: _Plan) -> list[str]:
    _check_writable(plan.tree, plan.frozen + plan.changed, "stop_gradient", _NO_WHERE)
    return [
        *_tree_at_block(plan),
        _STOP_GRADIENT + _apply_freeze_body(plan),
    ]


def _train_step(plan: _Plan) -> list[str]:
    spec = plan.spec
    make = _MAKE_STATEFUL_TRAIN_STEP if has_state(spec.model) else _MAKE_TRAIN_STEP
    prepare = _PREPARE if spec.inference_overrides else ""
    if _has_groups(spec):
        return [
            *_spec_block(plan),
            *_groups_block(plan),
            _INIT_OPT_STATE.format(groups=_GROUPS),
            make.format(prepare=prepare, groups=_GROUPS),
        ]
    return [
        *_spec_block(plan),
        _INIT_OPT_STATE.format(groups=""),
        make.format(prepare=prepare, groups=""),
    ]


# -- custom update rules ----------------------------------------------------------------------
_RULE_BRANCHES = {
    "positive": """\
    if rule == "positive":  # trained as log p: can never cross zero
        return p * jnp.exp(u)""",
    "orthogonal": """\
    if rule == "orthogonal":  # QR retraction back onto orthogonal matrices
        return retract(p + u)""",
    "unit_norm": """\
    if rule == "unit_norm":
        new = p + u
        return new / jnp.linalg.norm(new)""",
    "interval": """\
    if isinstance(rule, tuple) and rule[0] == "interval":
        return jnp.clip(p + u, rule[1], rule[2])""",
}

# The library's own retraction, so the exported code and StepRunner agree exactly.
_RETRACT = "\n\n" + inspect.getsource(retract).rstrip()

_CONSTRAIN_GRADS = '''

def constrain_grads(params, grads):
    """Gradients as the optimizer must see them: `g * p` for positive (log p) leaves."""

    def grad(path, p, g):
        if p is None or g is None or RULES.get(jtu.keystr(path)) != "positive":
            return g
        return g * p

    return jtu.tree_map_with_path(grad, params, grads, is_leaf=lambda x: x is None)'''

_APPLY_UPDATES = '''

def apply_updates(params, updates):
    """`eqx.apply_updates` with each constrained leaf kept valid by its rule.

    Use in place of `eqx.apply_updates` (after `grads = constrain_grads(params, grads)` and
    `optimizer.update`). A None update keeps its leaf, so non-array leaves survive.
    """

    def update(path, p, u):
        if u is None or p is None:
            return p
        rule = RULES.get(jtu.keystr(path))
{branches}
        return p + u

    return jtu.tree_map_with_path(update, params, updates, is_leaf=lambda x: x is None)'''


_NO_RULES = """

# No leaf has an update rule (FilterSpec.constrain): updates are plain additions.


def constrain_grads(params, grads):
    return grads


apply_updates = eqx.apply_updates"""


def _bound(x: float) -> str:
    # An open side of an interval is +-inf, which has no literal.
    if math.isinf(x):
        return 'float("inf")' if x > 0 else '-float("inf")'
    return repr(float(x))


def _custom_updates(plan: _Plan) -> list[str]:
    rules = plan.spec.constraints
    custom = [p for p, r in rules.items() if r.name == "custom"]
    if custom:
        raise ExplorerError(
            f"the rule on `{custom[0]}` is a Python function, which cannot be written as code; "
            "use a built-in rule (positive, orthogonal, unit_norm, interval) or export with "
            'style "train_step" and call your function in place of `eqx.apply_updates`'
        )
    items = []
    for path, rule in rules.items():
        keystr = jtu.keystr(plan.tree.keys[plan.tree.find(path)])
        if rule.name == "interval":
            value = f'("interval", {_bound(rule.lo)}, {_bound(rule.hi)})'
        else:
            value = _literal(rule.name)
        items.append(f"{_INDENT}{_literal(keystr)}: {value},")
    if not items:
        return [*_spec_block(plan), _NO_RULES]
    table = "\n".join(["", "# Update rules by key path (`jtu.keystr`).", "RULES = {", *items, "}"])
    used = sorted({r.name for r in rules.values()}, key=list(_RULE_BRANCHES).index)
    branches = "\n".join(
        "\n".join(_INDENT + line for line in _RULE_BRANCHES[name].splitlines()) for name in used
    )
    parts = [*_spec_block(plan), table]
    if "orthogonal" in used:
        parts.append(_RETRACT)
    parts += [_CONSTRAIN_GRADS, _APPLY_UPDATES.format(branches=branches)]
    return parts


_RENDERERS: dict[Style, Callable[[_Plan], list[str]]] = {
    "tree_at": _tree_at,
    "path": _path,
    "optax": _optax,
    "stop_gradient": _stop_gradient,
    "train_step": _train_step,
    "custom_updates": _custom_updates,
}


def to_code(spec: FilterSpec, style: Style = "tree_at") -> str:
    """Python source that rebuilds `spec` from a variable `model`, written in `style`.

    Every style defines `filter_spec` (Python bools, the model's structure); `optax` adds
    `labels` and `make_optimizer(inner)`, `stop_gradient` adds `apply_freeze(model)`,
    `train_step` adds `init_opt_state(optimizer, model)` and `make_train_step(loss_fn, optimizer)`,
    `custom_updates` adds `RULES`, `constrain_grads(params, grads)` and
    `apply_updates(params, updates)` for the spec's update rules (`FilterSpec.constrain`).

    A spec that sets layers' inference flags (`FilterSpec.inference`) ends, in every style,
    with `set_inference(model)`; the `train_step` step calls it on every call.
    A spec with learning-rate groups (a trainable factor other than 1, `FilterSpec.scale_lr`)
    adds, in `optax` and `train_step`, `LR_FACTORS`, the `lr_factors` tree and
    `with_lr_factors(optimizer)` (which `make_optimizer`, `init_opt_state` and
    `make_train_step` apply); the on/off styles start with a comment saying they leave the
    groups out.
    For a stateful model (`eqx.nn.make_with_state`) `train_step` threads the state:
    `step(model, state, opt_state, batch) -> (model, state, opt_state, loss)` with
    `loss_fn(model, state, batch) -> (loss, new_state)`.
    """
    if style not in _RENDERERS:
        raise ExplorerError(
            f"unknown code style {style!r}; choose one of {', '.join(map(repr, STYLES))}"
        )
    plan = _plan(spec)
    parts = [*_RENDERERS[style](plan), *_inference_block(plan, by_path=style == "path")]
    if style not in ("optax", "train_step") and _has_groups(spec):
        parts = [*_groups_note(spec), *parts]
    return _with_header(plan, "\n".join(parts)) + "\n"
