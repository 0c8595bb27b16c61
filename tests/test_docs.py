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


def _public_members() -> list[str]:
    names = []
    for cls_name in PUBLIC:
        cls = getattr(ex, cls_name)
        if inspect.isclass(cls):
            names += [
                f"{cls_name}.{name}"
                for name, value in vars(cls).items()
                if not name.startswith("_")
                and isinstance(value, property | classmethod | staticmethod | type(_public_members))
            ]
    return names


@pytest.mark.parametrize("name", _public_members())
def test_public_method_has_an_example(name: str) -> None:
    cls_name, member = name.split(".")
    value = inspect.getattr_static(getattr(ex, cls_name), member)
    function = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
    assert ">>>" in (inspect.getdoc(function) or ""), f"{name} has no runnable example"
