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
from tests.strategies import models, random_edits

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
    with pytest.raises(ExplorerError, match="needs at least one target"):
        spec.freeze()
    assert isinstance(ExplorerError("x"), ValueError)


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


@given(data=st.data(), model=models)
@settings(max_examples=60, deadline=None)
def test_random_models_structure_round_trips(data, model):
    spec = FilterSpec(model)
    for action, path in data.draw(random_edits(spec.model_tree)):
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
