"""The Explorer widget in a real browser: the tour in JupyterLab and in Notebook 7.

JupyterLab: open notebooks/00_tour.ipynb (a copy), run all cells, then use the widget as a
student would: it shows the model as built; click a module's checkbox (the header counts and
the code pane follow), Step (rows get status badges: frozen rows stay frozen, trainable rows
are updated), and Copy (the clipboard holds the code pane's text). Notebook 7: the tour's
widget renders.

Every wait is on a condition (the kernel's state through `window.jupyterapp`, the widget's
DOM), never a fixed sleep. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import pytest

from .conftest import ACTION_MS, WIDGET_MS, badge, open_and_run_all, row, shot

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_tour_in_jupyterlab(page, jupyter_server):
    open_and_run_all(page, jupyter_server.lab_url("lab/00_tour.ipynb"))
    root = page.locator(".eqxe-root").first
    shot(page, "lab-1-after-run-all")

    # After Run All the tour's widget shows the model as built (the cells after it drive their
    # own explorer): everything trainable, no badges.
    for path in ("embed", "blocks", "blocks[0]", "head"):
        assert page.get_attribute(row(path), "data-state") == "trainable", path
    assert page.get_attribute(row("step_count"), "data-state") == "static"
    first_badges = root.locator(".eqxe-tree .eqxe-badge").evaluate_all(
        "bs => bs.map((b) => b.dataset.status).filter(Boolean)"
    )
    assert first_badges == []

    # 1. Click a module's checkbox: `head` becomes frozen; counts and code follow.
    trainable = root.locator(".eqxe-header [data-testid=trainable]")
    frozen = root.locator(".eqxe-header [data-testid=frozen]")
    code = root.locator(".eqxe-code")
    before = (trainable.inner_text(), frozen.inner_text(), code.inner_text())
    # the code pane's first line repeats the header's count: "N of M parameters train"
    assert f"{before[0]} of " in before[2], (before[0], before[2][:200])
    page.click(f"{row('head')} .eqxe-check")
    page.wait_for_function(
        f"""() => document.querySelector('{row("head")}').dataset.state === 'frozen'""",
        timeout=ACTION_MS,
    )
    page.wait_for_function(
        """(old) => { const c = document.querySelector('.eqxe-root .eqxe-code');
                      return c && c.textContent !== old; }""",
        arg=before[2],
        timeout=ACTION_MS,
    )
    after = (trainable.inner_text(), frozen.inner_text(), code.inner_text())
    assert after[0] != before[0], f"trainable count unchanged: {before[0]!r}"
    assert after[1] != before[1], f"frozen count unchanged: {before[1]!r}"
    assert f"{after[0]} of " in after[2], (after[0], after[2][:200])
    assert not page.is_checked(f"{row('head')} .eqxe-check")
    shot(page, "lab-2-head-frozen")

    # 2. Step: every row gets a badge.
    page.click(".eqxe-root .eqxe-step")
    page.wait_for_function(
        f"""() => !!document.querySelector('{row("head.weight")} .eqxe-badge').dataset.status""",
        timeout=ACTION_MS,
    )
    expected = {
        "head.weight": "frozen",  # just clicked
        "head.bias": "frozen",
        "embed.weight": "updated",  # trainable
        "blocks[0].norm.weight": "updated",
        "blocks[1].norm.weight": "updated",
        "blocks[1].norm.bias": "updated",
        "step_count": "kept",  # an int array: never trains, kept as it was
    }
    assert "eqxe-stale" not in (root.get_attribute("class") or "")
    seen = {path: badge(page, path) for path in expected}
    assert seen == expected
    statuses = page.eval_on_selector_all(
        ".eqxe-root .eqxe-tree .eqxe-badge", "bs => bs.map((b) => b.dataset.status)"
    )
    assert "leaked" not in statuses and "lost" not in statuses
    shot(page, "lab-3-after-step")

    # 3. Copy puts the code pane's text on the clipboard.
    page.click(".eqxe-root .eqxe-copy")
    page.wait_for_function(
        "() => document.querySelector('.eqxe-root .eqxe-copy').textContent !== 'Copy'",
        timeout=ACTION_MS,
    )
    assert root.locator(".eqxe-copy").inner_text() == "Copied"
    clipboard = page.evaluate("() => navigator.clipboard.readText()")
    assert clipboard.strip() == code.inner_text().strip()
    assert f"{after[0]} of " in clipboard and "filter_spec" in clipboard

    # 4. A row's rule menu constrains a leaf; its collapsed module counts the rules inside.
    page.click(f"{row('head.bias')} .eqxe-rule-menu")
    page.click(".eqxe-rule-pop .eqxe-rule-pick[data-rule=unit_norm]")
    page.wait_for_function(
        f"""() => document.querySelector('{row("head.bias")}').dataset.rule === 'unit_norm'""",
        timeout=ACTION_MS,
    )
    assert page.locator(f"{row('head.bias')} .eqxe-rule").first.inner_text() == "unit_norm"
    scroll = "() => document.querySelector('.eqxe-root .eqxe-tree').scrollTop"
    top = page.evaluate(scroll)
    page.click(f"{row('head')} .eqxe-twisty")
    # Collapsing keeps the tree where it was scrolled (it used to jump to the top).
    assert top > 0 and page.evaluate(scroll) > 0, (top, page.evaluate(scroll))
    page.wait_for_selector(f"{row('head')} .eqxe-rule-inside:not([hidden])", timeout=ACTION_MS)
    assert page.locator(f"{row('head')} .eqxe-rule-inside").first.inner_text() == "1 rule"
    shot(page, "lab-4-rule")


def test_tour_in_notebook7(page, jupyter_server):
    open_and_run_all(page, jupyter_server.page_url("notebooks/notebook7/00_tour.ipynb"))
    root = page.locator(".eqxe-root").first
    root.wait_for(state="visible", timeout=WIDGET_MS)
    assert root.locator(".eqxe-row").count() > 5
    assert root.locator(".eqxe-header [data-testid=trainable]").inner_text().strip()
    assert "filter_spec" in root.locator(".eqxe-code").inner_text()
    assert page.get_attribute(row("embed"), "data-state") == "trainable"  # as built
    shot(page, "notebook7-after-run-all")
