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
