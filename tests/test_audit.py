"""audit_step / assert_frozen_safe: auditing a user's own step function."""

from __future__ import annotations

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from eqx_explorer import ExplorerError, FilterSpec
from eqx_explorer._audit import StepReport, assert_frozen_safe, audit_step


class Small(eqx.Module):
    mlp: eqx.nn.MLP
    steps: jax.Array
    scale: float
    name: str

    def __call__(self, x):
        return self.scale * self.mlp(x)[0]


@pytest.fixture(scope="module")
def model():
    return Small(eqx.nn.MLP(2, 1, 3, 1, key=jax.random.key(0)), jnp.zeros((), jnp.int32), 1.5, "s")


@pytest.fixture(scope="module")
def grads(model):
    x = jnp.ones((4, 2))

    @eqx.filter_grad
    def grad_fn(m):
        return jnp.mean(jax.vmap(m)(x) ** 2)

    return grad_fn(model)


def good_step(model, opt_state, grads, optim):
    updates, opt_state = optim.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
    return eqx.apply_updates(model, updates), opt_state


def filter_before_apply_step(model, opt_state, grads, optim):
    """The bug: filtering the model before apply_updates drops every non-array leaf."""
    updates, opt_state = optim.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
    return eqx.apply_updates(eqx.filter(model, eqx.is_array), updates), opt_state


@pytest.mark.parametrize(
    "optim", [optax.adam(1e-2), optax.MultiSteps(optax.adam(1e-2), every_k_schedule=1)]
)
def test_filtering_the_model_before_apply_updates_loses_its_non_array_leaves(model, grads, optim):
    opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))
    report = audit_step(filter_before_apply_step, model, opt_state, grads, optim)
    assert set(report.by_status("lost")) == {
        "mlp.activation",
        "mlp.final_activation",
        "scale",
        "name",
    }
    lost = {r.path: r.detail for r in report.leaves if r.status == "lost"}
    assert lost["scale"] == "became None (was 1.5)"
    assert lost["mlp.activation"] == "became None (was custom_jvp relu)"
    assert report.statuses()["mlp.layers[0].weight"] == "updated"
    assert report.statuses()["steps"] == "kept"  # an int array: never trainable
    assert not report.ok

    fixed = audit_step(good_step, model, opt_state, grads, optim)
    assert fixed.ok and fixed.by_status("lost") == []
    assert set(fixed.by_status("kept")) == {*lost, "steps"}


def test_assert_frozen_safe_raises_with_a_table(model, grads):
    optim = optax.adam(1e-2)
    opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))
    with pytest.raises(AssertionError) as info:
        assert_frozen_safe(filter_before_apply_step, model, opt_state, grads, optim)
    text = str(info.value)
    assert text.startswith("step is not frozen-safe: 4 lost")
    assert "mlp.final_activation" in text and "became None" in text
    assert "mlp.layers[0].weight" not in text  # only the bad leaves are listed
    report = assert_frozen_safe(good_step, model, opt_state, grads, optim)
    assert isinstance(report, StepReport) and report.ok


def test_optax_masked_alone_is_not_a_freeze(model, grads):
    # optax.masked(inner, mask): False leaves get the raw gradient, unchanged.
    spec = FilterSpec(model).freeze("mlp.layers[0]")
    params = eqx.filter(model, eqx.is_inexact_array)
    mask = jax.tree.map(lambda x, t: t if eqx.is_inexact_array(x) else None, model, spec.tree)
    optim = optax.masked(optax.adam(1e-2), mask)
    opt_state = optim.init(params)
    report = audit_step(good_step, model, opt_state, grads, optim, spec=spec)
    assert set(report.by_status("leaked")) == {"mlp.layers[0].weight", "mlp.layers[0].bias"}
    assert report.statuses()["mlp.layers[1].weight"] == "updated"
    with pytest.raises(AssertionError, match="2 leaked"):
        assert_frozen_safe(good_step, model, opt_state, grads, optim, spec=spec)


def test_statuses_without_spec_and_bit_level_comparison():
    class M(eqx.Module):
        a: jax.Array
        b: jax.Array
        c: jax.Array
        n: jax.Array
        f: float

    model = M(jnp.array([1.0, jnp.nan]), jnp.array([0.0]), jnp.ones(2), jnp.arange(3), 0.5)

    def step(m):
        return M(
            m.a + jnp.array([0.0, 1.0]),  # NaN + 1 is NaN again, 1.0 stays: bit-identical
            -m.b,  # 0.0 -> -0.0: equal as numbers, different bits
            m.c.astype(jnp.float16),
            m.n + 1,
            0.25,
        )

    report = audit_step(step, model)
    assert report.statuses() == {
        "a": "stalled",
        "b": "updated",
        "c": "lost",
        "n": "leaked",
        "f": "lost",
    }
    details = {r.path: r.detail for r in report.leaves}
    assert details["c"] == "changed float32[2] -> float16[2]"
    assert details["n"] == "int32 array changed"
    assert details["f"] == "changed value: 0.5 -> 0.25"
    b = next(r for r in report.leaves if r.path == "b")
    assert b.delta_norm == 0.0 and b.grad_norm is None
    a = next(r for r in report.leaves if r.path == "a")
    assert np.isnan(a.delta_norm) and a.to_dict()["delta_norm"] is None
    json.dumps(report.to_dict())  # NaN norms are sent as None: valid JSON


def test_spec_marks_frozen_changes_as_leaked(model, grads):
    spec = FilterSpec(model).freeze("mlp.layers[1]")

    def sgd(m, g):
        return eqx.apply_updates(m, jax.tree.map(lambda d: -0.1 * d, g)), "aux"

    report = audit_step(sgd, model, grads, spec=spec)
    assert set(report.by_status("leaked")) == {"mlp.layers[1].weight", "mlp.layers[1].bias"}
    assert report.by_status("updated") == ["mlp.layers[0].weight", "mlp.layers[0].bias"]
    partitioned = eqx.filter(grads, spec.tree)
    assert audit_step(sgd, model, partitioned, spec=spec).by_status("leaked") == []
    with pytest.raises(ExplorerError, match="unknown status"):
        report.by_status("moved")


def test_failing_step_and_bad_input(model):
    def broken(m):
        raise RuntimeError("out of memory")

    report = audit_step(broken, model)
    assert report.error == "the step function raised RuntimeError: out of memory"
    assert report.leaves == [] and not report.ok
    with pytest.raises(AssertionError, match="out of memory"):
        assert_frozen_safe(broken, model)
    other = FilterSpec(jnp.ones(3))
    with pytest.raises(ExplorerError, match="another model"):
        audit_step(lambda m: m, model, spec=other)
    with pytest.raises(ExplorerError, match="FilterSpec"):
        audit_step(lambda m: m, model, spec=object())


def test_model_that_is_a_tuple():
    model = (jnp.ones(2), jax.nn.relu)
    report = audit_step(lambda m: (m[0] * 2, m[1]), model)
    assert report.statuses() == {"[0]": "updated", "[1]": "kept"}
    report = audit_step(lambda m: ((m[0], None), "opt_state"), model)
    assert report.statuses() == {"[0]": "stalled", "[1]": "lost"}
