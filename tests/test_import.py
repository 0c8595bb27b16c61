"""`import eqx_explorer` stays headless: the widget stack loads only when `Explorer` is used."""

import json
import subprocess
import sys

WIDGET_STACK = ["anywidget", "ipywidgets", "treescope", "traitlets", "IPython", "jupyterlab"]

PROBE = f"""
import json, sys
import eqx_explorer as ex
loaded = lambda: [m for m in {WIDGET_STACK!r} if m in sys.modules]
before = loaded()
ex.Explorer
print(json.dumps([before, loaded()]))
"""


def test_import_loads_no_widget_stack_until_explorer_is_used():
    run = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    before, after = json.loads(run.stdout)
    assert before == []
    assert {"anywidget", "ipywidgets"} <= set(after)


def _package_imports() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Each module of the package -> the package modules it imports at run time (anywhere in
    it; not under `if TYPE_CHECKING:`), and the names it imports from them."""
    import ast
    from pathlib import Path

    import eqx_explorer

    class Imports(ast.NodeVisitor):
        def __init__(self) -> None:
            self.modules: set[str] = set()
            self.names: set[str] = set()

        def visit_If(self, node: ast.If) -> None:
            if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                self.generic_visit(node)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.level != 1:
                return
            if node.module:  # from ._spec import FilterSpec
                self.modules.add(node.module)
                self.names |= {alias.name for alias in node.names}
            else:  # from . import _widget
                self.modules |= {alias.name for alias in node.names}

    graph, names = {}, {}
    for path in sorted(Path(eqx_explorer.__file__).parent.glob("*.py")):
        found = Imports()
        found.visit(ast.parse(path.read_text()))
        graph[path.stem], names[path.stem] = found.modules, found.names
    return graph, names


def test_package_modules_import_each_other_without_cycles_or_private_names():
    graph, names = _package_imports()
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", "import cycle: " + " -> ".join(trail + [module])
        state[module] = "open"
        for other in sorted(graph.get(module, ())):
            visit(other, trail + [module])
        state[module] = "done"

    for module in graph:
        visit(module, [])
    private = {m: sorted(n for n in ns if n.startswith("_")) for m, ns in names.items()}
    assert {m: ns for m, ns in private.items() if ns} == {}, "promote shared helpers to names"
