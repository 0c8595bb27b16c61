"""Search, keyboard, breadcrumb and virtual rows in a real browser (JupyterLab).

One notebook shows a 12-block transformer and a 50,000-leaf model. On the transformer, as a
user would: type a substring, jump between matches with Enter / Shift+Enter, clear the box
(the expansion comes back), type a glob within a key and freeze its matches, read the
breadcrumb of a deep row scrolled to the top, drive the rows with the keyboard, and click while
the kernel is busy with the widget (it says it waits). The
expected matches are computed by Python's `match_nodes` on the same model. The 50,000-leaf
model, fully expanded, keeps fewer than 500 rows in the DOM.
"""

from __future__ import annotations

import equinox as eqx
import jax
import pytest

from eqx_explorer._examples import TinyTransformer
from eqx_explorer._select import match_nodes
from eqx_explorer._tree import ModelTree

from .conftest import ACTION_MS, PANEL, SETUP, notebook, open_and_run_all, shot, wait_js

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DEEP = """\
deep = ex.Explorer(TinyTransformer(jax.random.key(0), dim=8, depth=12))
deep"""

WIDE = """\
class Cell(eqx.Module):
    weight: jax.Array
    bias: jax.Array

w4, b4 = jnp.ones((4, 4)), jnp.zeros(4)
wide = ex.Explorer({f"group{g}": [Cell(w4, b4) for _ in range(50)] for g in range(500)})
wide"""

DEEP_ROOT = "document.querySelectorAll('.eqxe-root')[0]"
WIDE_ROOT = "document.querySelectorAll('.eqxe-root')[1]"
INFO = f"{DEEP_ROOT}.querySelector('.eqxe-match-info')"


def row(path: str) -> str:
    return f'.eqxe-row[data-path="{path}"]'


def deep_tree() -> ModelTree:
    # The kernel's model, traced for its structure (paths are all a search reads): building
    # its arrays would compile the random initialisers here too (about 2 s).
    model = eqx.filter_eval_shape(TinyTransformer, jax.random.key(0), dim=8, depth=12)
    return ModelTree(model)


def expected_paths(pattern: str) -> list[str]:
    tree = deep_tree()
    return [tree.paths[i] for i in match_nodes(tree, pattern)]


def scroll_to(page, root: str, y: int | str) -> None:
    """Scroll a widget's tree to `y` pixels (a JS expression of the tree `t`)."""
    page.evaluate(f"() => {{ const t = {root}.querySelector('.eqxe-tree'); t.scrollTop = {y}; }}")


def test_search_keyboard_breadcrumb_and_virtual_rows(page, jupyter_server):
    open_and_run_all(page, notebook(jupyter_server, "search", SETUP, DEEP, WIDE))
    w = page.locator(".eqxe-root").nth(0)
    box = w.locator(".eqxe-filter")
    info = w.locator(".eqxe-match-info")
    # Top to bottom: rows are positioned, and the DOM keeps a row built earlier first.
    expanded = f"""[...{DEEP_ROOT}.querySelectorAll('.eqxe-twisty[aria-expanded=true]')]
                   .map((t) => t.closest('.eqxe-row'))
                   .sort((a, b) => a.offsetTop - b.offsetTop).map((r) => r.dataset.path)"""
    before = page.evaluate(f"() => {expanded}")

    # The code pane shows at least 80 characters a line (beside the tree, or below it).
    fits = page.evaluate(
        f"""() => {{
          const code = {DEEP_ROOT}.querySelector('.eqxe-code');
          const probe = document.createElement('span');
          probe.textContent = 'x'.repeat(80);
          code.append(probe);
          const width = probe.getBoundingClientRect().width;
          probe.remove();
          const style = getComputedStyle(code);
          return code.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight)
                 >= width;
        }}"""
    )
    assert fits

    # 1. A substring, any case: every path containing it; Enter jumps, Shift+Enter goes back.
    attn = expected_paths("attn")
    box.fill("ATTN")
    wait_js(page, f"{INFO}.textContent.includes('match')")
    assert info.inner_text().startswith(f"{len(attn):,} matches")
    current = f"{DEEP_ROOT}.querySelector('.eqxe-row.eqxe-current')"
    box.press("Enter")
    wait_js(page, f"{current} && {current}.dataset.path === {attn[0]!r}")
    assert info.inner_text().startswith(f"1 of {len(attn):,} matches")
    box.press("Enter")
    wait_js(page, f"{current}.dataset.path === {attn[1]!r}")
    box.press("Shift+Enter")
    box.press("Shift+Enter")  # back past the first: the last match, far down, in view
    wait_js(page, f"{current} && {current}.dataset.path === {attn[-1]!r}")
    in_view = page.evaluate(
        f"""() => {{
          const tree = {DEEP_ROOT}.querySelector('.eqxe-tree').getBoundingClientRect();
          const r = {current}.getBoundingClientRect();
          return r.top >= tree.top && r.bottom <= tree.bottom;
        }}"""
    )
    assert in_view
    highlighted = page.evaluate(
        f"() => [...{DEEP_ROOT}.querySelectorAll('.eqxe-match')].map((r) => r.dataset.path)"
    )
    assert set(highlighted) <= set(attn) and attn[-1] in highlighted
    shot(page, "search-1-substring")

    # 2. Clearing the box restores the expansion the user had, drawn in the frame that clears
    # it, though the last match left the tree scrolled past the end of the shorter list.
    drawn = page.evaluate(
        f"""() => new Promise((resolve) => {{
              const box = {DEEP_ROOT}.querySelector('.eqxe-filter');
              box.value = '';
              box.dispatchEvent(new Event('input'));  // the search runs in the next frame
              requestAnimationFrame(() => resolve({expanded}));  // in that frame, after it
            }})"""
    )
    assert info.inner_text() == "" and drawn == before

    # 3. A glob within a key, and "Freeze matches" (Python matches the same nodes).
    norms = expected_paths("norm*")
    assert len(norms) == 12
    box.fill("norm*")
    wait_js(
        page, f"{DEEP_ROOT}.querySelector('.eqxe-match-info').textContent.startsWith('12 matches')"
    )
    w.locator(".eqxe-freeze-matches").click()
    wait_js(page, f"{DEEP_ROOT}.querySelector('{row(norms[-1])}').dataset.state === 'frozen'")
    states = page.evaluate(
        f"() => {[*norms]}.map((p) => {DEEP_ROOT}.querySelector(`.eqxe-row[data-path='${{p}}']`)"
        ".dataset.state)"
    )
    assert states == ["frozen"] * 12
    assert w.locator(f"{row('blocks[0].attn')}").get_attribute("data-state") == "trainable"
    box.fill("")
    shot(page, "search-2-glob-frozen")

    # 4. The breadcrumb names the ancestors of the row at the top of the view.
    w.locator(".eqxe-expand-all").click()
    # Fully expanded, the rows are the nodes in tree order, ROW_H = 22 pixels each.
    scroll_to(page, DEEP_ROOT, 22 * deep_tree().paths.index("blocks[7].mlp.layers[0]"))
    wait_js(page, f"{DEEP_ROOT}.querySelector('{row('blocks[7].mlp.layers[0].bias')}') !== null")
    crumb = f"{DEEP_ROOT}.querySelector('.eqxe-crumb').textContent"
    wait_js(page, f"{crumb} === 'blocks › [7] › mlp › layers'")
    shot(page, "search-3-breadcrumb")

    # 5. Keyboard: click a row, then arrows move, space toggles, left / right collapse / expand.
    scroll_to(page, DEEP_ROOT, "t.scrollHeight")
    wait_js(page, f"{DEEP_ROOT}.querySelector('{row('head')}') !== null")
    w.locator(f"{row('head')} .eqxe-name").click()
    page.keyboard.press("Space")
    wait_js(page, f"{DEEP_ROOT}.querySelector('{row('head')}').dataset.state === 'frozen'")
    page.keyboard.press("ArrowDown")  # head.weight
    page.keyboard.press("Space")
    wait_js(page, f"{DEEP_ROOT}.querySelector('{row('head')}').dataset.state === 'mixed'")
    assert w.locator(row("head.weight")).get_attribute("data-state") == "trainable"
    page.keyboard.press("ArrowLeft")  # from a leaf to its parent
    page.keyboard.press("ArrowLeft")  # collapse it
    twisty = f"{DEEP_ROOT}.querySelector('{row('head')} .eqxe-twisty')"
    wait_js(page, f"{twisty}.getAttribute('aria-expanded') === 'false'")
    assert w.locator(row("head.weight")).count() == 0
    page.keyboard.press("ArrowRight")
    wait_js(page, f"{twisty}.getAttribute('aria-expanded') === 'true'")
    assert w.locator(row("head.weight")).count() == 1
    shot(page, "search-4-keyboard")

    # 6. While the kernel is busy with the widget, a click says it waits, then applies. (JupyterLab
    # sends widget messages on a kernel subshell, so a cell that merely runs does not block
    # them; this one holds the widget's lock, as w.step from Python does.)
    page.evaluate(
        f"""() => {{ ({PANEL})().sessionContext.session.kernel.requestExecute(
              {{code: 'import time\\nwith deep._lock:\\n    time.sleep(3)'}}); }}"""
    )
    scroll_to(page, DEEP_ROOT, 0)
    wait_js(page, f"{DEEP_ROOT}.querySelector('{row('embed')}') !== null")
    w.locator(f"{row('embed')} .eqxe-check").click()
    wait = f"{DEEP_ROOT}.querySelector('.eqxe-wait')"
    wait_js(page, f"!{wait}.hidden && {wait}.textContent.startsWith('waiting for the kernel')")
    assert w.locator(row("embed")).get_attribute("data-state") == "trainable"
    shot(page, "search-5-waiting")
    wait_js(page, f"{DEEP_ROOT}.querySelector('{row('embed')}').dataset.state === 'frozen'")
    wait_js(page, f"{wait}.hidden")

    # 7. 50,000 leaves fully expanded: the tree scrolls through every row, fewer than 500 exist.
    wide = page.locator(".eqxe-root").nth(1)
    wide.locator(".eqxe-expand-all").click()
    n_nodes = 1 + 500 * (1 + 50 * 3)  # root; each group, its 50 cells and their 2 leaves
    rows_height = f"{WIDE_ROOT}.querySelector('.eqxe-rows').offsetHeight"
    wait_js(page, f"{rows_height} === {n_nodes * 22}", timeout=ACTION_MS)
    assert wide.locator(".eqxe-tree .eqxe-row").count() < 500
    scroll_to(page, WIDE_ROOT, "t.scrollHeight")
    last = f"['{max(f'group{g}' for g in range(500))}'][49].bias"  # dict keys sort as text
    wait_js(page, f'{WIDE_ROOT}.querySelector(`.eqxe-row[data-path="{last}"]`) !== null')
    assert wide.locator(".eqxe-tree .eqxe-row").count() < 500
    shot(page, "search-6-wide")
