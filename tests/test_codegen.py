"""`FilterSpec.to_code`: every style rebuilds the spec exactly, runs, and is ruff-clean."""

import ast
import collections
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eqx_explorer import ExplorerError, FilterSpec, StepRunner
from eqx_explorer._codegen import STYLES, _literal, to_code
from eqx_explorer._examples import Hypernet, TinyTransformer, example_batch, mse_loss
from tests.helpers import (
    assert_rebuilds,
    assert_ruff_clean,
    models,
    random_edits,
    random_lr_factors,
)

INJECTION = '"]; import os; os.system("x") #'


# -- helpers ------------------------------------------------------------------------------------
def frozen_leaves_identical(before: Any, after: Any, spec: FilterSpec) -> bool:
    old, new = jtu.tree_leaves(before), jtu.tree_leaves(after)
    frozen = spec.model_tree.inexact & ~spec.mask
    return all(
        np.asarray(old[i]).tobytes() == np.asarray(new[i]).tobytes() for i in np.flatnonzero(frozen)
    )


def trainable_leaves_moved(before: Any, after: Any, spec: FilterSpec) -> bool:
    old, new = jtu.tree_leaves(before), jtu.tree_leaves(after)
    return all(not np.array_equal(old[i], new[i]) for i in np.flatnonzero(spec.mask))


# -- models -------------------------------------------------------------------------------------
Pair = collections.namedtuple("Pair", ["left", "right"])


class WithNone(eqx.Module):
    linear: eqx.nn.Linear
    missing: Any
    counts: jax.Array
    act: Any
    pair: Pair


class Odd:
    """A custom pytree node whose attribute names are not identifiers."""

    def __init__(self, a, b):
        setattr(self, "my field", a)
        setattr(self, "class", b)


jtu.register_pytree_with_keys(
    Odd,
    lambda o: (
        (
            (jtu.GetAttrKey("my field"), getattr(o, "my field")),
            (jtu.GetAttrKey("class"), getattr(o, "class")),
        ),
        None,
    ),
    lambda _, children: Odd(*children),
)


def arr(*shape: int, value: float = 1.0) -> jax.Array:
    return jnp.full(shape or (2,), value, jnp.float32)


def odd_keys_model() -> dict:
    return {
        "text": {
            INJECTION: arr(),
            "it's": arr(),
            'say "hi"': arr(),
            "a\\b": arr(),
            "line\nbreak": arr(),
            "ключ": arr(),
            "": arr(),
        },
        "ints": {7: arr(), -1: arr()},
        "tuples": {(1, "a"): arr(), (2, "b"): arr()},
        "bytes": {b"raw'\"": arr()},
        "floats": {1e16: arr(), 0.5: arr()},
        "odd": Odd(arr(), {"k": arr(), "j": arr(), "n": jnp.arange(3)}),
    }


def with_none_model() -> WithNone:
    return WithNone(
        linear=eqx.nn.Linear(2, 2, key=jax.random.key(3)),
        missing=None,
        counts=jnp.arange(4),
        act=jax.nn.relu,
        pair=Pair(arr(3), [None, arr(2), jnp.zeros(2, jnp.int32)]),
    )


class Stateful(eqx.Module):
    norm: eqx.nn.BatchNorm
    linear: eqx.nn.Linear

    def __init__(self, key):
        self.norm = eqx.nn.BatchNorm(3, "batch")
        self.linear = eqx.nn.Linear(3, 3, key=key)


def odd_inference_model() -> dict:
    """Inference flags behind hostile dict keys, a non-identifier attribute and a list."""
    return {
        "text": {INJECTION: eqx.nn.Dropout(0.1), "it's": eqx.nn.Dropout(0.2, inference=True)},
        "odd": Odd(eqx.nn.Dropout(0.3), {"k": eqx.nn.Linear(2, 2, key=jax.random.key(8))}),
        "blocks": [eqx.nn.Dropout(0.1) for _ in range(4)],
    }


def shared_model() -> eqx.nn.Shared:
    a = eqx.nn.Linear(3, 3, key=jax.random.key(1))
    b = eqx.nn.Linear(3, 3, key=jax.random.key(2))
    return eqx.nn.Shared((a, b), lambda p: p[1].weight, lambda p: p[0].weight)


def blocks_model(n: int = 12) -> dict:
    keys = jax.random.split(jax.random.key(5), n)
    return {"blocks": [TinyBlock(k) for k in keys], "head": arr(4)}


class TinyBlock(eqx.Module):
    attn: eqx.nn.Linear
    mlp: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.attn = eqx.nn.Linear(2, 2, key=k1)
        self.mlp = eqx.nn.Linear(2, 2, key=k2)


@functools.cache
def example_models() -> dict[str, Any]:
    """The models the example specs are built on, on first use (their init compiles)."""
    tiny = TinyTransformer(jax.random.key(0))
    hyper = Hypernet(jax.random.key(0))
    stateful, state = eqx.nn.make_with_state(Stateful)(jax.random.key(4))
    scan = eqx.nn.MLP(2, 2, 4, 3, scan=True, key=jax.random.key(6))
    odd = odd_keys_model()
    odd_spec = FilterSpec(odd).freeze(
        lambda m: m["text"][INJECTION],
        lambda m: m["text"]["line\nbreak"],
        lambda m: m["ints"][7],
        lambda m: m["tuples"][(2, "b")],
        lambda m: m["bytes"],
        lambda m: m["floats"][1e16],
        lambda m: getattr(m["odd"], "my field"),
        lambda m: getattr(m["odd"], "class")["k"],
    )
    return {
        "tiny": tiny,
        "hyper": hyper,
        "stateful": stateful,
        "state": state,
        "scan": scan,
        "odd": odd,
        "odd_spec": odd_spec,
    }


# name -> the spec, built from `example_models()`.
SPEC_BUILDERS: dict[str, Callable[[dict[str, Any]], FilterSpec]] = {
    "tiny_attn": lambda built: FilterSpec(built["tiny"]).freeze("embed", "blocks[*].attn"),
    "tiny_all_trainable": lambda built: FilterSpec(built["tiny"]),
    "tiny_all_frozen": lambda built: FilterSpec(built["tiny"]).freeze("**"),
    "tiny_head_only": lambda built: FilterSpec(built["tiny"]).freeze("**").unfreeze("head"),
    "hyper_only_hypernet": lambda built: (
        FilterSpec(built["hyper"]).freeze("**").unfreeze("hyper_net")
    ),
    "hyper_mixed": lambda built: FilterSpec(built["hyper"]).freeze(
        "target", "hyper_net.layers[0].bias"
    ),
    "odd_keys": lambda built: built["odd_spec"],
    "odd_keys_trainable_few": lambda built: (
        FilterSpec(built["odd"]).freeze("**").unfreeze(built["odd_spec"].frozen_paths()[0])
    ),
    "with_none": lambda built: FilterSpec(with_none_model()).freeze("pair.right", "linear.bias"),
    "stateful": lambda built: FilterSpec(built["stateful"]).freeze("norm"),
    "stateful_inference": lambda built: (
        FilterSpec(built["stateful"]).freeze("norm").inference("norm")
    ),
    "stateful_with_state": lambda built: FilterSpec((built["stateful"], built["state"])).freeze(
        "[1]", "[0].linear.bias"
    ),
    "stateful_with_state_inference": lambda built: (
        FilterSpec((built["stateful"], built["state"])).freeze("[1]").inference("[0].norm")
    ),
    "hyper_training_mode": lambda built: FilterSpec(built["hyper"]).inference("dropout", on=False),
    "odd_inference": lambda built: (
        FilterSpec(odd_inference_model())
        .freeze(lambda m: getattr(m["odd"], "class"))
        .inference(
            lambda m: m["text"][INJECTION],
            lambda m: getattr(m["odd"], "my field"),
            '["blocks"][*]',
        )
        .inference("""["text"]["it's"]""", on=False)
    ),
    "nan_key_inference": lambda built: (
        FilterSpec({"d": {float("nan"): eqx.nn.Dropout(0.1)}, "w": arr()})
        .freeze('["w"]')
        .inference("**")
    ),
    "shared": lambda built: FilterSpec(shared_model()).freeze("pytree[0].bias"),
    "scan_mlp": lambda built: FilterSpec(built["scan"]).freeze("layers[1].weight"),  # stacked
    "blocks_run": lambda built: FilterSpec(blocks_model()).freeze(
        *[f'["blocks"][{i}].attn' for i in range(2, 9)], '["blocks"][11]'
    ),
    "no_float_arrays": lambda built: FilterSpec({"ids": jnp.arange(3), "act": jax.nn.relu}),
    "tiny_llrd": lambda built: (
        FilterSpec(built["tiny"])
        .freeze("embed")
        .layerwise_decay("blocks", 0.5)
        .scale_lr("head.bias", 2.0)
    ),
    "blocks_llrd": lambda built: FilterSpec(blocks_model()).layerwise_decay('["blocks"]', 0.9),
    "odd_keys_groups": lambda built: (
        FilterSpec(built["odd"])
        .scale_lr(lambda m: m["text"][INJECTION], 0.5)
        .scale_lr(lambda m: (m["floats"][1e16], getattr(m["odd"], "class")), 1e-05)
    ),
    "stateful_with_state_groups": lambda built: (
        FilterSpec((built["stateful"], built["state"])).freeze("[1]").scale_lr("[0].linear", 0.1)
    ),
}


class _Specs(Mapping):
    """`SPEC_BUILDERS` as a mapping name -> spec, each spec built on first use, so collecting
    the tests (every worker imports this module) compiles nothing."""

    def __getitem__(self, name: str) -> FilterSpec:
        return _spec(name)

    def __iter__(self) -> Iterator[str]:
        return iter(SPEC_BUILDERS)

    def __len__(self) -> int:
        return len(SPEC_BUILDERS)


@functools.cache
def _spec(name: str) -> FilterSpec:
    return SPEC_BUILDERS[name](example_models())


SPECS = _Specs()


# -- the contract -------------------------------------------------------------------------------
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("name", list(SPECS))
def test_every_style_rebuilds_the_spec(name, style):
    assert_rebuilds(to_code(SPECS[name], style), SPECS[name])


def test_example_outputs_are_ruff_clean_and_deterministic(tmp_path):
    codes = [to_code(spec, style) for spec in SPECS.values() for style in STYLES]
    assert codes == [to_code(spec, style) for spec in SPECS.values() for style in STYLES]
    assert_ruff_clean(codes, tmp_path)


def test_to_code_method_and_unknown_style():
    spec = SPECS["tiny_attn"]
    assert spec.to_code() == to_code(spec, "tree_at")
    with pytest.raises(ExplorerError, match="unknown code style 'jax'.*'tree_at'"):
        spec.to_code("jax")


def test_tree_at_is_the_equinox_idiom_with_grouped_where():
    code = to_code(SPECS["tiny_attn"], "tree_at")
    assert "filter_spec = jtu.tree_map(eqx.is_inexact_array, model)" in code
    assert "lambda m: (m.embed, *[block.attn for block in m.blocks])" in code
    assert code.count("eqx.tree_at(") == 1
    # Mostly frozen: start from everything frozen and train one sub-tree, read from the model.
    few = to_code(SPECS["hyper_only_hypernet"], "tree_at")
    assert "filter_spec = jtu.tree_map(lambda _: False, model)" in few
    assert "eqx.tree_at(lambda m: m.hyper_net, filter_spec, replace=float_arrays.hyper_net)" in few


def test_uniform_specs_need_no_tree_at():
    for name in ("tiny_all_trainable", "tiny_all_frozen", "no_float_arrays"):
        for style in ("tree_at", "path"):
            assert "tree_at(" not in to_code(SPECS[name], style)
            assert "is_trainable" not in to_code(SPECS[name], style)


def test_runs_fold_into_comprehensions_over_slices():
    code = to_code(SPECS["blocks_run"], "tree_at")
    assert 'm["blocks"][11]' in code and '*[x.attn for x in m["blocks"][2:9]]' in code
    assert "[1].attn" not in code


class Lists(eqx.Module):
    layers: list
    ls: list
    ms: tuple


def test_comprehension_names_are_readable_and_lint_clean(tmp_path):
    items = [TinyBlock(k) for k in jax.random.split(jax.random.key(7), 4)]
    model = Lists(layers=items, ls=items, ms=tuple(items))
    spec = FilterSpec(model).freeze("layers[*].attn", "ls[*].attn", "ms[*].mlp")
    codes = [to_code(spec, style) for style in STYLES]
    for code in codes:
        assert_rebuilds(code, spec)
    assert "*[layer.attn for layer in m.layers]" in codes[0]
    assert "*[x.attn for x in m.ls]" in codes[0] and "*[x.mlp for x in m.ms]" in codes[0]
    assert_ruff_clean(codes, tmp_path)


def test_none_fields_and_static_leaves_are_never_targets():
    code = to_code(SPECS["with_none"], "tree_at")
    assert "missing" not in code and "counts" not in code and ".act" not in code


def test_attribute_that_is_not_an_identifier_uses_getattr():
    code = to_code(SPECS["odd_keys"], "tree_at")
    assert 'getattr(m["odd"], "my field")' in code and 'getattr(m["odd"], "class")' in code


def test_injection_key_is_a_literal_and_runs_safely(monkeypatch):
    import os

    calls = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(a))
    spec = SPECS["odd_keys"]
    for style in STYLES:
        code = to_code(spec, style)
        assert_rebuilds(code, spec)
        # The key is data inside a string constant; the code imports only what it needs.
        tree = ast.parse(code)
        constants = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)]
        assert any(INJECTION in str(c) for c in constants)
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert imported <= {"equinox", "jax", "jax.tree_util", "optax"}
    assert calls == []


@settings(max_examples=150, deadline=None)
@given(
    st.recursive(
        st.one_of(
            st.text(),
            st.binary(max_size=6),
            st.integers(),
            st.floats(allow_nan=False, allow_infinity=False),
            st.booleans(),
            st.none(),
        ),
        lambda inner: st.lists(inner, max_size=3).map(tuple),
        max_leaves=4,
    )
)
def test_literal_evaluates_back_to_the_key(key):
    assert ast.literal_eval(_literal(key)) == key


def test_key_without_literal_raises_and_names_path_style():
    model = {"d": {float("nan"): arr(), 0.5: arr()}, "x": arr()}
    spec = FilterSpec(model)
    spec = spec.set_mask(["nan" not in p for p in spec.model_tree.leaf_paths])
    with pytest.raises(ExplorerError, match=r"`\['d'\]\[nan\]`.*no Python literal.*style \"path\""):
        to_code(spec, "tree_at")
    for style in ("path", "optax", "train_step"):
        assert_rebuilds(to_code(spec, style), spec)


def test_flat_index_keys_raise_in_where_styles_and_fall_back_elsewhere():
    stateful, state = eqx.nn.make_with_state(Stateful)(jax.random.key(4))
    tree = FilterSpec((stateful, state))
    state_floats = [p for p in tree.trainable_paths() if "flat index" in p]
    assert len(state_floats) == 2  # running mean and variance
    spec = tree.freeze(state_floats[0])
    with pytest.raises(ExplorerError, match=r"flat index.*style \"path\""):
        to_code(spec, "tree_at")
    with pytest.raises(ExplorerError, match=r"flat index.*\"train_step\" or \"optax\""):
        to_code(spec, "stop_gradient")
    for style in ("path", "optax", "train_step"):
        code = to_code(spec, style)
        assert "FROZEN = " in code
        assert_rebuilds(code, spec)


def test_path_prefixes_stop_at_key_boundaries():
    model = {"blocks": [arr() for _ in range(11)]}
    spec = FilterSpec(model).freeze('["blocks"][1]')
    code = to_code(spec, "path")
    assert "FROZEN = (\"['blocks'][1]\",)" in code
    assert_rebuilds(code, spec)  # blocks[10] stays trainable


def test_ten_thousand_leaves_one_frozen_subnetwork_is_short():
    leaves = np.ones((2,), np.float32)
    encoder = {f"layer{i}": {"w": leaves, "b": leaves} for i in range(2500)}
    decoder = {f"layer{i}": {"w": leaves, "b": leaves} for i in range(2500)}
    model = {"encoder": encoder, "decoder": decoder}
    spec = FilterSpec(model).freeze('["encoder"]')
    assert spec.model_tree.num_leaves == 10_000
    for style in ("tree_at", "path"):
        code = to_code(spec, style)
        assert len(code.splitlines()) < 30
        assert_rebuilds(code, spec)


# -- behaviour: real optimizer steps ------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    spec = SPECS["tiny_attn"]
    return spec.model, spec, example_batch()


def test_optax_style_keeps_frozen_leaves_bit_identical(tiny):
    model, spec, batch = tiny
    ns = assert_rebuilds(to_code(spec, "optax"), spec)
    optimizer = ns["make_optimizer"](optax.adamw(1e-2, weight_decay=0.1))
    params = eqx.filter(model, eqx.is_inexact_array)
    opt_state = optimizer.init(params)
    # No Adam moments for frozen leaves: state is 2 x the trainable parameters (+ counters).
    state_size = sum(x.size for x in jtu.tree_leaves(opt_state) if eqx.is_array(x))
    assert 2 * spec.counts["trainable_params"] <= state_size < 2 * spec.counts["total_params"]

    @eqx.filter_jit  # one compilation instead of three eager passes through the transformer
    def step(model, opt_state):
        grads = eqx.filter_grad(mse_loss)(model, batch)
        params = eqx.filter(model, eqx.is_inexact_array)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return eqx.apply_updates(model, updates), opt_state

    new = model
    for _ in range(3):
        new, opt_state = step(new, opt_state)
    assert frozen_leaves_identical(model, new, spec)
    assert trainable_leaves_moved(model, new, spec)
    assert ns["labels"].embed.weight == "frozen" and ns["labels"].head.weight == "trainable"


def test_stop_gradient_style_zeroes_exactly_the_frozen_gradients(tiny):
    model, spec, batch = tiny
    ns = assert_rebuilds(to_code(spec, "stop_gradient"), spec)
    # Jitted: one compilation is cheaper than an eager pass through the transformer.
    grad_fn = eqx.filter_jit(eqx.filter_grad(lambda m: mse_loss(ns["apply_freeze"](m), batch)))
    grads = grad_fn(model)
    # `filter_grad` gives one gradient per float array, in leaf order.
    inexact = np.flatnonzero(spec.model_tree.inexact)
    for i, grad in zip(inexact, jtu.tree_leaves(grads), strict=True):
        assert bool(jnp.any(grad != 0)) == bool(spec.mask[i]), spec.model_tree.leaf_paths[i]


def _train(code: str, spec: FilterSpec, loss_fn, batch, steps: int = 3):
    ns = assert_rebuilds(code, spec)
    optimizer = optax.adamw(1e-2, weight_decay=0.1)
    opt_state = ns["init_opt_state"](optimizer, spec.model)
    step = ns["make_train_step"](loss_fn, optimizer)
    model = spec.model
    for _ in range(steps):
        model, opt_state, loss = step(model, opt_state, batch)
    assert jnp.isfinite(loss)
    return ns, model, step, optimizer


def test_train_step_style_adamw_keeps_frozen_and_non_array_leaves(tiny):
    model, spec, batch = tiny
    _, new, _, _ = _train(to_code(spec, "train_step"), spec, mse_loss, batch)
    assert frozen_leaves_identical(model, new, spec)
    assert trainable_leaves_moved(model, new, spec)
    assert new.step_count.dtype == jnp.int32  # an int array: no gradient, no optimizer state


def test_train_step_style_on_hypernet_keeps_functions_and_flags():
    spec = SPECS["hyper_mixed"]
    model = spec.model
    x = jnp.ones((4,))

    def loss_fn(m, batch):
        return jnp.sum(m(batch) ** 2)

    _, new, _, _ = _train(to_code(spec, "train_step"), spec, loss_fn, x)
    assert frozen_leaves_identical(model, new, spec)
    assert new.dropout.p == 0.1 and new.dropout.inference is True
    assert new.target.activation is model.target.activation
    assert new.name == "hypernet"


def test_train_step_reads_the_current_spec_not_a_stale_one():
    # A small MLP: the claim is about which spec the step reads, not about compiling a model.
    model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
    batch = (jnp.ones((3, 2)), jnp.zeros((3, 1)))

    def loss_fn(m, b):
        return jnp.mean((jax.vmap(m)(b[0]) - b[1]) ** 2)

    spec = FilterSpec(model).freeze("layers[1]")
    ns, _, step, optimizer = _train(to_code(spec, "train_step"), spec, loss_fn, batch, steps=1)
    last_only = FilterSpec(model).freeze("layers[0]")
    ns["filter_spec"] = last_only.tree  # the user's toggle; a new spec needs a new opt state
    opt_state = ns["init_opt_state"](optimizer, model)
    new, _, _ = step(model, opt_state, batch)
    assert frozen_leaves_identical(model, new, last_only)
    assert trainable_leaves_moved(model, new, last_only)


# -- random models and specs ----------------------------------------------------------------------
def test_random_models_and_specs_round_trip_in_every_style(tmp_path):
    outputs: list[str] = []

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(data=st.data())
    def check(data):
        model = data.draw(models)
        spec = FilterSpec(model)
        if data.draw(st.booleans()):  # a user's clicks: freeze/unfreeze whole nodes
            for action, path in data.draw(random_edits(spec.model_tree)):
                try:
                    spec = getattr(spec, action)(path)
                except ExplorerError:
                    pass  # unfreezing something with no float array
        else:  # any mask at all, however scattered
            n = spec.model_tree.num_leaves
            flags = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
            spec = spec.set_mask(np.asarray(flags, bool) & spec.model_tree.inexact)
        for style in STYLES:
            code = to_code(spec, style)
            assert_rebuilds(code, spec)
            outputs.append(code)

    check()
    assert_ruff_clean(outputs, tmp_path / "random")


# -- stateful models and inference mode ----------------------------------------------------------
class BNNet(eqx.Module):
    bn: eqx.nn.BatchNorm
    head: eqx.nn.Linear

    def __init__(self, key):
        self.bn = eqx.nn.BatchNorm(3, "batch", mode="batch")
        self.head = eqx.nn.Linear(3, 1, key=key)

    def __call__(self, x, state):
        x, state = self.bn(x, state)
        return self.head(x), state


def bn_loss(model, state, batch):
    x, y = batch
    batched = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    pred, state = batched(x, state)
    return jnp.mean((pred[:, 0] - y) ** 2), state


@pytest.fixture(scope="module")
def bn_net():
    model, state = eqx.nn.make_with_state(BNNet)(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (8, 3)) * 2.0 + 1.0
    return model, state, (x, jnp.sum(x, axis=1))


def _train_stateful(spec, state, batch, steps=3, optimizer=None):
    """Run the exported train_step of `spec` (a stateful model); the namespace and the result."""
    ns = assert_rebuilds(to_code(spec, "train_step"), spec)
    optimizer = optimizer or optax.adam(1e-2)
    opt_state = ns["init_opt_state"](optimizer, spec.model)
    step = ns["make_train_step"](bn_loss, optimizer)
    model = spec.model
    for _ in range(steps):
        model, state, opt_state, loss = step(model, state, opt_state, batch)
    assert jnp.isfinite(loss)
    return ns, model, state


def _bits(tree) -> list[bytes]:
    return [np.asarray(x).tobytes() for x in jtu.tree_leaves(tree) if eqx.is_array(x)]


BN_SPECS = {
    "frozen_bn_inference": lambda m: FilterSpec(m).freeze("bn").inference("bn"),
    "frozen_bn_training": lambda m: FilterSpec(m).freeze("bn"),
    "trainable_bn_inference": lambda m: FilterSpec(m).inference("bn"),
    "trainable_bn": FilterSpec,
}


@pytest.mark.parametrize("name", list(BN_SPECS))
def test_stateful_train_step_equals_step_runner(bn_net, name):
    model, state, batch = bn_net
    spec = BN_SPECS[name](model)
    _, new, new_state = _train_stateful(spec, state, batch)
    # The model in the spec's inference mode, as the exported step trains it (applying the
    # flags twice changes nothing, so this holds whether or not the runner applies them too).
    runner = StepRunner(
        spec.apply_inference(model),
        spec,
        bn_loss,
        batch,
        optimizer=optax.adam(1e-2),
        method="partition",
        state=state,
    )
    for _ in range(3):
        assert runner.step(1).ok
    for ours, theirs in ((new, runner.model), (new_state, runner.state)):
        assert jtu.tree_structure(ours) == jtu.tree_structure(theirs)
        for a, b in zip(jtu.tree_leaves(ours), jtu.tree_leaves(theirs), strict=True):
            if eqx.is_array(a):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
            else:
                assert a == b
    assert new.bn.inference is ("inference" in name)


def test_frozen_batchnorm_statistics_stay_bit_identical_only_in_inference_mode(bn_net):
    model, state, batch = bn_net
    frozen = FilterSpec(model).freeze("bn")
    _, new, kept = _train_stateful(frozen.inference("bn"), state, batch)
    assert _bits(kept) == _bits(state)  # running mean, variance and counter
    assert _bits(new.bn) == _bits(model.bn) and _bits(new.head) != _bits(model.head)
    # The classic mistake: frozen weights, but the layer still in training mode.
    _, new, moved = _train_stateful(frozen, state, batch)
    assert _bits(new.bn) == _bits(model.bn)
    assert all(a != b for a, b in zip(_bits(moved), _bits(state), strict=True))


def test_stateful_train_step_code_threads_the_state_and_sets_inference(bn_net):
    model, _, _ = bn_net
    code = to_code(FilterSpec(model).inference("bn"), "train_step")
    assert "def step(model, state, opt_state, batch):" in code
    assert "(loss, state), grads = eqx.filter_value_and_grad(loss_of, has_aux=True)" in code
    assert "        model = set_inference(model)" in code
    assert "eqx.tree_at(lambda m: m.bn.inference, model, replace_fn=lambda _: True)" in code
    plain = to_code(FilterSpec(model), "train_step")
    assert "set_inference" not in plain and "has_aux=True" in plain
    # A stateless model keeps the plain step.
    assert "def step(model, opt_state, batch):" in to_code(SPECS["tiny_attn"], "train_step")


def test_set_inference_reaches_hostile_keys_and_falls_back_to_key_paths():
    code = to_code(SPECS["odd_inference"], "tree_at")
    assert 'getattr(m["odd"], "my field").inference' in code
    assert '*[x.inference for x in m["blocks"]]' in code
    assert "INFERENCE = " not in code
    # A NaN dict key has no literal: the flags are then listed by key path, as style "path" does.
    fallback = to_code(SPECS["nan_key_inference"], "tree_at")
    assert "INFERENCE = {\"['d'][nan].inference\": True}" in fallback
    assert "INFERENCE = " in to_code(SPECS["odd_inference"], "path")


class DropNet(eqx.Module):
    drop: eqx.nn.Dropout
    lin: eqx.nn.Linear

    def __call__(self, x):
        return self.lin(self.drop(x))


def test_stateless_train_step_runs_dropout_in_the_spec_inference_mode():
    model = DropNet(eqx.nn.Dropout(0.5), eqx.nn.Linear(2, 1, key=jax.random.key(0)))
    x = jnp.ones((4, 2))

    def loss_fn(m, batch):
        return jnp.mean(jax.vmap(m)(batch) ** 2)

    with pytest.raises(RuntimeError, match="requires a key"):
        loss_fn(model, x)  # Dropout in training mode needs a key
    spec = FilterSpec(model).inference("drop")
    ns, new, _, _ = _train(to_code(spec, "train_step"), spec, loss_fn, x)
    assert new.drop.inference is True and model.drop.inference is False
    assert "set_inference" in ns


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    freeze=st.sets(st.sampled_from(["bn", "head"])),
    mode=st.sampled_from([None, True, False]),  # the spec's flag for `bn`; None: not set
    model_flag=st.booleans(),
)
def test_random_freeze_and_inference_round_trip_on_a_stateful_model(
    bn_net, freeze, mode, model_flag
):
    base, state, batch = bn_net
    model = eqx.tree_at(lambda m: m.bn.inference, base, replace=model_flag)
    spec = FilterSpec(model)
    if freeze:
        spec = spec.freeze(*sorted(freeze))
    if mode is not None:
        spec = spec.inference("bn", on=mode)
    _, new, new_state = _train_stateful(spec, state, batch, steps=1)
    inference = model_flag if mode is None else mode
    assert new.bn.inference is inference
    assert (_bits(new_state) == _bits(state)) == inference
    assert frozen_leaves_identical(model, new, spec)
    assert trainable_leaves_moved(model, new, spec)


# -- learning-rate groups --------------------------------------------------------------------------
def test_random_learning_rate_groups_round_trip_in_every_style(tmp_path):
    outputs: list[str] = []

    @settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(data=st.data())
    def check(data):
        model = data.draw(models)
        base = FilterSpec(model)
        spec = base.set_lr_factors(data.draw(random_lr_factors(base.model_tree)))
        groups = bool((spec.lr_factors[spec.mask] != 1).any())
        for style in STYLES:
            code = to_code(spec, style)
            ns = assert_rebuilds(code, spec)
            outputs.append(code)
            if style not in ("optax", "train_step"):
                assert ("NOTE: this spec trains" in code) == groups  # never dropped silently
                continue
            assert ("with_lr_factors" in ns) == groups
            if groups:
                assert jtu.tree_leaves(ns["lr_factors"]) == spec.lr_factors.tolist()
            # Labels and scales as the user's optimizer meets them: a pass-through optimizer
            # on gradient 1 returns each optimized leaf's factor.
            if style == "optax":
                optimized = spec.model_tree.inexact
                params = eqx.filter(model, eqx.is_inexact_array)
                optimizer = ns["make_optimizer"](optax.identity())
                opt_state = optimizer.init(params)
            else:
                optimized = spec.mask
                params, _ = eqx.partition(model, ns["filter_spec"])
                # The step's optimizer, and a state from `init_opt_state` (which must wrap it).
                optimizer = ns["with_lr_factors"](optax.identity()) if groups else optax.identity()
                opt_state = ns["init_opt_state"](optax.identity(), model)
            ones = jtu.tree_map(jnp.ones_like, params)
            updates, _ = optimizer.update(ones, opt_state, params)
            got = jtu.tree_leaves(updates)
            for u, f in zip(got, spec.lr_factors[optimized], strict=True):
                assert np.array_equal(u, np.full(u.shape, f, u.dtype))

    check()
    assert_ruff_clean(outputs, tmp_path / "groups")


def test_group_table_lists_the_highest_sub_tree_of_each_factor():
    code = to_code(SPECS["tiny_llrd"], "optax")
    table = code.split("LR_FACTORS = ")[1].split("\n")[0]
    assert table == '{".blocks[0]": 0.25, ".blocks[1]": 0.5, ".head.bias": 2.0}'
    assert "optax.partition" in code and "with_lr_factors(frozen_apart)" in code


def _pytorch_groups(params, grads, factors, lr, step_fn, clip):
    """Reference: PyTorch's clip_grad_norm_ over all parameters, then per-parameter steps
    at `lr * factor` (PyTorch parameter groups), written out in NumPy."""
    state = {}
    for t, g in enumerate(grads, start=1):
        norm = np.sqrt(sum(float(np.sum(x**2)) for x in g.values()))
        scale = min(1.0, clip / norm)  # optax's form; torch adds 1e-6 to `norm`
        for name in params:
            params[name] = step_fn(
                params[name], scale * g[name], lr * factors[name], t, state, name
            )
    return params


def _adamw_step(p, g, lr, t, state, name, b1=0.9, b2=0.999, eps=1e-8, wd=0.1):
    m, v = state.get(name, (0.0, 0.0))
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g**2
    state[name] = (m, v)
    p = p - lr * wd * p  # decoupled weight decay, scaled by the group's rate
    return p - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)


def _sgd_momentum_step(p, g, lr, t, state, name, mu=0.9):
    buf = mu * state[name] + g if name in state else g
    state[name] = buf
    return p - lr * buf


def _run_optimizer(optimizer, params, grads):
    opt_state = optimizer.init(params)
    for g in grads:
        updates, opt_state = optimizer.update(g, opt_state, params)
        params = optax.apply_updates(params, updates)
    return params


@pytest.mark.parametrize(
    "make_inner, step_fn",
    [
        (lambda lr: optax.adamw(lr, weight_decay=0.1), _adamw_step),
        (lambda lr: optax.sgd(lr, momentum=0.9), _sgd_momentum_step),
    ],
    ids=["adamw", "sgd_momentum"],
)
def test_scaled_updates_equal_pytorch_parameter_groups(make_inner, step_fn):
    model = {"a": arr(3, value=0.5), "b": arr(2, value=-1.0)}
    spec = FilterSpec(model).scale_lr('["a"]', 0.1)
    ns = assert_rebuilds(to_code(spec, "optax"), spec)
    clip = optax.clip_by_global_norm(1.0)  # active: the gradients' global norm is about 6
    optimizer = ns["make_optimizer"](optax.chain(clip, make_inner(0.1)))
    keys = jax.random.split(jax.random.key(7), 4)
    grads = [{k: 3 * jax.random.normal(key, model[k].shape) for k in model} for key in keys]
    params = _run_optimizer(optimizer, model, grads)
    want = _pytorch_groups(
        {k: np.asarray(v, np.float64) for k, v in model.items()},
        [{k: np.asarray(v, np.float64) for k, v in g.items()} for g in grads],
        {"a": 0.1, "b": 1.0},
        0.1,
        step_fn,
        1.0,
    )
    for k in model:
        np.testing.assert_allclose(params[k], want[k], rtol=1e-5, atol=1e-7)
    # One optimizer per group, `lr * factor` each, clips each group by its own norm.
    per_group = optax.partition(
        {"a": optax.chain(clip, make_inner(0.01)), "b": optax.chain(clip, make_inner(0.1))},
        {"a": "a", "b": "b"},
    )
    split = _run_optimizer(per_group, model, grads)
    assert not np.allclose(split["a"], want["a"], rtol=1e-3)


@pytest.mark.parametrize("layout", ["masked", "structural"])
@pytest.mark.parametrize(
    "optimizer",
    [optax.adam(1e-2), optax.adamw(1e-2, weight_decay=0.1), optax.sgd(1e-2, momentum=0.9)],
    ids=["adam", "adamw", "sgd_momentum"],
)
def test_train_step_with_groups_equals_step_runner(optimizer, layout):
    model = eqx.nn.MLP(2, 1, 4, 3, key=jax.random.key(0))  # `layers`: 4 Linear layers
    spec = FilterSpec(model).freeze("layers[0].bias").layerwise_decay("layers", 0.5)
    x = jax.random.normal(jax.random.key(1), (8, 2))
    batch = (x, jnp.sum(x, axis=1, keepdims=True))

    def loss_fn(m, b):
        return jnp.mean((jax.vmap(m)(b[0]) - b[1]) ** 2)

    ns = assert_rebuilds(to_code(spec, "train_step"), spec)
    opt_state = ns["init_opt_state"](optimizer, model)
    step = ns["make_train_step"](loss_fn, optimizer)
    runner = StepRunner(model, spec, loss_fn, batch, optimizer=optimizer, layout=layout)
    ours = model
    for _ in range(3):
        ours, opt_state, _ = step(ours, opt_state, batch)
        assert runner.step(1).ok
    for a, b in zip(jtu.tree_leaves(ours), jtu.tree_leaves(runner.model), strict=True):
        if eqx.is_array(a):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
        else:
            assert a == b
    assert frozen_leaves_identical(model, ours, spec)
