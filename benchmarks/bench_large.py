"""A 50,000-leaf model (a deep stack of small blocks): widget build, toggle and code export,
each as a ratio to `treescope.render_to_html` of the same model, measured in the same run.

Run: `python benchmarks/bench_large.py` (or `python benchmarks/run_all.py large`).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _models import best_of, stack_model  # noqa: E402
from bench_widget import _build, _toggle_cost  # noqa: E402

N_LEAVES = 50_000


def main(n: int = N_LEAVES) -> list[dict]:
    import treescope

    model = stack_model(n)
    render = best_of(lambda: treescope.render_to_html(model), repeat=1)
    build = best_of(lambda: _build(model), repeat=2)
    widget = _build(model)
    widget.send = lambda content, buffers=None: None  # no kernel: drop the messages
    middle = f"blocks[{len(model.blocks) // 2}]"
    toggle = _toggle_cost(widget, middle, repeat=10)
    spec = widget.spec
    rows = [
        ("build widget", build),
        ("toggle one block (message, spec, delta, code)", toggle),
    ]
    for style in ("tree_at", "path", "train_step"):
        seconds = best_of(lambda s=style: spec.to_code(s), repeat=3)
        lines = spec.to_code(style).count("\n")
        rows.append((f"export {style} ({lines} lines)", seconds))
    return [
        {
            "benchmark": f"{what}, {n:,} leaves, vs treescope render",
            "ours": seconds,
            "baseline": render,
            "ratio": render / seconds,
            "target": "x faster",
        }
        for what, seconds in rows
    ]


if __name__ == "__main__":
    from run_all import print_table

    print_table(main())
