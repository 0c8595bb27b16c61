"""Synthetic models shared by the benchmarks: a deep stack of small blocks."""

from __future__ import annotations

import time
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp


class SmallBlock(eqx.Module):
    """Five leaves: two tiny linear maps and an activation function."""

    w1: jax.Array
    b1: jax.Array
    w2: jax.Array
    b2: jax.Array
    act: Callable

    def __call__(self, x):
        return self.act(self.w2 @ self.act(self.w1 @ x + self.b1) + self.b2)


class Stack(eqx.Module):
    blocks: list
    head: jax.Array

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return jnp.sum(self.head * x)


def stack_model(n_leaves: int, width: int = 4) -> Stack:
    """A model with about `n_leaves` leaves (5 per block, plus the head)."""
    base = jnp.linspace(-1.0, 1.0, width * width).reshape(width, width)
    blocks = [
        SmallBlock(base * (i % 7 + 1), jnp.zeros(width) + i, base.T, jnp.ones(width), jax.nn.relu)
        for i in range(max(1, (n_leaves - 1) // 5))
    ]
    return Stack(blocks, jnp.ones(width))


def best_of(fn: Callable, repeat: int = 3) -> float:
    """Best wall time of `repeat` calls, in seconds (best-of damps noise on shared machines)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)
