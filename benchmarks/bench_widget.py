"""Explorer widget build vs `treescope.render_to_html`, and the Python-side cost of one toggle.

Run: `python benchmarks/bench_widget.py` (or `python benchmarks/run_all.py widget`).
Targets at 10,000 leaves: building the widget (node table, states, code, and the JSON of its
synced state with its binary buffers split off, i.e. what the kernel sends when it is
displayed) is >= 10x faster than treescope's render of the same model, and >= 50x with an
optimizer given (issue 13); the optimizer costs <= 1.1x the build without one (its state is
measured on one array per leaf kind); one checkbox toggle (message validation, new spec,
state codes, counts, code export) costs <= 5% of the build.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _models import best_of, stack_model  # noqa: E402

SIZES = (1_000, 10_000)


def _build(model, optimizer=None):
    from ipywidgets.widgets.widget import _remove_buffers

    from eqx_explorer._widget import Explorer

    widget = Explorer(model, optimizer=optimizer)
    state, _, _ = _remove_buffers(widget.get_state())
    json.dumps(state)
    return widget


def _interleaved_best(fns, repeat: int) -> list[float]:
    """Best wall time of each of `fns`, called in turn `repeat` times."""
    times = [[] for _ in fns]
    for _ in range(repeat):
        for fn, out in zip(fns, times):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return [min(t) for t in times]


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
    import optax
    import treescope

    rows = []
    for n in sizes:
        model = stack_model(n)
        # Interleaved, so that a busy machine slows both alike.
        build, with_opt = _interleaved_best(
            [lambda m=model: _build(m), lambda m=model: _build(m, optax.adamw(1e-3))], repeat=5
        )
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
        rows += [
            {
                "benchmark": f"build widget with optax.adamw vs treescope render, {n:,} leaves",
                "ours": with_opt,
                "baseline": render,
                "ratio": render / with_opt,
                "target": ">= 50 (at 10,000)" if n == 10_000 else "",
            },
            {
                "benchmark": f"build widget with optax.adamw / without, {n:,} leaves",
                "ours": with_opt,
                "baseline": build,
                "ratio": with_opt / build,
                "target": "<= 1.1" if n == 10_000 else "",
            },
        ]
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
