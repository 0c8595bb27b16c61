"""The docstrings' examples run (as doctests), and every public name has one."""

import doctest
import importlib
import inspect
import pkgutil

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_explorer as ex

# Names every example may use without importing them, as in the README.
GLOBS = {"ex": ex, "eqx": eqx, "jax": jax, "jnp": jnp, "np": np}
MODULES = sorted(m.name for m in pkgutil.iter_modules(ex.__path__) if m.name != "__main__")
# The widget documents itself in `_widget.py`.
PUBLIC = [name for name in ex.__all__ if name != "Explorer"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(f"eqx_explorer.{name}")
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    result = doctest.testmod(module, extraglobs=GLOBS, optionflags=flags, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed"


@pytest.mark.parametrize("name", PUBLIC)
def test_public_name_documents_its_arguments_with_an_example(name: str) -> None:
    obj = getattr(ex, name)
    doc = inspect.getdoc(obj) or ""
    assert ">>>" in doc, f"{name} has no runnable example"
    if inspect.isfunction(obj):
        assert "**Arguments:**" in doc and "**Returns:**" in doc, name
