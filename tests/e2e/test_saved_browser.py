"""The widget with no kernel: a saved executed notebook reopened in JupyterLab, and its HTML export.

The tour is executed once by nbclient, which stores the widget state in the notebook's
metadata (what JupyterLab's "save widget state" writes). Everything the widget draws is in
that state, so both views must show the saved node states, counts, code and badges:

- JupyterLab reopens the saved notebook; its widget manager draws the saved widgets once a
  fresh kernel is connected, and no cell runs, so the rows come from the notebook's metadata
  (the widgets are read-only until the cells run again);
- `jupyter nbconvert --to html` output opens from a file URL-like origin; an online reader
  loads require.js, @jupyter-widgets/html-manager and anywidget's front end from CDNs, which
  this machine cannot reach, so `page.route` serves them from their npm packages (packed once
  into a cache directory) and anywidget's AMD module from the installed Python package.

The expected values are read from the saved widget state itself, so the tests hold whatever
the tour does to its widget.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import anywidget
import nbformat
import numpy as np
import pytest
from nbformat.sign import NotebookNotary

from eqx_explorer._widget import STATES, STATUSES, table_columns

from .conftest import PANEL, ROOT, WIDGET_MS, open_notebook, shot

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NPM_PACKAGES = {
    "html-manager": ("@jupyter-widgets/html-manager@1.0.15", "package/dist/embed-amd.js"),
    "requirejs": ("requirejs@2.3.8", "package/require.js"),
}
STATIC_ORIGIN = "http://static.eqxe.test"
EXECUTE_S = 600
# The kernel's own execution counter: 0 while no cell ran in this session.
KERNEL_EXECUTIONS = f"""async () => {{
  const kernel = ({PANEL})().sessionContext.session.kernel;
  const reply = await kernel.requestExecute({{code: '', silent: false, store_history: false}}).done;
  return reply.content.execution_count;
}}"""


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "eqx_explorer-e2e"


@pytest.fixture(scope="session")
def cdn_files() -> dict[str, Path]:
    """The files an HTML export loads from CDNs, from npm tarballs packed into a cache."""
    cache = _cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, (spec, member) in NPM_PACKAGES.items():
        target = cache / spec.replace("/", "+") / Path(member).name
        if not target.exists():
            if shutil.which("npm") is None:
                pytest.fail("npm is needed to fetch the widget front end of the HTML export")
            packed = subprocess.run(
                ["npm", "pack", spec, "--pack-destination", str(cache), "--silent"],
                check=True,
                capture_output=True,
                text=True,
                timeout=300,
            ).stdout.split()[-1]
            with tarfile.open(cache / packed) as tar:
                data = tar.extractfile(member).read()
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        out[name] = target
    out["anywidget"] = Path(anywidget.__file__).parent / "nbextension" / "index.js"
    return out


@pytest.fixture(scope="session")
def executed_tour(tmp_path_factory) -> Path:
    """The tour run top to bottom by nbclient, saved with its widget state."""
    from nbclient import NotebookClient

    out = tmp_path_factory.mktemp("executed") / "00_tour.ipynb"
    nb = nbformat.read(ROOT / "notebooks" / "00_tour.ipynb", as_version=4)
    client = NotebookClient(
        nb,
        timeout=EXECUTE_S,
        kernel_name="python3",
        store_widget_state=True,
        resources={"metadata": {"path": str(out.parent)}},
    )
    client.execute()
    nbformat.write(nb, out)
    return out


def saved_explorers(notebook: Path) -> list[dict]:
    """The saved state of each Explorer the notebook displays, in output order, with the
    buffers decoded to bytes (the order of the `.eqxe-root`s on the page)."""
    nb = json.loads(notebook.read_text())
    models = nb["metadata"]["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    out = []
    for cell in nb["cells"]:
        for output in cell.get("outputs", []):
            view = output.get("data", {}).get("application/vnd.jupyter.widget-view+json")
            model = models.get(view["model_id"]) if view else None
            if model and "_table" in model["state"]:
                state = dict(model["state"])
                for buf in model.get("buffers", []):
                    state[buf["path"][0]] = base64.b64decode(buf["data"])
                out.append(state)
    assert out, f"no Explorer in the widget state of {notebook}"
    return out


def expected_view(state: dict) -> dict:
    """What the first rows must show, from the saved state: path -> (state, badge)."""
    table = {**state["_table"], **table_columns(state["_table"], state["_table_columns"])}
    paths = [""]
    for i in range(1, table["n"]):
        paths.append(paths[table["parent"][i]] + table["step"][i])
    codes = np.frombuffer(state["_state_codes"], np.uint8)
    status = np.frombuffer(state["_leaf_status"], np.uint8)
    kinds = [state["_options"]["kinds"][k] for k in table["kind"]]
    leaf = -1
    out = {}
    for i, path in enumerate(paths):
        badge = ""
        if kinds[i] in ("array", "leaf"):
            leaf += 1
            badge = STATUSES[status[leaf]] if status[leaf] != 255 else ""
        out[path] = (STATES[codes[i]], badge)
    return out


def check_saved_views(page, states: list[dict]) -> None:
    """Each widget on the page shows its saved counts, code, node states and badges."""
    roots = page.locator(".eqxe-root")
    assert roots.count() == len(states)
    badges = []
    for k, state in enumerate(states):
        root = roots.nth(k)
        counts = state["counts"]
        header = root.locator(".eqxe-header")
        for part, key in (("trainable", "trainable_params"), ("total", "total_params")):
            assert header.locator(f"[data-testid={part}]").inner_text() == f"{counts[key]:,}"
        assert root.locator(".eqxe-code").inner_text().strip() == state["code"].strip()
        expected = expected_view(state)
        shown = root.locator(".eqxe-tree .eqxe-row").evaluate_all(
            "rows => rows.map((r) => [r.dataset.path, r.dataset.state, "
            "r.querySelector('.eqxe-badge').dataset.status || ''])"
        )
        assert len(shown) > 5
        for path, node_state, status in shown:
            assert (node_state, status) == expected[path], (k, path)
        badges += [status for _, _, status in shown if status]
        # The stale flag is drawn as saved.
        assert ("eqxe-stale" in (root.get_attribute("class") or "")) == state["_stale"]
    assert badges  # the saved steps left badges on shown leaves


def test_html_export_shows_the_saved_tree_counts_code_and_badges(
    browser, executed_tour, cdn_files, tmp_path
):
    from nbconvert import HTMLExporter

    html, _ = HTMLExporter().from_filename(str(executed_tour))
    (tmp_path / "00_tour.html").write_text(html)
    states = saved_explorers(executed_tour)

    served = {
        re.compile(r"/require(\.min)?\.js$"): cdn_files["requirejs"],
        re.compile(r"/@jupyter-widgets/html-manager@[^/]*/dist/embed-amd\.js$"): cdn_files[
            "html-manager"
        ],
        re.compile(r"/anywidget@[^/]*/dist/index\.js$"): cdn_files["anywidget"],
    }
    requested: list[str] = []

    def handle(route):
        url = route.request.url
        requested.append(url)
        if url == f"{STATIC_ORIGIN}/00_tour.html":
            return route.fulfill(path=str(tmp_path / "00_tour.html"), content_type="text/html")
        for pattern, path in served.items():
            if pattern.search(url):
                return route.fulfill(path=str(path), content_type="application/javascript")
        return route.abort()  # fonts, MathJax: nothing else is needed to draw the widget

    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        context.route("**/*", handle)
        page.goto(f"{STATIC_ORIGIN}/00_tour.html")
        page.wait_for_selector(".eqxe-root .eqxe-row[data-path]", timeout=WIDGET_MS)
        page.locator(".eqxe-root").first.scroll_into_view_if_needed()
        shot(page, "html-export")
        assert any("embed-amd.js" in u for u in requested), requested
        check_saved_views(page, states)
        assert not errors, errors
    finally:
        context.close()


def test_reopened_saved_notebook_shows_saved_state_before_any_cell_runs(
    page, jupyter_server, executed_tour
):
    target = jupyter_server.root / "saved" / "00_tour.ipynb"
    target.parent.mkdir(exist_ok=True)
    shutil.copy(executed_tour, target)
    states = saved_explorers(target)
    # Outputs a user ran and saved are trusted (the server shares this user's notary);
    # JupyterLab shows only the text fallback of an untrusted widget output.
    NotebookNotary().sign(nbformat.read(target, as_version=4))
    # JupyterLab's widget manager reads a notebook's saved widgets once a (fresh) kernel is
    # connected; no cell runs here, so the rows can only come from the notebook's metadata.
    open_notebook(page, jupyter_server.lab_url("saved/00_tour.ipynb"))
    page.wait_for_selector(".eqxe-root .eqxe-row[data-path]", timeout=WIDGET_MS)
    page.locator(".eqxe-root").first.scroll_into_view_if_needed()
    shot(page, "saved-notebook-reopened")
    assert page.evaluate(KERNEL_EXECUTIONS) == 0
    check_saved_views(page, states)
