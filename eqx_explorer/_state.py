"""The model's state (`eqx.nn.State`), named by the layers that own it.

`eqx.nn.make_with_state` leaves `StateIndex` markers in the model and puts the arrays in a
separate `State`. A state array is named by the path of its `StateIndex` in the model plus its
place in the stored value, in the one path grammar:

```python
model, state = eqx.nn.make_with_state(Net)(key)      # Net has `bn1 = eqx.nn.BatchNorm(...)`
[(e.path, e.owner) for e in state_entries(model, state)]
# [('bn1.ema_first_time_index', 'bn1'),
#  ('bn1.ema_state_index[0]', 'bn1'), ('bn1.ema_state_index[1]', 'bn1')]
```

Entries come in the order of `jtu.tree_leaves(state)`, so entry `i` names state leaf `i`;
a state leaf whose `StateIndex` is not in the model (a state built for another model) is named
by its position, `state[<flat index i>]`, with owner `""`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import equinox as eqx
import jax.tree_util as jtu

from ._paths import format_key, format_path

__all__ = ["StateEntry", "state_entries", "has_state"]


class StateEntry(NamedTuple):
    path: str  # e.g. "bn1.ema_state_index[0]"
    owner: str  # path of the layer holding the StateIndex, e.g. "bn1"
    index_path: str  # path of the StateIndex itself, e.g. "bn1.ema_state_index"


def _indices(model: Any) -> list[tuple[tuple, Any]]:
    is_index = lambda x: isinstance(x, eqx.nn.StateIndex)  # noqa: E731
    flat = jtu.tree_flatten_with_path(model, is_leaf=is_index)[0]
    return [(keys, x) for keys, x in flat if is_index(x)]


def has_state(model: Any) -> bool:
    """Whether `model` holds `eqx.nn.StateIndex` markers (it needs an `eqx.nn.State`)."""
    # No key paths: this runs on every export, and a 50,000-leaf model has many.
    is_index = lambda x: isinstance(x, eqx.nn.StateIndex)  # noqa: E731
    return any(is_index(x) for x in jtu.tree_leaves(model, is_leaf=is_index))


def state_entries(model: Any, state: Any) -> list[StateEntry]:
    """One `StateEntry` per array leaf of `state`, in `jtu.tree_leaves(state)` order."""
    leaves = jtu.tree_leaves(state)
    names: dict[int, StateEntry] = {}
    by_id = {id(x): i for i, x in enumerate(leaves)}
    for keys, index in _indices(model):
        try:
            value = state.get(index)
        except Exception:  # noqa: BLE001 - an index this state does not hold
            continue
        owner, where = format_path(keys[:-1]), format_path(keys)
        for sub, leaf in jtu.tree_flatten_with_path(value)[0]:
            i = by_id.get(id(leaf))
            if i is not None and i not in names:
                names[i] = StateEntry(where + "".join(map(format_key, sub)), owner, where)
    return [
        names.get(i, StateEntry(f"state[<flat index {i}>]", "", "")) for i in range(len(leaves))
    ]
