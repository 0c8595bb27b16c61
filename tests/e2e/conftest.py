"""Fixtures for the browser tests: a JupyterLab server on 127.0.0.1 and Debian's Chromium.

The server runs this interpreter's `jupyter lab` with a random token, in a temporary root that
holds a copy of the tour (running it writes outputs; the repository's notebook stays clean),
with its own settings and workspaces (no news pop-up, no restored layout, every cell kept in
the DOM) and a `python3` kernel that is this interpreter. `window.jupyterapp` is exposed so the
tests can wait on the kernel's state instead of sleeping.

On a failing test the page's screenshot and console log go to test-artifacts/. The helpers at
the end (open a notebook and run all its cells, find a row, read a badge) serve every test.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest

from tests.conftest import FAST_COMPILE

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
SERVER_START_S = 120

# User settings for the test server: no news/update toasts over the page, and no notebook
# windowing, so a widget's output stays in the DOM wherever it is scrolled.
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}


def pytest_runtest_makereport(item, call):
    if call.when == "call":
        excinfo = call.excinfo
        item.eqxe_failed = excinfo is not None and not excinfo.errisinstance(pytest.skip.Exception)


def stop_process(proc: subprocess.Popen) -> None:
    """Terminate a server process; kill it if it does not exit within 20 s."""
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, token: str, root: Path, log: Path):
        self.url, self.token, self.root, self.log = url, token, root, log

    def page_url(self, path: str) -> str:
        return f"{self.url}/{path.lstrip('/')}?token={self.token}"

    def lab_url(self, notebook: str) -> str:
        """JupyterLab opening `notebook` (a path in the root) in a workspace of its own: the
        default workspace would reopen the notebooks other tests opened, beside it."""
        workspace = notebook.removesuffix(".ipynb").replace("/", "-")
        return self.page_url(f"lab/workspaces/{workspace}/tree/{notebook}")

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


@contextlib.contextmanager
def lab_server(base: Path, copy_tour: bool = True, kernel_env: dict[str, str] | None = None):
    """A JupyterLab server rooted at `base / "root"` (used by the tests and bench_browser),
    whose kernels get `kernel_env` on top of the server's environment."""
    root = base / "root"
    root.mkdir()
    if copy_tour:  # one copy per front end, so that each test gets its own kernel session
        for front_end in ("lab", "notebook7"):
            (root / front_end).mkdir()
            shutil.copy(ROOT / "notebooks" / "00_tour.ipynb", root / front_end / "00_tour.ipynb")

    settings = base / "settings"
    for name, values in LAB_SETTINGS.items():
        path = settings / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    # `python3` = this interpreter, found first (JUPYTER_PATH precedes the user's data dir)
    kernel_dir = base / "data" / "kernels" / "python3"
    kernel_dir.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel = {
        "argv": argv,
        "display_name": "Python 3",
        "language": "python",
        "env": kernel_env or {},
    }
    (kernel_dir / "kernel.json").write_text(json.dumps(kernel))

    env = dict(os.environ)
    env.update(
        JUPYTERLAB_SETTINGS_DIR=str(settings),
        JUPYTERLAB_WORKSPACES_DIR=str(base / "workspaces"),
        JUPYTER_PATH=os.pathsep.join([str(base / "data"), env.get("JUPYTER_PATH", "")]).strip(
            os.pathsep
        ),
        JUPYTER_RUNTIME_DIR=str(base / "runtime"),
    )
    port, token = _free_port(), secrets.token_hex(16)
    cmd = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        "--port-retries=0",
        f"--IdentityProvider.token={token}",
        "--allow-root",
        "--LabApp.expose_app_in_browser=True",
        "--JupyterNotebookApp.expose_app_in_browser=True",
        f"--ServerApp.root_dir={root}",
    ]
    log = base / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root)
    server = Server(f"http://127.0.0.1:{port}", token, root, log)
    deadline = time.monotonic() + SERVER_START_S
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited ({proc.returncode}):\n{server.log_tail()}")
            try:
                status = f"{server.url}/api/status?token={token}"
                with urllib.request.urlopen(status, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"jupyter lab did not answer in {SERVER_START_S} s:\n{server.log_tail()}"
                )
            time.sleep(0.25)
        yield server
    finally:
        stop_process(proc)


@pytest.fixture(scope="session")
def jupyter_server(tmp_path_factory):
    base = tmp_path_factory.mktemp("lab")
    try:
        with lab_server(
            base,
            kernel_env={"XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()},
        ) as server:
            yield server
    except RuntimeError as e:
        pytest.fail(str(e))
    finally:
        ARTIFACTS.mkdir(exist_ok=True)
        if (base / "server.log").exists():
            shutil.copy(base / "server.log", ARTIFACTS / "jupyter-server.log")


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).exists():
        message = f"{CHROMIUM} is missing (`make test` installs it: scripts/ensure_chromium.sh)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="session")
def _shared_page() -> Iterator[dict]:
    """The page the tests on the server share (`page`), while no test fails on it."""
    shared: dict = {}
    yield shared
    if shared:
        shared["context"].close()


@pytest.fixture
def page(browser, jupyter_server, _shared_page, request):
    """A page on the server, shared by the tests that pass: once it runs JupyterLab,
    `open_notebook` opens the next test's notebook in it (loading JupyterLab costs Chromium
    about 5 s of a core, opening a notebook in it about 1 s). A failed test's page is closed:
    the next test starts on a new one."""
    if not _shared_page:
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=jupyter_server.url)
        page = context.new_page()
        console: list[str] = []
        page.on("console", lambda m: console.append(f"[{m.type}] {m.text}"))
        page.on("pageerror", lambda e: console.append(f"[pageerror] {e}"))
        page.eqxe_console = console
        _shared_page.update(context=context, page=page)
    page = _shared_page["page"]
    page.eqxe_console.clear()  # this test's messages only
    try:
        yield page
    finally:
        if getattr(request.node, "eqxe_failed", False):
            ARTIFACTS.mkdir(exist_ok=True)
            name = request.node.name.replace("/", "_")
            try:
                page.screenshot(path=str(ARTIFACTS / f"{name}-failure.png"), full_page=True)
            except Exception:  # the page may be gone; the log still helps
                pass
            (ARTIFACTS / f"{name}-console.log").write_text("\n".join(page.eqxe_console))
            _shared_page.pop("context").close()
            _shared_page.clear()


# -- helpers for the browser tests ----------------------------------------------------------
KERNEL_IDLE_MS = 180_000  # a cold kernel start
RUN_ALL_MS = 300_000  # JAX import + jit compiles on 2 cores
WIDGET_MS = 60_000
ACTION_MS = 60_000  # one click -> Python -> state back (a Step compiles the first time)

# `window.jupyterapp` in JupyterLab and in Notebook 7: the notebook panel in the main area.
PANEL = """() => {
  const app = window.jupyterapp;
  if (!app || !app.shell) return null;
  const w = app.shell.currentWidget;
  return w && w.content && w.sessionContext ? w : null;
}"""

KERNEL_IDLE = f"""() => {{
  const w = ({PANEL})();
  const kernel = w && w.sessionContext.session && w.sessionContext.session.kernel;
  return !!kernel && kernel.status === 'idle' && w.context.isReady;
}}"""

ALL_RAN = f"""() => {{
  const w = ({PANEL})();
  if (!w) return false;
  const kernel = w.sessionContext.session && w.sessionContext.session.kernel;
  const cells = w.content.widgets.filter((c) => c.model.type === 'code');
  const errors = cells.some((c) => c.model.outputs.toJSON().some((o) => o.output_type === 'error'));
  return errors || (!!kernel && kernel.status === 'idle' &&
                    cells.every((c) => c.model.executionCount !== null));
}}"""

CELL_ERRORS = f"""() => ({PANEL})().content.widgets
  .filter((c) => c.model.type === 'code')
  .flatMap((c) => c.model.outputs.toJSON().filter((o) => o.output_type === 'error'))
  .map((o) => o.ename + ': ' + o.evalue + '\\n' + (o.traceback || []).join('\\n'))"""


def row(path: str) -> str:
    return f'.eqxe-root .eqxe-row[data-path="{path}"]'


def row_in(path: str) -> str:
    """A row's selector inside one widget (`root.locator(row_in(path))`)."""
    return f'.eqxe-row[data-path="{path}"]'


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=False)


# Closes the notebooks open in JupyterLab, unsaved (no "save your work?" dialog), and opens
# the one at `path`.
OPEN_IN_PLACE = """async (path) => {
  const app = window.jupyterapp;
  for (const w of Array.from(app.shell.widgets('main'))) {
    if (w.context) w.context.model.dirty = false;
    w.dispose();
  }
  await app.commands.execute('docmanager:open', {path});
}"""
SHOWS = f"""(path) => {{
  const w = ({PANEL})();
  return !!w && w.context.path === path;
}}"""


def open_notebook(page, url: str) -> None:
    """Go to `url` and wait for its notebook's kernel. A JupyterLab URL (`Server.lab_url`) on
    a page that already runs this server's JupyterLab opens the notebook in place."""
    lab, _, path = url.partition("?")[0].partition("/lab/workspaces/")
    path = urllib.parse.unquote(path.partition("/tree/")[2])
    if path and page.url.startswith(f"{lab}/lab") and page.evaluate("!!window.jupyterapp"):
        page.evaluate(OPEN_IN_PLACE, path)
        page.wait_for_function(SHOWS, arg=path, timeout=WIDGET_MS, polling=100)
    else:
        page.goto(url)
    page.wait_for_function(KERNEL_IDLE, timeout=KERNEL_IDLE_MS, polling=100)


def open_and_run_all(page, url: str) -> None:
    open_notebook(page, url)
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    page.wait_for_function(ALL_RAN, timeout=RUN_ALL_MS, polling=100)
    errors = page.evaluate(CELL_ERRORS)
    assert not errors, "a cell failed:\n" + "\n\n".join(errors)[-6000:]
    page.wait_for_selector(".eqxe-root .eqxe-row[data-path]", timeout=WIDGET_MS)
    page.locator(".eqxe-root").first.scroll_into_view_if_needed()


def badge(page, path: str) -> str:
    return page.eval_on_selector(f"{row(path)} .eqxe-badge", "b => b.dataset.status || ''")


# A notebook's first cell for tests that build their own explorers.
SETUP = """\
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import eqx_explorer as ex
from eqx_explorer._examples import TinyTransformer, example_batch, mse_loss

warnings.filterwarnings("ignore", message="When `eqx.nn.BatchNorm")"""


def notebook(server, name: str, *cells: str) -> str:
    """Write a notebook of `cells` into the server's root; its URL in JupyterLab."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    path = server.root / "steps" / f"{name}.ipynb"
    path.parent.mkdir(exist_ok=True)
    nbformat.write(nb, path)
    return server.lab_url(f"steps/{name}.ipynb")


def wait_js(page, condition: str, timeout: float = ACTION_MS) -> float:
    """Wait for a JS condition (an expression); the seconds it took."""
    t0 = time.monotonic()
    page.wait_for_function(f"() => {condition}", timeout=timeout, polling=50)
    return time.monotonic() - t0
