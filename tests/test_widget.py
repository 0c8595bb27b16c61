"""The Explorer widget at Python level: front-end messages are simulated with `_handle_message`,
the state the page draws is read from the synced traits, and the events Python sends (acks,
match replies) are captured from `send` (the browser tests live in tests/e2e)."""

import json
import threading
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eqx_explorer import ExplorerError, FilterSpec, summary
from eqx_explorer._audit import LeafReport, StepReport
from eqx_explorer._codegen import STYLES, to_code
from eqx_explorer._constraints import RULE_NAMES
from eqx_explorer._examples import StatefulNet, example_model, stateful_loss
from eqx_explorer._select import match_nodes
from eqx_explorer._slots import optimizer_slots
from eqx_explorer._steps import StepProgress
from eqx_explorer._widget import (
    KINDS,
    METHODS,
    NO_STATUS,
    STATES,
    STATUSES,
    Explorer,
    table_columns,
)
from tests.helpers import models, random_edits


class Sent:
    """Records the custom messages a widget sends to the browser."""

    def __init__(self, widget):
        self.messages = []
        widget.send = lambda content, buffers=None: self.messages.append((content, buffers))

    def of_type(self, kind):
        return [(c, b) for c, b in self.messages if c["type"] == kind]

    def clear(self):
        self.messages.clear()


def page_step(widget, n, **extra):
    """A Step from the page: it runs in a worker thread; wait for it to end."""
    widget._handle_message({"type": "step", "n": n, **extra})
    widget._worker.join(timeout=120)
    assert not widget._worker.is_alive() and widget.progress == {}


def synced_codes(widget):
    """The node state codes as the page reads them from the `_state_codes` trait."""
    return np.frombuffer(widget.get_state()["_state_codes"], np.uint8)


def synced_report(widget):
    """The last report's statuses, norms and factors (4 x slots) and notes as the page reads
    them."""
    state = widget.get_state()
    status = np.frombuffer(state["_leaf_status"], np.uint8)
    norms = np.frombuffer(state["_leaf_norms"], "<f4").reshape(4, -1)
    return status, norms, state["_last_run"]


def expected_codes(spec):
    return np.array([STATES.index(spec.node_state(i)) for i in range(len(spec.model_tree))])


def full_table(w) -> dict:
    """The node table as the page reads it: `_table` with the columns of `_table_columns`."""
    return {**w._table, **table_columns(w._table, w._table_columns)}


def table_paths(table):
    paths = [""]
    for i in range(1, table["n"]):
        paths.append(paths[table["parent"][i]] + table["step"][i])
    return paths


@pytest.fixture
def model():
    return example_model()


@pytest.fixture
def widget(model):
    return Explorer(model)


# -- the node table ----------------------------------------------------------------------------
def test_table_rebuilds_every_row(widget):
    tree = widget.spec.model_tree
    table = full_table(widget)
    assert table_paths(table) == list(tree.paths)
    assert [KINDS[k] for k in table["kind"]] == list(tree.kind)
    assert [table["classes"][c] for c in table["cls"]] == list(tree.cls)
    assert table["params"] == [tree.params(i) for i in range(len(tree))]
    for i in range(len(tree)):
        text = table["summaries"][table["summary"][i]]
        assert text == (tree.summary(i) if tree.kind[i] in ("array", "leaf", "none") else "")
    mha = tree.find("blocks[0].attn")
    assert "num_heads=2" in table["static"][str(mha)]
    assert table["sharding"] == {}  # one device, no mesh: nothing to show


def test_table_lists_shardings():
    mesh = jax.make_mesh((1,), ("data",))
    x = jax.device_put(jnp.ones((4, 2)), jax.sharding.NamedSharding(mesh, jax.P("data")))
    w = Explorer({"w": x, "v": jnp.ones(2)})
    tree = w.spec.model_tree
    assert list(w._table["sharding"]) == [str(tree.find("['w']"))]
    assert "data" in w._table["sharding"][str(tree.find("['w']"))]
    w.select("['w']")
    assert "data" in w.detail["sharding"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(models, st.data())
def test_paths_rebuilt_by_the_browser_address_the_same_nodes(model, data):
    # The browser joins `step`s into paths and sends them back in toggles: weird dict keys
    # (quotes, newlines, "**") must survive the round trip and toggle exactly that node.
    w = Explorer(model)
    tree = w.spec.model_tree
    paths = table_paths(full_table(w))
    assert paths == list(tree.paths)
    spec = w.spec
    for action, path in data.draw(random_edits(tree)):
        node = paths.index(path)
        w._handle_message({"type": "toggle", "path": path, "frozen": action == "freeze"})
        try:
            spec = spec.freeze(path) if action == "freeze" else spec.unfreeze(path)
        except ExplorerError:
            assert w.error  # e.g. unfreezing a function: banner, spec unchanged
        else:
            assert w.error == "", (path, w.error)
        assert w.spec == spec
        assert w._codes[node] == STATES.index(spec.node_state(node))
    np.testing.assert_array_equal(w._codes, expected_codes(spec))


# -- toggles -----------------------------------------------------------------------------------
def test_toggle_module_freezes_subtree_and_syncs_the_state_codes(widget, model):
    sent = Sent(widget)
    tree = widget.spec.model_tree
    widget._handle_message({"type": "toggle", "path": "blocks[0]", "frozen": True, "id": 7})
    expected = FilterSpec(model).freeze("blocks[0]")
    assert widget.spec == expected
    assert widget.code == to_code(expected, "tree_at")
    assert widget.counts["frozen_params"] == expected.counts["frozen_params"] > 0
    assert widget.error == ""
    codes = synced_codes(widget)
    np.testing.assert_array_equal(codes, expected_codes(expected))
    assert STATES[codes[tree.find("blocks[0]")]] == "frozen"
    assert STATES[codes[0]] == "mixed"
    # The state travels as a trait; the only message is the click's acknowledgement.
    assert sent.messages == [({"type": "ack", "id": 7, "ok": True}, None)]


def test_toggle_unfreeze_of_mixed_module_makes_it_trainable(widget, model):
    widget.freeze("blocks[1].mlp")
    assert widget.spec.state("blocks[1]") == "mixed"
    widget._handle_message({"type": "toggle", "path": "blocks[1]", "frozen": False})
    assert widget.spec == FilterSpec(model)
    assert widget._codes[widget.spec.model_tree.find("blocks[1]")] == STATES.index("trainable")


def test_toggle_takes_exact_paths_not_globs(widget):
    before = widget.spec
    widget._handle_message({"type": "toggle", "path": "blocks[*]", "frozen": True})
    assert widget.error and widget.spec is before


def test_glob_freeze_and_unfreeze_matches(widget, model):
    widget._handle_message({"type": "glob", "pattern": "**.bias", "action": "freeze"})
    assert widget.spec == FilterSpec(model).freeze("**.bias")
    widget._handle_message({"type": "glob", "pattern": "blocks[*].norm", "action": "unfreeze"})
    assert widget.spec == FilterSpec(model).freeze("**.bias").unfreeze("blocks[*].norm")
    assert widget.code == to_code(widget.spec, "tree_at")
    # What people type in the search box: a substring, a glob within a key.
    widget._handle_message({"type": "glob", "pattern": "ATTN", "action": "freeze"})
    widget._handle_message({"type": "glob", "pattern": "norm*", "action": "freeze"})
    assert widget.error == ""
    expected = FilterSpec(model).freeze("**.bias").unfreeze("blocks[*].norm")
    assert widget.spec == expected.freeze("blocks[*].attn", "blocks[*].norm")


# -- code pane ---------------------------------------------------------------------------------
@pytest.mark.parametrize("style", STYLES)
def test_style_message_changes_the_code(widget, style):
    widget.freeze("embed", "blocks[0]")
    widget._handle_message({"type": "style", "style": style})
    assert widget.code_style == style
    assert widget.code == to_code(widget.spec, style)
    widget.unfreeze("blocks[0]")
    assert widget.code == to_code(widget.spec, style)


def test_options_list_every_style_and_method(widget):
    assert widget._options["styles"] == list(STYLES)
    assert "custom_updates" in widget._options["styles"]  # the export of update rules
    assert widget._options["rules"] == list(RULE_NAMES)
    assert widget._options["methods"] == list(METHODS)
    assert widget.code_style == "tree_at"


def test_style_the_export_cannot_write_shows_why_and_keeps_the_click():
    model = {"a b": jnp.ones(2), "c": jnp.ones(2)}  # not an attribute name
    w = Explorer(model)
    w.freeze("['a b']")
    assert w.spec.state("['a b']") == "frozen"
    w.code_style = "stop_gradient"
    codes = {s: w.code for s in STYLES if not setattr(w, "code_style", s)}
    assert all(code.strip() for code in codes.values())
    for style, code in codes.items():
        try:
            assert code == to_code(w.spec, style)
        except ExplorerError as e:
            assert code.startswith("# Cannot export") and str(e)[:40] in code.replace("\n# ", " ")


# -- validation --------------------------------------------------------------------------------
BAD_MESSAGES = [
    "toggle",
    None,
    {"path": "embed"},
    {"type": 3},
    {"type": "explode"},
    {"type": "toggle", "path": "embed"},
    {"type": "toggle", "path": "embed", "frozen": "yes"},
    {"type": "toggle", "path": ["embed"], "frozen": True},
    {"type": "toggle", "path": "embed", "frozen": True, "extra": 1},
    {"type": "toggle", "path": "embedding", "frozen": True},
    {"type": "toggle", "path": "blocks[9]", "frozen": True},
    {"type": "toggle", "path": "blocks[0", "frozen": True},
    {"type": "toggle", "path": "step_count", "frozen": False},
    {"type": "glob", "pattern": "**.nothing", "action": "freeze"},
    {"type": "glob", "pattern": "**.bias", "action": "delete"},
    {"type": "select", "path": "nowhere"},
    {"type": "style", "style": "cobol"},
    {"type": "method", "method": "magic"},
    {"type": "step", "n": 1},  # no loss function
    {"type": "step", "n": True},
    {"type": "step", "n": 2.5},
    # Update rules: the rule's own checks, then paths, then malformed rules.
    {"type": "constrain", "path": "blocks[0].norm.weight", "rule": "orthogonal"},  # 1-D
    {"type": "constrain", "path": "head.weight", "rule": "orthogonal"},  # not orthogonal
    {"type": "constrain", "path": "embed.weight", "rule": "positive"},  # has values <= 0
    {"type": "constrain", "path": "head.bias", "rule": ["interval", 1, 0]},
    {"type": "constrain", "path": "step_count", "rule": "unit_norm"},  # an int array
    {"type": "constrain", "path": "nowhere", "rule": "positive"},
    {"type": "constrain", "path": "blocks[*].norm.weight", "rule": "positive"},  # a glob
    {"type": "constrain", "path": "head.bias", "rule": "Positive"},
    {"type": "constrain", "path": "head.bias", "rule": "interval"},
    {"type": "constrain", "path": "head.bias", "rule": ["interval", 0]},
    {"type": "constrain", "path": "head.bias", "rule": ["interval", "0", 1]},
    {"type": "constrain", "path": "head.bias", "rule": ["interval", False, 1]},
    {"type": "constrain", "path": "head.bias", "rule": ["interval", float("-inf"), 1]},
    {"type": "constrain", "path": "head.bias", "rule": ["clip", 0, 1]},
    {"type": "constrain", "path": "head.bias", "rule": None},
    {"type": "constrain", "path": "head.bias"},
    {"type": "constrain", "path": 3, "rule": "positive"},
    {"type": "constrain", "path": "head.bias", "rule": "unit_norm", "where": "head"},
]


@pytest.mark.parametrize("msg", BAD_MESSAGES, ids=repr)
def test_bad_message_shows_banner_and_changes_nothing(widget, msg):
    widget.freeze("head")
    widget.constrain("blocks[1].norm.weight", "positive")
    spec, code, counts, codes = widget.spec, widget.code, widget.counts, widget._codes.copy()
    rules = widget._constraints
    sent = Sent(widget)
    widget._handle_message(msg)
    assert widget.error
    assert widget.spec is spec and widget.code == code and widget.counts == counts
    assert widget._constraints == rules
    np.testing.assert_array_equal(widget._codes, codes)
    assert widget.code_style == "tree_at" and widget.method == "partition"
    np.testing.assert_array_equal(synced_codes(widget), codes)
    assert sent.messages == []
    # The next good action clears the banner; dismiss clears it too.
    widget._handle_message({"type": "dismiss"})
    assert widget.error == ""


def test_unexpected_exception_reaches_the_banner_not_the_kernel(widget, monkeypatch):
    import eqx_explorer._widget as widget_module

    def broken(spec, style):
        raise RuntimeError("codegen bug")

    monkeypatch.setattr(widget_module, "_export", broken)
    spec = widget.spec
    sent = Sent(widget)
    widget._handle_message({"type": "toggle", "path": "embed", "frozen": True, "id": 1})
    assert "internal error" in widget.error and "codegen bug" in widget.error
    assert widget.spec is spec
    assert sent.of_type("ack") == [({"type": "ack", "id": 1, "ok": False}, None)]


def test_comm_callback_goes_through_validation(widget):
    # What ipywidgets calls for a custom message from the page.
    widget._handle_custom_msg({"type": "toggle", "path": "embed", "frozen": True}, [])
    assert widget.spec.state("embed") == "frozen"
    widget._handle_custom_msg({"type": "toggle"}, [])
    assert "lacks the field 'path'" in widget.error


# -- update rules ------------------------------------------------------------------------------
def test_constrain_message_sets_the_rule_and_sends_a_small_delta(widget, model):
    widget.code_style = "custom_updates"
    codes = synced_codes(widget)
    sent = Sent(widget)
    tree = widget.spec.model_tree
    norm, bias = tree.find("blocks[0].norm.weight"), tree.find("head.bias")
    msg = {"type": "constrain", "path": "blocks[0].norm.weight", "rule": "positive", "id": 4}
    widget._handle_message(msg)
    expected = FilterSpec(model).constrain("blocks[0].norm.weight", "positive")
    assert widget.error == "" and widget.spec == expected
    assert widget._constraints == {str(norm): ["positive", "positive"]}
    assert widget.code == to_code(expected, "custom_updates")
    assert '".blocks[0].norm.weight": "positive"' in widget.code
    assert sent.of_type("ack") == [({"type": "ack", "id": 4, "ok": True}, None)]
    np.testing.assert_array_equal(synced_codes(widget), codes)  # a rule freezes nothing
    widget._handle_message(
        {"type": "constrain", "path": "head.bias", "rule": ["interval", -1, 0.5]}
    )
    expected = expected.constrain("head.bias", ("interval", -1, 0.5))
    assert widget.spec == expected and widget.code == to_code(expected, "custom_updates")
    assert widget._constraints[str(bias)] == ["interval", "interval[-1, 0.5]", -1.0, 0.5]
    widget._handle_message({"type": "constrain", "path": "blocks[0].norm.weight", "rule": "none"})
    expected = expected.constrain("blocks[0].norm.weight", None)
    assert widget.spec == expected and set(widget.spec.constraints) == {"head.bias"}
    assert list(widget._constraints) == [str(bias)]  # only constrained leaves travel
    assert widget.code == to_code(expected, "custom_updates")
    # What the page receives: plain JSON, no NaN or infinity.
    json.dumps(widget.get_state()["_constraints"], allow_nan=False)


def test_constrain_from_python_mirrors_the_menu(widget, model):
    tree = widget.spec.model_tree
    norms = [str(tree.find(f"blocks[{i}].norm.weight")) for i in range(3)]
    spec = widget.constrain("blocks[*].norm.weight", "positive")
    assert spec is widget.spec == FilterSpec(model).constrain("blocks[*].norm.weight", "positive")
    assert widget._constraints == {i: ["positive", "positive"] for i in norms}
    bias = str(tree.find("head.bias"))
    widget.constrain("head.bias", ("interval", float("-inf"), 0.0))
    assert widget._constraints[bias] == ["interval", "interval[-inf, 0]", None, 0.0]
    json.dumps(widget.get_state()["_constraints"], allow_nan=False)
    widget.constrain("head.bias", ("interval", -1, 0))
    assert widget._constraints[bias] == ["interval", "interval[-1, 0]", -1.0, 0.0]

    def bounded_step(p, u):
        return p + 0.1 * u

    widget.code_style = "custom_updates"
    widget.constrain("head.weight", bounded_step)
    assert widget._constraints[str(tree.find("head.weight"))] == ["custom", "bounded_step"]
    assert widget.code.startswith("# Cannot export")  # a function is not code; the rule stays
    widget.constrain("blocks", None)
    assert set(widget.spec.constraints) == {"head.bias", "head.weight"}
    before = widget.spec
    with pytest.raises(ExplorerError, match="orthogonal needs a matrix"):
        widget.constrain("head.bias", "orthogonal")
    assert widget.spec is before and len(widget._constraints) == 2


def test_constraints_reach_a_view_displayed_later(model):
    # The trait is part of the widget state every new view starts from; so is a spec set later.
    spec = FilterSpec(model).constrain("blocks[2].norm.weight", "unit_norm")
    w = Explorer(model, spec=spec, code_style="custom_updates")
    node = str(w.spec.model_tree.find("blocks[2].norm.weight"))
    assert w.get_state()["_constraints"] == {node: ["unit_norm", "unit_norm"]}
    assert w.code == to_code(spec, "custom_updates")
    w.spec = FilterSpec(model).constrain("head.weight", "unit_norm")
    assert list(w.get_state()["_constraints"]) == [str(w.spec.model_tree.find("head.weight"))]
    assert w.code == to_code(w.spec, "custom_updates")


# -- learning-rate groups ---------------------------------------------------------------------
def synced_factors(widget):
    """The factors per leaf as the page reads them (empty: 1 on every trainable leaf)."""
    return np.frombuffer(widget.get_state()["_lr_factors"], "<f4")


def test_scale_lr_message_sets_the_factor_and_counts_and_code_follow(widget, model):
    widget.code_style = "optax"
    assert synced_factors(widget).size == 0 and list(widget.counts["lr_groups"]) == [1.0]
    sent = Sent(widget)
    widget._handle_message({"type": "scale_lr", "path": "head", "factor": 0.5, "id": 7})
    expected = FilterSpec(model).scale_lr("head", 0.5)
    assert widget.error == "" and widget.spec == expected
    assert sent.of_type("ack") == [({"type": "ack", "id": 7, "ok": True}, None)]
    np.testing.assert_array_equal(synced_factors(widget), expected.lr_factors.astype(np.float32))
    assert widget.counts["lr_groups"] == expected.counts["lr_groups"]
    assert list(widget.counts["lr_groups"]) == [1.0, 0.5]
    assert widget.code == to_code(expected, "optax") and "with_lr_factors" in widget.code
    widget.select("head")
    assert widget.detail["lr"] == [0.5, 0.5]
    # Factor 0 freezes, as a toggle does; back to 1, no factors travel again.
    widget._handle_message({"type": "scale_lr", "path": "head.bias", "factor": 0})
    assert widget.spec.state("head.bias") == "frozen"
    np.testing.assert_array_equal(synced_codes(widget), expected_codes(widget.spec))
    widget._handle_message({"type": "scale_lr", "path": "head", "factor": 1})
    assert widget.spec == FilterSpec(model) and synced_factors(widget).size == 0


def test_layerwise_decay_message_decays_the_blocks_and_python_mirrors_it(widget, model):
    widget.code_style = "train_step"
    widget._handle_message({"type": "layerwise_decay", "path": "blocks", "decay": 0.5})
    expected = FilterSpec(model).layerwise_decay("blocks", 0.5)
    assert widget.error == "" and widget.spec == expected
    tree = widget.spec.model_tree
    factors = synced_factors(widget)
    for j, factor in enumerate([0.25, 0.5, 1.0]):
        part = slice(tree.lo[tree.find(f"blocks[{j}]")], tree.hi[tree.find(f"blocks[{j}]")])
        assert set(factors[part][expected.mask[part]]) == {factor}  # on its float arrays
    assert widget.counts["lr_groups"] == expected.counts["lr_groups"]
    assert widget.code == to_code(expected, "train_step") and "with_lr_factors" in widget.code
    assert widget.select("blocks")["lr"] == [0.25, 1.0]  # the page shows a range, 0.25–1
    other = Explorer(model, code_style="train_step")
    spec = other.layerwise_decay("blocks", 0.5)
    assert (
        spec is other.spec == expected
        and other.get_state()["_lr_factors"] == (widget.get_state()["_lr_factors"])
    )
    assert other.scale_lr("embed", 0.1) == expected.scale_lr("embed", 0.1) == other.spec
    assert other.code == to_code(other.spec, "train_step")
    with pytest.raises(ExplorerError, match="one list or tuple"):
        other.layerwise_decay("head", 0.5)
    assert other.spec == expected.scale_lr("embed", 0.1)


def test_step_report_sends_each_leaf_factor_and_update_norm(trainer):
    trainer.scale_lr("head", 0.1)
    trainer.freeze("body.layers[0]")
    report = trainer.step(1)
    status, norms, _ = synced_report(trainer)
    tree = trainer.spec.model_tree
    for leaf in report.leaves:
        i = tree.lo[tree.find(leaf.path)]
        for row, value in ((1, leaf.update_norm), (3, leaf.lr_factor)):  # None (kept): NaN
            expected = np.nan if value is None else value
            assert norms[row, i] == pytest.approx(expected, rel=1e-5, nan_ok=True)
    head = tree.lo[tree.find("head.weight")]
    assert norms[3, head] == pytest.approx(0.1) and norms[1, head] > 0
    assert norms[3, tree.lo[tree.find("body.layers[0].weight")]] == 0
    assert trainer.select("head.weight")["norms"][3] == pytest.approx(0.1)


# -- Python API mirrors the page ---------------------------------------------------------------
def test_python_methods_mirror_the_ui(widget, model):
    assert widget.freeze("blocks") == FilterSpec(model).freeze("blocks") == widget.spec
    np.testing.assert_array_equal(synced_codes(widget), expected_codes(widget.spec))
    widget.unfreeze("blocks[2]")
    assert jtu.tree_leaves(widget.filter_spec) == jtu.tree_leaves(widget.spec.tree)
    assert all(type(b) is bool for b in jtu.tree_leaves(widget.filter_spec))
    widget.code_style = "optax"
    assert widget.code == to_code(widget.spec, "optax")
    widget.spec = FilterSpec(model).freeze("head")  # a spec built from its own tree
    assert widget.spec == FilterSpec(model).freeze("head")
    assert widget.spec.model_tree is widget._tree
    widget.spec = widget.spec.constrain("head.weight", "unit_norm")
    widget.spec = FilterSpec(model).constrain("embed", "unit_norm")  # replaces the constraints
    assert set(widget.spec.constraints) == {"embed.weight"}
    assert widget.code == to_code(widget.spec, "optax")
    with pytest.raises(ExplorerError, match="another structure"):
        widget.spec = FilterSpec([jnp.ones(2)])
    with pytest.raises(ExplorerError):
        widget.freeze("nope")
    with pytest.raises(ExplorerError, match="unknown code style"):
        widget.code_style = "cobol"
    with pytest.raises(ExplorerError, match="unknown method 'magic'"):
        widget.method = "magic"


def test_constructor_checks_and_initial_spec(model):
    spec = FilterSpec(model).freeze("embed")
    w = Explorer(model, spec=spec, code_style="path")
    assert w.spec is spec and w.code == to_code(spec, "path")
    copy = jtu.tree_map(lambda x: x, model)  # same structure, another object
    assert Explorer(copy, spec=spec).spec == FilterSpec(copy).freeze("embed")
    with pytest.raises(ExplorerError, match="another structure"):
        Explorer([jnp.ones(3)], spec=spec)
    with pytest.raises(ExplorerError, match="FilterSpec"):
        Explorer(model, spec=jtu.tree_map(lambda _: True, model))
    with pytest.raises(ExplorerError, match="unknown code style"):
        Explorer(model, code_style="cobol")


def test_header_counts_and_optimizer_state_estimate(model):
    spec = FilterSpec(model).freeze("blocks")
    c = spec.counts
    floats = c["trainable_bytes"] + c["frozen_bytes"]
    w = Explorer(model, spec=spec)
    assert w.counts["trainable_params"] == c["trainable_params"]
    assert w.counts["total_bytes"] == floats
    # The masked layout (default) holds optimizer state for every float leaf.
    assert w.counts["opt_state_bytes"] == 2 * floats  # Adam-like guess
    assert "all float" in w.counts["opt_state_note"]
    w = Explorer(model, spec=spec, layout="structural")
    assert w.counts["opt_state_bytes"] == 2 * c["trainable_bytes"]
    assert w._options["layout"] == "structural"
    measured = Explorer(
        model, spec=spec, optimizer=optax.sgd(0.1, momentum=0.9), layout="structural"
    )
    assert measured.counts["opt_state_bytes"] == c["trainable_bytes"]  # one slot, measured
    assert "trainable" in measured.counts["opt_state_note"]
    measured.method = "stop_gradient"  # its optimizer state spans every float leaf
    assert measured.counts["opt_state_bytes"] == floats
    with pytest.raises(ExplorerError, match="unknown layout"):
        Explorer(model, layout="sparse")


# -- detail pane -------------------------------------------------------------------------------
def test_select_array_renders_values_with_treescope(widget):
    widget._handle_message({"type": "select", "path": "blocks[0].mlp.layers[0].weight"})
    d = widget.detail
    assert d["path"] == "blocks[0].mlp.layers[0].weight" and d["state"] == "trainable"
    assert d["summary"] == "float32[32, 16]" and d["params"] == 512
    assert "treescope" in d["value_html"] and "<script" in d["value_html"]
    assert "update_html" not in d  # no step yet
    widget.freeze("blocks[0]")
    assert widget.detail["state"] == "frozen"


def test_select_module_and_non_array_leaf(widget):
    widget._handle_message({"type": "select", "path": "blocks[1].attn"})
    assert widget.detail["static"]["num_heads"] == "2"
    assert "value_html" not in widget.detail
    widget._handle_message({"type": "select", "path": "blocks[1].mlp.activation"})
    assert widget.detail["kind"] == "leaf" and widget.detail["summary"] == "relu"
    assert widget.detail["repr"].startswith("<jax")
    widget._handle_message({"type": "select", "path": "blocks[1].attn.dropout.p"})
    assert widget.detail["repr"] == "0.0" and widget.detail["state"] == "static"
    widget._handle_message({"type": "select", "path": "step_count"})
    assert widget.detail["state"] == "static" and "treescope" in widget.detail["value_html"]


# -- re-display and independence ---------------------------------------------------------------
def test_widget_state_alone_carries_what_the_page_draws(widget):
    # A view displayed later, a saved notebook and an HTML export get only `get_state()`.
    widget.freeze("blocks[0]", "head")
    state = widget.get_state()
    np.testing.assert_array_equal(synced_codes(widget), expected_codes(widget.spec))
    status, norms, last_run = synced_report(widget)
    assert set(status) == {NO_STATUS} and np.isnan(norms).all()
    assert len(status) == widget.spec.model_tree.num_leaves
    assert last_run == {"notes": [], "details": {}, "run": {}} and state["_stale"] is False
    # Per-node arrays are bytes (binary buffers), never JSON lists.
    for name in ("_state_codes", "_leaf_status", "_leaf_norms"):
        assert isinstance(state[name], bytes), name
    with pytest.raises(ExplorerError, match="unknown message type 'hello'"):
        widget._validate({"type": "hello"})


def test_redisplay_uses_the_same_model_and_shows_the_same_state(widget):
    first = widget._repr_mimebundle_()
    widget.freeze("embed")
    second = widget._repr_mimebundle_()
    key = "application/vnd.jupyter.widget-view+json"
    assert first[0][key]["model_id"] == second[0][key]["model_id"] == widget.model_id
    assert "frozen" in second[0]["text/plain"]


def test_two_widgets_on_one_model_are_independent(model):
    a, b = Explorer(model), Explorer(model)
    a.freeze("blocks")
    b._handle_message({"type": "style", "style": "path"})
    assert b.spec == FilterSpec(model) and a.code_style == "tree_at"
    assert a.spec.state("blocks") == "frozen"
    assert a.model_id != b.model_id


def test_repr_is_the_text_summary(widget, model):
    widget.freeze("embed")
    assert repr(widget) == summary(model, FilterSpec(model).freeze("embed"))


# -- scale -------------------------------------------------------------------------------------
class Cell(eqx.Module):
    weight: jax.Array
    bias: jax.Array


def wide_model(n_leaves):
    weight, bias = jnp.ones((4, 4)), jnp.zeros(4)
    return {f"group{g}": [Cell(weight, bias) for _ in range(50)] for g in range(n_leaves // 100)}


def test_10k_leaf_table_is_compact_and_a_toggle_syncs_one_byte_per_node():
    model = wide_model(10_000)
    w = Explorer(model)
    tree = w.spec.model_tree
    assert tree.num_leaves == 10_000
    payload = len(json.dumps(w._table, separators=(",", ":"))) + len(w._table_columns)
    assert payload / len(tree) < 40  # bytes per node: columns, not HTML
    w._handle_message({"type": "toggle", "path": "['group7'][3]", "frozen": True})
    state = w.get_state()
    assert len(state["_state_codes"]) == len(tree)
    assert len(state["_leaf_status"]) == 10_000 and len(state["_leaf_norms"]) == 16 * 10_000
    assert state["_lr_factors"] == b""  # no learning-rate groups: no factors travel
    changed = np.flatnonzero(synced_codes(w) != STATES.index("trainable"))
    # The cell, its two leaves, and its ancestors (the group and the root).
    assert sorted(changed) == sorted(
        [0, tree.find("['group7']"), *range(tree.find("['group7'][3]"), tree.find("['group7'][4]"))]
    )
    assert len(w.code) < 2_000


# -- steps ---------------------------------------------------------------------------------
class Small(eqx.Module):
    body: eqx.nn.MLP
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.body = eqx.nn.MLP(2, 4, 8, 1, key=k1)
        self.head = eqx.nn.Linear(4, 1, key=k2)

    def __call__(self, x):
        return self.head(self.body(x))[0]


def small_loss(model, batch):
    x, y = batch
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)


SMALL_BATCH = (jnp.linspace(-1, 1, 16).reshape(8, 2), jnp.linspace(0, 1, 8))


@pytest.fixture
def small():
    return Small(jax.random.key(0))


@pytest.fixture
def trainer(small):
    return Explorer(small, loss_fn=small_loss, batch=SMALL_BATCH, optimizer=optax.adam(1e-2))


def test_step_message_runs_the_runner_and_sends_statuses(trainer, small):
    original = jtu.tree_leaves(small)
    copies = [np.asarray(x).copy() if eqx.is_array(x) else x for x in original]
    trainer._handle_message({"type": "toggle", "path": "body.layers[0]", "frozen": True})
    trainer._handle_message({"type": "select", "path": "head.weight"})
    sent = Sent(trainer)
    page_step(trainer, 3, id=2)
    report = trainer.report
    assert report.ok and trainer.error == ""
    assert len(trainer.losses) == 3 and trainer.losses == pytest.approx(report.loss)
    status, norms, last_run = synced_report(trainer)
    assert last_run["run"]["steps"] == 3 and last_run["notes"] == list(report.notes)
    tree = trainer.spec.model_tree
    for leaf in report.leaves:
        i = tree.lo[tree.find(leaf.path)]
        assert STATUSES[status[i]] == leaf.status
        if leaf.delta_norm is None:
            assert np.isnan(norms[2, i])
        else:
            assert norms[2, i] == pytest.approx(leaf.delta_norm, rel=1e-5)
    assert report.by_status("frozen") == ["body.layers[0].weight", "body.layers[0].bias"]
    assert "head.weight" in report.by_status("updated")
    assert sent.of_type("ack")[-1][0] == {"type": "ack", "id": 2, "ok": True}
    # The selected leaf shows its new values and the change (diverging colours around zero).
    assert "update_html" in trainer.detail and trainer.detail["status"] == "updated"
    # The user's model is untouched; w.model is the trained one.
    for x, c in zip(jtu.tree_leaves(small), copies, strict=True):
        if eqx.is_array(x):
            np.testing.assert_array_equal(np.asarray(x), c)
    assert not np.array_equal(trainer.model.head.weight, small.head.weight)
    np.testing.assert_array_equal(trainer.model.body.layers[0].weight, small.body.layers[0].weight)


def test_spec_and_method_changes_reach_the_runner(trainer):
    trainer.step(1)
    trainer._handle_message({"type": "method", "method": "stop_gradient"})
    trainer._handle_message({"type": "toggle", "path": "head", "frozen": True})
    report = trainer.step(2)
    assert report.method == "stop_gradient"
    assert "head.weight" in report.by_status("leaked")  # Adam momentum keeps moving it
    assert len(trainer.losses) == 3
    trainer._handle_message({"type": "method", "method": "partition"})
    report = trainer.step(1)
    assert report.method == "partition" and "head.weight" in report.by_status("frozen")


def test_stale_flag_follows_the_spec_and_method_the_last_steps_ran_with(trainer):
    assert not trainer._stale  # no steps yet: no badges to dim
    trainer.step(1)
    assert not trainer._stale
    trainer._handle_message({"type": "method", "method": "stop_gradient"})
    assert trainer._stale and trainer.get_state()["_stale"]
    trainer._handle_message({"type": "method", "method": "partition"})
    assert not trainer._stale  # back to what the badges describe
    trainer.freeze("head")
    assert trainer._stale
    trainer.step(1)
    assert not trainer._stale


def test_reset_returns_to_the_original_model(trainer, small):
    trainer.step(2)
    trainer.freeze("head")
    assert trainer._stale
    trainer._handle_message({"type": "reset"})
    assert trainer.losses == [] and trainer.report is None
    for a, b in zip(jtu.tree_leaves(trainer.model), jtu.tree_leaves(small), strict=True):
        assert a is b or np.array_equal(a, b)
    status, norms, last_run = synced_report(trainer)
    assert set(status) == {NO_STATUS} and np.isnan(norms).all()
    assert last_run == {"notes": [], "details": {}, "run": {}} and not trainer._stale


def test_failing_loss_shows_the_runner_error_in_the_banner(small):
    def loss(m, batch):
        raise RuntimeError("bad batch")

    w = Explorer(small, loss_fn=loss, batch=SMALL_BATCH)
    page_step(w, 1)
    assert "bad batch" in w.error
    assert w.spec == FilterSpec(small)


def test_non_finite_losses_are_sent_as_null(small):
    def loss(m, batch):
        return small_loss(m, batch) * jnp.inf

    w = Explorer(small, loss_fn=loss, batch=SMALL_BATCH)
    page_step(w, 2)
    assert w.error  # the runner names the non-finite loss
    assert all(x is None or np.isfinite(x) for x in w.losses)
    json.dumps(w.losses, allow_nan=False)


def test_step_python_api_validates_n(trainer):
    with pytest.raises(ExplorerError, match="between 1 and"):
        trainer.step(0)
    with pytest.raises(ExplorerError, match="no loss function"):
        Explorer(example_model()).step()


# -- steps in a worker thread: progress, Stop, a busy runner -----------------------------------
class GatedRunner:
    """A stand-in for StepRunner whose steps wait for the test: one step per `gate.release()`.

    It reports progress as the runner does ("compiling", then "running" after each step) and
    honours `stop()` between steps; like the runner, a call starts by forgetting earlier stops.
    """

    def __init__(self, model, spec, loss_fn, batch, optimizer=None, method="partition", **kw):
        self.model, self.state, self.method, self.kw = model, kw.get("state"), method, kw
        self.paths = spec.model_tree.leaf_paths
        self.specs = [spec]
        self.gate = threading.Semaphore(0)
        self.stopped = threading.Event()
        self.warmed = 0  # calls of warm(): when the widget asks for the program of any spec

    def set_spec(self, spec, method=None):
        self.specs.append(spec)

    def warm(self):
        self.warmed += 1

    def stop(self):
        self.stopped.set()

    def step(self, n=1, *, progress=None):
        self.stopped.clear()
        progress(StepProgress("compiling", 0, n, None, 0.0))
        losses = []
        while len(losses) < n:
            self.gate.acquire()
            if self.stopped.is_set():
                break
            losses.append(1.0 / (1 + len(losses)))
            progress(StepProgress("running", len(losses), n, losses[-1], 0.1))
        stopped = self.stopped.is_set()
        self.stopped.clear()
        leaves = [LeafReport(p, "frozen") for p in self.paths]
        return StepReport(leaves, loss=losses, steps=len(losses), stopped=stopped, compiles=1)


def wait_for(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def run_until(w, n, done):
    """Start `n` steps from the page and let `done` of them through; returns the runner."""
    w._handle_message({"type": "step", "n": n})
    runner = w._runner
    runner.gate.release(done)
    wait_for(lambda: w.progress.get("done") == done)
    return runner


@pytest.fixture
def gated(small, monkeypatch):
    import eqx_explorer._widget as widget

    monkeypatch.setattr(widget, "StepRunner", GatedRunner)  # the runner the widget builds
    w = Explorer(small, loss_fn=small_loss, batch=SMALL_BATCH, layout="structural")
    yield w
    if w._worker is not None:  # never leave a thread behind
        w._runner.stop()
        w._runner.gate.release(10)
        w._worker.join(timeout=10)


def test_page_step_runs_in_a_worker_and_the_kernel_keeps_answering(gated, small):
    w = gated
    phases = []
    w.observe(lambda change: phases.append(dict(change["new"])), "progress")
    sent = Sent(w)
    w._handle_message({"type": "step", "n": 3, "id": 5})
    # The message is answered at once, while the steps wait in the worker.
    assert sent.of_type("ack") == [({"type": "ack", "id": 5, "ok": True}, None)]
    runner = w._runner
    assert runner.kw["layout"] == "structural"
    wait_for(lambda: w.progress.get("phase") == "compiling")
    assert w.progress["total"] == 3 and w.progress["blocking"] is False
    assert w.get_state()["progress"] == w.progress  # a view displayed now shows it too
    runner.gate.release()
    wait_for(lambda: w.progress.get("done") == 1)
    assert w.progress["phase"] == "running" and w.progress["loss"] == 1.0
    # A toggle while the steps run is applied now; the runner gets it at the next Step.
    w._handle_message({"type": "toggle", "path": "head", "frozen": True, "id": 6})
    assert w.spec == FilterSpec(small).freeze("head") and w.error == ""
    assert sent.of_type("ack")[-1][0]["ok"] and len(runner.specs) == 1
    assert runner.warmed == 0  # not beside the steps: it would slow them down
    runner.gate.release(2)
    w._worker.join(timeout=10)
    assert w.progress == {} and w.report.steps == 3 and not w.report.stopped
    assert runner.warmed == 1  # after the answer, for the click that may come next
    assert w.losses == [1.0, 0.5, pytest.approx(1 / 3)]
    assert [p.get("phase") for p in phases] == [
        "starting",
        "compiling",
        "running",
        "running",
        "running",
        None,
    ]
    assert all(p["started"] == phases[0]["started"] for p in phases[:-1])
    *_, last_run = synced_report(w)
    assert w._stale  # the toggle came after the steps started: their badges are stale
    assert last_run["run"] == {
        "steps": 3,
        "total": 3,
        "stopped": False,
        "seconds": last_run["run"]["seconds"],
        "compiles": 1,
    }
    runner.gate.release()
    page_step(w, 1)  # the next Step takes the toggled spec
    assert runner.specs[-1] == w.spec


def test_a_second_step_or_reset_while_steps_run_is_refused(gated):
    w = gated
    runner = run_until(w, 5, done=2)
    sent = Sent(w)
    w._handle_message({"type": "step", "n": 1, "id": 9})
    assert "steps are running (2 / 5 done)" in w.error and "Stop" in w.error
    assert sent.of_type("ack") == [({"type": "ack", "id": 9, "ok": False}, None)]
    with pytest.raises(ExplorerError, match="steps are running"):
        w.step(1)  # from Python too
    w._handle_message({"type": "reset"})
    assert "steps are running" in w.error and "before reset" in w.error
    assert w.progress["total"] == 5  # the running call goes on
    runner.gate.release(3)
    w._worker.join(timeout=10)
    assert w.report.steps == 5


def test_stop_ends_the_run_and_keeps_the_steps_done(gated):
    w = gated
    runner = run_until(w, 100, done=4)
    w._handle_message({"type": "stop"})
    assert w.progress["stopping"] is True and runner.stopped.is_set()
    runner.gate.release()
    w._worker.join(timeout=10)
    assert w.report.stopped and w.report.steps == 4 and len(w.losses) == 4
    *_, last_run = synced_report(w)
    assert last_run["run"]["stopped"] and last_run["run"]["steps"] == 4
    assert last_run["run"]["total"] == 100
    assert w.progress == {} and w.error == ""
    # Stop with nothing running does nothing (a late click).
    w._handle_message({"type": "stop"})
    assert w.error == "" and not runner.stopped.is_set()


def test_stop_right_after_step_is_not_lost(gated):
    # The runner forgets a stop() that comes before its call starts; the widget asks again.
    w = gated
    w._handle_message({"type": "step", "n": 1})
    runner = w._runner
    runner.gate.release()
    w._worker.join(timeout=10)
    entered, step = threading.Event(), runner.step

    def late_step(n=1, *, progress=None):
        entered.wait(timeout=10)
        return step(n, progress=progress)

    runner.step = late_step
    w._handle_message({"type": "step", "n": 100})
    w._handle_message({"type": "stop"})  # before the runner's call starts
    entered.set()
    runner.gate.release()
    w._worker.join(timeout=10)
    assert w.report.stopped and w.report.steps == 0 and w.progress == {}


def test_python_step_blocks_and_shows_the_same_progress(small):
    # A real runner: its progress callback drives the trait a view displays.
    w = Explorer(small, loss_fn=small_loss, batch=SMALL_BATCH, optimizer=optax.adam(1e-2))
    seen = []
    w.observe(lambda change: seen.append(dict(change["new"])), "progress")
    report = w.step(20)
    assert report.steps == 20 and w.progress == {}
    phases = [p.get("phase") for p in seen]
    assert phases[0] == "starting" and phases[-1] is None and "running" in phases
    assert "compiling" in phases  # the first call compiles
    assert all(p["blocking"] for p in seen[:-1])
    last = [p for p in seen if p.get("phase") == "running"][-1]
    assert last["done"] == last["total"] == 20
    assert last["loss"] == pytest.approx(report.loss[-1], rel=1e-6)
    seen.clear()
    w.step(3)
    assert "compiling" not in [p.get("phase") for p in seen]  # same program, no compilation


def test_a_failing_worker_reports_in_the_banner_and_frees_the_runner(gated, monkeypatch):
    w = gated
    page_step_thread = w._handle_message
    page_step_thread({"type": "step", "n": 1})
    runner = w._runner
    runner.gate.release()
    w._worker.join(timeout=10)

    def broken(n=1, *, progress=None):
        raise RuntimeError("runner bug")

    monkeypatch.setattr(runner, "step", broken)
    page_step(w, 2)
    assert "internal error (RuntimeError: runner bug)" in w.error
    assert w.progress == {}  # the next Step is not refused


# -- the model's state and inference mode ------------------------------------------------------
@pytest.fixture
def stateful():
    model, state = eqx.nn.make_with_state(StatefulNet)(jax.random.key(0))
    return Explorer(model, loss_fn=stateful_loss, batch=SMALL_BATCH, state=state)


def state_paths(table):
    paths = table_paths(table)
    st = table["state"]
    return [paths[p] + step for p, step in zip(st["parent"], st["step"])]


def test_state_arrays_are_rows_under_their_layer(stateful):
    w = stateful
    tree = w.spec.model_tree
    table = full_table(w)
    bn = tree.find("bn")
    assert state_paths(table) == [
        "bn.ema_first_time_index",
        "bn.ema_state_index[0]",
        "bn.ema_state_index[1]",
    ]
    assert table["state"]["parent"] == [bn, bn, bn]
    summaries = [table["summaries"][k] for k in table["state"]["summary"]]
    assert summaries == ["bool[]", "float32[4]", "float32[4]"]
    # The StateIndex markers they replace are hidden (their _Sentinel goes with them).
    hidden = [tree.paths[i] for i in table["hidden"]]
    assert hidden == ["bn.ema_first_time_index", "bn.ema_state_index"]
    assert all(tree.cls[i] == "StateIndex" for i in table["hidden"])
    # Status buffers: model leaves, then the state arrays.
    assert len(w._status) == tree.num_leaves + 3
    # A state array is not a parameter: a toggle says what to do instead.
    w._handle_message({"type": "toggle", "path": "bn.ema_state_index[0]", "frozen": True})
    assert "model state" in w.error and "inference mode" in w.error
    # A model without `state=` keeps its rows as they are.
    plain = Explorer(w.spec.model)
    assert plain._table["hidden"] == [] and plain._table["state"]["parent"] == []


def test_step_reports_state_statuses_and_inference_keeps_them(stateful):
    w = stateful
    tree = w.spec.model_tree
    nl = tree.num_leaves
    w.select("bn.ema_state_index[0]")
    assert w.detail["kind"] == "state" and w.detail["owner"] == "bn"
    assert w.detail["summary"] == "float32[4]" and "treescope" in w.detail["value_html"]
    assert "status" not in w.detail
    report = w.step(2)
    assert {leaf.status for leaf in report.state_leaves} == {"updated"}
    status, norms, _ = synced_report(w)
    assert [STATUSES[c] for c in status[nl:]] == ["updated"] * 3
    assert norms[2, nl + 1] == pytest.approx(report.state_leaves[1].delta_norm, rel=1e-5)
    d = w.detail  # the selected state row follows the report
    assert d["status"] == "updated" and d["norms"][2] > 0 and "update_html" in d
    # Frozen is not enough: the statistics move, and the report's notes (listed in the step
    # pane) say how to keep them.
    w._handle_message({"type": "toggle", "path": "bn", "frozen": True})
    report = w.step(1)
    # ema_first_time_index stays False after the first step; the running statistics move.
    assert [leaf.status for leaf in report.state_leaves] == ["unchanged", "updated", "updated"]
    *_, last_run = synced_report(w)
    assert any("frozen layer `bn`" in n and "inference mode" in n for n in last_run["notes"])
    # In inference mode (from the row menu) they stay.
    w._handle_message({"type": "inference", "path": "bn", "on": True, "id": 3})
    assert w.error == "" and w._modes == {str(tree.find("bn")): True}
    report = w.step(2)
    assert {leaf.status for leaf in report.state_leaves} == {"unchanged"}
    assert w.detail["status"] == "unchanged"


def test_inference_message_and_python_method_set_the_spec(stateful):
    w = stateful
    tree = w.spec.model_tree
    bn, drop = tree.find("bn"), tree.find("drop")
    assert w._table["inference"] == [bn, drop] and w._modes == {}
    sent = Sent(w)
    w._handle_message({"type": "inference", "path": "bn", "on": True, "id": 1})
    assert w.spec == FilterSpec(w.spec.model).inference("bn")
    assert w._modes == {str(bn): True} and w.code == to_code(w.spec, "tree_at")
    assert "m.bn.inference" in w.code  # the exported code sets it too
    assert sent.messages == [({"type": "ack", "id": 1, "ok": True}, None)]
    np.testing.assert_array_equal(synced_codes(w), expected_codes(w.spec))
    assert STATES[synced_codes(w)[bn]] == "trainable"  # a mode changes no freeze state
    assert w.inference("drop") is w.spec and w._modes == {str(bn): True, str(drop): True}
    w._handle_message({"type": "inference", "path": "bn", "on": False})
    assert w._modes == {str(drop): True}
    assert w.spec.inference_overrides == {"bn.inference": False, "drop.inference": True}
    # A layer built in inference mode shows it without any spec setting.
    model = eqx.tree_at(lambda m: m.drop.inference, w.spec.model, True)
    assert Explorer(model)._modes == {str(drop): True}
    for bad in (
        {"type": "inference", "path": "lin", "on": True},  # no inference field
        {"type": "inference", "path": "b*", "on": True},  # a glob
        {"type": "inference", "path": "bn", "on": 1},
        {"type": "inference", "path": "bn"},
    ):
        spec = w.spec
        w._handle_message(bad)
        assert w.error and w.spec is spec
    w._handle_message({"type": "inference", "path": "lin", "on": True})
    assert "no layer with an `inference` field" in w.error


# -- the search box's pattern language (also FilterSpec's) ---------------------------------------
MLP_KEYS = ("layers", "activation", "final_activation")


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("norm*", ["blocks[0].norm", "blocks[1].norm", "blocks[2].norm"]),
        ("*ttn*", ["blocks[0].attn", "blocks[1].attn", "blocks[2].attn"]),
        ("blocks[*].mlp.*", [f"blocks[{i}].mlp.{k}" for i in range(3) for k in MLP_KEYS]),
        ("blocks[1].NORM", ["blocks[1].norm", "blocks[1].norm.weight", "blocks[1].norm.bias"]),
        ("head", ["head"]),  # a path is that node, not every path containing it
        ("blocks[-1].norm", ["blocks[2].norm"]),
    ],
)
def test_search_patterns_match_what_people_type(widget, pattern, expected):
    tree = widget.spec.model_tree
    assert [tree.paths[i] for i in match_nodes(tree, pattern)] == expected


def test_freeze_takes_partial_key_globs_and_substrings(model):
    spec = FilterSpec(model)
    assert spec.freeze("norm*") == spec.freeze("blocks[*].norm")
    assert spec.freeze("attn") == spec.freeze("blocks[*].attn")
    assert spec.select("attn").nodes == spec.select("blocks[*].attn").nodes
    with pytest.raises(ExplorerError, match="no node at path `atn`"):
        spec.freeze("atn")  # contained in no path: the unknown-path error, with suggestions
    with pytest.raises(ExplorerError, match="unbalanced"):
        spec.freeze("blocks[0")  # malformed path text is an error, not a search


# -- the optimizer-state estimate, measured on one array per leaf kind ------------------------
@pytest.mark.parametrize(
    "optimizer",
    [
        optax.adamw(1e-3),
        optax.sgd(0.1, momentum=0.9),
        optax.adafactor(1e-3, min_dim_size_to_factor=8),  # factored: not proportional to size
        optax.chain(optax.clip_by_global_norm(1.0), optax.lion(1e-4)),
    ],
    ids=["adamw", "sgd-momentum", "adafactor", "clip+lion"],
)
def test_optimizer_slots_of_a_proxy_equal_a_trace_of_the_whole_model(model, optimizer):
    params = eqx.filter(model, eqx.is_inexact_array)
    nbytes = sum(x.size * x.dtype.itemsize for x in jtu.tree_leaves(params))
    state = jax.eval_shape(optimizer.init, params)
    expected = sum(x.size * x.dtype.itemsize for x in jtu.tree_leaves(state)) / nbytes
    assert optimizer_slots(model, optimizer) == pytest.approx(expected, rel=1e-12)


def test_optimizer_slots_fall_back_to_the_model_when_init_needs_its_structure(model):
    # Labels as a pytree of the model's own structure (in a dict: a callable Module would be
    # called by optax as a labelling function).
    labels = jtu.tree_map(lambda _: "sgd", eqx.filter(model, eqx.is_inexact_array))
    to_adam = lambda sub: jtu.tree_map(lambda _: "adam", sub)  # noqa: E731
    labels = {"m": eqx.tree_at(lambda m: m.head, labels, replace_fn=to_adam)}
    optimizer = optax.multi_transform({"sgd": optax.sgd(0.1), "adam": optax.adam(1e-3)}, labels)
    head = model.head.weight.nbytes + model.head.bias.nbytes
    params = eqx.filter(model, eqx.is_inexact_array)
    total = sum(x.nbytes for x in jtu.tree_leaves(params))
    # Adam's two moments for the head only (plus its count), nothing for the rest.
    assert optimizer_slots({"m": model}, optimizer) == pytest.approx((2 * head + 4) / total)
