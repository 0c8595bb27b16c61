import subprocess
import sys

import jax
import jax.tree_util as jtu
import pytest

from eqx_explorer import FilterSpec
from eqx_explorer.__main__ import main
from eqx_explorer._examples import example_model


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "eqx_explorer", *args], capture_output=True, text=True, timeout=300
    )


def test_demo_prints_summary_and_runnable_code():
    out = cli("demo", "--style", "path")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "trainable params: 3,329 || all params: 6,913" in text
    assert "blocks[0].attn" in text and "frozen" in text
    code = text.split("code pane):\n", 1)[1]
    model = example_model(jax.random.key(0))
    ns = {"model": model}
    exec(code, ns)
    expected = FilterSpec(model).freeze("embed", "blocks[*].attn").tree
    assert jtu.tree_leaves(ns["filter_spec"]) == jtu.tree_leaves(expected)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["demo", "--seed", "99999999999999999999999"],
            "--seed: '99999999999999999999999' is not a seed",
        ),
        (["demo", "--seed", "-1"], "is not a seed (an int from 0 to 4,294,967,295)"),
        (["demo", "--seed", "x" * 5000], "--seed: 'xxxxxxxxxxxxxxxx"),
        (["demo", "--max-rows", "-5"], "--max-rows: '-5' is not a row count"),
        (["demo", "--max-rows", "five"], "--max-rows: 'five' is not a row count"),
        (["demo", "--style", "nope"], "--style: invalid choice: 'nope' (choose from tree_at, "),
        (["demo", "--style", "x" * 5000], "invalid choice: 'xxxxxxxxxx"),
        (["nope"], "invalid choice: 'nope'"),
        ([], "the following arguments are required: command"),
    ],
)
def test_bad_arguments_are_a_usage_error_with_exit_code_2_never_a_traceback(args, expected, capsys):
    # In process: argparse exits with SystemExit(2) before any work (the demo test above runs
    # the real `python -m`); any other exception, a traceback in a shell, fails pytest.raises.
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and expected in err
    assert len(err) < 1_000  # long arguments are quoted shortened
