import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eqx_explorer import ExplorerError, FilterSpec, summary
from eqx_explorer._examples import Hypernet, example_model
from eqx_explorer._spec import STATES
from tests.helpers import models, random_edits, random_lr_factors

KEY = jax.random.key(0)


@pytest.fixture(scope="module")
def model():
    return example_model()


def leaf_flags(spec):
    return dict(zip(spec.model_tree.leaf_paths, spec.mask.tolist(), strict=True))


def test_default_spec_is_every_inexact_array(model):
    spec = FilterSpec(model)
    assert jtu.tree_structure(spec.tree) == jtu.tree_structure(model)
    assert jtu.tree_leaves(spec.tree) == [eqx.is_inexact_array(x) for x in jtu.tree_leaves(model)]
    assert all(type(b) is bool for b in jtu.tree_leaves(spec.tree))
    assert spec.state("") == "trainable"
    assert spec.state("step_count") == "static"


def test_freeze_returns_new_spec_and_later_calls_override(model):
    spec = FilterSpec(model)
    frozen = spec.freeze("blocks")
    assert spec.state("blocks") == "trainable"  # unchanged
    assert frozen.state("blocks") == "frozen"
    again = frozen.unfreeze("blocks[2]")
    assert again.state("blocks") == "mixed"
    assert again.state("blocks[2]") == "trainable"
    assert again.state("blocks[1].attn") == "frozen"
    assert again.freeze("blocks[2].mlp").state("blocks[2]") == "mixed"


def test_spec_tree_works_with_equinox_filters(model):
    spec = FilterSpec(model).freeze("embed", "blocks[*].attn")
    params, static = eqx.partition(model, spec.tree)
    assert params.embed.weight is None
    assert params.blocks[0].attn.query_proj.weight is None
    assert params.head.weight is not None
    assert params.step_count is None  # int arrays never train
    assert jtu.tree_structure(eqx.combine(params, static)) == jtu.tree_structure(model)
    assert eqx.filter(model, spec.tree).blocks[0].mlp.layers[0].weight is not None


def test_target_forms_agree(model):
    base = FilterSpec(model)
    by_path = base.freeze("blocks[0].attn", "blocks[1].attn", "blocks[2].attn")
    assert base.freeze("blocks[*].attn") == by_path
    assert base.freeze(["blocks[0].attn", ["blocks[1].attn", "blocks[2].attn"]]) == by_path
    assert base.freeze(lambda m: [b.attn for b in m.blocks]) == by_path
    assert base.freeze(eqx.nn.MultiheadAttention) == by_path
    assert base.freeze(lambda path, leaf: ".attn." in path) == by_path
    assert base.freeze("**.attn") == by_path
    # `**` also matches zero keys; `*` exactly one.
    assert base.freeze("**.bias").frozen_paths() == [
        p for p in base.model_tree.leaf_paths if p.endswith(".bias") and "step" not in p
    ]
    assert base.freeze("*").state("") == "frozen"
    assert base.freeze("blocks.*") == base.freeze("blocks")


def test_predicate_freezes_kernels_by_shape(model):
    # Seed 000: freeze every 2-D kernel by a predicate on shape.
    spec = FilterSpec(model).freeze(lambda path, leaf: eqx.is_array(leaf) and leaf.ndim == 2)
    assert spec.state("head.weight") == "frozen"
    assert spec.state("head.bias") == "trainable"


def test_unfreeze_mixed_subtree_and_errors(model):
    spec = FilterSpec(model).freeze("")
    assert spec.unfreeze("").state("") == "trainable"  # functions/ints in the sub-tree are fine
    with pytest.raises(ExplorerError, match="step_count.*int32"):
        spec.unfreeze("step_count")
    hyper = Hypernet(KEY)
    with pytest.raises(ExplorerError, match="hyper_net.activation"):
        FilterSpec(hyper).unfreeze("hyper_net.activation")
    with pytest.raises(ExplorerError, match="dropout"):
        FilterSpec(hyper).unfreeze("dropout")


def test_bad_targets(model):
    spec = FilterSpec(model)
    with pytest.raises(ExplorerError, match="Closest existing paths.*blocks\\[0\\].mlp"):
        spec.freeze("blocks[0].mpl")
    with pytest.raises(ExplorerError, match="matches no node"):
        spec.freeze("blocks[*].conv")
    with pytest.raises(ExplorerError, match="not part of the model's pytree"):
        spec.freeze(lambda m: m.head.in_features)
    with pytest.raises(ExplorerError, match="failed on the model's structure"):
        spec.freeze(lambda m: m.head.weight.T)
    with pytest.raises(ExplorerError, match="no node of class"):
        spec.freeze(eqx.nn.Conv2d)
    with pytest.raises(ExplorerError, match="cannot select with"):
        spec.freeze(3)
    # An ExplorerError is a ValueError: `except ValueError` around a freeze catches it.
    with pytest.raises(ValueError, match="needs at least one target"):
        spec.freeze()


def test_counts_and_summary(model):
    spec = FilterSpec(model).freeze("embed")
    c = spec.counts
    assert c["frozen_params"] == 32 * 16
    assert c["trainable_params"] + c["frozen_params"] == c["total_params"]
    assert c["frozen_bytes"] == 32 * 16 * 4
    assert c["static_leaves"] == sum(not eqx.is_inexact_array(x) for x in jtu.tree_leaves(model))
    text = summary(model, spec)
    assert "embed" in text and "frozen" in text
    assert f"trainable params: {c['trainable_params']:,}" in text
    short = summary(model, spec, max_rows=3)
    assert "more rows" in short


def test_json_round_trip_and_structure_change(model):
    spec = FilterSpec(model).freeze("blocks[1]", "head.bias")
    assert FilterSpec.from_json(model, spec.to_json()) == spec
    smaller = example_model()
    smaller = eqx.tree_at(lambda m: m.blocks, smaller, smaller.blocks[:2])
    with pytest.raises(ExplorerError, match=r"blocks\[2\]"):
        FilterSpec.from_json(smaller, spec.to_json())
    with pytest.raises(ExplorerError, match="not valid JSON"):
        FilterSpec.from_json(model, "{")


def test_from_tree_reads_hand_written_specs(model):
    hand = jtu.tree_map(lambda _: False, model)
    hand = eqx.tree_at(lambda m: m.head, hand, replace=eqx.nn.Linear(16, 1, key=KEY))
    hand = eqx.tree_at(lambda m: (m.head.weight, m.head.bias), hand, replace=(True, True))
    spec = FilterSpec.from_tree(model, hand)
    assert spec.trainable_paths() == ["head.weight", "head.bias"]
    assert FilterSpec.from_tree(model, eqx.is_inexact_array) == FilterSpec(model)


def test_model_never_mutated(model):
    before = [id(x) for x in jtu.tree_leaves(model)]
    tree = FilterSpec(model).freeze("blocks").unfreeze("blocks[0]").tree
    assert jtu.tree_structure(tree) == jtu.tree_structure(model)
    assert before == [id(x) for x in jtu.tree_leaves(model)]


def edits_of_nodes_with_leaves(tree) -> st.SearchStrategy:
    """`random_edits` that freeze only nodes holding a leaf (freezing a None field raises)."""
    return random_edits(tree).map(
        lambda edits: [
            (action, path)
            for action, path in edits
            if action == "unfreeze" or tree.lo[tree.find(path)] < tree.hi[tree.find(path)]
        ]
    )


@given(data=st.data(), model=models)
@settings(max_examples=60, deadline=None)
def test_random_models_structure_round_trips(data, model):
    spec = FilterSpec(model)
    for action, path in data.draw(edits_of_nodes_with_leaves(spec.model_tree)):
        try:
            spec = getattr(spec, action)(path)
        except ExplorerError:
            assert (
                action == "unfreeze" and spec.model_tree.n_inexact(spec.model_tree.find(path)) == 0
            )
    tree = spec.tree
    assert jtu.tree_structure(tree) == jtu.tree_structure(model)
    assert all(type(b) is bool for b in jtu.tree_leaves(tree))
    flags = np.array(jtu.tree_leaves(tree), bool)
    assert not (flags & ~spec.model_tree.inexact).any()  # True only on inexact arrays
    assert FilterSpec.from_json(model, spec.to_json()) == spec
    assert FilterSpec.from_tree(model, tree) == spec
    # Freezing then unfreezing a fully trainable node restores the spec.
    for i in range(len(spec.model_tree)):
        if spec.node_state(i) == "trainable":
            path = spec.model_tree.paths[i]
            assert spec.freeze(path).unfreeze(path) == spec
    eqx.partition(model, tree)


def test_weak_and_numpy_leaves_count():
    model = {"w": np.ones((3,), np.float32), "s": jnp.full((2,), 0.05)}
    spec = FilterSpec(model)
    assert spec.counts["trainable_params"] == 5


def test_spec_applies_to_another_instance_of_the_architecture(model):
    other = example_model(jax.random.key(42))
    spec = FilterSpec(model).freeze("blocks").constrain("head.bias", ("interval", -1, 1))
    moved = spec.for_model(other)
    assert moved.model is other and moved.mask is not spec.mask
    assert np.array_equal(moved.mask, spec.mask) and moved.constraints == spec.constraints
    assert spec.for_model(model) is spec
    # The summary reads the model it is given, not the one the spec was built on.
    head = other.head.weight
    assert f"{head.size:,}" in summary(other, spec)
    with pytest.raises(ExplorerError, match="another structure"):
        spec.for_model(eqx.nn.Linear(2, 2, key=KEY))


def test_for_model_keeps_the_spec_across_float_dtypes_and_names_a_leaf_that_left_them():
    model = eqx.nn.Linear(2, 3, key=KEY)
    spec = FilterSpec(model).freeze("bias")
    half = jtu.tree_map(lambda x: x.astype(jnp.bfloat16), model)
    assert np.array_equal(spec.for_model(half).mask, spec.mask)  # still float: same spec
    as_int = eqx.tree_at(lambda m: m.weight, model, jnp.zeros((3, 2), jnp.int32))
    with pytest.raises(
        ExplorerError, match=r"`weight` is float32\[3, 2\]; here it is int32\[3, 2\]"
    ):
        spec.for_model(as_int)


# -- empty targets and tied weights -------------------------------------------------------------
class Lin(eqx.Module):
    layer: eqx.nn.Linear
    nothing: None
    empty: list
    ident: eqx.nn.Identity
    step: jax.Array

    def __init__(self):
        self.layer = eqx.nn.Linear(2, 2, key=KEY)
        self.nothing = None
        self.empty = []
        self.ident = eqx.nn.Identity()
        self.step = jnp.zeros((), jnp.int32)


@pytest.mark.parametrize("action", ["freeze", "unfreeze"])
def test_a_target_holding_no_leaf_raises_in_every_form(action):
    spec = FilterSpec(Lin())
    edit = getattr(spec, action)
    with pytest.raises(
        ExplorerError, match=rf"`nothing` is None \(an empty field\): nothing to {action}"
    ):
        edit("nothing")
    with pytest.raises(ExplorerError, match=rf"`empty` is an empty list: nothing to {action}"):
        edit("empty")
    with pytest.raises(ExplorerError, match=rf"`ident` is an empty Identity: nothing to {action}"):
        edit(eqx.nn.Identity)
    with pytest.raises(ExplorerError, match=rf"returned None\): .* holds nothing to {action}"):
        edit(lambda m: m.nothing)
    with pytest.raises(ExplorerError, match=rf"`nothing` is None.*nothing to {action}"):
        edit("layer", "nothing")


def test_freezing_leaves_that_never_train_or_a_predicate_matching_none_changes_nothing():
    spec = FilterSpec(Lin())
    assert spec.freeze("step") == spec  # an int array is never trained
    assert spec.freeze(lambda path, leaf: False) == spec  # a filter may pick nothing
    with pytest.raises(ExplorerError, match="cannot unfreeze `step`"):
        spec.unfreeze("step")


class EmbedHead(eqx.Module):
    """Equinox's tied embedding and head (`eqx.nn.Shared` docs)."""

    shared: eqx.nn.Shared

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        embedding = eqx.nn.Embedding(5, 3, key=k1)
        linear = eqx.nn.Linear(3, 5, key=k2)
        self.shared = eqx.nn.Shared(
            (embedding, linear), lambda pair: pair[1].weight, lambda pair: pair[0].weight
        )

    def __call__(self, token):
        embedding, linear = self.shared()
        return linear(embedding(token))


def head_weight_moves(spec: FilterSpec) -> bool:
    """Whether one SGD step on `spec`'s trainable part changes the head's (tied) weight."""
    model = spec.model
    params, static = eqx.partition(model, spec.tree)
    grads = jax.grad(lambda p: jnp.sum(eqx.combine(p, static)(1) ** 2))(params)
    stepped = eqx.apply_updates(model, jtu.tree_map(lambda g: -0.1 * g, grads))
    return not np.array_equal(stepped.shared()[1].weight, model.shared()[1].weight)


def test_a_tied_place_has_its_source_state_which_is_what_training_does():
    model = EmbedHead(KEY)
    spec = FilterSpec(model)
    frozen_source = spec.freeze("shared.pytree[0]")
    for s, tied, head in [(spec, "trainable", "trainable"), (frozen_source, "frozen", "mixed")]:
        assert s.state("shared.pytree[1].weight") == tied
        assert s.state("shared.pytree[1]") == head
        assert head_weight_moves(s) == (tied == "trainable")
    bias_only = spec.freeze("shared.pytree[1].bias")
    assert bias_only.state("shared.pytree[1]") == "mixed"  # not "frozen": its weight trains
    assert head_weight_moves(bias_only)
    assert list(spec.state_codes()) == [
        STATES.index(spec.node_state(i)) for i in range(len(spec.model_tree))
    ]


def test_freezing_or_unfreezing_only_the_tied_side_raises_naming_the_source():
    spec = FilterSpec(EmbedHead(KEY))
    source = r"tied to `shared\.pytree\[0\]\.weight` by the eqx\.nn\.Shared at `shared`"
    with pytest.raises(ExplorerError, match=source + r", which stays trainable.*Freeze `shared"):
        spec.freeze("shared.pytree[1]")
    with pytest.raises(
        ExplorerError, match=r"freeze only the rest, e\.g\. `shared\.pytree\[1\]\.bias`"
    ):
        spec.freeze(eqx.nn.Linear)
    with pytest.raises(ExplorerError, match=source):
        spec.freeze("shared.pytree[1].weight")
    with pytest.raises(ExplorerError, match=source + r", which stays trainable at factor 1\b"):
        spec.scale_lr("shared.pytree[1]", 0.5)
    frozen = spec.freeze("shared.pytree[0]")
    with pytest.raises(ExplorerError, match=source + r", which stays frozen.*Unfreeze `shared"):
        frozen.unfreeze("shared.pytree[1].weight")
    # Asking for what the tie already does, or editing the source with it, is fine.
    assert spec.unfreeze("shared.pytree[1].weight") == spec
    assert spec.freeze("shared.pytree") == spec.freeze("shared.pytree[0]", "shared.pytree[1].bias")
    assert frozen.freeze("shared.pytree[1]").state("shared.pytree[1]") == "frozen"


def test_the_summary_shows_each_tie_and_its_source_state():
    model = EmbedHead(KEY)
    text = summary(model, FilterSpec(model).freeze("shared.pytree[0]"))
    row = next(
        line for line in text.splitlines() if line.strip().startswith("shared.pytree[1].weight")
    )
    assert "tied to `shared.pytree[0].weight`" in row and row.endswith("frozen")
    assert text.splitlines()[-1] == (
        "tied by eqx.nn.Shared (each trains as its source and is counted there): "
        "`shared.pytree[1].weight` -> `shared.pytree[0].weight`"
    )


# -- inference mode -----------------------------------------------------------------------------
class Net(eqx.Module):
    bn1: eqx.nn.BatchNorm
    lin: eqx.nn.Linear
    drop: eqx.nn.Dropout

    def __init__(self, key, drop_inference=True):
        self.bn1 = eqx.nn.BatchNorm(3, "batch", mode="batch")
        self.lin = eqx.nn.Linear(3, 3, key=key)
        self.drop = eqx.nn.Dropout(0.1, inference=drop_inference)


@pytest.fixture(scope="module")
def net():
    return eqx.nn.make_with_state(Net)(KEY)[0]


def test_inference_sets_fields_in_the_spec_not_the_model(net):
    spec = FilterSpec(net).freeze("bn1").inference("bn1")
    assert net.bn1.inference is False  # the model is never changed
    assert spec.inference_paths == ("bn1.inference",)
    assert spec.inference_overrides == {"bn1.inference": True}
    assert spec.tree == FilterSpec(net).freeze("bn1").tree  # flags are not trainable leaves
    assert spec.apply_inference(net).bn1.inference is True


def test_inference_off_clears_a_field_the_model_sets(net):
    spec = FilterSpec(net).inference("drop", on=False)
    assert spec.inference_overrides == {"drop.inference": False}
    assert spec.inference_paths == ()  # only fields turned on
    assert net.drop.inference is True and spec.apply_inference(net).drop.inference is False
    # Later calls override earlier ones; a field the model already holds stays recorded.
    again = spec.inference("**")
    assert again.inference_overrides == {"bn1.inference": True, "drop.inference": True}
    assert again.inference_paths == ("bn1.inference",)


def test_inference_target_forms_agree(net):
    base = FilterSpec(net)
    both = base.inference("bn1", "drop")
    assert base.inference("") == both
    assert base.inference("**") == both
    assert base.inference(["bn1", "drop"]) == both
    assert base.inference(lambda m: (m.bn1, m.drop)) == both
    assert base.inference(lambda path, leaf: path.endswith("inference")) == both
    assert (
        base.inference(eqx.nn.BatchNorm) == base.inference("bn1") == base.inference("bn1.inference")
    )
    assert base.inference(eqx.nn.BatchNorm) != both


def test_inference_errors_name_the_path_and_the_layers_that_have_the_field(net):
    spec = FilterSpec(net)
    with pytest.raises(ExplorerError, match=r"`lin` has no layer with an `inference` field.*`bn1`"):
        spec.inference("lin")
    with pytest.raises(ExplorerError, match=r"`bn1.weight` has no layer.*`bn1`, `drop`"):
        spec.inference("bn1", "bn1.weight")  # every target must hold one
    with pytest.raises(ExplorerError, match="class Linear has no layer"):
        spec.inference(eqx.nn.Linear)
    with pytest.raises(ExplorerError, match="no such layer"):
        FilterSpec(net.lin).inference("")
    with pytest.raises(ExplorerError, match="needs at least one target"):
        spec.inference()
    with pytest.raises(ExplorerError, match="True or False, got 1"):
        spec.inference("bn1", on=1)
    with pytest.raises(ExplorerError, match="no node at path `bn2`"):
        spec.inference("bn2")


def test_apply_inference_keeps_other_leaves_and_checks_the_structure(net):
    spec = FilterSpec(net).inference("bn1")
    new = spec.apply_inference(net)
    flags = [p == "bn1.inference" for p in spec.model_tree.leaf_paths]
    for changed, old, leaf in zip(flags, jtu.tree_leaves(net), jtu.tree_leaves(new), strict=True):
        assert leaf is True if changed else leaf is old
    assert FilterSpec(net).apply_inference(net) is net  # nothing to set
    with pytest.raises(ExplorerError, match="another structure"):
        spec.apply_inference(net.lin)
    # Another instance whose field is not a bool: same treedef, but nothing to set.
    broken = eqx.tree_at(lambda m: m.bn1.inference, net, replace="yes")
    with pytest.raises(ExplorerError, match=r"`bn1.inference` is 'yes' in this model, not a bool"):
        spec.apply_inference(broken)
    with pytest.raises(ExplorerError, match="not a bool"):
        spec.for_model(broken)


def test_inference_survives_chaining_json_for_model_and_repr(net):
    spec = FilterSpec(net).inference("bn1").inference("drop", on=False)
    overrides = {"bn1.inference": True, "drop.inference": False}
    chained = (
        spec.freeze("bn1")
        .unfreeze("bn1.bias")
        .constrain("lin.bias", ("interval", -1, 1))
        .set_mask(spec.mask)
        .constrain("lin.bias", None)
    )
    assert chained == spec and chained.inference_overrides == overrides
    assert spec != FilterSpec(net)  # the flags are part of the value
    assert FilterSpec.from_json(net, spec.to_json()) == spec
    assert '"inference": {\n  "bn1.inference": true,\n  "drop.inference": false\n }' in (
        spec.to_json()
    )
    # Another instance holding the opposite flags: the spec still sets its own values.
    other = eqx.nn.make_with_state(Net)(jax.random.key(1), drop_inference=False)[0]
    moved = spec.for_model(other)
    assert moved.model is other and moved.inference_overrides == overrides
    assert moved.apply_inference(other).drop.inference is False
    assert "1 layer set to inference mode, 1 layer set to training mode)" in repr(spec)
    assert "mode" not in repr(FilterSpec(net))


def test_json_without_inference_loads_and_bad_values_raise(net):
    old = FilterSpec(net).freeze("bn1")
    assert '"inference"' not in old.to_json()  # files saved before inference mode existed
    assert FilterSpec.from_json(net, old.to_json()).inference_overrides == {}
    bad = old.to_json().replace('"version": 1,', '"version": 1, "inference": {"bn1.inference": 1},')
    with pytest.raises(ExplorerError, match="must map paths to true/false"):
        FilterSpec.from_json(net, bad)


class Layers(eqx.Module):
    layers: list


_LAYER_KINDS = ("bn", "drop", "lin")


def _layers_model(kinds, flags, seed):
    keys = jax.random.split(jax.random.key(seed), len(kinds))
    make = {
        "bn": lambda k, f: eqx.nn.BatchNorm(2, "batch", mode="batch", inference=f),
        "drop": lambda k, f: eqx.nn.Dropout(0.5, inference=f),
        "lin": lambda k, f: eqx.nn.Linear(2, 2, key=k),
    }
    layers = [make[kind](k, f) for kind, k, f in zip(kinds, keys, flags, strict=True)]
    # Through make_with_state: it numbers the StateIndex markers, so instances share a treedef.
    return eqx.nn.make_with_state(Layers)(layers)[0]


@given(data=st.data())
@settings(max_examples=40, deadline=None)
def test_random_inference_edits_round_trip(data):
    kinds = data.draw(st.lists(st.sampled_from(_LAYER_KINDS), min_size=1, max_size=4))
    flags = data.draw(st.lists(st.booleans(), min_size=len(kinds), max_size=len(kinds)))
    model = _layers_model(kinds, flags, 0)
    spec = FilterSpec(model)
    expected: dict[int, bool] = {}  # layer index -> the flag the spec sets
    edits = st.tuples(
        st.sampled_from(["freeze", "unfreeze", "inference", "training"]),
        st.integers(0, len(kinds) - 1),
    )
    for action, i in data.draw(st.lists(edits, max_size=6)):
        path = f"layers[{i}]"
        if action in ("freeze", "unfreeze"):
            if kinds[i] == "lin" or action == "freeze":
                spec = getattr(spec, action)(path)
            continue
        on = action == "inference"
        if kinds[i] == "lin":
            with pytest.raises(ExplorerError, match="no layer with an `inference` field"):
                spec.inference(path, on=on)
        else:
            spec = spec.inference(path, on=on)
            expected[i] = on
    overrides = {f"layers[{i}].inference": on for i, on in sorted(expected.items())}
    assert spec.inference_overrides == overrides
    assert list(spec.inference_overrides) == list(overrides)  # leaf order
    assert spec.inference_paths == tuple(
        f"layers[{i}].inference" for i, on in sorted(expected.items()) if on and not flags[i]
    )
    assert FilterSpec.from_json(model, spec.to_json()) == spec
    assert spec.set_mask(spec.mask) == spec and spec.freeze("").inference_overrides == overrides
    applied = spec.apply_inference(model)
    for i, (kind, flag) in enumerate(zip(kinds, flags, strict=True)):
        if kind != "lin":
            assert applied.layers[i].inference is expected.get(i, flag)
    # The same spec over another instance whose flags are all flipped.
    other = _layers_model(kinds, [not f for f in flags], 1)
    moved = spec.for_model(other)
    assert moved.inference_overrides == overrides
    moved_applied = moved.apply_inference(other)
    for i, (kind, flag) in enumerate(zip(kinds, flags, strict=True)):
        if kind != "lin":
            assert moved_applied.layers[i].inference is expected.get(i, not flag)


# -- learning-rate groups -------------------------------------------------------------------------
def mlp(depth: int = 3) -> eqx.nn.MLP:
    """`layers`: a tuple of `depth + 1` Linear layers (weight and bias each)."""
    return eqx.nn.MLP(2, 2, 2, depth, key=KEY)


def factors_of(spec: FilterSpec) -> dict[str, float]:
    return dict(zip(spec.model_tree.leaf_paths, spec.lr_factors.tolist(), strict=True))


def test_lr_factors_default_to_the_mask_and_are_read_only():
    spec = FilterSpec(mlp()).freeze("layers[0]")
    assert spec.lr_factors.dtype == np.float64
    assert np.array_equal(spec.lr_factors, spec.mask.astype(float))
    with pytest.raises(ValueError, match="read-only"):
        spec.lr_factors[0] = 2.0


def test_scale_lr_sets_factors_trains_and_zero_freezes():
    spec = FilterSpec(mlp()).freeze("layers[0]")
    scaled = spec.scale_lr(["layers[0]", "layers[1].bias"], 0.1)
    assert factors_of(scaled)["layers[0].weight"] == 0.1  # frozen before: now trains at 0.1
    assert factors_of(scaled)["layers[1].bias"] == 0.1
    assert factors_of(scaled)["layers[1].weight"] == 1.0
    assert np.array_equal(scaled.mask, scaled.lr_factors > 0)
    assert scaled.scale_lr("layers[0]", 0) == scaled.freeze("layers[0]")
    assert spec.state("layers[0]") == "frozen"  # unchanged: specs are values


def test_mask_changes_keep_the_factors_of_leaves_that_stay_trainable():
    spec = FilterSpec(mlp()).scale_lr("layers[1]", 0.5)
    frozen = spec.freeze("layers[1].bias")
    assert factors_of(frozen)["layers[1].bias"] == 0.0
    assert factors_of(frozen)["layers[1].weight"] == 0.5
    # unfreeze turns frozen leaves on at 1 (a frozen leaf keeps no factor), the rest keep theirs
    back = frozen.unfreeze("layers[1]")
    assert factors_of(back)["layers[1].bias"] == 1.0
    assert factors_of(back)["layers[1].weight"] == 0.5
    assert np.array_equal(spec.set_mask(spec.mask).lr_factors, spec.lr_factors)


def test_layerwise_decay_gives_the_last_child_1_and_earlier_ones_decay_powers():
    spec = FilterSpec(mlp(depth=3)).freeze("layers[1].bias").layerwise_decay("layers", 0.5)
    got = factors_of(spec)
    assert [got[f"layers[{i}].weight"] for i in range(4)] == [0.125, 0.25, 0.5, 1.0]
    assert got["layers[1].bias"] == 0.0  # frozen stays frozen
    assert spec.state("layers[1].bias") == "frozen"
    # A `where` naming the tuple means the same; factors are set, not multiplied.
    again = spec.scale_lr("layers[3]", 3.0).layerwise_decay(lambda m: m.layers, 0.5)
    assert again == spec


def test_layerwise_decay_needs_one_list_node_and_a_decay_in_0_1():
    spec = FilterSpec(mlp())
    with pytest.raises(ExplorerError, match=r"`layers\[0\]` is a module node.*`layers`"):
        spec.layerwise_decay("layers[0]", 0.5)
    with pytest.raises(ExplorerError, match="is not one node"):
        spec.layerwise_decay("layers[*]", 0.5)
    with pytest.raises(ExplorerError, match=r"decay 1.5 is not a number in \[0, 1\]"):
        spec.layerwise_decay("layers", 1.5)
    with pytest.raises(ExplorerError, match="gives the first of its 4 layers factor 0"):
        spec.layerwise_decay("layers", 0.0)
    with pytest.raises(ExplorerError, match="nothing under `layers` trains"):
        spec.freeze("layers").layerwise_decay("layers", 0.5)


@pytest.mark.parametrize(
    "factor, match",
    [
        (-0.1, "the factor -0.1 is not a finite number >= 0"),
        (float("nan"), "the factor nan is not a finite number"),
        (float("inf"), "the factor inf is not a finite number"),
        ("0.1", "the factor must be a number, got a str"),
        (True, "the factor must be a number, got a bool"),
    ],
)
def test_bad_factors_raise_naming_the_target(factor, match):
    with pytest.raises(ExplorerError, match=r"scale_lr\(`layers\[0\]`, factor\): " + match):
        FilterSpec(mlp()).scale_lr("layers[0]", factor)


def test_scale_lr_of_leaves_that_cannot_train_raises():
    spec = FilterSpec({"ids": jnp.arange(3), "w": jnp.ones(2)})
    with pytest.raises(ExplorerError, match="cannot scale the learning rate of"):
        spec.scale_lr('["ids"]', 0.5)


def test_set_lr_factors_checks_shape_values_and_leaf_kinds():
    spec = FilterSpec({"ids": jnp.arange(3), "w": jnp.ones(2)})  # leaves: ids, w
    assert spec.set_lr_factors([0, 0.5]).lr_factors.tolist() == [0.0, 0.5]
    assert spec.set_lr_factors([0, 0]).state() == "frozen"
    with pytest.raises(ExplorerError, match=r"shape \(2,\)"):
        spec.set_lr_factors([1.0])
    with pytest.raises(ExplorerError, match=r"factor of `\['w'\]` is -1.0"):
        spec.set_lr_factors([0, -1])
    with pytest.raises(ExplorerError, match="cannot be trainable"):
        spec.set_lr_factors([1, 1])


def test_counts_repr_and_summary_show_the_groups():
    plain = FilterSpec(mlp(depth=1))  # layers[0]: 2x2 + 2, layers[1]: 2x2 + 2
    assert plain.counts["lr_groups"] == {1.0: {"params": 12, "leaves": 4}}
    assert "group" not in repr(plain) and " lr" not in summary(plain.model, plain)
    spec = plain.scale_lr("layers[0]", 0.1).freeze("layers[1].bias")
    assert spec.counts["lr_groups"] == {
        1.0: {"params": 4, "leaves": 1},
        0.1: {"params": 6, "leaves": 2},
    }
    assert spec.counts["trainable_params"] == 10  # earlier keys unchanged
    assert "2 learning-rate groups" in repr(spec)
    text = summary(spec.model, spec)
    assert "lr factor 0.1: 6 params in 2 arrays" in text
    rows = {line.split()[0]: line.split() for line in text.splitlines()[2:6]}
    assert rows["(root)"][-1] == "0.1–1" and rows["layers[0]"][-1] == "0.1"
    assert max(map(len, text.splitlines())) <= 100


def test_json_round_trip_keeps_factors_and_reads_files_without_them():
    spec = FilterSpec(mlp()).layerwise_decay("layers", 0.3).freeze("layers[0].bias")
    text = spec.to_json()
    assert FilterSpec.from_json(spec.model, text) == spec
    plain = FilterSpec(mlp()).freeze("layers[0]")
    assert '"lr_factors"' not in plain.to_json()  # files saved before groups existed
    assert FilterSpec.from_json(plain.model, plain.to_json()) == plain


@pytest.mark.parametrize(
    "saved, match",
    [
        ('{"layers[0].bias": 0.5}', "gives `layers\\[0\\].bias` a factor, but it is not under"),
        ('{"layers[1].bias": 0}', "is 0 but the path is under `trainable`"),
        ('{"layers[1].bias": -2}', "factor -2.0 is not a finite number >= 0"),
        ('{"layers[1].bias": "x"}', "lr_factors"),
        ("[0.5]", "lr_factors"),
    ],
)
def test_json_with_bad_factors_raises(saved, match):
    text = FilterSpec(mlp()).freeze("layers[0].bias").to_json()
    bad = text.replace('"version": 1,', f'"version": 1, "lr_factors": {saved},')
    with pytest.raises(ExplorerError, match=match):
        FilterSpec.from_json(mlp(), bad)


@given(data=st.data(), model=models)
@settings(max_examples=40, deadline=None)
def test_random_factors_round_trip_through_json_for_model_and_tree(data, model):
    base = FilterSpec(model)
    spec = base.set_lr_factors(data.draw(random_lr_factors(base.model_tree)))
    assert np.array_equal(spec.mask, spec.lr_factors > 0)
    assert jtu.tree_leaves(spec.tree) == (spec.lr_factors > 0).tolist()
    assert FilterSpec.from_json(model, spec.to_json()) == spec
    moved = spec.for_model(jtu.tree_map(lambda x: x, model))
    assert np.array_equal(moved.lr_factors, spec.lr_factors)
