"""The Explorer widget in marimo: notebooks/marimo_tour.py served by `marimo run`, in Chromium.

The widget renders, a click on a checkbox freezes the node (the new state, counts and code come
back from Python), and Step brings the report's badges.

marimo renders an anywidget inside a shadow root; Playwright's CSS locators pierce it, so
the rows are found with the same selectors as in JupyterLab. marimo's configuration, cache
and state go to a temporary directory (never the user's), and it neither opens a browser nor
checks for updates.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import expect

from .conftest import (
    ACTION_MS,
    ARTIFACTS,
    ROOT,
    SERVER_START_S,
    _free_port,
    row,
    shot,
    stop_process,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TOUR = ROOT / "notebooks" / "marimo_tour.py"
RENDER_MS = 300_000  # the app runs every cell (JAX import, model) before the widget shows
STEP_MS = 180_000  # the first Step compiles


@pytest.fixture(scope="module")
def marimo_url(tmp_path_factory):
    base = tmp_path_factory.mktemp("marimo")
    env = dict(os.environ)
    for name in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME", "XDG_DATA_HOME"):
        env[name] = str(base / name.lower())
    env["MARIMO_SKIP_UPDATE_CHECK"] = "1"
    port = _free_port()
    cmd = [
        *(sys.executable, "-m", "marimo", "run", str(TOUR)),
        *("--headless", "--host", "127.0.0.1", "--port", str(port), "--no-token"),
        "--no-sandbox",
    ]
    log = base / "marimo.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=base)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for_health(proc, url, log)
        yield url
    finally:
        stop_process(proc)
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "marimo-server.log").write_bytes(log.read_bytes())


def _wait_for_health(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"marimo run exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"marimo run did not answer in {SERVER_START_S} s:\n{log.read_text()}")
        time.sleep(0.25)


@pytest.fixture
def marimo_page(browser, request):
    """A page of its own (the shared `page` fixture would start JupyterLab too)."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    console: list[str] = []
    page.on("console", lambda m: console.append(f"[{m.type}] {m.text}"))
    page.on("pageerror", lambda e: console.append(f"[pageerror] {e}"))
    try:
        yield page
    finally:
        if getattr(request.node, "eqxe_failed", False):
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "marimo-failure.png"), full_page=True)
            (ARTIFACTS / "marimo-console.log").write_text("\n".join(console))
        context.close()


def test_tour_in_marimo_renders_a_click_freezes_and_step_reports(marimo_page, marimo_url):
    page = marimo_page
    page.goto(marimo_url)
    embed = page.locator(row("embed"))
    expect(embed).to_have_attribute("data-state", "trainable", timeout=RENDER_MS)
    expect(page.locator(row("head"))).to_have_attribute("data-state", "trainable")
    frozen = page.locator(".eqxe-root .eqxe-header [data-testid=frozen]")
    code = page.locator(".eqxe-root .eqxe-code")
    before = (frozen.inner_text(), code.inner_text())
    shot(page, "marimo-1-rendered")

    # The click goes to the kernel as a message; the new state comes back from Python.
    embed.locator(".eqxe-check").click()
    expect(embed).to_have_attribute("data-state", "frozen", timeout=ACTION_MS)
    expect(page.locator(row("embed.weight"))).to_have_attribute("data-state", "frozen")
    expect(page.locator(row("head"))).to_have_attribute("data-state", "trainable")
    expect(embed.locator(".eqxe-check")).not_to_be_checked()
    expect(frozen).not_to_have_text(before[0], timeout=ACTION_MS)
    expect(code).not_to_have_text(before[1], timeout=ACTION_MS)
    assert "embed" in code.inner_text()
    shot(page, "marimo-2-embed-frozen")

    # Step runs in a worker thread whose progress and report reach the page too.
    page.locator(".eqxe-root .eqxe-step").click()
    head = page.locator(f"{row('head.weight')} .eqxe-badge")
    expect(head).to_have_attribute("data-status", "updated", timeout=STEP_MS)
    expect(page.locator(f"{row('embed.weight')} .eqxe-badge")).to_have_attribute(
        "data-status", "frozen"
    )
    shot(page, "marimo-3-after-step")
