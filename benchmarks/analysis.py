"""Speed of the relational analyzer: lattice, compare, landscape and explore, against anchors measured in this run.

    python benchmarks/analysis.py [--repeats 3] [--sample 300]

Anchors: ``python -c "import sympy"`` (a subprocess, as for the CLI benchmark) and a SymPy brute force of the
three-atom landscape — ``cancel(WMC(✓)/WMC(✗))`` on a random sample of structures, extrapolated to all 65 025.
Targets: full-catalog lattice ≤ 1 s, landscape N = 2 ≤ 1 s, landscape N = 3 ≤ 10 s, ``dpalogic landscape --atoms 4``
≤ 2 s in a cold process.
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def wall(cmd: list[str], repeats: int) -> float:
    return best_of(lambda: subprocess.run(cmd, check=True, capture_output=True), repeats)


def sympy_landscape_per_structure(sample: int) -> float:
    """Seconds per structure for the SymPy brute force: expand WMCs world by world, ``cancel``, normalise."""
    import sympy

    xs = sympy.symbols("x0:3", positive=True)

    def wmc(mask: int) -> sympy.Expr:
        total = sympy.Integer(0)
        for w in range(8):
            if (mask >> w) & 1:
                total += sympy.Mul(*(xs[i] if (w >> i) & 1 else 1 - xs[i] for i in range(3)))
        return sympy.expand(total)

    rng = random.Random(0)
    pairs = [(rng.randrange(1, 256), rng.randrange(1, 256)) for _ in range(sample)]
    t = time.perf_counter()
    keys = set()
    for top, bottom in pairs:
        num, den = sympy.fraction(sympy.cancel(wmc(top) / wmc(bottom)))
        pd = sympy.Poly(den, *xs, domain="QQ")
        keys.add((sympy.Poly(num, *xs, domain="QQ").quo_ground(pd.LC()), pd.quo_ground(pd.LC())))
    return (time.perf_counter() - t) / sample


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sample", type=int, default=300, help="structures for the SymPy brute-force anchor")
    args = ap.parse_args()
    r = args.repeats

    anchor = wall([sys.executable, "-c", "import sympy"], r)
    per_structure = sympy_landscape_per_structure(args.sample)
    sympy_n3 = per_structure * 255 * 255

    from dpalogic.analysis.landscape import explore, loss_classes
    from dpalogic.analysis.lattice import build_lattice
    from dpalogic.analysis.order import compare
    from dpalogic.semantics.catalog import entries

    build_lattice()  # warm the catalog and the readable-formula caches once; then time the warm builds
    lattice_s = best_of(build_lattice, r)
    with tempfile.TemporaryDirectory() as tmp:
        cli_lattice = wall([sys.executable, "-m", "dpalogic", "lattice", "--json"], r)
        cli_svg = wall([sys.executable, "-m", "dpalogic", "lattice", "--out", str(Path(tmp) / "l.svg")], r)
        cli_n3 = wall([sys.executable, "-m", "dpalogic", "landscape", "--atoms", "3", "--json"], r)
        cli_n4 = wall([sys.executable, "-m", "dpalogic", "landscape", "--atoms", "4", "--json"], r)

    programs = {name: e.program for name, e in entries().items()}
    pairs = list(itertools.combinations(programs, 2))
    compare_s = best_of(lambda: [compare(programs[a], programs[b], a, b) for a, b in pairs], r)

    from dpalogic.analysis import factoring
    from dpalogic.analysis.landscape import landscape

    factored = {n: best_of(lambda n=n: landscape(n, examples=0), r) for n in (3, 4, 8)}
    n2 = best_of(lambda: loss_classes(2), r)
    n3 = best_of(lambda: loss_classes(3), r)
    count2 = len(loss_classes(2)[0])
    explore_s = best_of(lambda: explore("ceunl", "ccpo"), r)
    explore_ref = best_of(lambda: explore("ceunl", "ccpo", atoms=["Ref(yw)", "Ref(yl)"], distinct=True), r)

    rows = [
        ("python -c 'import sympy' (anchor)", anchor, "", anchor),
        (f"SymPy cancel landscape N=3 (anchor, {args.sample} sampled, extrapolated)", sympy_n3, "", sympy_n3),
        ("build_lattice(): full catalog, warm", lattice_s, "≤ 1 s", anchor),
        ("dpalogic lattice --json (cold process)", cli_lattice, "≤ 1 s + start", anchor),
        ("dpalogic lattice --out l.svg (cold process)", cli_svg, "", anchor),
        (f"compare every catalog pair ({len(pairs)} pairs)", compare_s, "", anchor),
        (f"landscape N=2 ({count2} loss functions)", n2, "≤ 1 s", anchor),
        ("dpalogic landscape --atoms 3 (cold process)", cli_n3, "≤ 10 s", sympy_n3),
        ("enumeration: loss_classes(3), the tests' independent check", n3, "", sympy_n3),
        ("landscape N=3 by factoring, in process", factored[3], "", sympy_n3),
        (f"landscape N=4 by factoring ({factoring.loss_function_count(4)} loss functions)", factored[4], "", anchor),
        ("dpalogic landscape --atoms 4 (cold process)", cli_n4, "≤ 2 s", anchor),
        ("landscape N=8 by factoring, in process", factored[8], "", anchor),
        ("explore ceunl … ccpo (6 structures, closed forms)", explore_s, "", anchor),
        ("explore ceunl … ccpo over +Ref(yw), Ref(yl), --distinct (4094)", explore_ref, "", anchor),
    ]
    print(f"{'task':<72} {'seconds':>10} {'target':>14} {'× anchor':>10}  anchor")
    for name, secs, target, ref in rows:
        which = "import sympy" if ref is anchor else "SymPy N=3"
        print(f"{name:<72} {secs:10.4f} {target:>14} {secs / ref:10.4f}  {which}")
    print(f"\nper catalog pair: {1000 * compare_s / len(pairs):.2f} ms; SymPy brute force: {1000 * per_structure:.2f} ms "
          f"per structure; landscape N=3: {1e6 * n3 / 65025:.2f} µs per structure")  # fmt: skip


if __name__ == "__main__":
    main()
