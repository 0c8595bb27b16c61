"""A 50,000-leaf model opens in the widget and a toggle changes only its block's nodes."""

import jax.tree_util as jtu
import numpy as np

from eqx_explorer import Explorer
from tests.helpers import deep_model


def test_fifty_thousand_leaves_open_and_a_toggle_changes_only_its_nodes():
    model = deep_model(50_000)
    assert len(jtu.tree_leaves(model)) >= 49_995
    w = Explorer(model)
    before = np.frombuffer(w._state_codes, np.uint8).copy()
    w._handle_message({"type": "toggle", "path": "blocks[4321]", "frozen": True})
    assert w.error == ""
    assert w.spec.state("blocks[4321]") == "frozen"
    assert w.spec.state("blocks[4322]") == "trainable"
    # The synced node states are one byte per node; the toggle changes the block's nodes and
    # its ancestors' only.
    after = np.frombuffer(w._state_codes, np.uint8)
    assert after.shape == before.shape == (len(w._tree),)
    tree = w._tree
    changed = {tree.paths[i] for i in np.flatnonzero(after != before)}
    assert "blocks[4321]" in changed and len(changed) <= 10
    assert all("blocks[4321]".startswith(p) or p.startswith("blocks[4321]") for p in changed)
