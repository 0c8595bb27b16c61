import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from eqx_explorer import ExplorerError, FilterSpec, StepRunner
from eqx_explorer._constraints import apply_updates, constrain_grads, make_rule, violations
from tests.helpers import assert_rebuilds, assert_ruff_clean


class Physics(eqx.Module):
    scale: jax.Array
    rot: jax.Array
    direction: jax.Array
    gain: jax.Array
    free: jax.Array
    act: object = jax.nn.relu

    def __call__(self, x):
        return self.act(self.scale * (self.rot @ x) + self.gain * self.direction) + self.free


def physics():
    q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(3), (3, 3)))
    return Physics(
        scale=jnp.full((3,), 0.2),
        rot=q,
        direction=jnp.array([1.0, 0.0, 0.0]),
        gain=jnp.array([0.5]),
        free=jnp.zeros(3),
    )


def loss_fn(model, x):
    # Pushes the scale hard towards negative values and the rotation towards a non-rotation.
    target = jnp.array([-3.0, 5.0, -2.0])
    return jnp.sum((model(x) - target) ** 2) + jnp.sum(model.scale) * 10 + jnp.sum(model.rot) * 5


def test_positive_is_the_log_reparametrisation():
    rule = make_rule("positive")
    p, u = jnp.array([0.01, 2.0]), jnp.array([-5.0, 0.1])
    np.testing.assert_allclose(rule.apply(p, u), p * jnp.exp(u), rtol=1e-6)
    np.testing.assert_allclose(rule.grad(p, jnp.array([1.0, 1.0])), p)


def test_custom_rule_and_none_updates():
    spec = FilterSpec(physics()).constrain("free", lambda p, u: p + 2 * u)
    params = {"free": jnp.ones(2), "act": jax.nn.relu, "skip": jnp.ones(1)}
    rules = {"['free']": spec.constraints["free"]}
    new = apply_updates(params, {"free": jnp.ones(2), "act": None, "skip": None}, rules)
    np.testing.assert_allclose(new["free"], 3.0)
    assert new["act"] is jax.nn.relu and new["skip"] is params["skip"]


def test_bad_constraints_raise():
    spec = FilterSpec(physics())
    with pytest.raises(ExplorerError, match="`free` has values <= 0"):
        spec.constrain("free", "positive")
    with pytest.raises(ExplorerError, match="orthogonal needs a matrix"):
        spec.constrain("scale", "orthogonal")
    not_rotation = eqx.tree_at(lambda m: m.rot, physics(), jnp.ones((3, 3)))
    with pytest.raises(ExplorerError, match="not orthogonal to start with"):
        FilterSpec(not_rotation).constrain("rot", "orthogonal")
    with pytest.raises(ExplorerError, match="unknown update rule"):
        spec.constrain("scale", "negative")
    with pytest.raises(ExplorerError, match="cannot constrain"):
        spec.constrain("act", "positive")
    with pytest.raises(ExplorerError, match="needs lo < hi"):
        spec.constrain("gain", ("interval", 1, 0))


def test_constraints_round_trip_json_and_removal():
    spec = (
        FilterSpec(physics()).constrain("scale", "positive").constrain("gain", ("interval", 0, 1))
    )
    back = FilterSpec.from_json(physics(), spec.to_json())
    assert back == spec
    assert back.constraints["gain"].label == "interval[0, 1]"
    assert spec.constrain("scale", None).constraints.keys() == {"gain"}


def test_exported_custom_updates_match_the_library(tmp_path):

    model = physics()
    spec = (
        FilterSpec(model)
        .freeze("free")
        .constrain("scale", "positive")
        .constrain("rot", "orthogonal")
        .constrain("direction", "unit_norm")
        .constrain("gain", ("interval", 0.0, 1.0))
    )
    code = spec.to_code("custom_updates")
    assert_ruff_clean([code], tmp_path)
    ns = assert_rebuilds(code, spec)
    params, static = eqx.partition(model, ns["filter_spec"])
    opt = optax.adam(0.5)
    state = opt.init(params)
    x = jnp.array([1.0, -2.0, 0.5])
    grads = eqx.filter_grad(lambda p: loss_fn(eqx.combine(p, static), x))(params)
    ours = constrain_grads(params, grads, spec.constraints)
    theirs = ns["constrain_grads"](params, grads)
    updates, _ = opt.update(ours, state, params)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_array_equal(a, b)
    ours = apply_updates(params, updates, spec.constraints)
    theirs = ns["apply_updates"](params, updates)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_custom_callable_rules_cannot_be_exported():
    spec = FilterSpec(physics()).constrain("free", lambda p, u: p + u)
    with pytest.raises(ExplorerError, match="cannot be written as code"):
        spec.to_code("custom_updates")


def test_rules_keep_parameters_valid_where_additive_updates_do_not():
    model = physics()
    x = jnp.array([1.0, -2.0, 0.5])
    spec = (
        FilterSpec(model)
        .constrain("scale", "positive")
        .constrain("rot", "orthogonal")
        .constrain("direction", "unit_norm")
        .constrain("gain", ("interval", 0.0, 1.0))
    )
    runner = StepRunner(model, spec, loss_fn, x, optimizer=optax.adam(0.5))
    worst = {"scale": np.inf, "rot": 0.0, "direction": 0.0, "gain": 0.0}
    for _ in range(100):
        report = runner.step(1)
        assert report.ok, report.error
        leaves = {leaf.path: leaf for leaf in report.leaves}
        worst["scale"] = min(worst["scale"], leaves["scale"].violation)
        for path in ("rot", "direction", "gain"):
            worst[path] = max(worst[path], leaves[path].violation)
        assert leaves["free"].violation is None
    assert worst["scale"] > 0 and float(runner.model.scale.min()) > 0
    assert worst["rot"] < 1e-4 and worst["direction"] < 1e-5 and worst["gain"] == 0.0
    assert runner.model.act is jax.nn.relu

    # Plain additive updates on the same run break every constraint.
    plain = StepRunner(model, FilterSpec(model), loss_fn, x, optimizer=optax.adam(0.5))
    assert plain.step(100).ok
    broken = {p: float(v) for p, v in violations(plain.model, spec.constraints).items()}
    assert broken["scale"] < 0 and broken["rot"] > 1e-2
    assert broken["direction"] > 1e-2 and broken["gain"] > 0

    # A frozen constrained leaf is never touched by its rule (the QR retraction would
    # otherwise move it by rounding).
    frozen = StepRunner(model, spec.freeze("rot"), loss_fn, x, optimizer=optax.adam(0.5))
    report = frozen.step(3)
    assert "rot" in report.by_status("frozen")
    assert (frozen.model.rot == model.rot).all()


def test_open_interval_exports(tmp_path):

    spec = FilterSpec(physics()).constrain("free", ("interval", float("-inf"), 0.0))
    code = spec.to_code("custom_updates")
    assert_ruff_clean([code], tmp_path)
    ns = assert_rebuilds(code, spec)
    params = physics()
    updates = jax.tree.map(lambda _: None, params)
    updates = eqx.tree_at(
        lambda m: m.free, updates, jnp.array([-5.0, 1.0, 0.0]), is_leaf=lambda x: x is None
    )
    out = ns["apply_updates"](params, updates)
    np.testing.assert_array_equal(out.free, [-5.0, 0.0, 0.0])
    assert out.rot is params.rot
