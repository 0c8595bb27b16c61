"""ModelTree + FilterSpec build vs `treescope.render_to_html`, and the cost of one freeze.

Run: `python benchmarks/bench_tree.py` (or `make bench` for every benchmark).
Targets: at 10,000 leaves our build is >= 10x faster than treescope's render, and freezing one
block costs <= 5% of a full build. Bad paths: an unknown path, or a number in a key, 10x
longer takes <= 20x longer (linear: 10x; quadratic, as the lookup and number scan they
replaced: 100x), and a 1 MB glob is refused without being parsed: <= 100x a 4-character
unknown path (hashing the text once; the issue's bound is 1 s).
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
    return rows + bad_paths()


def _error_time(fn, repeat: int = 3) -> float:
    from eqx_explorer import ExplorerError

    def call():
        try:
            fn()
        except ExplorerError:
            return
        raise AssertionError("expected an ExplorerError")

    return best_of(call, repeat=repeat)


def bad_paths() -> list[dict]:
    from eqx_explorer import FilterSpec

    spec = FilterSpec(stack_model(100))
    short, long = (_error_time(lambda k=k: spec.freeze("blocks" + "[0]" * k)) for k in (300, 3_000))
    tiny = _error_time(lambda: spec.freeze("nope"), repeat=20)
    huge = _error_time(lambda: spec.freeze("*" * 1_000_000))
    digits = [
        _error_time(lambda k=k: spec.freeze("blocks[" + "9" * k + "x]")) for k in (900, 9_000)
    ]
    return [
        {
            "benchmark": "a key of 9,000 digits then a letter / of 900 (number scan)",
            "ours": digits[1],
            "baseline": digits[0],
            "ratio": digits[1] / digits[0],
            "target": "<= 20",
        },
        {
            "benchmark": "unknown path of 3,000 keys (9 KB) / of 300 keys (0.9 KB)",
            "ours": long,
            "baseline": short,
            "ratio": long / short,
            "target": "<= 20",
        },
        {
            "benchmark": "a 1 MB glob refused / a short unknown path",
            "ours": huge,
            "baseline": tiny,
            "ratio": huge / tiny,
            "target": "<= 100",
        },
    ]


if __name__ == "__main__":
    from run_all import print_table

    print_table(main())
