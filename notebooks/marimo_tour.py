"""The tour (00_tour.ipynb) as a marimo notebook: `marimo edit notebooks/marimo_tour.py`."""

import marimo

__generated_with = "0.25.2"
app = marimo.App(width="full")


@app.cell
def _():
    import marimo as mo

    return (mo,)


@app.cell
def _(mo):
    mo.md("""
    # A tour of eqx_explorer, in marimo

    In Equinox you freeze part of a model by choosing which leaves of the model's pytree the
    optimizer may change: a **filter spec**, a pytree of `True` (trains) and `False` (stays).
    The explorer below shows that choice as a tree. It is the widget of the Jupyter tour
    (`00_tour.ipynb`), wrapped with `mo.ui.anywidget`.

    1. **Click the checkbox of `embed`** to freeze the embeddings. The counts at the top and
       the code follow.
    2. Expand `blocks` and freeze `blocks[0]`. `blocks` becomes *mixed*.
    3. Press **Step**: each row gets a badge, `updated` for what trained, `frozen` for what
       did not.
    """)
    return


@app.cell
def _():
    import os

    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import optax

    import eqx_explorer as ex

    if jax.config.jax_compilation_cache_dir is None:  # re-runs skip XLA compilation (README)
        cache = os.path.expanduser("~/.cache/eqx_explorer/jax")
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    return eqx, ex, jax, jnp, optax


@app.cell
def _(eqx, jax, jnp):
    class Block(eqx.Module):
        attn: eqx.nn.MultiheadAttention
        norm: eqx.nn.LayerNorm
        mlp: eqx.nn.MLP

        def __init__(self, dim, key):
            k1, k2 = jax.random.split(key)
            self.attn = eqx.nn.MultiheadAttention(2, dim, key=k1)
            self.norm = eqx.nn.LayerNorm(dim)
            self.mlp = eqx.nn.MLP(dim, dim, 2 * dim, 1, key=k2)

        def __call__(self, x):
            x = x + self.attn(x, x, x)
            return x + jax.vmap(self.mlp)(jax.vmap(self.norm)(x))

    class TinyTransformer(eqx.Module):
        embed: eqx.nn.Embedding
        blocks: list
        head: eqx.nn.Linear
        step_count: jax.Array

        def __init__(self, key, vocab=32, dim=16, depth=2):
            keys = jax.random.split(key, depth + 2)
            self.embed = eqx.nn.Embedding(vocab, dim, key=keys[0])
            self.blocks = [Block(dim, k) for k in keys[1:-1]]
            self.head = eqx.nn.Linear(dim, 1, key=keys[-1])
            self.step_count = jnp.array(0)

        def __call__(self, tokens):
            x = jax.vmap(self.embed)(tokens)
            for block in self.blocks:
                x = block(x)
            return jax.vmap(self.head)(x).mean()

    def loss_fn(model, batch):
        tokens, targets = batch
        return jnp.mean((jax.vmap(model)(tokens) - targets) ** 2)

    model = TinyTransformer(jax.random.key(0))
    k1, k2 = jax.random.split(jax.random.key(1))
    batch = (jax.random.randint(k1, (8, 6), 0, 32), jax.random.normal(k2, (8,)))
    return batch, loss_fn, model


@app.cell
def _(batch, ex, loss_fn, mo, model, optax):
    w = ex.Explorer(model, loss_fn=loss_fn, batch=batch, optimizer=optax.adamw(1e-2))
    explorer = mo.ui.anywidget(w)
    explorer  # noqa: B018 (marimo shows a cell's last expression)
    return


@app.cell
def _(mo):
    mo.md("""
    ## The same from Python

    `w.spec` is the spec your clicks made (read it in a new cell). The cell below builds
    a spec of its own from Python, so the explorer above stays as you left it. Specs are
    immutable values: `freeze` returns a new one.
    """)
    return


@app.cell
def _(ex, model):
    spec = ex.FilterSpec(model).freeze("embed", "blocks[0]")
    print(spec.state("embed"), spec.state("blocks"), spec.state("head"))
    print(spec.to_code("tree_at"))
    assert spec.state("blocks") == "mixed"  # blocks[0] frozen, blocks[1] trainable
    return (spec,)


@app.cell
def _(batch, ex, loss_fn, model, optax, spec):
    report = ex.StepRunner(model, spec, loss_fn, batch, optimizer=optax.adamw(1e-2)).step(3)
    print(report.counts)
    assert report.ok and set(spec.frozen_paths()) <= set(report.by_status("frozen"))
    return


if __name__ == "__main__":
    app.run()
