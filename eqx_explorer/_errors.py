"""The one exception type of eqx_explorer, and how its messages quote user input."""

from __future__ import annotations

from typing import Any

QUOTE_LIMIT = 80


class ExplorerError(ValueError):
    """Raised for bad input: an unknown path, an impossible freeze, a stale spec.

    Messages say what went wrong, at which path, and how to fix it. It is a
    `ValueError`, so code that already catches `ValueError` keeps working.

    >>> model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
    >>> ex.FilterSpec(model).freeze("layers[2]")
    Traceback (most recent call last):
    ...
    eqx_explorer._errors.ExplorerError: no node at path `layers[2]` in this MLP: ...
    """


def shorten(text: str, limit: int = QUOTE_LIMIT) -> str:
    """`text` cut to `limit` characters with `…` and its length, for quoting in messages.

    A 1 MB path in a message would be a 1 MB message.

    >>> shorten("layers" + "[0]" * 100, 20)
    'layers[0][0][0][0][…(306 characters)'
    """
    return text if len(text) <= limit else f"{text[: limit - 1]}…({len(text):,} characters)"


def short_repr(value: Any, limit: int = QUOTE_LIMIT) -> str:
    """`repr(value)` shortened as by `shorten`; never raises (a user's `__repr__` may)."""
    try:
        text = repr(value)
    except Exception as e:
        return f"<{type(value).__name__} whose repr raised {type(e).__name__}>"
    return shorten(text, limit)
