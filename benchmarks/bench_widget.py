"""Explorer widget build vs `treescope.render_to_html`, and the Python-side cost of one toggle.

Run: `python benchmarks/bench_widget.py` (or `python benchmarks/run_all.py widget`).
Targets at 10,000 leaves: building the widget (node table, states, code, and the JSON of its
synced state, i.e. what the kernel sends when it is displayed) is >= 10x faster than
treescope's render of the same model, and one checkbox toggle (message validation, new spec,
state delta, counts, code export) costs <= 5% of that build.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _models import best_of, stack_model  # noqa: E402

SIZES = (1_000, 10_000)


def _build(model):
    from eqx_explorer._widget import Explorer

    widget = Explorer(model)
    json.dumps(widget.get_state())
    return widget


def _toggle_cost(widget, path: str, repeat: int) -> float:
    """Best time of one freeze toggle of `path`, each from the same starting spec."""
    start = widget.spec
    msg = {"type": "toggle", "path": path, "frozen": True}

    times = []
    for _ in range(repeat):
        widget.spec = start
        begin = time.perf_counter()
        widget._handle_message(msg)
        times.append(time.perf_counter() - begin)
    assert widget.error == "", widget.error
    return min(times)


def main(sizes=SIZES) -> list[dict]:
    import treescope

    rows = []
    for n in sizes:
        model = stack_model(n)
        build = best_of(lambda m=model: _build(m), repeat=3)
        render = best_of(lambda m=model: treescope.render_to_html(m), repeat=1)
        widget = _build(model)
        table = widget._table
        per_node = len(json.dumps(table, separators=(",", ":"))) / table["n"]
        rows.append(
            {
                "benchmark": f"build widget vs treescope.render_to_html, {n:,} leaves "
                f"({per_node:.0f} B/node)",
                "ours": build,
                "baseline": render,
                "ratio": render / build,
                "target": ">= 10 (at 10,000)" if n == 10_000 else "",
            }
        )
        widget.send = lambda content, buffers=None: None  # no kernel: drop the messages
        middle = f"blocks[{len(model.blocks) // 2}]"
        for path, what in ((middle, "one block"), ("blocks", "all blocks")):
            toggle = _toggle_cost(widget, path, repeat=20)
            rows.append(
                {
                    "benchmark": f"toggle {what} / widget build, {n:,} leaves",
                    "ours": toggle,
                    "baseline": build,
                    "ratio": toggle / build,
                    "target": "<= 0.05" if n == 10_000 else "",
                }
            )
    return rows


if __name__ == "__main__":
    from run_all import print_table

    print_table(main())
