"""Start-up and derive speed of the symbolic commands.

    python benchmarks/cli.py [--repeats 5]

Prints (1) the cold start of ``dpalogic derive`` against the anchor ``python -c "import sympy"``, measured side by
side, as a ratio; (2) the warm time of ``derive`` for every catalog structure (targets: cold ≤ 0.8 s, warm ≤ 50 ms).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def wall(cmd: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    anchor = wall([sys.executable, "-c", "import sympy"], args.repeats)
    cold = wall([sys.executable, "-m", "dpalogic", "derive", "M(yl) -> M(yw)", "--json"], args.repeats)
    cold_show = wall([sys.executable, "-m", "dpalogic", "show", "dpo", "--json"], args.repeats)
    print(f"{'command':<40} {'median s':>9} {'× import sympy':>15}")
    print(f"{'python -c import sympy (anchor)':<40} {anchor:9.3f} {1.0:15.2f}")
    print(f"{'dpalogic derive (cold, target ≤ 0.8 s)':<40} {cold:9.3f} {cold / anchor:15.2f}")
    print(f"{'dpalogic show dpo (cold)':<40} {cold_show:9.3f} {cold_show / anchor:15.2f}")

    from dpalogic.cli.derive import derive
    from dpalogic.semantics.catalog import entries

    print()
    print(f"{'catalog structure':<16} {'warm derive ms (target ≤ 50)':>30}")
    worst = 0.0
    for name, e in entries().items():
        s = e.program.structure
        if s is None:
            continue
        text = s.text("ascii")
        derive(text)  # warm the caches
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            derive(text)
            times.append(time.perf_counter() - t)
        ms = 1000 * statistics.median(times)
        worst = max(worst, ms)
        print(f"{name:<16} {ms:30.2f}")
    print(f"{'worst':<16} {worst:30.2f}")


if __name__ == "__main__":
    main()
