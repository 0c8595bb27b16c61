"""Update rules that keep constrained parameters valid under training.

`eqx.apply_updates` adds updates, which can push a scale below zero or a rotation off the
orthogonal group. A rule replaces the addition for the leaves it constrains:

| rule | gradient the optimizer sees | new parameter | violation measured |
| --- | --- | --- | --- |
| `"positive"` | `g * p` (gradient of `log p`) | `p * exp(u)` | `min(p)` (valid when > 0) |
| `"orthogonal"` | `g` | `qr(p + u)` (QR retraction) | `‖QᵀQ − I‖` (or `‖QQᵀ − I‖` if wide) |
| `"unit_norm"` | `g` | `(p + u) / ‖p + u‖` | `|‖p‖ − 1|` |
| `("interval", lo, hi)` | `g` | `clip(p + u, lo, hi)` | distance outside `[lo, hi]` |
| callable `rule(p, u)` | `g` | `rule(p, u)` | not measured |

An interval bound of `None` or ±inf leaves that side open (saved as JSON `null`).

Positive trains `log p`: the optimizer's step `u` is taken in log space and `p * exp(u)` can
never cross zero. (`p * exp(u / p)` would explode for small `p`.)

```python
spec = ex.FilterSpec(model).constrain("scale", "positive").constrain("rot", "orthogonal")
grads = constrain_grads(params, grads, spec.constraints)
updates, opt_state = optimizer.update(grads, opt_state, params)
params = apply_updates(params, updates, spec.constraints)   # None updates skipped
```
Everything here is jittable; non-array leaves and `None` updates are left untouched.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from ._errors import ExplorerError, short_repr
from ._paths import format_path

__all__ = [
    "Rule",
    "RuleName",
    "RuleLike",
    "make_rule",
    "constrain_grads",
    "apply_updates",
    "violations",
    "retract",
]

RuleName = Literal["positive", "orthogonal", "unit_norm", "interval", "custom"]
# What `FilterSpec.constrain` takes as a rule.
RuleLike = (
    Literal["positive", "orthogonal", "unit_norm"]
    | tuple[Literal["interval"], float | None, float | None]
    | Callable[[Any, Any], Any]
)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One update rule; `name` is a built-in name, or "custom" for a callable."""

    name: RuleName
    lo: float = -math.inf  # the interval's bounds; open (infinite) for every other rule
    hi: float = math.inf
    fn: Callable[[Any, Any], Any] | None = None

    # -- what runs inside the jitted step ------------------------------------
    def grad(self, p: Any, g: Any) -> Any:
        return g * p if self.name == "positive" else g

    def apply(self, p: Any, u: Any) -> Any:
        if self.name == "positive":
            return p * jnp.exp(u)
        if self.name == "orthogonal":
            return retract(p + u)
        if self.name == "unit_norm":
            new = p + u
            return new / jnp.linalg.norm(new)
        if self.name == "interval":
            return jnp.clip(p + u, self.lo, self.hi)
        assert self.fn is not None  # a custom rule
        return self.fn(p, u)

    def violation(self, p: Any) -> Any:
        """The measured violation of `p` (see the module table); NaN for custom rules."""
        if self.name == "positive":
            return jnp.min(p)
        if self.name == "orthogonal":
            return _orthogonality_error(p)
        if self.name == "unit_norm":
            return jnp.abs(jnp.linalg.norm(p) - 1)
        if self.name == "interval":
            return jnp.maximum(0.0, jnp.maximum(self.lo - jnp.min(p), jnp.max(p) - self.hi))
        return jnp.asarray(jnp.nan)

    def is_valid(self, value: float, tol: float = 1e-4) -> bool:
        if self.name == "positive":
            return value > 0
        if self.name == "custom":
            return True
        return value <= tol

    # -- checks and display ---------------------------------------------------
    def check(self, path: str, leaf: Any) -> None:
        """Raise `ExplorerError` if this rule cannot hold for `leaf` at `path`."""
        shape = np.shape(leaf)
        if self.name == "positive" and not bool(np.all(np.asarray(leaf) > 0)):
            raise ExplorerError(
                f"`{path}` has values <= 0, so it cannot be trained as positive (the rule "
                "trains log p). Initialise it with positive values, e.g. jnp.ones(shape)."
            )
        if self.name == "orthogonal":
            if len(shape) < 2:
                raise ExplorerError(
                    f"`{path}` has shape {shape}: orthogonal needs a matrix (or a stack of them)"
                )
            err = float(_orthogonality_error(jnp.asarray(leaf)))
            if err > 1e-3:
                raise ExplorerError(
                    f"`{path}` is not orthogonal to start with (‖QᵀQ − I‖ = {err:.3g}); "
                    "initialise it with jnp.linalg.qr(x)[0] or jax.nn.initializers.orthogonal()"
                )
        if self.name == "interval" and not self.lo < self.hi:
            raise ExplorerError(
                f"interval rule for `{path}` needs lo < hi, got {self.lo}, {self.hi}"
            )
        if np.iscomplexobj(leaf) and self.name in ("positive", "interval"):
            raise ExplorerError(f"`{path}` is complex: {self.name} needs real values")

    @property
    def label(self) -> str:
        if self.name == "interval":
            return f"interval[{self.lo:g}, {self.hi:g}]"
        if self.name == "custom":
            return getattr(self.fn, "__name__", "custom")
        return self.name

    def to_json(self) -> Any:
        if self.name == "interval":  # strict JSON has no Infinity: an open side is null
            return ["interval", *(b if math.isfinite(b) else None for b in (self.lo, self.hi))]
        if self.name == "custom":
            raise ExplorerError(
                f"the custom rule {self.label} is a Python function and cannot be saved as JSON; "
                "use a built-in rule or re-apply it after FilterSpec.from_json"
            )
        return self.name


_BUILTIN = ("positive", "orthogonal", "unit_norm")
RULE_NAMES = (*_BUILTIN, "interval")


def make_rule(rule: Any) -> Rule:
    """A `Rule` from `"positive"`, `"orthogonal"`, `"unit_norm"`, `("interval", lo, hi)`,
    a callable `rule(param, update) -> new_param`, or a `Rule`."""
    if isinstance(rule, Rule):
        return rule
    if isinstance(rule, str) and rule in _BUILTIN:
        return Rule(rule)  # type: ignore[arg-type]  # narrowed by `in _BUILTIN`
    if isinstance(rule, tuple | list) and len(rule) == 3 and rule[0] == "interval":
        lo, hi = _bound(rule[1], "lo", -math.inf), _bound(rule[2], "hi", math.inf)
        if not lo < hi:
            raise ExplorerError(
                f"the interval rule needs lo < hi, got ('interval', {lo:g}, {hi:g}); "
                "e.g. ('interval', -1.0, 1.0)"
            )
        return Rule("interval", lo=lo, hi=hi)
    if callable(rule):
        return Rule("custom", fn=rule)
    raise ExplorerError(
        f"unknown update rule {short_repr(rule)}: use one of {', '.join(map(repr, _BUILTIN))}, "
        "('interval', lo, hi), or a callable rule(param, update) -> new_param"
    )


def _bound(value: Any, name: str, open_side: float) -> float:
    """An interval bound as a float; `None` (as JSON writes an infinite bound) leaves it open."""
    if value is None:
        return open_side
    ok = isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)
    try:
        bound = float(value) if ok else float("nan")
    except OverflowError:  # an int beyond float range, e.g. 10**400
        bound = float("nan")
    if math.isnan(bound):
        raise ExplorerError(
            f"the interval rule's {name} bound must be a real number or None (open), "
            f"got {short_repr(value, 40)}; e.g. ('interval', 0.0, 1.0)"
        )
    return bound


def retract(x: jax.Array) -> jax.Array:
    """Nearest-frame QR retraction with the sign fixed so that it is continuous."""
    wide = x.shape[-2] < x.shape[-1]
    if wide:
        x = jnp.swapaxes(x, -1, -2)
    q, r = jnp.linalg.qr(x)
    signs = jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))
    q = q * jnp.where(signs == 0, 1.0, signs)[..., None, :]
    return jnp.swapaxes(q, -1, -2) if wide else q


def _orthogonality_error(q: Any) -> Any:
    if q.shape[-2] < q.shape[-1]:
        q = jnp.swapaxes(q, -1, -2)
    gram = jnp.swapaxes(q, -1, -2).conj() @ q
    return jnp.linalg.norm(gram - jnp.eye(q.shape[-1], dtype=q.dtype))


def _zip(fn: Callable, params: Any, other: Any) -> Any:
    # `None` (a filtered-out leaf) is a leaf here so that both trees align.
    return jtu.tree_map_with_path(
        lambda path, p, x: fn(format_path(path), p, x), params, other, is_leaf=lambda v: v is None
    )


def constrain_grads(params: Any, grads: Any, rules: dict) -> Any:
    """Gradients as the optimizer should see them (chain rule of each reparametrisation)."""
    if not rules:
        return grads

    def grad(path: str, p: Any, g: Any) -> Any:
        rule = rules.get(path)
        return g if rule is None or p is None or g is None else rule.grad(p, g)

    return _zip(grad, params, grads)


def apply_updates(params: Any, updates: Any, rules: dict) -> Any:
    """`eqx.apply_updates` with each constrained leaf updated by its rule.

    A `None` update keeps its parameter, so non-array leaves survive, as in `eqx.apply_updates`.
    """

    def update(path: str, p: Any, u: Any) -> Any:
        if u is None or p is None:
            return p
        rule = rules.get(path)
        return p + u if rule is None else rule.apply(p, u).astype(p.dtype)

    return _zip(update, params, updates)


def violations(params: Any, rules: dict) -> dict:
    """`{path: violation}` for every constrained array leaf of `params` (jnp scalars)."""
    out = {}
    for path, leaf in jtu.tree_flatten_with_path(params)[0]:
        text = format_path(path)
        if text in rules and hasattr(leaf, "shape"):
            out[text] = rules[text].violation(leaf)
    return out
