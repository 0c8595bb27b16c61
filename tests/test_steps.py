"""StepRunner: methods, statuses, set_spec, compile cache, failures and odd models."""

from __future__ import annotations

import json
import threading

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eqx_explorer import ExplorerError, FilterSpec, _steps
from eqx_explorer._steps import SPECIALISE_AFTER, StepRunner


class Net(eqx.Module):
    """Every kind of leaf: float arrays, an int buffer, functions, a float, a string, Dropout,
    and a static field (no leaf at all)."""

    mlp: eqx.nn.MLP
    head: eqx.nn.Linear
    counter: jax.Array
    act: object
    temperature: float
    label: str
    dropout: eqx.nn.Dropout
    kind: str = eqx.field(static=True)

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.mlp = eqx.nn.MLP(3, 4, 4, 1, key=k1)
        self.head = eqx.nn.Linear(4, 1, key=k2)
        self.counter = jnp.zeros((), jnp.int32)
        self.act = jax.nn.relu
        self.temperature = 2.0
        self.label = "net"
        self.dropout = eqx.nn.Dropout(0.1, inference=True)
        self.kind = "regressor"

    def __call__(self, x):
        h = self.act(self.mlp(x)) / self.temperature
        return self.head(self.dropout(h))[0]


def mse(model, batch):
    x, y = batch
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)


@pytest.fixture(scope="module")
def net():
    return Net(jax.random.key(0))


@pytest.fixture(scope="module")
def batch():
    kx, ky = jax.random.split(jax.random.key(1))
    return jax.random.normal(kx, (8, 3)), jax.random.normal(ky, (8,))


def leaves_equal(a, b) -> bool:
    la, lb = jtu.tree_leaves(a), jtu.tree_leaves(b)
    return len(la) == len(lb) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) if eqx.is_array(x) else x is y
        for x, y in zip(la, lb)
    )


@pytest.mark.parametrize("layout", ["masked", "structural"])
def test_statuses_partition_every_leaf_kind(net, batch, layout):
    spec = FilterSpec(net).freeze("mlp")
    runner = StepRunner(net, spec, mse, batch, layout=layout)
    report = runner.step(2)
    statuses = report.statuses()
    assert report.ok and report.error is None and report.steps == 2 and len(report.loss) == 2
    assert set(report.by_status("updated")) == {"head.weight", "head.bias"}
    assert set(report.by_status("frozen")) == {
        "mlp.layers[0].weight",
        "mlp.layers[0].bias",
        "mlp.layers[1].weight",
        "mlp.layers[1].bias",
    }
    for path in ("counter", "act", "temperature", "label", "dropout.p", "mlp.activation"):
        assert statuses[path] == "kept"
    frozen_leaf = next(r for r in report.leaves if r.path == "mlp.layers[0].weight")
    assert frozen_leaf.grad_norm is None  # partition: no gradient at all, not a zero one
    head = next(r for r in report.leaves if r.path == "head.weight")
    assert head.grad_norm > 0 and head.update_norm > 0 and head.delta_norm > 0
    # The trained model keeps its structure and non-array leaves; the user's is untouched.
    trained = runner.model
    assert trained.kind == "regressor" and "kind" not in statuses
    assert trained.act is jax.nn.relu and trained.label == "net" and trained.temperature == 2.0
    assert trained.mlp.layers[0].weight is net.mlp.layers[0].weight
    assert not np.array_equal(trained.head.weight, net.head.weight)
    assert leaves_equal(net, Net(jax.random.key(0)))
    # Optimizer state under partition: Adam's mu and nu (+ count) for trainable leaves only
    # (structural), or for every float leaf (masked: one program for every spec).
    state_bytes = sum(x.nbytes for x in jtu.tree_leaves(runner.opt_state))
    covered = spec.counts["trainable_bytes"]
    if layout == "masked":
        covered += spec.counts["frozen_bytes"]
    assert state_bytes == 2 * covered + 4


@pytest.mark.parametrize(
    "method, frozen_grad, frozen_status",
    [
        ("partition", None, "frozen"),
        ("stop_gradient", 0.0, "frozen"),  # plain Adam: zero grads, zero moments, no move
        ("optax_mask", "positive", "frozen"),  # a real gradient, a zero update
        ("none", "positive", "updated"),
    ],
)
def test_methods(net, batch, method, frozen_grad, frozen_status):
    spec = FilterSpec(net).freeze("head")
    report = StepRunner(net, spec, mse, batch, method=method).step()
    weight = next(r for r in report.leaves if r.path == "head.weight")
    assert weight.status == frozen_status
    if frozen_grad == "positive":
        assert weight.grad_norm > 0
    else:
        assert weight.grad_norm == frozen_grad
    if method == "optax_mask":
        assert weight.update_norm == 0.0
    assert report.statuses()["mlp.layers[0].weight"] == "updated"
    assert report.ok


@pytest.mark.parametrize("method", ["partition", "stop_gradient"])
def test_everything_frozen(net, batch, method):
    spec = FilterSpec(net).freeze("mlp", "head")
    report = StepRunner(net, spec, mse, batch, method=method).step(2)
    # Six float arrays frozen; the int buffer is kept (it can never train).
    assert report.ok and report.counts["frozen"] == 6 and report.counts["updated"] == 0


def test_adamw_leaks_under_stop_gradient_not_under_partition(net, batch):
    spec = FilterSpec(net).freeze("mlp")
    adamw = optax.adamw(1e-2, weight_decay=0.1)
    leaky = StepRunner(net, spec, mse, batch, optimizer=adamw, method="stop_gradient").step(2)
    assert set(leaky.by_status("leaked")) == set(spec.frozen_paths())
    assert not leaky.ok
    assert all("frozen but changed" in r.detail for r in leaky.leaves if r.status == "leaked")
    safe = StepRunner(net, spec, mse, batch, optimizer=adamw, method="partition").step(2)
    assert safe.by_status("leaked") == [] and safe.ok


@pytest.mark.parametrize("method, expected", [("partition", "frozen"), ("stop_gradient", "leaked")])
def test_train_then_freeze_with_momentum(net, batch, method, expected):
    spec = FilterSpec(net)
    runner = StepRunner(
        net, spec, mse, batch, optimizer=optax.sgd(0.1, momentum=0.9), method=method
    )
    assert runner.step(3).ok
    runner.set_spec(spec.freeze("head"))
    report = runner.step()
    assert report.statuses()["head.weight"] == expected
    assert report.statuses()["mlp.layers[0].weight"] == "updated"
    if method == "partition":
        assert any(
            "dropped for newly frozen leaves: head.weight, head.bias" in n for n in report.notes
        )
    else:  # the whole-model momentum state carried over unchanged: nothing to say
        assert report.notes == []


def test_set_spec_partition_keeps_state_of_leaves_that_stay(net, batch):
    spec = FilterSpec(net).freeze("head")
    runner = StepRunner(net, spec, mse, batch, layout="structural")
    runner.step()
    before = {jtu.keystr(p): x for p, x in jtu.tree_flatten_with_path(runner.opt_state)[0]}
    runner.set_spec(spec.unfreeze("head"))
    after = {jtu.keystr(p): x for p, x in jtu.tree_flatten_with_path(runner.opt_state)[0]}
    kept = [p for p in before if p in after]
    assert kept and all(after[p] is before[p] for p in kept)  # includes Adam's count
    assert "[0].mu.head.weight" in after and "[0].mu.head.weight" not in before
    assert not np.any(after["[0].mu.head.weight"])  # fresh: zeros
    report = runner.step()
    assert any("started fresh for: head.weight, head.bias" in n for n in report.notes)
    details = {r.path: r.detail for r in report.leaves}
    assert details["head.weight"] == "optimizer state started fresh"
    assert details["mlp.layers[0].weight"] == ""
    assert runner.step().notes == []  # notes are reported once


def test_set_spec_optax_mask_carries_state_and_method_switch_rebuilds(net, batch):
    spec = FilterSpec(net).freeze("head")
    runner = StepRunner(net, spec, mse, batch, method="optax_mask")
    runner.step()
    runner.set_spec(spec.unfreeze("head"))
    notes = runner.step().notes
    assert any("started fresh for: head.weight, head.bias" in n for n in notes)
    runner.set_spec(spec, method="partition")
    notes = runner.step().notes
    assert "method changed: optax_mask -> partition" in notes
    assert any("rebuilt from scratch" in n for n in notes)


class Weak(eqx.Module):
    w: jax.Array
    b: jax.Array

    def __call__(self, x):
        return jnp.sum(self.w * x) + self.b


def weak_loss(model, batch):
    return jnp.mean((jax.vmap(model)(batch) - 1.0) ** 2)


def test_masked_layout_compiles_once_for_every_spec_method_and_n():
    model = Weak(jnp.full((3,), 0.05), jnp.asarray(0.5))
    assert model.w.weak_type and model.b.weak_type
    spec = FilterSpec(model)
    runner = StepRunner(model, spec, weak_loss, jnp.ones((4, 3)), specialise=False)
    for n in (1, 1, 3, 4, 1):
        runner.step(n)
    for method in ("partition", "stop_gradient", "optax_mask", "none"):
        for s in (spec.freeze("b"), spec.freeze("w"), spec):
            runner.set_spec(s, method=method)
            assert runner.step(2).compiles == 0
    assert runner.compile_count == 1 and runner.background_compile_count == 0
    assert model.w.weak_type  # the user's arrays are not touched


def test_structural_layout_compiles_once_per_spec_and_method():
    model = Weak(jnp.full((3,), 0.05), jnp.asarray(0.5))
    spec = FilterSpec(model)
    runner = StepRunner(model, spec, weak_loss, jnp.ones((4, 3)), layout="structural")
    for n in (1, 1, 3, 4):  # weak types made strong once; n is data
        runner.step(n)
    assert runner.compile_count == 1
    for method in ("partition", "stop_gradient", "optax_mask", "none"):
        runner.set_spec(spec.freeze("b"), method=method)
        runner.step()
    seen = runner.compile_count
    for method in ("partition", "stop_gradient", "optax_mask", "none"):
        runner.set_spec(spec, method=method)
        runner.step()
        runner.set_spec(spec.freeze("b"), method=method)
        assert runner.step().compiles == 0  # a spec seen before: no recompile
    # The first visit of the full spec under optax_mask (its labels); partition saw it at
    # the start, and stop_gradient with nothing frozen and "none" are the same program.
    assert runner.compile_count == seen + 1


def _reported(report) -> list:
    """(path, status, grad, update and delta norms) of every row; NaN for no norm."""
    rows = [*report.leaves, *report.state_leaves]
    norms = [(r.grad_norm, r.update_norm, r.delta_norm) for r in rows]
    return [
        (r.path, r.status, *(np.nan if x is None else x for x in n)) for r, n in zip(rows, norms)
    ]


def test_small_audits_stay_on_numpy_and_large_ones_compile_to_the_same_report(
    net, batch, monkeypatch
):
    def run() -> tuple[list, int]:
        before = _steps._audit_call._cache_size()
        runner = StepRunner(net, FilterSpec(net), mse, batch, layout="structural")
        reports = []
        for spec in (FilterSpec(net), FilterSpec(net).freeze("head"), FilterSpec(net)):
            runner.set_spec(spec)
            reports.append(_reported(runner.step(2)))
            assert runner.wait_ready(timeout=120)
            reports.append(_reported(runner.step(1)))
        return reports, _steps._audit_call._cache_size() - before

    on_host, compiled = run()
    assert compiled == 0  # a few hundred elements: NumPy's audit, nothing built
    monkeypatch.setattr(_steps, "AUDIT_COMPILE_ELEMENTS", 0)
    on_device, compiled = run()
    assert compiled == 2  # a program per set of leaves: all of them, and all but the head's
    for host, device in zip(on_host, on_device):
        assert [r[:2] for r in host] == [r[:2] for r in device]
        np.testing.assert_allclose(
            [r[2:] for r in host], [r[2:] for r in device], rtol=1e-6, equal_nan=True
        )


# Values where NumPy and XLA could disagree: signed zeros, NaN, infinities, overflow.
_odd = st.sampled_from([0.0, -0.0, 1.5, -2.0, np.nan, np.inf, -np.inf, 3e38])


def _floats(shape: tuple) -> st.SearchStrategy:
    n = int(np.prod(shape))
    return st.lists(_odd, min_size=n, max_size=n).map(
        lambda v: jnp.asarray(np.reshape(np.asarray(v, np.float32), shape))
    )


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(_floats((3,)), _floats((2, 2))), min_size=4, max_size=4),
    st.lists(st.integers(-2, 2), min_size=2, max_size=2),
    st.booleans(),
)
def test_host_audit_equals_the_compiled_audit(leaves, ints, first):
    begin, before, end, grads = (list(pair) for pair in leaves)
    state0 = [begin[0], jnp.zeros(2, jnp.int32)]
    state = [end[0], jnp.asarray(ints, jnp.int32)]
    args = (begin, before, end, grads, state0, state, np.bool_(first))
    for host, device in zip(_steps._host_audit(*args), _steps._audit_call(*args)):
        np.testing.assert_allclose(host, np.asarray(device), rtol=1e-6, equal_nan=True)


class Scalar(eqx.Module):
    w: jax.Array
    b: jax.Array


def sqrt_loss(model, batch):
    return jnp.sqrt(model.w[0]) * batch + jnp.sum(model.b)


def scalar_runner(**kwargs):
    model = Scalar(jnp.ones((1,)), jnp.zeros((2,)))
    return model, StepRunner(model, FilterSpec(model), sqrt_loss, jnp.asarray(1.0), **kwargs)


def test_nan_mid_call_rolls_back_to_last_good_step():
    # sgd(1.2) on sqrt(w): w = 1 -> 0.4 -> -0.55; step 3 takes the sqrt of a negative.
    _, runner = scalar_runner(optimizer=optax.sgd(1.2))
    report = runner.step(5)
    assert report.steps == 2 and len(report.loss) == 2 and not report.ok
    assert "step 3 of this call: non-finite loss (nan)" in report.error
    assert "non-finite gradients at: w." in report.error  # b's gradient (1) is finite
    w1 = 1 - 1.2 * 0.5
    assert np.allclose(runner.model.w, w1 - 1.2 * 0.5 / np.sqrt(w1))
    w = next(r for r in report.leaves if r.path == "w")
    assert w.status == "updated" and not w.finite and np.isnan(w.grad_norm)


def test_nan_loss_keeps_model_and_optimizer_state():
    _, runner = scalar_runner()
    runner.step()
    model_before, opt_before = runner.model, runner.opt_state
    runner.batch = jnp.asarray(jnp.nan)
    report = runner.step()
    assert "step 1 of this call: non-finite loss (nan); non-finite gradients at: w." in report.error
    assert report.loss == [] and report.steps == 0
    assert leaves_equal(runner.model, model_before)
    assert all(
        a is b for a, b in zip(jtu.tree_leaves(runner.opt_state), jtu.tree_leaves(opt_before))
    )
    runner.batch = jnp.asarray(1.0)  # the kernel lives on: fix the input and continue
    assert runner.step().ok


def test_non_finite_update_is_blamed_on_the_optimizer():
    model, runner = scalar_runner(optimizer=optax.sgd(jnp.inf))
    report = runner.step(3)
    assert "step 1 of this call: the update made NaN/inf values in: w, b" in report.error
    assert "check the optimizer" in report.error
    assert leaves_equal(runner.model, model)


def test_loss_that_raises_and_non_scalar_loss(net, batch):
    def raising(model, batch):
        raise ValueError("no such column")

    runner = StepRunner(net, FilterSpec(net), raising, batch)
    report = runner.step(2)
    assert "ValueError: no such column" in report.error and report.steps == 0
    assert report.statuses()["head.weight"] == "stalled" and not report.ok
    assert leaves_equal(runner.model, net)

    runner.loss_fn = lambda model, batch: jax.vmap(model)(batch[0])
    report = runner.step()
    assert "loss_fn must return a float scalar" in report.error and "[8]" in report.error
    runner.loss_fn = mse
    assert runner.step().ok


class RaisingOptimizer:
    def init(self, params):
        return optax.sgd(0.1).init(params)

    def update(self, grads, state, params=None):
        raise RuntimeError("boom in update")


@pytest.mark.parametrize(
    "loss_fn, optimizer, says",
    [
        (lambda m, b: (mse(m, b), 0.0), None, "returned a tuple of 2 values"),
        (lambda m, b: mse(m, b), RaisingOptimizer(), "the optimizer's update raised RuntimeError"),
    ],
    ids=["tuple-loss", "raising-optimizer"],
)
def test_a_failing_step_names_its_cause(net, batch, loss_fn, optimizer, says):
    runner = StepRunner(net, FilterSpec(net), loss_fn, batch, optimizer=optimizer)
    report = runner.step(np.int64(2))
    assert says in report.error and report.steps == 0 and leaves_equal(runner.model, net)


def test_a_constant_python_float_is_a_loss(net, batch):
    assert StepRunner(net, FilterSpec(net), lambda m, b: 3.0, batch).step(1).loss == [3.0]


def test_stateful_model_needs_state_and_a_state_back():
    model, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch")
    x = jnp.ones((4, 3))
    with pytest.raises(ExplorerError, match=r"needs an eqx.nn.State.*state=state"):
        StepRunner(model, FilterSpec(model), lambda m, b: 0.0, x)
    runner = StepRunner(
        model, FilterSpec(model), lambda m, s, b: (jnp.sum(m.weight), 5), x, state=state
    )
    assert "new_state an eqx.nn.State like the one it was given" in runner.step(1).error


class JvpModel(eqx.Module):
    x: jax.Array
    y: jax.Array


@eqx.filter_custom_jvp
def scaled(x, y):
    return x * y


@scaled.def_jvp
def _scaled_jvp(primals, tangents):
    x, y = primals
    t_x, t_y = tangents
    return scaled(x, y), t_x * 2 + t_y  # breaks when y is frozen: t_y is None


def test_custom_jvp_none_tangent_gets_a_hint():
    model = JvpModel(jnp.ones(2), jnp.ones(2))
    spec = FilterSpec(model).freeze("y")
    loss = lambda m, b: jnp.sum(scaled(m.x, m.y))  # noqa: E731
    # Masked: the first answer tries the program specialised to the spec (frozen leaves not
    # differentiated), which fails; the masked one differentiates every float leaf, so no
    # tangent is None and the steps run. The notes say why, once.
    masked = StepRunner(model, spec, loss, None)
    report = masked.step(SPECIALISE_AFTER)
    assert report.ok and report.steps == SPECIALISE_AFTER
    notes = report.notes + masked.step().notes
    assert sum("custom JVP rule failed on a `None` tangent" in n for n in notes) == 1
    # Structural: frozen leaves are not differentiated, as in the exported code.
    runner = StepRunner(model, spec, loss, None, layout="structural")
    error = runner.step().error
    assert "custom JVP rule failed on a `None` tangent" in error
    assert "eqx.filter_custom_jvp" in error and "symbolic" in error
    # An unrelated NoneType error gets no custom-JVP hint.
    runner.loss_fn = lambda m, b: jnp.sum(m.x) + None
    error = runner.step().error
    assert "NoneType" in error and "custom JVP" not in error


class BNNet(eqx.Module):
    linear: eqx.nn.Linear
    bn: eqx.nn.BatchNorm

    def __init__(self, key):
        self.linear = eqx.nn.Linear(3, 2, key=key)
        self.bn = eqx.nn.BatchNorm(2, axis_name="batch")

    def __call__(self, x, state):
        return self.bn(self.linear(x), state)


def bn_loss(model, state, x):
    out, state = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)
    return jnp.mean(out**2), state


def test_batchnorm_state_is_audited_and_inference_mode_keeps_it():
    model, state = eqx.nn.make_with_state(BNNet)(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (6, 3))
    spec = FilterSpec(model).freeze("bn")
    runner = StepRunner(model, spec, bn_loss, x, state=state)
    report = runner.step(2)
    assert report.ok, report.error
    assert set(report.by_status("frozen")) == {"bn.weight", "bn.bias"}
    assert report.statuses()["bn.axis_name"] == "kept"
    assert not leaves_equal(runner.state, state)  # running statistics moved
    names = [leaf.path for leaf in report.state_leaves]
    assert names == ["bn.ema_first_time_index", "bn.ema_state_index[0]", "bn.ema_state_index[1]"]
    assert {leaf.status for leaf in report.state_leaves} == {"updated"}
    assert any("frozen layer `bn` still changed its state" in n for n in report.notes)
    assert "bn.ema_state_index[0]" in report.table()
    # In inference mode the frozen layer's statistics stay put (no recompile needed twice).
    runner.set_spec(spec.inference("bn"))
    report = runner.step(2)
    assert report.ok and {leaf.status for leaf in report.state_leaves} == {"unchanged"}
    assert not any("frozen layer" in n for n in report.notes)
    assert runner.model.bn.inference is True and model.bn.inference is False
    runner.set_spec(spec)  # the flag goes back to the model's own value
    assert runner.model.bn.inference is False
    moved = {leaf.path: leaf.status for leaf in runner.step().state_leaves}
    assert moved["bn.ema_state_index[0]"] == moved["bn.ema_state_index[1]"] == "updated"
    assert moved["bn.ema_first_time_index"] == "unchanged"  # False since the first step
    with pytest.raises(ExplorerError, match=r"loss_fn\(model, state, batch\)"):
        StepRunner(model, spec, mse, x, state=state)
    with pytest.raises(ExplorerError, match="make_with_state"):
        StepRunner(model, spec, bn_loss, x)


class Tied(eqx.Module):
    shared: eqx.nn.Shared

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        encode = eqx.nn.Linear(2, 2, key=k1)
        decode = eqx.nn.Linear(2, 2, key=k2)
        self.shared = eqx.nn.Shared((encode, decode), lambda p: p[1].weight, lambda p: p[0].weight)

    def __call__(self, x):
        encode, decode = self.shared()
        return decode(jax.nn.tanh(encode(x)))


def test_shared_weights():
    model = Tied(jax.random.key(0))
    x = jnp.ones((4, 2))
    report = StepRunner(
        model, FilterSpec(model), lambda m, b: jnp.mean(jax.vmap(m)(b) ** 2), x
    ).step()
    statuses = report.statuses()
    assert statuses["shared.pytree[0].weight"] == "updated"  # the source gets both gradients
    assert statuses["shared.pytree[1].weight"] == "kept"  # the tie (a SharedNode)
    assert statuses["shared.where"] == statuses["shared.get"] == "kept"


def test_dict_with_odd_keys_and_json():
    model = {"it's": jnp.ones(2), "a.b[0]": jnp.zeros(2), "*": jnp.full((2,), 3.0)}
    spec = FilterSpec(model).freeze("['*']")  # a quoted star is a literal key, not a glob

    def loss(m, b):
        return jnp.sum((m["it's"] * m["a.b[0]"] - b) ** 2) + jnp.sum(m["*"] ** 2)

    report = StepRunner(model, spec, loss, jnp.ones(2), method="stop_gradient").step()
    statuses = report.statuses()
    assert statuses == {
        "['*']": "frozen",
        "['a.b[0]']": "updated",
        '["it\'s"]': "stalled",  # its gradient is 2 (a * b - 1) * b = 0
    }
    doc = json.loads(json.dumps(report.to_dict()))
    assert doc["statuses"] == statuses and doc["ok"] is True
    assert doc["counts"]["stalled"] == 1


def test_reset_and_bad_inputs(net, batch):
    spec = FilterSpec(net)
    runner = StepRunner(net, spec, mse, batch)
    runner.step(2)
    runner.reset()
    assert leaves_equal(runner.model, net)
    assert not np.any(jtu.tree_leaves(runner.opt_state)[1])  # fresh moments
    assert runner.step().notes == ["reset: initial model, fresh optimizer state"]
    other = FilterSpec(Weak(jnp.ones(3), jnp.ones(())))
    with pytest.raises(ExplorerError, match="another model"):
        StepRunner(net, other, mse, batch)
    with pytest.raises(ExplorerError, match="another model"):
        runner.set_spec(other)
    with pytest.raises(ExplorerError, match="unknown method 'masked'"):
        StepRunner(net, spec, mse, batch, method="masked")
    with pytest.raises(ExplorerError, match="unknown method"):
        runner.set_spec(spec, method="freeze")
    with pytest.raises(ExplorerError, match=r"cannot be called as loss_fn\(model, batch\)"):
        StepRunner(net, spec, lambda model: 0.0, batch)
    with pytest.raises(ExplorerError, match="positive int"):
        runner.step(0)
    with pytest.raises(ExplorerError, match="GradientTransformation"):
        StepRunner(net, spec, mse, batch, optimizer="adam")


def test_runner_trains_the_model_it_is_given_not_the_specs():
    built_on = eqx.nn.MLP(2, 2, 3, 2, key=jax.random.key(0))
    trained = eqx.nn.MLP(2, 2, 3, 2, key=jax.random.key(7))
    spec = FilterSpec(built_on).freeze("layers[0]")
    runner = StepRunner(trained, spec, eq_loss, EQ_BATCH)
    assert runner.step(2).ok
    assert (runner.model.layers[0].weight == trained.layers[0].weight).all()
    assert not (runner.model.layers[0].weight == built_on.layers[0].weight).all()


def test_optimizer_state_estimate_is_headless_and_matches_the_runner():
    from eqx_explorer import FilterSpec, StepRunner
    from eqx_explorer._examples import example_batch, example_model, mse_loss
    from eqx_explorer._slots import opt_state_bytes, optimizer_slots

    model = example_model()
    spec = FilterSpec(model).freeze("blocks")
    sgd = optax.sgd(0.1, momentum=0.9)
    slots = optimizer_slots(model, sgd)
    assert slots == 1.0
    assert opt_state_bytes(spec, "partition", slots, "structural") == spec.counts["trainable_bytes"]
    everything = spec.counts["trainable_bytes"] + spec.counts["frozen_bytes"]
    for layout in ("structural", "masked"):
        runner = StepRunner(model, spec, mse_loss, example_batch(), optimizer=sgd, layout=layout)
        held = sum(x.nbytes for x in jax.tree.leaves(runner.opt_state))
        assert held == opt_state_bytes(spec, "partition", slots, layout)
        assert opt_state_bytes(spec, "stop_gradient", slots, layout) == everything
    assert opt_state_bytes(spec, "partition", slots, "masked") == everything


# -- the masked program equals the structural versions -----------------------------------


EQ_MODEL = eqx.nn.MLP(2, 2, 3, 2, key=jax.random.key(3))  # six float leaves
EQ_BATCH = (jax.random.normal(jax.random.key(4), (5, 2)), jnp.ones((5, 2)))
EQ_OPTIMIZERS = {
    "adam": optax.adam(0.05),
    "adamw": optax.adamw(0.05, weight_decay=0.3),
    "sgd_momentum": optax.sgd(0.1, momentum=0.9),
    "clipped_adam": optax.chain(optax.clip_by_global_norm(0.05), optax.adam(0.05)),
}
_EQ_RUNNERS: dict = {}


def eq_loss(model, batch):
    x, y = batch
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)


def eq_spec(factors: list) -> FilterSpec:
    """The spec giving the six float leaves these learning-rate factors (0 = frozen)."""
    spec = FilterSpec(EQ_MODEL)
    full = np.zeros(spec.model_tree.num_leaves)
    full[spec.model_tree.inexact] = factors
    return spec.set_lr_factors(full)


def eq_runner(name: str, layout: str) -> StepRunner:
    """One runner per (optimizer, layout), reset between examples: compilations are reused."""
    key = (name, layout)
    if key not in _EQ_RUNNERS:
        _EQ_RUNNERS[key] = StepRunner(
            EQ_MODEL,
            FilterSpec(EQ_MODEL),
            eq_loss,
            EQ_BATCH,
            optimizer=EQ_OPTIMIZERS[name],
            layout=layout,
            specialise=False,
        )
    runner = _EQ_RUNNERS[key]
    runner.set_spec(FilterSpec(EQ_MODEL), method="partition")
    runner.reset()
    return runner


def hand_written(spec: FilterSpec, method: str, optimizer, n: int):
    """Each method as a user writes it, structurally (the exported code's idioms); the
    learning-rate factors scale the updates of trainable leaves after the optimizer."""
    model = EQ_MODEL
    factors = jtu.tree_unflatten(
        spec.model_tree.treedef, np.where(spec.mask, spec.lr_factors, 1.0).tolist()
    )
    scale = optax.stateless(
        lambda u, _: jtu.tree_map(
            lambda x, f: None if x is None else x * f, u, factors, is_leaf=lambda x: x is None
        )
    )
    if method == "partition":
        optimizer = optax.chain(optimizer, scale)
        params, static = eqx.partition(model, spec.tree)
        opt_state = optimizer.init(params)
        for _ in range(n):
            grads = eqx.filter_grad(lambda p: eq_loss(eqx.combine(p, static), EQ_BATCH))(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            params = eqx.apply_updates(params, updates)
        return eqx.combine(params, static)
    frozen = [not t for t in jtu.tree_leaves(spec.tree)]
    floats = eqx.filter(model, eqx.is_inexact_array)
    if method == "optax_mask":
        labels = jtu.tree_map(lambda t: "trainable" if t else "frozen", spec.tree)
        optimizer = optax.partition(
            {"trainable": optimizer, "frozen": optax.set_to_zero()}, lambda _: labels
        )
    optimizer = optax.chain(optimizer, scale)
    opt_state = optimizer.init(floats)

    def objective(p):
        if method == "stop_gradient":
            leaves, treedef = jtu.tree_flatten(p)
            p = jtu.tree_unflatten(
                treedef,
                [
                    jax.lax.stop_gradient(x) if f and eqx.is_array(x) else x
                    for x, f in zip(leaves, frozen)
                ],
            )
        return eq_loss(p, EQ_BATCH)

    for _ in range(n):
        grads = eqx.filter_grad(objective)(model)
        updates, opt_state = optimizer.update(
            eqx.filter(grads, eqx.is_inexact_array), opt_state, floats
        )
        model = eqx.apply_updates(model, updates)
        floats = eqx.filter(model, eqx.is_inexact_array)
    return model


# A factor per float leaf: 0 freezes it, and 1 (plain on/off) is drawn most often.
factors = st.lists(st.sampled_from([0.0, 0.0, 1.0, 1.0, 0.1, 2.5]), min_size=6, max_size=6)
segment = st.tuples(factors, st.sampled_from(["partition", "stop_gradient", "optax_mask", "none"]))


@pytest.mark.slow  # a compilation per drawn spec (structural) or eager reference loops
@settings(max_examples=12, deadline=None)
@given(st.sampled_from(sorted(EQ_OPTIMIZERS)), segment, st.integers(1, 3))
def test_masked_steps_equal_the_hand_written_loop(name, seg, n):
    lr, method = seg
    spec = eq_spec(lr)
    runner = eq_runner(name, "masked")
    runner.set_spec(spec, method=method)
    report = runner.step(n)
    expected = hand_written(spec, method, EQ_OPTIMIZERS[name], n)
    arrays = lambda m: jtu.tree_leaves(eqx.filter(m, eqx.is_array))  # noqa: E731
    trainable = spec.mask[spec.model_tree.inexact]
    for got, want, train in zip(arrays(runner.model), arrays(expected), trainable):
        if method in ("partition", "optax_mask") and not train:
            assert got is want or np.array_equal(got, want)  # bit-identical
        else:
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
    assert report.ok or method == "stop_gradient"
    assert runner.compile_count == 1


@pytest.mark.slow  # a compilation per drawn spec (structural) or eager reference loops
@settings(max_examples=12, deadline=None)
@given(
    st.sampled_from(sorted(EQ_OPTIMIZERS)),
    st.lists(st.tuples(segment, st.integers(1, 3)), min_size=2, max_size=4),
)
def test_toggle_sequences_equal_the_structural_layout(name, segments):
    masked, structural = eq_runner(name, "masked"), eq_runner(name, "structural")
    for (lr, method), n in segments:
        spec = eq_spec(lr)
        reports = []
        for runner in (masked, structural):
            runner.set_spec(spec, method=method)
            reports.append(runner.step(n))
        a, b = reports
        assert a.statuses() == b.statuses()
        assert [n for n in a.notes if "compiled" not in n] == b.notes
        arrays = lambda m: jtu.tree_leaves(eqx.filter(m, eqx.is_array))  # noqa: E731
        for x, y in zip(arrays(masked.model), arrays(structural.model)):
            np.testing.assert_allclose(x, y, rtol=5e-5, atol=1e-6)
    assert masked.compile_count == 1


def test_lr_factor_scales_the_update_and_is_reported():
    # Same gradient (both calls start from the model), 10x smaller factor: 10x smaller step.
    runner = StepRunner(EQ_MODEL, FilterSpec(EQ_MODEL), eq_loss, EQ_BATCH, optimizer=optax.sgd(0.1))
    full = runner.step(1).leaf("layers[0].weight")
    runner.reset()
    runner.set_spec(FilterSpec(EQ_MODEL).scale_lr("layers[0]", 0.1).freeze("layers[2]"))
    report = runner.step(1)
    scaled = report.leaf("layers[0].weight")
    assert (full.lr_factor, scaled.lr_factor) == (1.0, pytest.approx(0.1))
    # Measured as the change of float32 weights: equal to rounding.
    assert scaled.update_norm == pytest.approx(0.1 * full.update_norm, rel=1e-3)
    assert scaled.grad_norm == pytest.approx(full.grad_norm, rel=1e-6)
    assert report.leaf("layers[2].bias").lr_factor == 0.0
    assert report.leaf("activation").lr_factor is None
    assert runner.compile_count == 1


def test_a_dead_parameter_moved_by_weight_decay_is_flagged():
    class Dead(eqx.Module):
        used: jax.Array
        unused: jax.Array

    model = Dead(jnp.ones(3), jnp.ones(3))
    loss = lambda m, b: jnp.sum(m.used * b)  # noqa: E731
    report = StepRunner(
        model, FilterSpec(model), loss, jnp.ones(3), optimizer=optax.adamw(0.1)
    ).step()
    dead, alive = report.leaf("unused"), report.leaf("used")
    assert dead.status == alive.status == "updated" and dead.grad_norm == 0.0
    assert "zero gradient" in dead.detail and "zero gradient" not in alive.detail


def _counting_recycled(runner: StepRunner) -> list:
    calls: list = []
    recycled = runner._recycled
    runner._recycled = lambda *a, **k: calls.append(1) or recycled(*a, **k)
    return calls


def _arrays(tree) -> list:
    return jtu.tree_leaves(eqx.filter(tree, eqx.is_array))


def test_a_toggle_before_the_masked_program_is_built_waits_for_it_and_says_so(monkeypatch):
    # The first answer compiles its spec's own program; the masked one, which every other
    # spec runs on, builds in the background after it. A spec changed before that build is
    # done waits for it, reporting "compiling", and compiles nothing in the foreground.
    runner = StepRunner(EQ_MODEL, eq_spec([1.0] * 6), eq_loss, EQ_BATCH)
    gate, build = threading.Event(), runner._warm_masked
    monkeypatch.setattr(runner, "_warm_masked", lambda: (gate.wait(60), build()))
    assert runner.step(1).ok and runner.compile_count == 1
    runner.set_spec(eq_spec(RECYCLED_SPEC))
    phases: list[str] = []
    told, reports = threading.Event(), []

    def progress(p) -> None:
        phases.append(p.phase)
        told.set()

    step = threading.Thread(target=lambda: reports.append(runner.step(1, progress=progress)))
    step.start()
    try:
        assert told.wait(60) and phases[0] == "compiling"
        step.join(1.0)  # compiling the masked program here would take well under a second
        assert step.is_alive()  # still waiting for the background's build
    finally:
        gate.set()
        step.join(60)
    assert reports[0].ok and phases[-1] == "running" and runner.program == "masked"
    assert runner.compile_count == 1 and runner.background_compile_count == 1


RECYCLED_SPEC = [1.0, 1.0, 0.0, 0.0, 0.5, 1.0]  # learning-rate factors; 0 = frozen


def test_the_masked_program_builds_once_the_spec_changes_or_when_asked():
    # A script that never changes the spec never builds the program for other specs.
    runner = StepRunner(EQ_MODEL, eq_spec([1.0] * 6), eq_loss, EQ_BATCH)
    runner.step(1), runner.step(3)
    assert runner.wait_ready(timeout=60) and runner.background_compile_count == 0
    runner.set_spec(eq_spec(RECYCLED_SPEC))
    assert runner.wait_ready(timeout=120) and runner.background_compile_count == 1
    assert runner.step(1).compiles == 0 and runner.program == "masked"
    asked = StepRunner(EQ_MODEL, eq_spec([1.0] * 6), eq_loss, EQ_BATCH)
    asked.step(1)
    asked.warm()
    assert asked.wait_ready(timeout=120) and asked.background_compile_count == 1
    asked.warm()  # once started, nothing more
    assert asked.wait_ready(timeout=120) and asked.background_compile_count == 1


def long_run(optimizer: str) -> tuple[FilterSpec, StepRunner]:
    """A runner whose spec has run `SPECIALISE_AFTER` steps, its recycling program built."""
    spec = eq_spec(RECYCLED_SPEC)
    runner = StepRunner(EQ_MODEL, spec, eq_loss, EQ_BATCH, optimizer=EQ_OPTIMIZERS[optimizer])
    runner.step(SPECIALISE_AFTER)
    assert runner.wait_ready(timeout=300)
    return spec, runner


def assert_hand_written(runner: StepRunner, spec: FilterSpec, optimizer: str, n: int) -> None:
    """The runner's model is the hand-written loop's after `n` steps."""
    expected = hand_written(spec, "partition", EQ_OPTIMIZERS[optimizer], n)
    for x, y in zip(_arrays(runner.model), _arrays(expected)):
        np.testing.assert_allclose(x, y, rtol=2e-5, atol=1e-6)


def test_long_runs_recycle_buffers_and_keep_the_users_arrays():
    # A spec run long gets a specialised program whose steps write into the buffers of an
    # earlier step; the user's model, and a model read from the runner earlier, stay intact.
    spec, runner = long_run("adamw")
    assert list(runner._donors.values()) == [True]
    earlier = runner.model
    snapshot = [np.asarray(x) for x in _arrays(earlier)]
    runner.step(5)
    assert runner.compile_count == 1
    assert_hand_written(runner, spec, "adamw", SPECIALISE_AFTER + 5)
    for x, y in zip(_arrays(earlier), snapshot):  # not donated away
        np.testing.assert_array_equal(np.asarray(x), y)
    assert all(np.isfinite(np.asarray(x)).all() for x in _arrays(EQ_MODEL))


def test_single_steps_recycle_the_buffers_of_the_step_before():
    # A call of one step writes into the buffers of the call before (which only the runner
    # held) and audits in the same program: same steps and same report as without.
    spec, runner = long_run("adam")
    plain = StepRunner(
        EQ_MODEL, spec, eq_loss, EQ_BATCH, optimizer=EQ_OPTIMIZERS["adam"], specialise=False
    )
    plain.step(SPECIALISE_AFTER)
    calls = _counting_recycled(runner)
    for _ in range(4):
        got, want = runner.step(1), plain.step(1)
        assert [r.status for r in got.leaves] == [r.status for r in want.leaves]
        for a, b in zip(got.leaves, want.leaves):
            for field in ("delta_norm", "update_norm", "grad_norm"):
                x, y = getattr(a, field), getattr(b, field)
                assert x == y or x == pytest.approx(y, rel=1e-4, abs=1e-7), (a.path, field)
    assert len(calls) == 3  # the first call's own arrays are the second's scratch, ...
    assert runner.compile_count == 1
    for x, y in zip(_arrays(runner.model), _arrays(plain.model)):
        np.testing.assert_allclose(x, y, rtol=2e-5, atol=1e-6)


def test_arrays_read_from_the_runner_are_never_recycled():
    spec, runner = long_run("adam")
    calls = _counting_recycled(runner)
    for _ in range(3):
        runner.step(1)
    held, opt_held = runner.model, runner.opt_state
    snapshot = [np.array(x) for x in _arrays((held, opt_held))]
    for _ in range(3):
        runner.step(1)
    assert len(calls) == 2 + 2  # the call after each read wrote into older buffers
    for x, y in zip(_arrays((held, opt_held)), snapshot):
        assert not x.is_deleted()
        np.testing.assert_array_equal(np.asarray(x), y)
    assert all(not x.is_deleted() for x in _arrays(EQ_MODEL))
    assert_hand_written(runner, spec, "adam", SPECIALISE_AFTER + 6)


def test_a_failed_recycled_step_keeps_the_last_good_arrays():
    spec, runner = long_run("adam")
    runner.step(1)
    calls = _counting_recycled(runner)
    good = [np.array(x) for x in runner._leaves if eqx.is_array(x)]  # not handed out
    runner.batch = (EQ_BATCH[0] * jnp.nan, EQ_BATCH[1])
    report = runner.step(1)
    assert calls and not report.ok and report.steps == 0
    for x, y in zip([x for x in runner._leaves if eqx.is_array(x)], good):
        np.testing.assert_array_equal(np.asarray(x), y)
    runner.batch = EQ_BATCH
    assert runner.step(2).ok
    assert_hand_written(runner, spec, "adam", SPECIALISE_AFTER + 3)
