"""Command line: `python -m eqx_explorer demo`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from ._codegen import STYLES
from ._errors import shorten


def _int_in(lo: int, hi: int, what: str) -> Callable[[str], int]:
    """An argparse type: an int in `[lo, hi]`, else a usage error (exit code 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text) if len(text) <= 30 else None
        except ValueError:
            value = None
        if value is None or not lo <= value <= hi:
            raise argparse.ArgumentTypeError(
                f"{shorten(text, 40)!r} is not {what} (an int from {lo:,} to {hi:,})"
            )
        return value

    return parse


def _style(text: str) -> str:
    """An argparse type: a code style (argparse's `choices` would quote a long value whole)."""
    if text not in STYLES:
        raise argparse.ArgumentTypeError(
            f"invalid choice: {shorten(text, 40)!r} (choose from {', '.join(STYLES)})"
        )
    return text


def _demo(args: argparse.Namespace) -> int:
    import jax

    from ._examples import example_model
    from ._spec import FilterSpec
    from ._summary import summary

    model = example_model(jax.random.key(args.seed))
    spec = FilterSpec(model).freeze("embed", "blocks[*].attn")
    print("Example: a TinyTransformer with its embedding and every attention layer frozen\n")
    print(summary(model, spec, max_rows=args.max_rows))
    print(f"\nThe filter spec as code (style {args.style!r}; the widget's code pane):\n")
    print(spec.to_code(args.style))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eqx_explorer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="print the summary and exported spec of an example model")
    # jax.random.key takes a seed that fits in 32 bits.
    demo.add_argument("--seed", type=_int_in(0, 2**32 - 1, "a seed"), default=0)
    demo.add_argument("--max-rows", type=_int_in(1, 10**6, "a row count"), default=80)
    demo.add_argument(
        "--style", default="tree_at", type=_style, help=f"code style: {', '.join(STYLES)}"
    )
    demo.set_defaults(run=_demo)
    args = parser.parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
