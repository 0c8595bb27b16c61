"""ModelTree + FilterSpec build vs `treescope.render_to_html`, and the cost of one freeze.

Run: `python benchmarks/bench_tree.py` (or `make bench` for every benchmark).
Targets: at 10,000 leaves our build is >= 10x faster than treescope's render, and freezing one
block costs <= 5% of a full build.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _models import best_of, stack_model  # noqa: E402

SIZES = (100, 1_000, 10_000, 50_000)


def main(sizes=SIZES) -> list[dict]:
    import treescope

    from eqx_explorer import FilterSpec

    rows = []
    for n in sizes:
        model = stack_model(n)
        build = best_of(lambda m=model: FilterSpec(m), repeat=3 if n <= 10_000 else 1)
        render = best_of(lambda m=model: treescope.render_to_html(m), repeat=1)
        rows.append(
            {
                "benchmark": f"build tree+spec vs treescope.render_to_html, {n:,} leaves",
                "ours": build,
                "baseline": render,
                "ratio": render / build,
                "target": ">= 10 (at 10,000)" if n == 10_000 else "",
            }
        )
        spec = FilterSpec(model)
        middle = f"blocks[{len(model.blocks) // 2}]"
        freeze = best_of(lambda s=spec, p=middle: s.freeze(p).node_state(0), repeat=20)
        rows.append(
            {
                "benchmark": f"freeze one block / full build, {n:,} leaves",
                "ours": freeze,
                "baseline": build,
                "ratio": freeze / build,
                "target": "<= 0.05" if n == 10_000 else "",
            }
        )
    return rows


if __name__ == "__main__":
    from run_all import print_table

    print_table(main())
