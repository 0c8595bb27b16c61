import enum

import jax.tree_util as jtu
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eqx_explorer import ExplorerError, format_path, parse_path
from eqx_explorer._paths import MAX_PATH_CHARS, STAR, STARSTAR, PrintedKey, is_glob


class Color(enum.IntEnum):
    RED = 1


identifiers = st.one_of(
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True),
    st.sampled_from(["x·y", "ключ", "αβ", "_℘", "a١"]),  # unicode identifiers
)
literal_keys = st.one_of(
    st.text(max_size=8),  # quotes, backslashes, newlines, unicode
    st.integers(-(10**40), 10**40),
    st.floats(),  # inf, -inf and nan included
    st.complex_numbers(),
    st.booleans(),
    st.none(),
    st.binary(max_size=4),
    st.tuples(st.integers(0, 9), st.text(max_size=3)),
    st.recursive(st.integers(0, 3), lambda t: st.tuples(t, t), max_leaves=4),
    st.just(Color.RED),
)
keys = st.one_of(
    identifiers.map(jtu.GetAttrKey),
    st.integers(0, 10_000).map(jtu.SequenceKey),
    literal_keys.map(jtu.DictKey),
    st.integers(0, 99).map(jtu.FlattenedIndexKey),
)


def same_keys(a: tuple, b: tuple) -> bool:
    return [jtu.keystr((k,)) for k in a] == [jtu.keystr((k,)) for k in b]


@given(st.lists(keys, max_size=6).map(tuple))
@settings(max_examples=300, deadline=None)
def test_format_is_keystr_without_leading_dot_and_parse_inverts_it(path):
    text = format_path(path)
    assert text == jtu.keystr(path).removeprefix(".")
    back = parse_path(text)
    assert same_keys(back, path)
    assert format_path(back) == text
    # A leading dot is accepted on input.
    assert format_path(parse_path("." + text if text and not text.startswith("[") else text)) == (
        text
    )


def test_examples_from_the_grammar():
    assert format_path(parse_path("blocks[3].attn.query_proj.weight")) == (
        "blocks[3].attn.query_proj.weight"
    )
    assert parse_path('table["it\'s"].bias') == (
        jtu.GetAttrKey("table"),
        jtu.DictKey("it's"),
        jtu.GetAttrKey("bias"),
    )
    assert format_path(parse_path('table["it\'s"].bias')) == 'table["it\'s"].bias'
    assert parse_path("by_id[7].weight")[1] == jtu.SequenceKey(7)
    assert parse_path(".pair[0]") == (jtu.GetAttrKey("pair"), jtu.SequenceKey(0))
    assert parse_path("state[<flat index 1>]")[1] == jtu.FlattenedIndexKey(1)
    assert parse_path("") == ()
    assert parse_path("['a]b'][\"x\\ny\"]") == (jtu.DictKey("a]b"), jtu.DictKey("x\ny"))


def test_globs():
    assert parse_path("blocks[*].attn") == (jtu.GetAttrKey("blocks"), STAR, jtu.GetAttrKey("attn"))
    assert parse_path("**.bias") == (STARSTAR, jtu.GetAttrKey("bias"))
    assert parse_path("a.*.b")[1] is STAR
    assert is_glob(parse_path("**"))
    # A quoted star is a literal dict key, not a wildcard.
    assert parse_path('d["*"]') == (jtu.GetAttrKey("d"), jtu.DictKey("*"))
    assert not is_glob(parse_path('d["*"]'))


def test_keys_that_print_as_their_repr_read_back_as_printed_keys():
    (key,) = parse_path("[<Color.RED: 1>]")
    assert key == jtu.DictKey(PrintedKey("<Color.RED: 1>"))
    assert format_path((key,)) == jtu.keystr((jtu.DictKey(Color.RED),))


def test_numbers_as_repr_writes_them():
    assert parse_path("[inf][-inf][(1+2j)][-0.0]") == tuple(
        map(jtu.DictKey, (float("inf"), float("-inf"), 1 + 2j, -0.0))
    )
    assert format_path(parse_path("[(-0-1j)]")) == "[(-0-1j)]"  # the sign of zero is kept
    # An int too large for a list index is an int dict key (it prints the same).
    assert parse_path("[99999999999999999999]") == (jtu.DictKey(99999999999999999999),)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("..layers", r"position 1 \(near '\.layers'\): `\.` must be followed by a field name"),
        ("a.[0]", r"position 2"),
        ("a[" + "9" * 5000 + "]", r"a 5,000-digit number"),
        ("a[" + "-" * 1000 + "1]", r"position 2 .*not a literal key"),
        ("a[" + "(" * 100 + ")" * 100 + "]", r"nest at most 32 deep"),
        ("a[<flat index 99999999999>]", r"larger than any index"),
        ("a[1, 2]", r"one key per `\[\.\.\.\]`"),
        ("a['it's]", r"position 6 .*unexpected text after the key"),
        ("a['it's']", r"unterminated string"),
        ("a[inf0]", r"not a literal key"),
        ("a[" + "9" * 9000 + "x]", r"position 2 .*not a literal key"),
        ("x" * (MAX_PATH_CHARS + 1), rf"has {MAX_PATH_CHARS + 1:,} characters, more than"),
    ],
)
def test_bad_paths_name_the_position_and_quote_the_path_shortened(bad, message):
    with pytest.raises(ExplorerError, match=message) as info:
        parse_path(bad)
    assert len(str(info.value)) < 400


@pytest.mark.parametrize(
    "bad",
    [
        "a.",
        "a[",
        "a[1",
        "a['x]",
        "a b",
        "a[__import__('os').system('echo hacked')]",
        "a[x + 1]",
        "a[{1: 2}]",
        "a[...]",
        "a[1]b",
        "-a",
    ],
)
def test_bad_paths_raise_explorer_error_and_never_evaluate(bad, capfd):
    with pytest.raises(ExplorerError):
        parse_path(bad)
    assert "hacked" not in capfd.readouterr().out


def test_non_string_path():
    with pytest.raises(ExplorerError, match="must be a string"):
        parse_path(3)
