"""Path text <-> JAX key paths.

One grammar everywhere: the text of `jax.tree_util.keystr` without its leading dot, e.g.
`blocks[3].attn.query_proj.weight`, `table["it's"].bias`, `pair[0]`, `state[<flat index 1>]`.
The root is the empty string. A leading dot is accepted on input.

Globs add two wildcards that stand where a key stands: `*` (exactly one key, written `.*`,
`[*]` or `*` at the start) and `**` (zero or more keys). A quoted `"*"` is a literal dict key.
(`_select.match_nodes` also reads `*` within a key, `norm*`, before parsing.)

Parsing never evaluates user text and is linear in its length (one left-to-right scan; paths
longer than `MAX_PATH_CHARS` are refused before any work). Dict keys are Python literals as
`repr` writes them: strings, bytes, ints, floats (`inf`, `nan`), complex numbers, `True`,
`False`, `None` and tuples of these. A key whose repr is not a literal (an `IntEnum` member
prints `<K.A: 1>`) is read back as a `PrintedKey`, which matches the key that prints the same.
"""

from __future__ import annotations

import ast
import re
import sys
import warnings
from typing import Any

import jax.tree_util as jtu

from ._errors import ExplorerError, short_repr, shorten

__all__ = [
    "MAX_PATH_CHARS",
    "PrintedKey",
    "check_length",
    "STAR",
    "STARSTAR",
    "format_key",
    "format_path",
    "parse_path",
    "is_glob",
]

# Far above any real path (a 1,000-layer model's deepest path is a few hundred characters);
# a path the library printed is found by its text whatever its length (`ModelTree.find`).
MAX_PATH_CHARS = 10_000
_MAX_NESTING = 32  # tuple keys nested deeper than this are refused (recursion bound)
_MAX_DIGITS = sys.get_int_max_str_digits() or 4300  # Python cannot print longer ints
_MAX_INDEX = 2**31 - 1  # `SequenceKey` and `FlattenedIndexKey` hold a C int


class _Wildcard:
    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


STAR = _Wildcard("*")
STARSTAR = _Wildcard("**")


class PrintedKey:
    """A dict key read back from its printed form `<...>` (enum members, plain objects).

    Such keys cannot be rebuilt from text; a path holding one matches the node whose key
    prints the same (`repr(PrintedKey(t)) == t`).
    """

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PrintedKey) and other.text == self.text

    def __hash__(self) -> int:
        return hash((PrintedKey, self.text))


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
    raise ExplorerError(
        f"{short_repr(key, 40)} ({type(key).__name__}) is not a key of a key path; keys are "
        "jax.tree_util.GetAttrKey, SequenceKey, DictKey or FlattenedIndexKey, as "
        "jax.tree_util.tree_flatten_with_path returns them"
    )


def format_path(keys: tuple) -> str:
    """`keystr` of a key path without the leading dot; `""` for the root.

    **Arguments:**

    - `keys`: a key path, as `jax.tree_util.tree_flatten_with_path` gives.

    **Returns:**

    The path as text, which `parse_path` reads back.

    >>> format_path((jtu.GetAttrKey("blocks"), jtu.SequenceKey(3), jtu.GetAttrKey("w")))
    'blocks[3].w'
    """
    if not isinstance(keys, tuple | list):
        raise ExplorerError(
            f"format_path takes a key path (a tuple of keys), got {type(keys).__name__}; "
            "e.g. a path from jax.tree_util.tree_flatten_with_path"
        )
    text = "".join(format_key(k) for k in keys)
    return text[1:] if text.startswith(".") else text


def is_glob(keys: tuple) -> bool:
    return any(k is STAR or k is STARSTAR for k in keys)


_STRING_PREFIX = frozenset("bBrRuU")
# Atomic (?>...): a long digit run followed by a letter fails in one pass, not by trying
# every split of the digits (quadratic: 7 s at 10,000 digits).
_NUMBER = re.compile(
    r"[+-]?(?>(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|inf|nan)[jJ]?(?![A-Za-z0-9_])"
)
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NAMES = {"True": True, "False": False, "None": None, "inf": float("inf"), "nan": float("nan")}
_SPACE = " \t"


class _Error(Exception):
    """A parse failure at a position; `parse_path` turns it into an `ExplorerError`."""

    def __init__(self, at: int, what: str):
        self.at = at
        self.what = what


def _scan_string(text: str, i: int) -> int:
    """Index just past the string literal starting at `i` (prefix letters allowed)."""
    start = i
    while i < len(text) and text[i] in _STRING_PREFIX and i - start < 2:
        i += 1
    if i >= len(text) or text[i] not in "'\"":
        raise _Error(start, "expected a quoted string")
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
    raise _Error(start, "unterminated string: close the quote of the dict key")


def _bracket_end(text: str, i: int) -> int:
    """Index of the `]` closing the bracket opened at `i - 1`, skipping strings and nesting."""
    open_at, depth = i - 1, 0
    while i < len(text):
        c = text[i]
        if c in "'\"" or (c in _STRING_PREFIX and _is_string_start(text, i)):
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
    raise _Error(open_at, "unbalanced `[`: every `[` needs a closing `]`")


def _is_string_start(text: str, i: int) -> bool:
    """A string prefix (`b`, `r`, `rb`, ...) at `i` directly followed by a quote."""
    j = i
    while j < len(text) and text[j] in _STRING_PREFIX and j - i < 2:
        j += 1
    return j < len(text) and text[j] in "'\""


def _skip_space(text: str, i: int, end: int) -> int:
    while i < end and text[i] in _SPACE:
        i += 1
    return i


def _number(token: str, at: int) -> Any:
    if token[-1] in "jJ":
        return complex(token)
    if any(c in token for c in ".eEan"):
        return float(token)
    if len(token) > _MAX_DIGITS:
        raise _Error(at, f"a {len(token):,}-digit number is longer than Python prints")
    return int(token)


def _literal(text: str, i: int, end: int, depth: int) -> tuple[Any, int]:
    """The literal starting at `i` (spaces allowed before it) and the index after it."""
    i = _skip_space(text, i, end)
    if i >= end:
        raise _Error(i, "expected a key")
    c = text[i]
    if c in "'\"" or _is_string_start(text, i):
        stop = _scan_string(text, i)
        if stop > end:
            raise _Error(i, "unterminated string: close the quote of the dict key")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid escapes: read as Python reads them
                value = ast.literal_eval(text[i:stop])
        except (SyntaxError, ValueError) as e:
            raise _Error(i, f"cannot read this string ({e.__class__.__name__}: {e})") from None
        return value, stop
    if c == "(":
        return _group(text, i, end, depth)
    match = _NUMBER.match(text, i, end)
    if match:
        return _number(match.group(), i), match.end()
    match = _WORD.match(text, i, end)
    if match and match.group() in _NAMES:
        return _NAMES[match.group()], match.end()
    raise _Error(
        i,
        "not a literal key: dict keys are written as Python literals (strings, numbers, "
        'True/False/None, tuples of these), e.g. `table["it\'s"]` or `by_id[7]`',
    )


def _group(text: str, i: int, end: int, depth: int) -> tuple[Any, int]:
    """A parenthesised tuple `(a, b)`, `(a,)`, `()`, or complex number `(1+2j)` at `i`."""
    if depth >= _MAX_NESTING:
        raise _Error(i, f"tuple keys nest at most {_MAX_NESTING} deep")
    items: list[Any] = []
    open_at, comma, i = i, False, i + 1
    while True:
        i = _skip_space(text, i, end)
        if i < end and text[i] == ")":
            return (items[0] if len(items) == 1 and not comma else tuple(items)), i + 1
        if items and not comma:
            raise _Error(i, "expected `,` or `)` in a tuple key")
        start = i
        value, i = _literal(text, i, end, depth + 1)
        # repr writes a complex number with a real part as `(re+imj)`, e.g. `(-0-1j)`.
        imag = _NUMBER.match(text, _skip_space(text, i, end), end)
        real = text[start:i].strip(_SPACE)
        if (
            imag
            and imag.group()[0] in "+-"
            and imag.group()[-1] in "jJ"
            and (_NUMBER.fullmatch(real) and real[-1] not in "jJ")
        ):
            value, i = complex(float(real), float(imag.group()[:-1])), imag.end()
        items.append(value)
        i = _skip_space(text, i, end)
        comma = i < end and text[i] == ","
        if comma:
            i += 1
        elif i >= end:
            raise _Error(open_at, "unclosed `(`: close the tuple key with `)`")


def _index(digits: str, at: int) -> int:
    if len(digits) > 10 or int(digits) > _MAX_INDEX:
        raise _Error(at, f"index {shorten(digits, 24)} is larger than any index can be")
    return int(digits)


def _bracket_key(text: str, start: int, end: int) -> Any:
    """The key written in `text[start:end]`, the inside of one `[...]`."""
    inner = text[start:end].strip(_SPACE)
    if inner == "*":
        return STAR
    if inner.startswith("<") and inner.endswith(">"):
        number = inner[len("<flat index ") : -1]
        if inner.startswith("<flat index ") and number.isascii() and number.isdigit():
            return jtu.FlattenedIndexKey(_index(number, start))
        return jtu.DictKey(PrintedKey(inner))
    if inner.isascii() and inner.isdigit():
        index = _number(inner, start)
        # An int too large to be a list index can still be an int dict key; it prints alike.
        return jtu.SequenceKey(index) if index <= _MAX_INDEX else jtu.DictKey(index)
    value, i = _literal(text, start, end, 0)
    i = _skip_space(text, i, end)
    if i < end and text[i] == ",":
        raise _Error(i, "one key per `[...]`: write a tuple key in parentheses, e.g. `d[(1, 2)]`")
    if i < end:
        raise _Error(
            i,
            "unexpected text after the key: a quote inside a string key is escaped, "
            """e.g. `table["it's"]` or `table['it\\'s']`""",
        )
    return jtu.DictKey(value)


def _name_end(text: str, i: int) -> int:
    """Index just past the Python identifier (unicode included) starting at `i`."""
    n = len(text)
    while i < n:
        c = text[i]
        if not (c.isalnum() or c == "_" or (not c.isascii() and ("a" + c).isidentifier())):
            break
        i += 1
    return i


def _keys(text: str) -> list:
    keys: list = []
    i, n = 0, len(text)
    expect_name = True  # a bare name may start the path, as keystr minus its dot does
    while i < n:
        c = text[i]
        if c == ".":
            i += 1
            if i >= n:
                raise _Error(i - 1, "the path ends with `.`: remove it or add a field name")
            # A leading dot is optional, so `.["k"]` reads as `["k"]`; elsewhere `.` needs a name.
            if text[i] == "." or (text[i] == "[" and i > 1):
                raise _Error(i, "`.` must be followed by a field name (`a.b`, `a[0]`, not `a.[0]`)")
            expect_name = True
            continue
        if c == "[":
            end = _bracket_end(text, i + 1)
            keys.append(_bracket_key(text, i + 1, end))
            i = end + 1
            expect_name = False
            continue
        if not expect_name:
            raise _Error(i, "unexpected character: separate keys with `.` or `[...]`")
        if text.startswith("**", i):
            keys.append(STARSTAR)
            i += 2
        elif c == "*":
            keys.append(STAR)
            i += 1
        elif c.isidentifier():
            j = _name_end(text, i + 1)
            keys.append(jtu.GetAttrKey(text[i:j]))
            i = j
        else:
            raise _Error(
                i,
                "unexpected character: attribute names are identifiers; dict keys go in "
                'brackets, e.g. `d["my key"]`',
            )
        expect_name = False
    return keys


def check_length(text: str) -> None:
    """`ExplorerError` if `text` is longer than a path or pattern may be (`MAX_PATH_CHARS`)."""
    if len(text) > MAX_PATH_CHARS:
        raise ExplorerError(
            f"path {shorten(text)!r} has {len(text):,} characters, more than the "
            f"{MAX_PATH_CHARS:,} a path may have; pass a shorter path or a glob such as "
            "`layers[*]`"
        )


def parse_path(text: str) -> tuple:
    """Key path of a path string; inverse of `format_path`.

    `[3]` is read as a sequence index (`SequenceKey`); an integer dict key prints the same way
    and the two are matched alike (see `_tree.ModelTree.find`). Bad text raises
    `ExplorerError` naming the position and quoting the path (shortened if long).

    **Arguments:**

    - `text`: a path such as `blocks[3].attn` or `table["key"]` (a leading dot is accepted).

    **Returns:**

    The key path: a tuple of `jax.tree_util` keys.

    >>> parse_path("blocks[3].w")
    (GetAttrKey(name='blocks'), SequenceKey(idx=3), GetAttrKey(name='w'))
    >>> format_path(parse_path('.table["it\\'s"].bias'))
    'table["it\\'s"].bias'
    """
    if not isinstance(text, str):
        raise ExplorerError(
            f"a path must be a string, got {type(text).__name__}; write it as "
            '`blocks[0].attn` or `table["key"]`'
        )
    check_length(text)
    try:
        return tuple(_keys(text))
    except _Error as e:
        near = shorten(text[e.at :], 20)
        raise ExplorerError(
            f"cannot read path {shorten(text)!r} at position {e.at} (near {near!r}): {e.what}"
        ) from None
