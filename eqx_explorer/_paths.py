"""Path text <-> JAX key paths.

One grammar everywhere: the text of `jax.tree_util.keystr` without its leading dot, e.g.
`blocks[3].attn.query_proj.weight`, `table["it's"].bias`, `pair[0]`, `state[<flat index 1>]`.
The root is the empty string. A leading dot is accepted on input.

Globs add two wildcards that stand where a key stands: `*` (exactly one key, written `.*`,
`[*]` or `*` at the start) and `**` (zero or more keys). A quoted `"*"` is a literal dict key.

Parsing never evaluates user text: dict keys are read with `ast.parse` and only literal
nodes (strings, bytes, numbers, booleans, `None`, tuples of those) are accepted.
"""

from __future__ import annotations

import ast
from typing import Any

import jax.tree_util as jtu

from ._errors import ExplorerError

__all__ = ["STAR", "STARSTAR", "format_key", "format_path", "parse_path", "is_glob"]


class _Wildcard:
    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


STAR = _Wildcard("*")
STARSTAR = _Wildcard("**")


def format_key(key: Any) -> str:
    """Text of one key, exactly as `jax.tree_util.keystr` writes it."""
    if isinstance(key, jtu.GetAttrKey):
        return f".{key.name}"
    if isinstance(key, jtu.SequenceKey):
        return f"[{key.idx}]"
    if isinstance(key, jtu.DictKey):
        return f"[{key.key!r}]"
    if isinstance(key, jtu.FlattenedIndexKey):
        return f"[<flat index {key.key}>]"
    if key is STAR:
        return ".*"
    if key is STARSTAR:
        return ".**"
    return str(key)


def format_path(keys: tuple) -> str:
    """`keystr` of a key path without the leading dot; `""` for the root.

    >>> format_path((jtu.GetAttrKey("blocks"), jtu.SequenceKey(3), jtu.GetAttrKey("w")))
    'blocks[3].w'
    """
    text = "".join(format_key(k) for k in keys)
    return text[1:] if text.startswith(".") else text


def is_glob(keys: tuple) -> bool:
    return any(k is STAR or k is STARSTAR for k in keys)


_IDENT_START = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_STRING_PREFIX = set("bBrRuU")


def _literal(node: ast.AST, text: str) -> Any:
    if isinstance(node, ast.Constant) and not isinstance(node.value, type(...)):
        return node.value
    if isinstance(node, ast.Tuple):
        return tuple(_literal(e, text) for e in node.elts)
    if (
        isinstance(node, ast.UnaryOp)
        and isinstance(node.op, ast.USub | ast.UAdd)
        and isinstance(node.operand, ast.Constant)
        and isinstance(node.operand.value, int | float | complex)
        and not isinstance(node.operand.value, bool)
    ):
        value = node.operand.value
        return -value if isinstance(node.op, ast.USub) else value
    raise ExplorerError(
        f"`[{text}]` is not a literal key: dict keys in paths are written as Python literals "
        '(strings, numbers, True/False/None, tuples of these), e.g. `table["it\'s"]`.'
    )


def _scan_string(text: str, i: int) -> int:
    """Index just past the string literal starting at `i` (prefix letters allowed)."""
    while i < len(text) and text[i] in _STRING_PREFIX:
        i += 1
    if i >= len(text) or text[i] not in "'\"":
        raise ExplorerError(f"expected a quote at position {i} of path {text!r}")
    quote = text[i]
    if text.startswith(quote * 3, i):
        quote = quote * 3
    i += len(quote)
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text.startswith(quote, i):
            return i + len(quote)
        i += 1
    raise ExplorerError(f"unterminated string in path {text!r}: close the quote of the dict key")


def _bracket_end(text: str, i: int) -> int:
    """Index of the `]` closing the bracket opened at `i - 1`, skipping strings and nesting."""
    depth = 0
    while i < len(text):
        c = text[i]
        if c in "'\"" or (c in _STRING_PREFIX and i + 1 < len(text) and text[i + 1] in "'\""):
            i = _scan_string(text, i)
            continue
        if c in "([{":
            depth += 1
        elif c in ")}":
            depth -= 1
        elif c == "]":
            if depth == 0:
                return i
            depth -= 1
        i += 1
    raise ExplorerError(f"unbalanced `[` in path {text!r}: every `[` needs a closing `]`")


def _bracket_key(inner: str, path: str) -> Any:
    stripped = inner.strip()
    if stripped == "*":
        return STAR
    if stripped.startswith("<flat index ") and stripped.endswith(">"):
        number = stripped[len("<flat index ") : -1]
        if number.isdigit():
            return jtu.FlattenedIndexKey(int(number))
    if stripped.isdigit():
        return jtu.SequenceKey(int(stripped))
    try:
        tree = ast.parse(stripped, mode="eval")
    except SyntaxError:
        raise ExplorerError(
            f"cannot read `[{inner}]` in path {path!r}: write dict keys as Python literals, "
            'e.g. `table["key"]` or `by_id[7]`.'
        ) from None
    return jtu.DictKey(_literal(tree.body, inner))


def parse_path(text: str) -> tuple:
    """Key path of a path string; inverse of `format_path`.

    `[3]` is read as a sequence index (`SequenceKey`); an integer dict key prints the same way
    and the two are matched alike (see `_tree.ModelTree.find`).

    >>> format_path(parse_path('.table["it\\'s"].bias'))
    'table["it\\'s"].bias'
    """
    if not isinstance(text, str):
        raise ExplorerError(f"a path must be a string, got {type(text).__name__}: {text!r}")
    keys: list = []
    i, n = 0, len(text)
    expect_name = True  # a bare name may start the path, as keystr minus its dot does
    while i < n:
        c = text[i]
        if c == ".":
            i += 1
            expect_name = True
            if i >= n:
                raise ExplorerError(f"path {text!r} ends with `.`: remove it or add a field name")
            continue
        if c == "[":
            end = _bracket_end(text, i + 1)
            keys.append(_bracket_key(text[i + 1 : end], text))
            i = end + 1
            expect_name = False
            continue
        if not expect_name:
            raise ExplorerError(
                f"unexpected {c!r} at position {i} of path {text!r}: separate keys with `.` "
                "or `[...]`"
            )
        if text.startswith("**", i):
            keys.append(STARSTAR)
            i += 2
        elif c == "*":
            keys.append(STAR)
            i += 1
        elif c in _IDENT_START or c.isidentifier():
            j = i + 1
            while j < n and (text[j] == "_" or text[j].isalnum()):
                j += 1
            keys.append(jtu.GetAttrKey(text[i:j]))
            i = j
        else:
            raise ExplorerError(
                f"unexpected {c!r} at position {i} of path {text!r}: attribute names are "
                'identifiers; dict keys go in brackets, e.g. `d["my key"]`'
            )
        expect_name = False
    return tuple(keys)
