import jax.tree_util as jtu
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eqx_explorer import ExplorerError, format_path, parse_path
from eqx_explorer._paths import STAR, STARSTAR, is_glob

identifiers = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)
literal_keys = st.one_of(
    st.text(max_size=8),  # quotes, backslashes, newlines, unicode
    st.integers(-1000, 1000),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.none(),
    st.binary(max_size=4),
    st.tuples(st.integers(0, 9), st.text(max_size=3)),
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
