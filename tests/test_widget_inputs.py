"""Bad messages from the page and bad constructor arguments: a clear banner or ExplorerError,
never "internal error (...)", the spec and model unchanged, and the widget keeps answering."""

import enum
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eqx_explorer import ExplorerError, FilterSpec
from eqx_explorer._paths import MAX_PATH_CHARS
from eqx_explorer._widget import Explorer


class K(enum.IntEnum):
    A = 1


class BadRepr:
    """A leaf whose own `__repr__` raises."""

    def __repr__(self):
        raise RuntimeError("boom")


def small_model():
    return {
        "layers": [eqx.nn.Linear(2, 2, key=jax.random.key(0))],
        "by_enum": {K.A: jnp.ones(2)},
        "odd": BadRepr(),
        "none": None,
    }


@pytest.fixture
def widget():
    w = Explorer(small_model())
    w.send = lambda content, buffers=None: None
    return w


HUGE = "layers" + "[0]" * (MAX_PATH_CHARS // 3 + 1)
TOO_LONG = rf"more than the {MAX_PATH_CHARS:,} a path may have"
LONG = "x" * 5_000

# (message, a regex the banner must match: what was wrong, naming the field or path)
BAD_MESSAGES = [
    ({"type": "toggle", "path": HUGE, "frozen": True}, rf"{len(HUGE):,} characters"),
    ({"type": "select", "path": HUGE}, TOO_LONG),
    ({"type": "glob", "pattern": HUGE, "action": "freeze"}, TOO_LONG),
    ({"type": "glob", "pattern": "*" * 1_000_000, "action": "freeze"}, TOO_LONG),
    ({"type": "glob", "pattern": "a*" * 500_000, "action": "unfreeze"}, TOO_LONG),
    ({"type": "match", "pattern": "layers"}, r"unknown message type 'match'"),
    ({"type": "toggle", "path": "['layers'][*]", "frozen": True}, r"is a glob"),
    ({"type": "toggle", "path": "['none']", "frozen": False}, r"`\['none'\]` selects no leaves"),
    ({"type": "toggle", "path": "['layers'][" + "9" * 5000 + "]", "frozen": True}, r"5,000-digit"),
    ({"type": "toggle", "path": "['layers'][99999999999999999999]", "frozen": True}, r"no node"),
    ({"type": "toggle", "path": "..layers", "frozen": True}, r"position 1"),
    ({"type": "toggle", "path": "['layers'][" + "-" * 1000 + "1]", "frozen": True}, "literal"),
    ({"type": "toggle", "path": 5, "frozen": True}, r"bad 'path'"),
    ({"type": "toggle", "path": "['layers']", "frozen": "yes"}, r"bad 'frozen'"),
    ({"type": "constrain", "path": "['layers'][0].weight", "rule": ["interval", 10**400, 1]}, "lo"),
    ({"type": "constrain", "path": "['layers'][0].weight", "rule": ["interval", 2, 1]}, "lo < hi"),
    ({"type": "constrain", "path": "['layers'][0].weight", "rule": ["x"]}, r"bad 'rule'"),
    ({"type": "inference", "path": "['layers'][0]", "on": True}, r"no layer with an `inference`"),
    ({"type": "scale_lr", "path": "['layers'][0]", "factor": -1}, r"factor -1\.0 is not a finite"),
    # JSON has no NaN: the page's NaN arrives as null; a NaN from Python is refused alike.
    ({"type": "scale_lr", "path": "['layers']", "factor": None}, r"number, got a NoneType"),
    ({"type": "scale_lr", "path": "['layers']", "factor": float("nan")}, r"factor nan is not"),
    ({"type": "scale_lr", "path": "['layers']", "factor": ""}, r"factor must be a number, got"),
    ({"type": "scale_lr", "path": "['layers']", "factor": True}, r"got a bool"),
    ({"type": "scale_lr", "path": "['odd']", "factor": 0.5}, r"no floating-point array"),
    ({"type": "scale_lr", "path": "['layers'][*]", "factor": 0.5}, r"is a glob"),
    ({"type": "scale_lr", "path": "['layers']"}, r"lacks the field 'factor'"),
    ({"type": "layerwise_decay", "path": "['layers']", "decay": 0}, r"factor 0 \(that is freez"),
    ({"type": "layerwise_decay", "path": "['layers']", "decay": 1.5}, r"decay 1\.5 is not"),
    ({"type": "layerwise_decay", "path": "['layers']", "decay": -0.5}, r"decay -0\.5 is not"),
    ({"type": "layerwise_decay", "path": "['layers']", "decay": "0.5"}, r"got a str"),
    ({"type": "layerwise_decay", "path": "['layers'][0]", "decay": 0.5}, r"one list or tuple"),
    ({"type": "style", "style": LONG}, r"unknown code style 'x+…\(5,002 characters\)"),
    ({"type": "step", "n": 10**30}, r"between 1 and"),
    ({"type": "step", "n": 3}, r"no loss function"),
    ({"type": "select", "path": LONG}, r"no node at path `x+…\(5,000 characters\)`"),
    ({"type": LONG}, r"unknown message type 'x+…"),
    ({"type": "toggle", "path": "a", "frozen": True, LONG: 1}, r"unexpected fields \[.x+…"),
    ("x" * 100_000, r"malformed message"),
    ([[[[]]]], r"malformed message"),
]


@pytest.mark.parametrize(("msg", "expected"), BAD_MESSAGES, ids=range(len(BAD_MESSAGES)))
def test_bad_message_gives_a_short_clear_banner_and_changes_nothing(widget, msg, expected):
    before_spec, before_leaves = widget.spec, jtu.tree_leaves(widget._model)
    widget._handle_message(msg)
    assert widget.error and not widget.error.startswith("internal error")
    assert len(widget.error) < 500  # long input is quoted shortened
    assert re.search(expected, widget.error), widget.error
    assert widget.spec == before_spec
    assert all(a is b for a, b in zip(jtu.tree_leaves(widget._model), before_leaves))
    # The kernel keeps answering: a good message afterwards works and clears the banner.
    widget._handle_message({"type": "toggle", "path": "['layers'][0]", "frozen": True})
    assert widget.error == "" and widget.spec.state("['layers'][0]") == "frozen"


def test_every_row_path_is_accepted_back_by_a_toggle(widget):
    # The enum-keyed row prints as `[<K.A: 1>]`; clicking it must work like any other row.
    for path in widget._tree.leaf_paths:
        if widget.spec.model_tree.inexact[widget._tree.lo[widget._tree.find(path)]]:
            widget._handle_message({"type": "toggle", "path": path, "frozen": True})
            assert widget.error == "", widget.error
            assert widget.spec.state(path) == "frozen"
    assert "['by_enum'][<K.A: 1>]" in widget._tree.leaf_paths


def test_a_leaf_whose_repr_raises_still_opens(widget):
    row = widget._tree.node(widget._tree.find("['odd']"))
    assert row.summary == "<BadRepr whose repr raised RuntimeError>"


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"optimizer": "adam"}, r"optimizer must be an optax GradientTransformation.*got str"),
        ({"optimizer": 1e-3}, r"optimizer must be .*got float.*optax.adam\(1e-3\)"),
        ({"loss_fn": "mse"}, r"loss_fn must be a function.*got str"),
        ({"spec": "frozen"}, r"spec must be an eqx_explorer.FilterSpec, not str"),
        ({"code_style": ["tree_at"]}, r"unknown code style \['tree_at'\]"),
    ],
)
def test_constructor_checks_its_arguments_before_anything_runs(kwargs, expected):
    model = {"w": jnp.ones(2)}
    with pytest.raises(ExplorerError, match=expected):
        Explorer(model, **kwargs)
    assert np.array_equal(model["w"], jnp.ones(2))


def test_a_spec_for_another_instance_with_a_different_static_field_is_accepted():
    class Cached(eqx.Module):
        w: jax.Array
        cache_key: str = eqx.field(static=True)

    spec = FilterSpec(Cached(jnp.ones(2), "a")).freeze("w")
    other = Cached(jnp.ones(2), "b")
    assert Explorer(other, spec=spec).spec.state("w") == "frozen"


json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(10**30), 10**30),
        st.floats(),
        st.text(max_size=12),
        st.sampled_from(["['layers'][0]", "['layers'][*]", "**", "none", "interval", "positive"]),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
message_types = st.sampled_from(
    [
        "toggle",
        "glob",
        "select",
        "constrain",
        "style",
        "method",
        "inference",
        "scale_lr",
        "layerwise_decay",
        "step",
        "reset",
        "dismiss",
        "x",
    ]
)
field_names = st.sampled_from(
    ["path", "frozen", "pattern", "action", "rule", "style", "method", "on", "n", "factor"]
    + ["decay", "id"]
)


@given(message_types, st.dictionaries(field_names, json_values, max_size=3))
@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_no_message_from_the_page_is_an_internal_error(widget, kind, fields):
    widget._handle_message({"type": kind, **fields})
    assert not widget.error.startswith("internal error"), widget.error
    assert len(widget.error) < 500


@pytest.mark.parametrize("bad", [["a"], [float("nan")], [True], [[1.0]]])
def test_losses_trait_takes_finite_numbers_only(bad):
    w = Explorer(eqx.nn.MLP(2, 1, 3, 1, key=jax.random.key(0)))
    with pytest.raises(ExplorerError, match="losses must be finite numbers"):
        w.losses = bad
    w.losses = [1, 0.5, None]
    assert w.losses == [1.0, 0.5, None]
