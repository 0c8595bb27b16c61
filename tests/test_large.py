"""A 50,000-leaf model opens in the widget, toggles with a small delta, and exports short code."""

import sys
from pathlib import Path

import jax.tree_util as jtu

from eqx_explorer import Explorer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _models import stack_model  # noqa: E402


def test_fifty_thousand_leaves():
    model = stack_model(50_000)
    assert len(jtu.tree_leaves(model)) >= 49_995
    w = Explorer(model)
    sent = []
    w.send = lambda content, buffers=None: sent.append((content, buffers))
    w._handle_message({"type": "toggle", "path": "blocks[4321]", "frozen": True})
    assert w.error == ""
    assert w.spec.state("blocks[4321]") == "frozen"
    assert w.spec.state("blocks[4322]") == "trainable"
    # The delta names the toggled block's nodes and its ancestors only, not the whole tree.
    changed = [c for c in sent if c[0].get("type") == "states"]
    assert changed and all(len(b[0]) // 4 <= 10 for _, b in changed)
    for style in ("tree_at", "path"):
        code = w.spec.to_code(style)
        assert len(code.splitlines()) < 30
        ns = {"model": model}
        exec(code, ns)
        assert jtu.tree_leaves(ns["filter_spec"]) == jtu.tree_leaves(w.filter_spec)
