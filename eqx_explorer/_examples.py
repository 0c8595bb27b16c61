"""Small built-in models for the demo, the notebooks and the tests."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

__all__ = ["Hypernet", "TinyTransformer", "example_model", "example_batch", "mse_loss"]


class Hypernet(eqx.Module):
    """A hyper-network that makes the weights of a small target network."""

    hyper_net: eqx.nn.MLP
    target: eqx.nn.MLP
    scale: jax.Array
    dropout: eqx.nn.Dropout
    name: str = eqx.field(static=True)

    def __init__(self, key: jax.Array, name: str = "hypernet"):
        k1, k2 = jax.random.split(key)
        self.hyper_net = eqx.nn.MLP(4, 8, 16, 2, activation=jax.nn.gelu, key=k1)
        self.target = eqx.nn.MLP(4, 1, 16, 2, activation=jax.nn.tanh, key=k2)
        self.scale = jnp.full((1,), 0.5)
        self.dropout = eqx.nn.Dropout(0.1, inference=True)
        self.name = name

    def __call__(self, x: jax.Array) -> jax.Array:
        modulation = self.hyper_net(x)
        return self.scale * self.target(x) + 0.01 * jnp.sum(modulation)


class Block(eqx.Module):
    attn: eqx.nn.MultiheadAttention
    mlp: eqx.nn.MLP
    norm: eqx.nn.LayerNorm

    def __init__(self, dim: int, key: jax.Array):
        k1, k2 = jax.random.split(key)
        self.attn = eqx.nn.MultiheadAttention(2, dim, key=k1)
        self.mlp = eqx.nn.MLP(dim, dim, 2 * dim, 1, key=k2)
        self.norm = eqx.nn.LayerNorm(dim)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(x, x, x)
        return x + jax.vmap(self.mlp)(jax.vmap(self.norm)(x))


class TinyTransformer(eqx.Module):
    """An embedding, a few blocks and a head: the tour's model of a pretrained backbone."""

    embed: eqx.nn.Embedding
    blocks: list
    head: eqx.nn.Linear
    step_count: jax.Array

    def __init__(self, key: jax.Array, vocab: int = 32, dim: int = 16, depth: int = 3):
        keys = jax.random.split(key, depth + 2)
        self.embed = eqx.nn.Embedding(vocab, dim, key=keys[0])
        self.blocks = [Block(dim, k) for k in keys[1:-1]]
        self.head = eqx.nn.Linear(dim, 1, key=keys[-1])
        self.step_count = jnp.zeros((), jnp.int32)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = jax.vmap(self.embed)(tokens)
        for block in self.blocks:
            x = block(x)
        return jax.vmap(self.head)(x).mean()


def example_model(key: jax.Array | None = None) -> TinyTransformer:
    return TinyTransformer(jax.random.key(0) if key is None else key)


def example_batch(
    key: jax.Array | None = None, n: int = 4, length: int = 6
) -> tuple[jax.Array, jax.Array]:
    key = jax.random.key(1) if key is None else key
    k1, k2 = jax.random.split(key)
    tokens = jax.random.randint(k1, (n, length), 0, 32)
    targets = jax.random.normal(k2, (n,))
    return tokens, targets


def mse_loss(model: TinyTransformer, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    tokens, targets = batch
    preds = jax.vmap(model)(tokens)
    return jnp.mean((preds - targets) ** 2)


class StatefulNet(eqx.Module):
    """A small stateful model (BatchNorm) for `eqx.nn.make_with_state` demos and tests.

    ```python
    model, state = eqx.nn.make_with_state(StatefulNet)(jax.random.key(0))
    loss, state = stateful_loss(model, state, stateful_batch())
    ```
    """

    lin: eqx.nn.Linear
    bn: eqx.nn.BatchNorm
    drop: eqx.nn.Dropout
    head: eqx.nn.Linear

    def __init__(self, key: jax.Array):
        k1, k2 = jax.random.split(key)
        self.lin = eqx.nn.Linear(2, 4, key=k1)
        self.bn = eqx.nn.BatchNorm(4, "batch", mode="ema")
        self.drop = eqx.nn.Dropout(0.0)
        self.head = eqx.nn.Linear(4, 1, key=k2)

    def __call__(self, x: jax.Array, state: eqx.nn.State) -> tuple[jax.Array, eqx.nn.State]:
        h, state = self.bn(self.lin(x), state)
        return self.head(self.drop(h))[0], state


def stateful_batch(n: int = 8) -> tuple[jax.Array, jax.Array]:
    return jnp.linspace(-1, 1, 2 * n).reshape(n, 2), jnp.linspace(0, 1, n)


def stateful_loss(
    model: StatefulNet, state: eqx.nn.State, batch: tuple[jax.Array, jax.Array]
) -> tuple[jax.Array, eqx.nn.State]:
    x, y = batch
    batched = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    out, state = batched(x, state)
    return jnp.mean((out - y) ** 2), state
