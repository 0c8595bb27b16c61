"""Sharded models on 8 simulated CPU devices (run in a subprocess: XLA reads the flag at start)."""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import NamedSharding, PartitionSpec as P

    import eqx_explorer as ex

    assert jax.device_count() == 8, jax.devices()
    # Auto axes (GSPMD): XLA propagates shardings through the user's unannotated loss.
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))

    model = eqx.nn.MLP(8, 4, 32, 2, key=jax.random.key(0))

    def shard(x):
        if not eqx.is_array(x):
            return x
        spec = P("model", None) if x.ndim == 2 and x.shape[0] % 2 == 0 else P()
        return jax.device_put(x, NamedSharding(mesh, spec))

    sharded = jax.tree_util.tree_map(shard, model)
    x = jax.device_put(
        jax.random.normal(jax.random.key(1), (16, 8)), NamedSharding(mesh, P("data", None))
    )
    y = jax.device_put(jnp.ones((16, 4)), NamedSharding(mesh, P("data", None)))

    def loss_fn(m, batch):
        xb, yb = batch
        return jnp.mean((jax.vmap(m)(xb) - yb) ** 2)

    # Rows and summary show each array's sharding.
    tree = ex.ModelTree(sharded)
    row = tree.node(tree.find("layers[0].weight"))
    assert "model" in row.sharding and "data=4" in row.sharding, row.sharding
    text = ex.summary(sharded)
    assert "sharding" in text and "'model', None)" in text, text

    spec = ex.FilterSpec(sharded).freeze("layers[0]")
    runs = {}
    for name, m in (("sharded", sharded), ("single", model)):
        runner = ex.StepRunner(m, ex.FilterSpec(m).freeze("layers[0]"), loss_fn, (x, y),
                               optimizer=optax.adam(1e-2))
        report = runner.step(5)
        assert report.ok, report.error
        runs[name] = (report, runner.model)

    (rep_s, out_s), (rep_1, out_1) = runs["sharded"], runs["single"]
    np.testing.assert_allclose(rep_s.loss, rep_1.loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(sharded), jax.tree_util.tree_leaves(out_s)):
        if eqx.is_array(a):
            assert b.sharding == a.sharding, (a.sharding, b.sharding)
    # Frozen leaves stay bit-identical.
    assert (out_s.layers[0].weight == sharded.layers[0].weight).all()
    assert set(rep_s.by_status("frozen")) == {"layers[0].weight", "layers[0].bias"}
    assert set(rep_s.by_status("updated")) >= {"layers[1].weight", "layers[2].weight"}
    print("SHARDING-OK")
    """
)


@pytest.mark.slow
def test_sharded_model_trains_and_keeps_shardings():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert "SHARDING-OK" in out.stdout, out.stdout + out.stderr
