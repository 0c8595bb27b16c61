import collections

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest
from hypothesis import given, settings

from eqx_explorer import ExplorerError, ModelTree, _tree
from eqx_explorer._examples import example_model
from eqx_explorer._tree import array_summary
from tests.helpers import models

KEY = jax.random.key(0)


def rows(tree):
    return {tree.paths[i]: tree.node(i) for i in range(len(tree))}


def test_nested_modules_and_static_fields():
    model = example_model()
    tree = ModelTree(model)
    r = rows(tree)
    assert r[""].kind == "module" and r[""].cls == "TinyTransformer"
    assert r["blocks"].kind == "list"
    assert r["blocks[1].attn.query_proj.weight"].shape == (16, 16)
    assert r["blocks[1].attn.query_proj.weight"].dtype == "float32"
    assert r["blocks[1].attn.query_proj.weight"].nbytes == 16 * 16 * 4
    assert r["head"].static == {"in_features": "16", "out_features": "1", "use_bias": "True"}
    # Static fields are attributes of their module, never nodes.
    assert "head.in_features" not in r
    assert r["step_count"].kind == "array" and not r["step_count"].trainable
    assert tree.num_leaves == len(jtu.tree_leaves(model))


def test_leaf_ranges_are_contiguous_and_in_flatten_order():
    model = example_model()
    tree = ModelTree(model)
    flat = jtu.tree_flatten_with_path(model)[0]
    assert tree.leaf_paths == [jtu.keystr(p).removeprefix(".") for p, _ in flat]
    for i in range(len(tree)):
        kids = tree.children[i]
        if kids:
            assert tree.lo[i] == tree.lo[kids[0]]
            assert tree.hi[i] == tree.hi[kids[-1]]
            assert tree.params(i) == sum(tree.params(k) for k in kids)


def test_containers_with_odd_keys_namedtuples_and_none():
    Pair = collections.namedtuple("Pair", ["left", "right"])
    model = {
        "table": {"it's": jnp.ones(2), 'say "hi"\n': jnp.ones(3), "ключ": jnp.ones(1)},
        "by_id": {7: jnp.ones(2), 12: None},
        "pair": Pair(jnp.ones(1), (jnp.ones(1), [jnp.zeros(2, jnp.int32)])),
    }
    tree = ModelTree(model)
    r = rows(tree)
    assert r["""['table']["it's"]"""].shape == (2,)
    assert r["""['table']['say "hi"\\n']"""].size == 3
    assert r["['table']['ключ']"].size == 1
    assert r["['by_id'][12]"].kind == "none"
    assert r["['by_id'][7]"].kind == "array"
    assert r["['pair']"].kind == "namedtuple" and r["['pair']"].cls == "Pair"
    assert r["['pair'].left"].kind == "array"
    assert r["['pair'].right"].kind == "tuple"
    assert r["['pair'].right[1]"].kind == "list"
    assert r["['pair'].right[1][0]"].dtype == "int32"
    # Lookup accepts another quoting of the same key and a leading dot.
    assert tree.find("""['table']['it\\'s']""") == tree.find("""['table']["it's"]""")
    assert tree.find(".['pair'].left") == tree.find("['pair'].left")


def test_none_field_is_a_node_without_leaves():
    lin = eqx.nn.Linear(2, 3, use_bias=False, key=KEY)
    tree = ModelTree(lin)
    r = rows(tree)
    assert r["bias"].kind == "none" and r["bias"].lo == r["bias"].hi
    assert tree.num_leaves == 1


def test_shared_weights_are_tied_once():
    class Tied(eqx.Module):
        shared: eqx.nn.Shared

        def __init__(self):
            emb = eqx.nn.Embedding(5, 3, key=KEY)
            lin = eqx.nn.Linear(3, 5, key=KEY)
            self.shared = eqx.nn.Shared((emb, lin), lambda p: p[1].weight, lambda p: p[0].weight)

    tree = ModelTree(Tied())
    r = rows(tree)
    assert r["shared.pytree[0].weight"].trainable
    assert r["shared.pytree[1].weight"].kind == "leaf"  # the tied copy holds no array
    assert r["shared.where"].kind == "leaf"
    assert tree.params(0) == 5 * 3 + 5  # embedding + linear bias; the tie is counted once
    # The tied place names its source, in its row and its text.
    assert r["shared.pytree[1].weight"].tied == "`shared.pytree[0].weight`"
    assert r["shared.pytree[1].weight"].summary == "tied to `shared.pytree[0].weight`"
    assert r["shared.pytree[1].bias"].tied is None
    assert list(tree.ties.values()) == [(tree.find("shared"), (0,))]


def test_a_tie_through_a_transposing_get_or_of_whole_modules_names_its_source():
    a, b = eqx.nn.Linear(3, 2, key=KEY), eqx.nn.Linear(2, 3, key=KEY)
    transposed = eqx.nn.Shared((a, b), lambda p: p[1].weight, lambda p: p[0].weight.T)
    assert rows(ModelTree(transposed))["pytree[1].weight"].tied == "`pytree[0].weight`"
    c = eqx.nn.Linear(3, 2, key=KEY)
    modules = eqx.nn.Shared((a, c), lambda p: p[1], lambda p: p[0])
    assert rows(ModelTree(modules))["pytree[1]"].tied == "`pytree[0]`"
    # Two ties at once: `where` and `get` pair them in order.
    two = eqx.nn.Shared(
        (a, c), lambda p: (p[1].bias, p[1].weight), lambda p: (p[0].bias, p[0].weight)
    )
    r = rows(ModelTree(two))
    assert (r["pytree[1].weight"].tied, r["pytree[1].bias"].tied) == (
        "`pytree[0].weight`",
        "`pytree[0].bias`",
    )


def test_a_tie_whose_get_reads_no_array_or_cannot_be_traced_still_opens():
    a, b = eqx.nn.Linear(3, 2, key=KEY), eqx.nn.Linear(3, 2, key=KEY)
    constant = eqx.nn.Shared((a, b), lambda p: p[1].bias, lambda p: jnp.zeros(2))
    row = rows(ModelTree(constant))["pytree[1].bias"]
    assert row.tied == "a constant (the `get` of the eqx.nn.Shared at the root reads no array)"
    # `get` is a leaf of the Shared: swapped afterwards, Equinox's own check never saw it.
    host = eqx.tree_at(lambda s: s.get, constant, lambda p: jnp.asarray(np.asarray(p[0].bias)))
    row = rows(ModelTree(host))["pytree[1].bias"]
    assert row.summary == (
        "tied to a value of the eqx.nn.Shared at the root, whose `get` could not be traced"
    )


def test_stateful_batchnorm():
    bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch", mode="batch")
    r = rows(ModelTree(bn))
    assert r["weight"].trainable and r["bias"].trainable
    assert r["axis_name"].kind == "leaf" and r["axis_name"].summary == "'batch'"
    assert r["inference"].kind == "leaf"
    st_rows = rows(ModelTree(state))
    assert any(p.endswith("[<flat index 0>]") or "flat index" in p for p in st_rows)


def test_array_kinds_and_python_leaves():
    class Zoo(eqx.Module):
        ints: jax.Array
        flags: jax.Array
        cplx: jax.Array
        host: np.ndarray
        act: object
        rate: float
        name: str
        stacked: eqx.nn.MLP

    zoo = Zoo(
        jnp.arange(3),
        jnp.array([True, False]),
        jnp.ones(2, jnp.complex64),
        np.ones((2, 2), np.float64),
        jax.nn.relu,
        0.1,
        "zoo",
        eqx.nn.MLP(2, 2, 4, 3, scan=True, key=KEY),
    )
    r = rows(ModelTree(zoo))
    assert not r["ints"].trainable and r["ints"].dtype == "int32"
    assert not r["flags"].trainable and r["flags"].dtype == "bool"
    assert r["cplx"].trainable and r["cplx"].nbytes == 16
    assert r["host"].trainable and r["host"].dtype == "float64"
    assert r["act"].kind == "leaf" and r["act"].summary == "relu"
    assert r["rate"].kind == "leaf" and r["rate"].summary == "0.1"
    assert r["name"].summary == "'zoo'"
    # A stacked (scan=True) hidden layer is one leaf with a leading layer axis.
    assert r["stacked.layers[1].weight"].shape == (2, 4, 4)


def test_model_is_never_mutated():
    model = example_model()
    before = jtu.tree_leaves(model)
    ModelTree(model)
    assert all(a is b for a, b in zip(before, jtu.tree_leaves(model), strict=True))


def test_unknown_path_lists_closest():
    tree = ModelTree(example_model())
    with pytest.raises(ExplorerError) as info:
        tree.find("blocks[1].atn")
    msg = str(info.value)
    assert "blocks[1].atn" in msg and "`blocks[1].attn`" in msg and "`blocks[1]`" in msg
    with pytest.raises(ExplorerError, match="the model root"):
        tree.find("nope")


def test_sharding_is_described():
    mesh = jax.make_mesh((1,), ("data",))
    x = jax.device_put(jnp.ones((4, 2)), jax.sharding.NamedSharding(mesh, jax.P("data")))
    tree = ModelTree({"w": x, "v": jnp.ones(2)})
    assert "data" in tree.node(tree.find("['w']")).sharding
    assert tree.node(tree.find("['v']")).sharding is None


@given(models)
@settings(max_examples=60, deadline=None)
def test_random_models_match_jax_flattening(model):
    tree = ModelTree(model)
    flat = jtu.tree_flatten_with_path(model)[0]
    assert tree.leaf_paths == [jtu.keystr(p).removeprefix(".") for p, _ in flat]
    assert all(a is b for a, b in zip(tree.leaves, (x for _, x in flat), strict=True))
    for i, path in enumerate(tree.paths):
        assert tree.find(path) == i


def test_negative_indices_count_from_the_end():
    tree = ModelTree(example_model())
    assert tree.find("blocks[-1].mlp") == tree.find("blocks[2].mlp")
    assert tree.find("blocks[-3]") == tree.find("blocks[0]")
    assert tree.find("blocks[0].mlp.layers[-1].weight") == tree.find(
        "blocks[0].mlp.layers[1].weight"
    )
    with pytest.raises(ExplorerError, match="blocks\\[-4\\]"):
        tree.find("blocks[-4]")
    # A dict's negative int key is a key, not an index.
    assert ModelTree({-1: jnp.ones(1)}).find("[-1]") == 1


def test_array_summary_is_the_rows_text():
    tree = ModelTree(example_model())
    node = tree.find("blocks[0].mlp.layers[0].weight")
    assert array_summary(tree.objects[node]) == tree.summary(node) == "float32[32, 16]"
    assert array_summary(jnp.array(True)) == "bool[]"  # e.g. a BatchNorm state flag


def test_lookup_reads_each_key_once(monkeypatch):
    # A path that is not a printed one (a leading dot) is walked key by key: the work grows
    # with its length, not with its square (each prefix re-printed, as the lookup once did).
    depth = 400
    model: list = [jnp.ones(1)]
    for _ in range(depth - 1):
        model = [model]
    tree = ModelTree(model)
    calls = []
    real = _tree.format_key
    monkeypatch.setattr(_tree, "format_key", lambda key: calls.append(key) or real(key))
    path = "." + "[0]" * depth
    assert tree.find(path) == depth
    assert len(calls) <= 2 * depth  # one per key read, one per child indexed
    calls.clear()
    unknown = r"no node at path `\[0\]\[1\]\[0\].*…\(6,000 characters\)`"
    with pytest.raises(ExplorerError, match=unknown):
        tree.find("[0][1]" + "[0]" * 1998)
    assert len(calls) <= 4


def test_the_tree_is_read_only():
    tree = ModelTree(eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0)))
    with pytest.raises(AttributeError, match="read-only"):
        tree.paths = ()
    with pytest.raises(TypeError):
        tree.static[tree.find("")]["activation"] = "x"  # type: ignore[index]
    with pytest.raises(ValueError):
        tree.lo[0] = 1
    columns = (tree.paths, tree.keys, tree.parent, tree.kind, tree.cls, tree.depth)
    assert all(isinstance(c, tuple) for c in (*columns, tree.objects, tree.leaves))
    assert all(isinstance(c, tuple) for c in tree.children)


def test_module_children_match_jax_flattening_for_each_instance():
    # A Module class's fields are read from the first instance's flatten, then from each
    # instance's fields; a subclass and an instance holding other values agree with JAX too.
    class Block(eqx.Module):
        w: jax.Array
        act: object
        n: int = eqx.field(static=True)

    class Wider(Block):
        extra: jax.Array

    blocks = [Block(jnp.ones(2), jax.nn.relu, 1), Block(jnp.zeros(3), None, 2)]
    model = [*blocks, Wider(jnp.ones(1), jnp.tanh, 3, jnp.ones(4)), (1.0, [jnp.ones(2)])]
    tree = ModelTree(model)
    flat, _ = jtu.tree_flatten_with_path(model)
    assert tree.leaf_paths == [jtu.keystr(p).removeprefix(".") for p, _ in flat]
    assert tree.kind[tree.find("[1].act")] == "none"
    assert tree.static[tree.find("[2]")] == {"n": "3"}
