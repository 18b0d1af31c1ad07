"""Benchmarks: zocalo-xrc against its peers, measured side by side in one run.

Each benchmark records its median under (suite, workload, contender); at the end
of the session the ratios peer / ours are printed per workload, and where a
workload has a floor contender (what any implementation must at least spend),
ours - floor. What a bench has to say (:func:`note`) is printed there too, not
amid the progress dots.

The session's RabbitMQ node keeps its data on tmpfs (``ZOCALO_XRC_BROKER_TMPFS``),
and a SIGTERM ends the session as Ctrl-C does (the root conftest): every
fixture's teardown runs, the node and the benches' service processes go.
"""

import os
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from scale import scaled

# numpy's BLAS threads spin on the second of two cores and disturb timings.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# The broker's disk is not what the benches measure (the root conftest's ``rabbit``).
os.environ.setdefault("ZOCALO_XRC_BROKER_TMPFS", "1")

# The scipy reference lives with the tests.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

MEDIANS: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
P99: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
NOTES: list[str] = []
OURS = "zocalo-xrc"
#: the contender that does only what any implementation must (benches/floor_xrc_service.py)
FLOOR = "floor (plain pika)"


@pytest.fixture(scope="session")
def note():
    """``note(line)``: a line for the end of the session's summary."""
    return NOTES.append


@pytest.fixture
def record(benchmark, request):
    """Run ``benchmark`` and keep its median for the ratio table."""

    def run(suite, workload, contender, fn, *args, rounds=None, setup=None, **kwargs):
        benchmark.group = f"{suite}: {workload}"
        benchmark.name = contender
        if rounds is not None:
            rounds = scaled(rounds)  # the quick mode's share (ZOCALO_XRC_BENCH_SCALE)
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
    tr = terminalreporter
    if NOTES:
        tr.section("zocalo-xrc benches: notes")
        for line in NOTES:
            tr.write_line(line)
        # timings on a shared machine mean little without how busy it was
        tr.write_line(f"load average at the end (1, 5, 15 min): {', '.join(f'{x:.1f}' for x in os.getloadavg())} "
                      f"on {os.cpu_count()} CPUs")
    if not MEDIANS:
        return
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
    floors = [(key, m) for key, m in MEDIANS.items() if FLOOR in m and OURS in m]
    if floors:
        tr.section("zocalo-xrc minus the floor (ours - floor: the service's own cost on top of the broker)")
    for (suite, workload), medians in floors:
        p99 = P99.get((suite, workload), {})
        tail = (f", p99 {(p99[OURS] - p99[FLOOR]) * 1e3:+.2f} ms (ours {p99[OURS] * 1e3:.2f}, floor {p99[FLOOR] * 1e3:.2f})"
                if OURS in p99 and FLOOR in p99 else ", p99: fewer than 100 rounds")
        tr.write_line(f"{suite} | {workload}: p50 {(medians[OURS] - medians[FLOOR]) * 1e3:+.2f} ms "
                      f"(ours {medians[OURS] * 1e3:.2f}, floor {medians[FLOOR] * 1e3:.2f}){tail}")
