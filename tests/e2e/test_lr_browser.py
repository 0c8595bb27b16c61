"""Learning-rate groups in a real browser (JupyterLab): a factor and a layer-wise decay set by
clicking the row menus, with the counts' groups, the rows' factors and the code following, and
a Step whose badges show each leaf's factor beside its update norm.

The expected code and groups come from the same spec built in Python (`FilterSpec.scale_lr`,
`layerwise_decay`) on the same model; a bad factor typed into the menu shows the library's
message in the banner and changes nothing.
"""

from __future__ import annotations

import jax
import pytest

from eqx_explorer import FilterSpec
from eqx_explorer._codegen import to_code
from eqx_explorer._examples import TinyTransformer

from .conftest import SETUP, notebook, open_and_run_all, row_in, shot, wait_js

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

GROUPS = """\
lr = ex.Explorer(
    TinyTransformer(jax.random.key(0), dim=8, depth=3),
    loss_fn=mse_loss,
    batch=example_batch(),
    optimizer=optax.adam(1e-3),
    code_style="optax",
)
lr"""

ROOT = "document.querySelector('.eqxe-root')"


def pill(path: str) -> str:
    """The factor shown on the row at `path` ('' when hidden) and its colour group."""
    return f"""(() => {{
      const p = {ROOT}.querySelector('.eqxe-row[data-path="{path}"] .eqxe-lr');
      return p.hidden ? '' : p.textContent + '|' + (p.dataset.group ?? '');
    }})()"""


CODE = f"{ROOT}.querySelector('.eqxe-code').textContent"
CHIPS = f"""[...{ROOT}.querySelectorAll('[data-testid=lr-groups] .eqxe-lr-group')]
            .map((c) => c.dataset.factor).join(',')"""


def test_a_factor_and_a_layerwise_decay_clicked_reach_the_counts_rows_and_code(
    page, jupyter_server
):
    open_and_run_all(page, notebook(jupyter_server, "lr_groups", SETUP, GROUPS))
    spec = FilterSpec(TinyTransformer(jax.random.key(0), dim=8, depth=3))
    w = page.locator(".eqxe-root").first
    groups = w.locator("[data-testid=lr-groups]")
    assert groups.is_hidden() and page.evaluate(f"() => {pill('head')}") == ""

    # A factor: the head's menu, then the 0.1 pick.
    w.locator(f"{row_in('head')} .eqxe-lr-menu").click()
    w.locator('.eqxe-lr-pop[data-path="head"] .eqxe-lr-pick[data-factor="0.1"]').click()
    spec = spec.scale_lr("head", 0.1)
    code = to_code(spec, "optax")
    assert "with_lr_factors" in code
    wait_js(page, f"{CODE} === {code!r}")
    wait_js(page, f"{CHIPS} === '1,0.1'")
    assert page.evaluate(f"() => {pill('head')}") == "0.1|1"  # group 1 of [1, 0.1]
    assert page.evaluate(f"() => {pill('head.weight')}") == "0.1|1"
    assert page.evaluate(f"() => {pill('')}") == "0.1–1|"  # a range has no one colour
    assert w.locator(".eqxe-lr-pop").count() == 0  # closed once Python accepted

    # A bad factor typed in: the library's message in the banner, the menu stays open.
    w.locator(f"{row_in('head')} .eqxe-lr-menu").click()
    w.locator(".eqxe-lr-factor").fill("-2")
    w.locator(".eqxe-lr-set").click()
    wait_js(page, f"{ROOT}.querySelector('.eqxe-banner-text').textContent.includes('-2.0 is not')")
    assert w.locator(".eqxe-lr-pop").count() == 1
    assert page.evaluate(f"() => {CODE}") == code
    w.locator(".eqxe-lr-close").click()
    w.locator(".eqxe-banner-close").click()

    # Layer-wise decay on the blocks, with the menu's default decay of 0.5.
    w.locator(f"{row_in('blocks')} .eqxe-lr-menu").click()
    assert w.locator(".eqxe-lr-decay").input_value() == "0.5"
    w.locator('.eqxe-lr-pop[data-path="blocks"] .eqxe-lr-decay-apply').click()
    spec = spec.layerwise_decay("blocks", 0.5)
    assert list(spec.counts["lr_groups"]) == [1.0, 0.5, 0.25, 0.1]
    wait_js(page, f"{CODE} === {to_code(spec, 'optax')!r}")
    wait_js(page, f"{CHIPS} === '1,0.5,0.25,0.1'")
    assert page.evaluate(f"() => {pill('blocks')}") == "0.25–1|"
    assert [page.evaluate(f"() => {pill(f'blocks[{j}]')}") for j in range(3)] == [
        "0.25|2",
        "0.5|1",
        "1|0",
    ]
    assert groups.locator('[data-factor="0.25"]').get_attribute("data-group") == "2"
    assert page.evaluate(f"() => {ROOT}.querySelector('.eqxe-banner').hidden")

    # A Step: each badge's tooltip has its leaf's factor and update norm.
    w.locator(".eqxe-step").click()
    head = f"{ROOT}.querySelector('{row_in('head.weight')} .eqxe-badge')"
    wait_js(page, f"{head}.dataset.status === 'updated'")
    assert "lr × 0.1  ‖grad‖" in page.evaluate(f"() => {head}.title")
    first = f"{ROOT}.querySelector('{row_in('blocks[0].attn.query_proj.weight')} .eqxe-badge')"
    assert "lr × 0.25  ‖grad‖" in page.evaluate(f"() => {first}.title")
    assert "‖update‖ " in page.evaluate(f"() => {first}.title")
    shot(page, "lr-groups")
