"""StepRunner vs a hand-written `eqx.filter_jit` training loop (same model, spec, optimizer).

Rows (`main()` returns them for `run_all.py`; run as a script to print them):

1. Many steps of an MLP with ~4.2M parameters, half frozen, Adam: median over repeats of
   (runner time / hand-written loop time). Target <= 1.15: the in-jit audit and the
   rollback checks cost little next to the step itself.
2. The same with one `runner.step(1)` call per step (the widget's pattern): every call pays
   for its audit (one jitted pass over the trainable arrays and their gradients), so this
   row is informational; the target applies to row 1.
3. Optimizer-state bytes under `"partition"` vs 2x trainable bytes (Adam's mu and nu):
   the state covers only trainable leaves (+4 bytes for Adam's step count).
4. Second visit to a spec (no recompile) vs its first step (trace + compile).
"""

from __future__ import annotations

import statistics
import time

WIDTH = 1024
DEPTH = 3  # hidden layers: 4 Linear layers of WIDTH x WIDTH, ~4.2M parameters
BATCH = 64
STEPS = 30
REPEATS = 7


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


def main() -> list[dict]:
    import jax

    from eqx_explorer._steps import StepRunner

    model, spec, batch, optimizer, loss_fn = _setup()
    runner = StepRunner(model, spec, loss_fn, batch, optimizer=optimizer)
    baseline = _hand_written(model, spec, batch, optimizer, loss_fn)
    runner.step(2)  # compile and warm up both
    baseline(2)

    def ours_many(n: int):
        report = runner.step(n)
        assert report.ok, report.error

    def ours_single(n: int):
        for _ in range(n):
            runner.step(1)

    rows = []
    for name, ours_fn, target in (
        (
            f"StepRunner.step({STEPS}) vs filter_jit loop, 4.2M-param MLP, half frozen",
            ours_many,
            "<= 1.15",
        ),
        (f"{STEPS} x StepRunner.step(1) vs filter_jit loop, same model", ours_single, "info"),
    ):
        ratios, t_ours, t_base = [], [], []
        for _ in range(REPEATS):  # interleaved, so machine noise hits both sides alike
            t_ours.append(_timed(ours_fn, STEPS))
            t_base.append(_timed(baseline, STEPS))
            ratios.append(t_ours[-1] / t_base[-1])
        rows.append(
            {
                "benchmark": name,
                "ours": statistics.median(t_ours),
                "baseline": statistics.median(t_base),
                "ratio": statistics.median(ratios),
                "target": target,
            }
        )

    opt_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(runner.opt_state))
    adam_bytes = 2 * spec.counts["trainable_bytes"]
    rows.append(
        {
            "benchmark": "optimizer-state bytes under partition vs 2x trainable bytes",
            "ours": opt_bytes,
            "baseline": adam_bytes,
            "ratio": opt_bytes / adam_bytes,
            "target": "1 (+4 B count)",
        }
    )

    other = spec.unfreeze("layers[1]")
    runner.set_spec(other)
    first = _timed(runner.step, 1)
    runner.set_spec(spec)
    runner.set_spec(other)
    compiles = runner.compile_count
    second = _timed(runner.step, 1)
    assert runner.compile_count == compiles, "revisiting a spec recompiled"
    rows.append(
        {
            "benchmark": "second visit to a spec (no recompile) vs its first compile",
            "ours": second,
            "baseline": first,
            "ratio": second / first,
            "target": "<< 1",
        }
    )
    return rows


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from run_all import print_table

    print_table(main())
