"""Run every `benchmarks/bench_*.py` (each has `main() -> rows`) and print one table of ratios.

`make bench` runs this. Each row measures ours and a baseline side by side in the same run.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def print_table(rows: list[dict]) -> None:
    header = f"{'benchmark':<64} {'ours (s)':>10} {'baseline (s)':>12} {'ratio':>9}  target"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['benchmark']:<64} {r['ours']:>10.4g} {r['baseline']:>12.4g} "
            f"{r['ratio']:>9.3g}  {r.get('target', '')}"
        )


def main(names: list[str]) -> None:
    sys.path.insert(0, str(HERE))
    scripts = sorted(HERE.glob("bench_*.py"))
    if names:
        scripts = [s for s in scripts if s.stem in names or s.stem.removeprefix("bench_") in names]
    for script in scripts:
        print(f"\n== {script.name}")
        print_table(importlib.import_module(script.stem).main())


if __name__ == "__main__":
    main(sys.argv[1:])
