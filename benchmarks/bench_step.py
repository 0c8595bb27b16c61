"""StepRunner vs a hand-written `eqx.filter_jit` training loop (same model, spec, optimizer).

Rows (`main()` returns them for `run_all.py`; run as a script to print them), all on an MLP
with ~4.2M parameters, half frozen, Adam, on the default masked layout:

1. Toggle then `step(1)` vs a warm `step(1)`: the spec is data, so no recompile (<= 3).
2. Method switch then `step(1)` vs a warm `step(1)` (<= 3).
3. A new runner's first `step(1)` (trace + compile + one step) vs the hand-written loop's
   first call (<= 1.3).
4. `step(30)` on the masked program vs the loop: the price of one program for every spec
   (frozen leaves' gradients are computed, then masked). Informational.
5. `step(30)` on the program specialised to the spec (masks compiled in; the first answer
   builds it; a spec run long also gets a variant that writes into the buffers of an earlier
   step, built in the background), vs the loop (<= 1.05).
6. 30 x `step(1)` vs the loop (<= 1.15), on the specialised program (each call writes into
   the previous call's buffers and audits in the same program).
7. Seconds until the masked program (built in the background after the first answer, on
   `warm()`, as the widget does) is ready, vs the first answer: until then a click waits for
   it instead of recompiling.
8. Optimizer-state bytes of the masked layout vs 2x all float bytes (Adam's mu and nu over
   every float leaf; the structural layout holds 2x the trainable bytes only).
"""

from __future__ import annotations

import statistics
import time

WIDTH = 1024
DEPTH = 3  # hidden layers: 4 Linear layers of WIDTH x WIDTH, ~4.2M parameters
BATCH = 64
STEPS = 30
REPEATS = 11


def _setup():
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import optax

    import eqx_explorer as ex

    model = eqx.nn.MLP(WIDTH, WIDTH, WIDTH, DEPTH, key=jax.random.key(0))
    spec = ex.FilterSpec(model).freeze("layers[0]", "layers[1]")  # exactly half the params
    kx, ky = jax.random.split(jax.random.key(1))
    batch = (jax.random.normal(kx, (BATCH, WIDTH)), jax.random.normal(ky, (BATCH, WIDTH)))
    optimizer = optax.adam(1e-4)

    def loss_fn(model, batch):
        x, y = batch
        return jnp.mean((jax.vmap(model)(x) - y) ** 2)

    return model, spec, batch, optimizer, loss_fn


def _hand_written(model, spec, batch, optimizer, loss_fn):
    """The loop a user would write: partition outside, filter_jit step, no audit."""
    import equinox as eqx

    params, static = eqx.partition(model, spec.tree)
    opt_state = optimizer.init(params)

    @eqx.filter_jit
    def make_step(params, static, opt_state, batch):
        def loss_p(p):
            return loss_fn(eqx.combine(p, static), batch)

        loss, grads = eqx.filter_value_and_grad(loss_p)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return eqx.apply_updates(params, updates), opt_state, loss

    def run(n: int):
        nonlocal params, opt_state
        for _ in range(n):
            params, opt_state, loss = make_step(params, static, opt_state, batch)
        return float(loss)  # blocks, like a loop that logs its final loss

    return run


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def _row(name: str, ours: float, base: float, target: str, ratio: float | None = None) -> dict:
    return {
        "benchmark": name,
        "ours": ours,
        "baseline": base,
        "ratio": ours / base if ratio is None else ratio,
        "target": target,
    }


def _paired(ours_fn, base_fn, repeats: int = REPEATS) -> tuple[float, float, float]:
    """Medians of ours, the baseline and their ratio, interleaved so noise hits both alike."""
    t_ours, t_base, ratios = [], [], []
    for _ in range(repeats):
        t_ours.append(_timed(ours_fn))
        t_base.append(_timed(base_fn))
        ratios.append(t_ours[-1] / t_base[-1])
    return statistics.median(t_ours), statistics.median(t_base), statistics.median(ratios)


def main() -> list[dict]:
    import jax

    from eqx_explorer._steps import StepRunner

    model, spec, batch, optimizer, loss_fn = _setup()
    rows = []

    # First calls, compilation included: a fresh runner vs a fresh hand-written loop.
    baseline = _hand_written(model, spec, batch, optimizer, loss_fn)
    runner = StepRunner(model, spec, loss_fn, batch, optimizer=optimizer)
    first_base = _timed(baseline, 1)
    first_ours = _timed(runner.step, 1)
    rows.append(
        _row(
            "first step(1) (compile incl.) vs the loop's first call",
            first_ours,
            first_base,
            "<= 1.3",
        )
    )

    # The first answer ran on a program specialised to `spec`; the masked one, for every
    # other spec and method, builds in the background right after it, as in the widget.
    start = time.perf_counter()
    runner.warm()
    runner.wait_ready()
    ready = time.perf_counter() - start
    warm = lambda: runner.step(1)  # noqa: E731
    for _ in range(3):
        warm()
    other = spec.unfreeze("layers[1]")
    specs = [other, spec]

    def toggle_then_step():
        runner.set_spec(specs[0])
        specs.reverse()
        runner.step(1)

    compiles = runner.compile_count
    t, w, r = _paired(toggle_then_step, warm)
    rows.append(_row("toggle then step(1) vs a warm step(1)", t, w, "<= 3", r))
    methods = ["stop_gradient", "partition"]

    def switch_then_step():
        runner.set_spec(spec, method=methods[0])
        methods.reverse()
        runner.step(1)

    t, w, r = _paired(switch_then_step, warm)
    rows.append(_row("method switch then step(1) vs a warm step(1)", t, w, "<= 3", r))
    runner.set_spec(spec, method="partition")
    assert runner.compile_count == compiles, "a toggle or a method switch recompiled"

    masked = StepRunner(model, spec, loss_fn, batch, optimizer=optimizer, specialise=False)
    masked.step(2)
    baseline(2)
    t, b, r = _paired(lambda: masked.step(STEPS), lambda: baseline(STEPS))
    rows.append(_row(f"step({STEPS}) masked program vs the loop", t, b, "info", r))

    runner.step(STEPS)
    runner.wait_ready()  # the recycling variant, built in the background
    t, b, r = _paired(lambda: runner.step(STEPS), lambda: baseline(STEPS))
    assert runner.program == "specialised"
    rows.append(_row(f"step({STEPS}) specialised program vs the loop", t, b, "<= 1.05", r))

    def singles():
        for _ in range(STEPS):
            runner.step(1)

    t, b, r = _paired(singles, lambda: baseline(STEPS))
    rows.append(_row(f"{STEPS} x step(1) vs the loop ({STEPS} steps)", t, b, "<= 1.15", r))
    rows.append(
        _row("masked program ready after the first answer (s) vs it", ready, first_ours, "info")
    )

    opt_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(runner.opt_state))
    adam_bytes = 2 * (spec.counts["trainable_bytes"] + spec.counts["frozen_bytes"])
    rows.append(
        _row(
            "optimizer-state bytes (masked) vs 2x all float bytes",
            opt_bytes,
            adam_bytes,
            "1 (+4 B)",
        )
    )
    return rows


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from run_all import print_table

    print_table(main())
