"""Every public entry point either works or raises `ExplorerError` naming the argument or path,
what was expected and a fix; long input is quoted shortened; the model is never changed.

One table of bad inputs (the widget's page messages are in test_widget_inputs.py, the CLI's
arguments in test_cli.py), then the inputs that used to be misread and now get a true answer.
"""

import enum
import functools
import json
import re
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import eqx_explorer as ex
from eqx_explorer import ExplorerError, FilterSpec, ModelTree, parse_path, summary
from eqx_explorer._constraints import make_rule
from eqx_explorer._paths import MAX_PATH_CHARS, format_path
from eqx_explorer._select import _wildcard


class Net(eqx.Module):
    layers: list
    table: dict
    none: Any
    act: Callable
    step: jax.Array


def make_net() -> Net:
    keys = jax.random.split(jax.random.key(0))
    return Net(
        layers=[eqx.nn.Linear(2, 3, key=keys[0]), eqx.nn.Linear(3, 1, key=keys[1])],
        table={"it's": jnp.ones(2)},
        none=None,
        act=jax.nn.relu,
        step=jnp.zeros((), jnp.int32),
    )


def mse(model, batch):
    x, y = batch
    return jnp.mean((jax.vmap(lambda v: model.layers[1](model.layers[0](v)))(x) - y) ** 2)


BATCH = (jnp.ones((4, 2)), jnp.zeros((4, 1)))
SAVED = FilterSpec(make_net()).freeze("layers[0]").to_json()
DOC = json.loads(SAVED)


def saved(**changes) -> str:
    """The saved spec with some fields replaced (None: removed)."""
    doc = {**DOC, **changes}
    return json.dumps({k: v for k, v in doc.items() if v is not None})


class Truthy:
    def __bool__(self):
        raise RuntimeError("no truth")


def spec_of(m):
    return FilterSpec(m)


HUGE = "layers" + "[0]" * (MAX_PATH_CHARS // 3 + 1)
# Bad path text, and what the message must say about it.
BAD_PATHS = [
    ("layers" + "[0]" * 3000, r"no node at path `layers\[0\]\[0\]\[0\].*…\(9,006 characters\)`"),
    (HUGE, r"more than the 10,000 a path may have"),
    ("*" * 1_000_000, r"1,000,000 characters, more than the 10,000"),
    ("a*" * 500_000, r"1,000,000 characters"),
    ("x" * 1_000_000, r"1,000,000 characters"),
    ("layers[" + "9" * 5000 + "]", r"5,000-digit number"),
    ("layers[99999999999999999999]", r"no node at path `layers\[99999999999999999999\]`"),
    ("layers[" + "-" * 100_000 + "1]", r"more than the 10,000"),
    ("layers[" + "-" * 1000 + "1]", r"not a literal key"),
    ("layers[" + "(" * 1000 + ")" * 1000 + "]", r"nest at most 32 deep"),
    ("..layers", r"position 1.*must be followed by a field name"),
    ("layers.[0]", r"position 7"),
    ("layers.", r"ends with `\.`"),
    ("layers[0", r"unbalanced `\[`"),
    ("table['it's]", r"position 10.*unexpected text after the key"),
    ("table[__import__('os').system('echo hacked')]", r"not a literal key"),
    ("layers[0] weight", r"unexpected character"),
    ("layers[1, 2]", r"one key per `\[\.\.\.\]`"),
    ("layers[<flat index 99999999999>]", r"larger than any index"),
    ("lyers", r"no node at path `lyers`.*Closest existing paths: `layers`"),
]
PATH_ENTRY_POINTS = {
    "freeze": lambda p, m: spec_of(m).freeze(p),
    "unfreeze": lambda p, m: spec_of(m).unfreeze(p),
    "state": lambda p, m: spec_of(m).state(p),
    "constrain": lambda p, m: spec_of(m).constrain(p, "unit_norm"),
    "find": lambda p, m: ModelTree(m).find(p),
    "parse_path": lambda p, m: parse_path(p),
}

CASES: list[tuple[str, Callable, str]] = [
    (f"{name}-path{i}", functools.partial(f, p), expected)
    for name, f in PATH_ENTRY_POINTS.items()
    for i, (p, expected) in enumerate(BAD_PATHS)
    # parse_path reads text only: an unknown key is not its concern.
    if not (name == "parse_path" and expected.startswith("no node"))
]
CASES += [
    # -- targets ------------------------------------------------------------------------
    (
        "target-foreign-module",
        lambda m: spec_of(m).freeze(eqx.nn.Identity()),
        r"Identity.*not part of this model",
    ),
    (
        "target-foreign-array",
        lambda m: spec_of(m).freeze(jnp.ones(3)),
        r"not part of this model.*layers\[0\]",
    ),
    ("target-int", lambda m: spec_of(m).freeze(3), r"cannot select with 3 \(int\)"),
    ("target-none", lambda m: spec_of(m).freeze(None), r"cannot select with None"),
    ("target-bytes", lambda m: spec_of(m).freeze(b"layers"), r"cannot select with b'layers'"),
    ("target-empty-list", lambda m: spec_of(m).freeze([]), r"empty list of targets"),
    ("target-no-args", lambda m: spec_of(m).freeze(), r"at least one target"),
    (
        "target-none-constrain",
        lambda m: spec_of(m).constrain("none", "positive"),
        r"`none` is None \(an empty field\): nothing to constrain \(`none` selects no leaves\)",
    ),
    (
        "target-none-unfreeze",
        lambda m: spec_of(m).unfreeze("none"),
        r"`none` is None \(an empty field\): nothing to unfreeze",
    ),
    (
        "target-none-freeze",
        lambda m: spec_of(m).freeze("none"),
        r"`none` is None \(an empty field\): nothing to freeze.*e\.g\. `layers`",
    ),
    (
        "target-none-in-list",
        lambda m: spec_of(m).freeze(["layers[0]", "none"]),
        r"`none` is None \(an empty field\): nothing to freeze",
    ),
    (
        "target-none-scale_lr",
        lambda m: spec_of(m).scale_lr("none", 0.5),
        r"`none` is None \(an empty field\): nothing to scale",
    ),
    (
        "target-none-inference",
        lambda m: spec_of(m).inference("none"),
        r"`none` is None \(an empty field\): nothing to set to inference mode",
    ),
    (
        "target-empty-glob-freeze",
        lambda m: spec_of(m).freeze("non*"),
        r"`none` is None \(an empty field\): nothing to freeze \(`non\*` selects no leaves\)",
    ),
    ("target-int-array", lambda m: spec_of(m).unfreeze("step"), r"cannot unfreeze `step`.*int32"),
    (
        "target-glob-none",
        lambda m: spec_of(m).freeze("layers[*].conv"),
        r"glob `layers\[\*\]\.conv` matches no node",
    ),
    ("target-glob-as-node", lambda m: ModelTree(m).find("layers[*]"), r"`layers\[\*\]` is a glob"),
    (
        "target-key-glob-as-node",
        lambda m: ModelTree(m).find("lay*"),
        r"`lay\*` is a glob.*accepted by freeze/unfreeze/select, e\.g\. spec\.freeze\('lay\*'\)",
    ),
    (
        "target-key-glob-state",
        lambda m: spec_of(m).state("layers[0].w*"),
        r"`layers\[0\]\.w\*` is a glob.*accepted by freeze",
    ),
    ("target-class-absent", lambda m: spec_of(m).freeze(eqx.nn.Conv2d), r"no node of class Conv2d"),
    (
        "target-three-args",
        lambda m: spec_of(m).freeze(lambda a, b, c: True),
        r"one parameter.*or a predicate with two",
    ),
    (
        "where-raises",
        lambda m: spec_of(m).freeze(lambda x: x.ndim == 2),
        r"`where` function.*AttributeError.*two parameters",
    ),
    (
        "where-computes",
        lambda m: spec_of(m).freeze(lambda m_: m_.layers[0].weight + 1),
        r"`where` function.*failed",
    ),
    ("where-static", lambda m: spec_of(m).freeze(lambda m_: 3), r"returned 3, which is not part"),
    (
        "where-none",
        lambda m: spec_of(m).freeze(lambda m_: m_.none),
        r"selects no leaves \(it returned None\)",
    ),
    (
        "predicate-str",
        lambda m: spec_of(m).freeze(lambda p, x: "no"),
        r"returned 'no' \(str\) at leaf `layers\[0\]\.weight`",
    ),
    (
        "predicate-none",
        lambda m: spec_of(m).freeze(lambda p, x: None),
        r"returned None \(NoneType\).*True or False",
    ),
    (
        "predicate-array",
        lambda m: spec_of(m).freeze(lambda p, x: jnp.ones(2)),
        r"returned Array.*at leaf",
    ),
    (
        "predicate-bool-raises",
        lambda m: spec_of(m).freeze(lambda p, x: Truthy()),
        r"returned .*Truthy",
    ),
    (
        "predicate-raises",
        lambda m: spec_of(m).freeze(lambda p, x: x.ndim == 2),
        r"raised AttributeError.*at leaf `act`",
    ),
    ("predicate-int", lambda m: spec_of(m).freeze(lambda p, x: 1), r"returned 1 \(int\)"),
    # -- update rules -------------------------------------------------------------------
    (
        "rule-str-bound",
        lambda m: spec_of(m).constrain("table", ("interval", "a", 1)),
        r"lo bound must be a real number.*'a'",
    ),
    ("rule-bool-bound", lambda m: make_rule(("interval", 0, True)), r"hi bound .*True"),
    (
        "rule-huge-bound",
        lambda m: make_rule(("interval", 10**400, 1)),
        r"lo bound .*…\(401 characters\)",
    ),
    ("rule-nan-bound", lambda m: make_rule(("interval", float("nan"), 1)), r"lo bound .*nan"),
    ("rule-order", lambda m: make_rule(("interval", 2, 1)), r"needs lo < hi"),
    (
        "rule-unknown",
        lambda m: spec_of(m).constrain("table", "x" * 500),
        r"unknown update rule 'x+…\(502 characters\)",
    ),
    ("rule-list", lambda m: spec_of(m).constrain("table", ["x"]), r"unknown update rule \['x'\]"),
    (
        "rule-positive-values",
        lambda m: spec_of(m).constrain("layers[0].weight", "positive"),
        r"`layers\[0\]\.weight` has values <= 0",
    ),
    (
        "rule-orthogonal-vector",
        lambda m: spec_of(m).constrain("table", "orthogonal"),
        r"`table\[\"it's\"\]` has shape \(2,\)",
    ),
    ("rule-on-int", lambda m: spec_of(m).constrain("step", "positive"), r"cannot constrain `step`"),
    # -- saved specs (JSON) ---------------------------------------------------------------
    (
        "json-none",
        lambda m: FilterSpec.from_json(m, None),
        r"from_json takes the text.*got NoneType",
    ),
    ("json-dict", lambda m: FilterSpec.from_json(m, DOC), r"got dict; for a dict, pass json.dumps"),
    ("json-empty", lambda m: FilterSpec.from_json(m, ""), r"not valid JSON"),
    ("json-list", lambda m: FilterSpec.from_json(m, "[]"), r"not a saved FilterSpec"),
    ("json-nan", lambda m: FilterSpec.from_json(m, "NaN"), r"holds NaN, which is not strict JSON"),
    (
        "json-infinity",
        lambda m: FilterSpec.from_json(
            m, saved(version=1).replace('"version": 1', '"version": Infinity')
        ),
        r"holds Infinity",
    ),
    (
        "json-deep",
        lambda m: FilterSpec.from_json(m, "[" * 100_000 + "]" * 100_000),
        r"not valid JSON \(RecursionError",
    ),
    (
        "json-long-number",
        lambda m: FilterSpec.from_json(m, "1" * 5000),
        r"not valid JSON \(ValueError: Exceeds the limit",
    ),
    (
        "json-trainable-int",
        lambda m: FilterSpec.from_json(m, saved(trainable=12345)),
        r"`trainable` is 12345; it must be a list of path strings",
    ),
    (
        "json-trainable-nested",
        lambda m: FilterSpec.from_json(m, saved(trainable=[["layers[1].weight"]])),
        r"`trainable` is \[\['layers",
    ),
    (
        "json-frozen-missing",
        lambda m: FilterSpec.from_json(m, saved(frozen=None)),
        r"`frozen` is None",
    ),
    (
        "json-constraints-list",
        lambda m: FilterSpec.from_json(m, saved(constraints=["x"])),
        r"`constraints` is \['x'\]; it must map paths",
    ),
    (
        "json-constraints-bad-rule",
        lambda m: FilterSpec.from_json(m, saved(constraints={'table["it\'s"]': 5})),
        r"`constraints` is .*5",
    ),
    (
        "json-inference-int",
        lambda m: FilterSpec.from_json(m, saved(inference={"x": 1})),
        r"`inference` is \{'x': 1\}; it must map paths to true/false",
    ),
    (
        "json-version",
        lambda m: FilterSpec.from_json(m, saved(version=999)),
        r"version 999; this eqx_explorer reads version 1",
    ),
    (
        "json-version-str",
        lambda m: FilterSpec.from_json(m, saved(version="1")),
        r"`version` is '1'; it must be 1",
    ),
    (
        "json-unknown-field",
        lambda m: FilterSpec.from_json(m, saved(extra=1)),
        r"unknown field\(s\) 'extra'",
    ),
    (
        "json-twice",
        lambda m: FilterSpec.from_json(m, saved(frozen=DOC["frozen"] + DOC["trainable"][:1])),
        r"lists `layers\[1\]\.weight` twice",
    ),
    (
        "json-gone-path",
        lambda m: FilterSpec.from_json(m, saved(trainable=DOC["trainable"] + ["ghost"])),
        r"structure changed.*`ghost`",
    ),
    (
        "json-format",
        lambda m: FilterSpec.from_json(m, saved(format="other")),
        r"not a saved FilterSpec",
    ),
    # -- hand-written filter specs ----------------------------------------------------------
    (
        "from_tree-raises",
        lambda m: FilterSpec.from_tree(m, lambda x: 1 / 0),
        r"raised ZeroDivisionError.*leaf at `layers\[0\]\.weight`",
    ),
    ("from_tree-str", lambda m: FilterSpec.from_tree(m, "no"), r"holds 'no' \(str\) at the root"),
    (
        "from_tree-str-inside",
        lambda m: FilterSpec.from_tree(m, jtu.tree_map(lambda _: "yes", m)),
        r"holds 'yes' \(str\) at `layers\[0\]\.weight`",
    ),
    (
        "from_tree-returns-str",
        lambda m: FilterSpec.from_tree(m, lambda x: "yes"),
        r"returned 'yes' on the leaf at `layers\[0\]\.weight`",
    ),
    (
        "from_tree-not-prefix",
        lambda m: FilterSpec.from_tree(m, [True, False]),
        r"not a prefix of the model's structure",
    ),
    # -- models, trees, specs ---------------------------------------------------------------
    (
        "model-mixed-keys",
        lambda m: FilterSpec({1: jnp.ones(1), "a": jnp.ones(1)}),
        r"JAX cannot flatten this dict.*sortable",
    ),
    (
        "model-cyclic",
        lambda m: ModelTree((lambda c: (c.append(c), c)[1])([jnp.ones(1)])),
        r"RecursionError.*no container inside itself",
    ),
    (
        "model-too-deep",
        lambda m: ModelTree(functools.reduce(lambda t, _: [t], range(5000), jnp.ones(1))),
        r"RecursionError.*fewer nested levels than Python's recursion limit",
    ),
    (
        "node-out-of-range",
        lambda m: ModelTree(m).node(999),
        r"node index 999 is out of range: this tree has \d+ nodes",
    ),
    ("node-negative", lambda m: ModelTree(m).node(-1), r"node index -1 is out of range"),
    (
        "node-str",
        lambda m: ModelTree(m).node("layers"),
        r"node\(index\) takes an int node index, got str",
    ),
    ("set_mask-shape", lambda m: spec_of(m).set_mask([True]), r"mask has shape \(1,\)"),
    ("set_mask-floats", lambda m: spec_of(m).set_mask(np.full(8, 0.5)), r"takes a bool array"),
    ("set_mask-ragged", lambda m: spec_of(m).set_mask([[1], [1, 2]]), r"got \[\[1\], \[1, 2\]\]"),
    ("set_mask-str", lambda m: spec_of(m).set_mask("abc"), r"over the model's \d+ leaves"),
    (
        "set_mask-int-leaf",
        lambda m: spec_of(m).set_mask(np.ones(spec_of(m).mask.shape, bool)),
        r"leaf `act` cannot be trainable: it is relu",
    ),
    (
        "inference-no-layer",
        lambda m: spec_of(m).inference("layers"),
        r"`layers` has no layer with an `inference` field",
    ),
    (
        "inference-on-str",
        lambda m: spec_of(m).inference("layers", on="yes"),
        r"on=\) takes True or False",
    ),
    (
        "for_model-other",
        lambda m: spec_of(m).for_model(eqx.nn.Linear(2, 2, key=jax.random.key(1))),
        r"another structure \(\d+ leaves there, 2 here; "
        r"leaf 0 is `layers\[0\]\.weight` there, `weight` here\)",
    ),
    (
        "for_model-dtype",
        lambda m: spec_of(m).for_model(eqx.tree_at(lambda n: n.table["it's"], m, jnp.ones(2, int))),
        r"whose `table\[\"it's\"\]` is float32\[2\]; here it is int32\[2\]",
    ),
    (
        "to_code-list",
        lambda m: spec_of(m).to_code(["tree_at"]),
        r"unknown code style \['tree_at'\] \(list\)",
    ),
    (
        "to_code-unknown",
        lambda m: spec_of(m).to_code("x" * 10_000),
        r"unknown code style 'x+…\(10,002 characters\) \(str\)",
    ),
    (
        "where-default-arg",
        lambda m: spec_of(m).freeze(lambda m_, k=1: m_.layers[0].weight.T),
        r"`where` function.*failed",
    ),
    (
        "summary-spec-str",
        lambda m: summary(m, "x"),
        r"summary\(model, spec\) takes a FilterSpec \(or None\), got str",
    ),
    (
        "summary-max-rows-str",
        lambda m: summary(m, max_rows="5"),
        r"max_rows=\) takes a positive int, got '5'",
    ),
    ("summary-max-rows-negative", lambda m: summary(m, max_rows=-5), r"got -5"),
    ("summary-max-rows-bool", lambda m: summary(m, max_rows=True), r"got True"),
    ("format_path-str", lambda m: format_path("layers"), r"takes a key path .*got str"),
    ("format_path-not-keys", lambda m: format_path(("layers",)), r"'layers' \(str\) is not a key"),
    # -- runner arguments -------------------------------------------------------------------
    (
        "audit_step-not-callable",
        lambda m: ex.audit_step("train_step", m),
        r"takes your step function first, got str",
    ),
    (
        "runner-optimizer-str",
        lambda m: ex.StepRunner(m, spec_of(m), mse, BATCH, optimizer="adam"),
        r"optimizer must be an optax GradientTransformation.*got str",
    ),
    (
        "runner-method",
        lambda m: ex.StepRunner(m, spec_of(m), mse, BATCH, method="magic"),
        r"unknown method 'magic'",
    ),
    ("runner-spec-str", lambda m: ex.StepRunner(m, "frozen", mse, BATCH), r"FilterSpec"),
    (
        "explorer-optimizer-str",
        lambda m: ex.Explorer(m, optimizer="adam"),
        r"optimizer must be an optax GradientTransformation.*got str",
    ),
    ("explorer-loss-str", lambda m: ex.Explorer(m, loss_fn="mse"), r"loss_fn must be a function"),
    ("explorer-optimizer-module", lambda m: ex.Explorer(m, optimizer=optax), r"got module"),
]


def snapshot(model):
    leaves = jtu.tree_leaves(model)
    return leaves, [np.array(x) if eqx.is_array(x) else x for x in leaves]


@pytest.fixture(scope="module")
def net():
    return make_net()


def test_the_table_covers_at_least_100_inputs_across_the_entry_points():
    assert len(CASES) >= 100
    assert len({name for name, _, _ in CASES}) == len(CASES)


@pytest.mark.parametrize(("name", "call", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_a_short_explorer_error_naming_it_and_keeps_the_model(
    net, name, call, expected
):
    leaves, values = snapshot(net)
    with pytest.raises(ExplorerError) as info:
        call(net)
    message = str(info.value)
    assert re.search(expected, message, re.S), message
    assert len(message) < 1_000  # long input is quoted shortened
    after = jtu.tree_leaves(net)
    assert all(a is b for a, b in zip(after, leaves, strict=True))
    for a, v in zip(after, values, strict=True):
        assert np.array_equal(a, v) if eqx.is_array(a) else a is v


def test_no_path_text_is_evaluated(capfd):
    with pytest.raises(ExplorerError):
        FilterSpec(make_net()).freeze("table[__import__('os').system('echo hacked')]")
    assert "hacked" not in capfd.readouterr().out


# -- inputs that used to be read wrongly, now with a true answer ------------------------------


class Color(enum.IntEnum):
    RED = 1
    BLUE = 2


def test_enum_keyed_rows_are_accepted_back_by_every_target_form():
    model = {"by_color": {Color.RED: jnp.ones(2), Color.BLUE: jnp.ones(3)}}
    tree = ModelTree(model)
    red = "['by_color'][<Color.RED: 1>]"
    assert red in tree.paths
    spec = FilterSpec(model).freeze(red)
    assert spec.frozen_paths() == [red]
    assert FilterSpec(model).constrain(red, "unit_norm").constraints.keys() == {red}
    assert FilterSpec(model).select("['by_color'][*]").mask.all()
    assert FilterSpec.from_json(model, spec.to_json()) == spec


def test_unicode_identifier_fields_are_read_back():
    ns: dict = {}
    exec("class U(eqx.Module):\n    x·y: jax.Array\n", {"eqx": eqx, "jax": jax}, ns)
    model = ns["U"](jnp.ones(2))
    assert ModelTree(model).paths[1] == "x·y"
    assert FilterSpec(model).freeze("x·y").state("x·y") == "frozen"


def test_a_sub_module_of_the_model_selects_where_it_sits(net):
    assert FilterSpec(net).freeze(net.layers[0]) == FilterSpec(net).freeze("layers[0]")
    assert FilterSpec(net).freeze(net.layers[0].weight).frozen_paths() == ["layers[0].weight"]


def test_one_argument_leaf_filters_select_the_leaves_they_accept(net):
    spec = FilterSpec(net).freeze(lambda x: eqx.is_array(x) and x.ndim == 2)
    assert spec.frozen_paths() == ["layers[0].weight", "layers[1].weight"]
    assert FilterSpec(net).freeze(eqx.is_inexact_array).counts["trainable_params"] == 0
    # A parameter with a default is not part of the call: this is a `where`, not a predicate.
    assert FilterSpec(net).freeze(lambda m, k=0: m.layers[k]) == FilterSpec(net).freeze("layers[0]")


def test_to_json_is_strict_json_and_an_open_interval_round_trips(net):
    spec = FilterSpec(net).constrain("table", ("interval", None, 1.0))
    text = spec.to_json()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert FilterSpec.from_json(net, text) == spec
    assert spec.constraints['table["it\'s"]'].lo == -np.inf


def test_a_predicate_may_return_a_scalar_bool_array(net):
    spec = FilterSpec(net).freeze(lambda p, x: eqx.is_inexact_array(x) and jnp.all(x != 0))
    assert 'table["it\'s"]' in spec.frozen_paths()


# Keys JAX flattens in dicts: enums, floats (inf, nan), bytes, tuples, None, unicode strings.
hostile_keys = st.one_of(
    st.text(max_size=6),
    st.sampled_from(["it's", 'say "hi"', "a]b", "x[0].y", "**", "*", "ключ", "\\", "\n"]),
    st.integers(-(10**30), 10**30),
    st.floats(allow_nan=False),
    st.just(float("nan")),
    st.binary(max_size=4),
    st.tuples(st.integers(-5, 5), st.text(max_size=2)),
    st.sampled_from([None, Color.RED, Color.BLUE, 1 + 2j, complex(-0.0, -1)]),
)


@given(st.lists(st.tuples(hostile_keys, hostile_keys), min_size=1, max_size=4))
@settings(max_examples=150, deadline=None)
def test_every_printed_path_parses_back_to_the_same_node(pairs):
    # Keys JAX can sort together (mixed numbers and enums too); two levels of hostile keys.
    outer: dict = {}
    for a, b in pairs:
        try:
            sorted([*outer, a])
        except TypeError:
            continue
        outer.setdefault(a, {b: jnp.ones(1)})
    tree = ModelTree({"root": outer})
    for i, path in enumerate(tree.paths):
        assert format_path(parse_path(path)) == path
        assert tree.find(path) == i
        if tree.kind[i] == "array":
            assert FilterSpec(tree.model).freeze(path).frozen_paths() == [path]


class CountingKey(str):
    """A key's text that counts the part look-ups made on it."""

    finds = 0

    def find(self, *args):
        CountingKey.finds += 1
        return super().find(*args)


def test_a_glob_within_a_key_looks_each_part_up_once():
    # `*a*a...*b` on `aaa...b` with one `a` too few: a regex `.*a.*a...b` backtracks through
    # every split of the key (C(12, 6) and more); part by part it is 12 look-ups.
    CountingKey.finds = 0
    assert not _wildcard("*a" * 12 + "*b")(CountingKey("a" * 11 + "b"))
    assert CountingKey.finds <= 12
    assert _wildcard("*a" * 12 + "*b")("a" * 12 + "b")


@given(
    st.from_regex(r"[ab*]{0,6}\*[ab*]{0,6}", fullmatch=True),
    st.from_regex(r"[ab]{0,8}", fullmatch=True),
)
@settings(max_examples=300, deadline=None)
def test_a_glob_within_a_key_matches_as_star_means_any_text(pattern, key):
    as_regex = ".*".join(re.escape(part) for part in pattern.split("*"))
    assert _wildcard(pattern)(key) == (re.fullmatch(as_regex, key) is not None)


def test_a_spec_from_another_instance_with_another_static_field_is_read_by_its_leaves():
    # eqx-llama's `cache_key = str(id(self))`: same leaves, another treedef.
    class Cached(eqx.Module):
        w: jax.Array
        cache_key: str = eqx.field(static=True)

    spec = FilterSpec(Cached(jnp.ones(2), "a")).freeze("w")
    other = Cached(jnp.ones(2), "b")
    assert spec.for_model(other).state("w") == "frozen"
    assert "frozen" in summary(other, spec)
    runner = ex.StepRunner(other, spec, lambda m, b: jnp.sum(m.w), None)
    assert runner.spec.state("w") == "frozen"


any_value = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(10**30), 10**30),
        st.floats(),
        st.text(max_size=16),
        st.text(alphabet="[]().*'\"\\<>-0123456789abjz_ ", max_size=16),
        st.sampled_from(["layers[0]", "layers[*]", "**.bias", "none", "table", "step", "act"]),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
ENTRY_POINTS = {
    "freeze": lambda s, v: s.freeze(v),
    "unfreeze": lambda s, v: s.unfreeze(v),
    "select": lambda s, v: s.select(v),
    "state": lambda s, v: s.state(v),
    "constrain": lambda s, v: s.constrain(v, "unit_norm"),
    "rule": lambda s, v: s.constrain("table", v),
    "inference": lambda s, v: s.inference(v),
    "to_code": lambda s, v: s.to_code(v),
    "from_json": lambda s, v: FilterSpec.from_json(
        s.model, v if isinstance(v, str) else saved(trainable=v)
    ),
    "from_json_field": lambda s, v: FilterSpec.from_json(s.model, saved(constraints=v)),
    "from_tree": lambda s, v: FilterSpec.from_tree(s.model, v),
    "summary": lambda s, v: summary(s.model, max_rows=v),
    "parse_path": lambda s, v: parse_path(v),
}


@given(st.sampled_from(sorted(ENTRY_POINTS)), any_value)
@settings(max_examples=400, deadline=None)
def test_any_value_at_any_entry_point_works_or_raises_explorer_error(entry, value):
    model = make_net()
    leaves, values = snapshot(model)
    try:
        ENTRY_POINTS[entry](FilterSpec(model), value)
    except ExplorerError as e:
        assert len(str(e)) < 1_000
    after = jtu.tree_leaves(model)
    assert all(a is b for a, b in zip(after, leaves, strict=True))
    assert all(np.array_equal(a, v) for a, v in zip(after, values) if eqx.is_array(a))
