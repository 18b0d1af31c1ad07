"""Benchmarks: zocalo-xrc against its peers, measured side by side in one run.

Each benchmark records its median under (suite, workload, contender); at the end
of the session the ratios peer / ours are printed per workload.
"""

import os
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import pytest

# numpy's BLAS threads spin on the second of two cores and disturb timings.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# The scipy reference lives with the tests.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

MEDIANS: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
P99: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
OURS = "zocalo-xrc"


@pytest.fixture
def record(benchmark, request):
    """Run ``benchmark`` and keep its median for the ratio table."""

    def run(suite, workload, contender, fn, *args, rounds=None, setup=None, **kwargs):
        benchmark.group = f"{suite}: {workload}"
        benchmark.name = contender
        if rounds is None:
            result = benchmark(fn, *args, **kwargs)
        else:
            if setup is not None:
                result = benchmark.pedantic(fn, setup=setup, rounds=rounds, warmup_rounds=min(20, rounds // 10))
            else:
                result = benchmark.pedantic(fn, args=args, kwargs=kwargs, rounds=rounds, iterations=1, warmup_rounds=0)
        if benchmark.stats is not None:  # None under --benchmark-disable
            stats = benchmark.stats.stats
            MEDIANS[(suite, workload)][contender] = stats.median
            if len(stats.data) >= 100:
                P99[(suite, workload)][contender] = statistics.quantiles(stats.data, n=100)[98]
        return result

    return run


def pytest_terminal_summary(terminalreporter):
    if not MEDIANS:
        return
    tr = terminalreporter
    tr.section("zocalo-xrc ratios (peer median / zocalo-xrc median; higher is better for us)")
    for (suite, workload), medians in MEDIANS.items():
        ours = medians.get(OURS)
        if ours is None:
            continue
        peers = {k: v for k, v in medians.items() if k != OURS}
        parts = [f"{name} {t / ours:,.1f}x" for name, t in sorted(peers.items(), key=lambda kv: kv[1])]
        tr.write_line(f"{suite} | {workload}: ours {ours * 1e3:.3f} ms" + "".join(f"; {part}" for part in parts))
        p99 = P99.get((suite, workload), {})
        if OURS in p99:
            others = "".join(f"; {k} {v * 1e3:.3f} ms ({v / p99[OURS]:,.1f}x)" for k, v in p99.items() if k != OURS)
            tr.write_line(f"    p99: ours {p99[OURS] * 1e3:.3f} ms{others}")
