"""The one exception type of eqx_explorer."""


class ExplorerError(ValueError):
    """Raised for bad input: an unknown path, an impossible freeze, a stale spec.

    Messages say what went wrong, at which path, and how to fix it. It is a
    `ValueError`, so code that already catches `ValueError` keeps working.
    """
