"""Live steps in a real browser (JupyterLab): progress, Stop, the model's state, inference mode.

Each test writes its own small notebook into the server's root, runs it, and drives the widget
as a user would. Every wait is on a condition; the timings a user feels (compilation shown,
a toggle answered while steps run, Stop to report) go to test-artifacts/steps-timings.json.
"""

from __future__ import annotations

import json

import pytest

from .conftest import (
    ARTIFACTS,
    PANEL,
    SETUP,
    notebook,
    open_and_run_all,
    row_in,
    shot,
    wait_js,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


# A model whose first step compiles for about a second on 2 cores: long enough to see
# "compiling…", short enough that its background builds after the toggle cost little.
SLOW = """\
slow = ex.Explorer(
    TinyTransformer(jax.random.key(0), dim=32, depth=1),
    loss_fn=mse_loss,
    batch=example_batch(n=8),
    optimizer=optax.adam(1e-3),
)
slow"""

STATEFUL = """\
from eqx_explorer._examples import StatefulNet, stateful_batch, stateful_loss

model, state = eqx.nn.make_with_state(StatefulNet)(jax.random.key(0))
bn = ex.Explorer(model, loss_fn=stateful_loss, batch=stateful_batch(), state=state)
bn"""

ROOT = "document.querySelector('.eqxe-root')"
PROGRESS = f"{ROOT}.querySelector('.eqxe-progress')"
STATE_PATHS = ["bn.ema_first_time_index", "bn.ema_state_index[0]", "bn.ema_state_index[1]"]


def record(timings: dict) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / "steps-timings.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**old, **timings}, indent=1))
    print(timings)


def test_progress_stop_and_a_toggle_while_steps_run(page, jupyter_server):
    open_and_run_all(page, notebook(jupyter_server, "progress", SETUP, SLOW))
    w = page.locator(".eqxe-root").first
    assert "masked layout" in w.locator(".eqxe-layout").inner_text()
    # Every text the progress line shows, in order.
    page.evaluate(
        f"""() => {{
          const el = {PROGRESS};
          window.eqxeTexts = [];
          const seen = () => {{
            const t = el.hidden ? '' : el.textContent;
            if (t && window.eqxeTexts[window.eqxeTexts.length - 1] !== t) window.eqxeTexts.push(t);
          }};
          new MutationObserver(seen).observe(el, {{
            childList: true, characterData: true, subtree: true, attributes: true }});
        }}"""
    )
    w.locator(".eqxe-n").fill("10000")
    w.locator(".eqxe-run").click()
    shown = wait_js(page, f"/^compiling… /.test({PROGRESS}.textContent)")
    assert w.locator(".eqxe-stop").is_visible() and "eqxe-busy" in w.get_attribute("class")
    shot(page, "steps-0-compiling")
    compiling = wait_js(page, f"/^step [\\d,]+ \\/ 10,000 · loss /.test({PROGRESS}.textContent)")
    first = w.locator(".eqxe-progress").inner_text()
    wait_js(page, f"{PROGRESS}.textContent.split(' · ')[0] !== {json.dumps(first.split(' · ')[0])}")
    shot(page, "steps-1-running")

    # The kernel answers the page while steps run: a toggle comes back at once.
    w.locator(f"{row_in('head')} .eqxe-check").click()
    toggle = wait_js(page, f"{ROOT}.querySelector('{row_in('head')}').dataset.state === 'frozen'")
    # A second Step is refused with a message; the run goes on.
    w.locator(".eqxe-step").click()
    refused = wait_js(
        page, f"/steps are running/.test({ROOT}.querySelector('.eqxe-banner-text').textContent)"
    )
    assert w.locator(".eqxe-progress").is_visible()
    shot(page, "steps-2-refused")

    w.locator(".eqxe-stop").click()
    stop = wait_js(
        page, f"/^stopped after/.test({ROOT}.querySelector('.eqxe-step-info').textContent)"
    )
    info = w.locator(".eqxe-step-info").inner_text()
    done = int(info.split()[2].replace(",", ""))
    assert 0 < done < 10_000 and "of 10,000 steps" in info
    assert w.locator(".eqxe-progress").is_hidden() and w.locator(".eqxe-stop").is_hidden()
    assert "eqxe-busy" not in w.get_attribute("class")
    assert w.locator(".eqxe-loss-caption").inner_text().startswith(f"{done:,} steps")
    # The report covers the steps that ran, taken before the toggle: its badges are stale.
    head_badge = w.locator(f"{row_in('head.weight')} .eqxe-badge")
    assert head_badge.get_attribute("data-status") == "updated"
    assert "eqxe-stale" in (w.get_attribute("class") or "")
    texts = page.evaluate("() => window.eqxeTexts")
    assert texts[0].startswith(("starting", "compiling"))
    steps = [t for t in texts if t.startswith("step ")]
    assert len(steps) >= 2 and any("stopping…" in t for t in texts)
    shot(page, "steps-3-stopped")

    # w.step(n) from Python blocks the kernel and shows the same progress (no Stop: the page
    # cannot reach a busy kernel; interrupting it can). Back on the spec the run started with,
    # which has its own program: the toggled spec would wait for the masked program, which
    # may still be building in the background (seconds this test does not need).
    page.evaluate(
        f"""() => ({PANEL})().sessionContext.session.kernel.requestExecute(
              {{ code: 'slow.unfreeze("head"); report = slow.step(500)' }})"""
    )
    wait_js(page, f"/^step [\\d,]+ \\/ 500/.test({PROGRESS}.textContent)")
    assert w.locator(".eqxe-stop").is_hidden()
    assert "interrupt the kernel" in w.locator(".eqxe-progress").get_attribute("title")
    wait_js(page, f"/^500 steps/.test({ROOT}.querySelector('.eqxe-step-info').textContent)")
    record(
        {
            "compiling_shown_s": round(shown, 3),
            "compiling_until_first_progress_s": round(compiling, 3),
            "toggle_while_running_s": round(toggle, 3),
            "second_step_refused_s": round(refused, 3),
            "stop_to_report_s": round(stop, 3),
            "steps_before_stop": done,
            "progress_texts": len(texts),
        }
    )


def test_state_rows_and_inference_mode(page, jupyter_server):
    open_and_run_all(page, notebook(jupyter_server, "state", SETUP, STATEFUL))
    w = page.locator(".eqxe-root").first
    states = w.locator(".eqxe-row[data-kind=state]")
    assert states.evaluate_all("rs => rs.map((r) => r.dataset.path)") == STATE_PATHS
    assert states.evaluate_all("rs => rs.map((r) => r.dataset.state)") == ["state"] * 3
    assert states.first.locator("input").count() == 0  # no checkbox: not a parameter
    classes = w.locator(".eqxe-tree .eqxe-cls").all_inner_texts()
    assert not any(c.startswith(("StateIndex", "_Sentinel")) for c in classes)

    def state_badges():
        return [
            w.locator(f"{row_in(p)} .eqxe-badge").get_attribute("data-status") for p in STATE_PATHS
        ]

    w.locator(".eqxe-step").click()
    wait_js(page, f"{ROOT}.querySelector('{row_in(STATE_PATHS[1])} .eqxe-badge').dataset.status")
    assert state_badges() == ["updated"] * 3
    shot(page, "state-1-updated")

    # Frozen is not enough: the statistics still move, and the step pane's notes say so.
    w.locator(f"{row_in('bn')} .eqxe-check").click()
    wait_js(page, f"{ROOT}.querySelector('{row_in('bn')}').dataset.state === 'frozen'")
    w.locator(".eqxe-step").click()
    wait_js(page, f"/frozen layer `bn`/.test({ROOT}.querySelector('.eqxe-notes').textContent)")
    assert state_badges()[1:] == ["updated"] * 2
    assert "inference mode" in w.locator(".eqxe-notes").inner_text()
    shot(page, "state-2-frozen-note")
    # Inference mode from the row menu.
    w.locator(f"{row_in('bn')} .eqxe-mode-menu").click()
    w.locator(".eqxe-mode-pop .eqxe-mode-pick[data-on=true]").click()
    wait_js(page, f"{ROOT}.querySelector('{row_in('bn')}').dataset.mode === 'eval'")
    assert w.locator(f"{row_in('bn')} .eqxe-mode").inner_text() == "eval"
    assert w.locator(".eqxe-mode-pop").count() == 0  # closed once Python accepted
    w.locator(".eqxe-step").click()
    wait_js(
        page,
        f"{ROOT}.querySelector('{row_in(STATE_PATHS[1])} .eqxe-badge').dataset.status"
        " === 'unchanged'",
    )
    assert state_badges() == ["unchanged"] * 3
    w.locator(f"{row_in(STATE_PATHS[1])} .eqxe-name").click()
    wait_js(
        page,
        f"{ROOT}.querySelector('.eqxe-detail .eqxe-title')?.textContent === '{STATE_PATHS[1]}'",
    )
    facts = w.locator(".eqxe-detail dl").inner_text()
    assert "layer\nbn" in facts and "unchanged" in facts
    w.locator(".eqxe-detail").scroll_into_view_if_needed()
    shot(page, "state-3-inference")
