"""Command line: `python -m eqx_explorer demo`."""

from __future__ import annotations

import argparse
import sys

from ._codegen import STYLES


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
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--max-rows", type=int, default=80)
    demo.add_argument("--style", default="tree_at", choices=STYLES, help="code style")
    demo.set_defaults(run=_demo)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
