"""Where the milliseconds of ``bench_service.py``'s 3D workloads go: ours and
the floor, each under ``timed_service.py``, on the same broker (its data on
tmpfs), the same streams. Not collected with the benches; run it by name::

    pytest benches/profile_service.py -p no:cacheprovider

For each round it joins the bench's clock (the last image's confirm for a
burst, its publish when paced; the result's arrival) with the service's
timestamps (same clock: CLOCK_MONOTONIC) and prints, at the end of the
session, the median of each point of the way from the round's start, and of
each step's duration. ``PROFILE_ROUNDS`` rounds each (default 40).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import pytest

import bench_service as bs
from bench_service import amqp, receiver  # noqa: F401 (fixtures)

ROUNDS = int(os.environ.get("PROFILE_ROUNDS", "40"))

#: the marks on the way, in order: (name, the timed service's step, its start (0) or end (1))
MARKS = [("the service wakes up", "its wake-up", 0), ("reads the socket", "its read", 0),
         ("pika hands over the delivery", "last delivery", 0), ("on_message", "on_message", 0),
         ("PiaMessage.parse", "PiaMessage.parse", 0), ("parsed", "PiaMessage.parse", 1),
         ("Assembly.add done", "Assembly.add", 1), ("_complete", "_complete", 0), ("centred", "centre", 1),
         ("_payload done", "_payload", 1), ("Envelope.send done", "Envelope.send", 1),
         ("_write_2d_files done", "_write_2d_files", 1), ("Subscription.commit", "Subscription.commit", 0),
         ("_commit (frames)", "_commit (frames)", 0), ("basic_publish of the result", "result published", 0),
         ("published", "result published", 1), ("basic_ack(s)", "acks", 0), ("acked", "acks", 1),
         ("tx.commit called", "tx.commit called", 0), ("_commit returned", "_commit (frames)", 1),
         ("_complete returned", "_complete", 1), ("on_message returned", "on_message", 1),
         ("pika's delivery returned", "last delivery", 1), ("tx.commit written to the socket", "tx.commit written", 0),
         ("tx.commit-ok read", "tx.commit-ok", 0)]


@pytest.fixture(scope="module", params=[bs.OURS, bs.FLOOR])
def timed(request, rabbit, amqp, receiver, tmp_path_factory):
    path = tmp_path_factory.mktemp("timings") / "timings.jsonl"
    c = bs.Contender(request.param, rabbit.url, amqp, receiver, tmp_path_factory.mktemp("logs"), timings=path)
    yield c
    c.close()


def rounds_of(contender: bs.Contender, workload: str) -> list[tuple[int, float, float]]:
    """(lower DCID, the round's start, the result's arrival) for each round of ``workload``."""
    out = []
    if workload == "3D burst":
        for _ in range(ROUNDS + 3):
            scan = contender.scan_3d()
            start = bs.publish(contender.amqp, scan.messages)
            arrived, _ = contender.results.wait([scan])
            out.append((scan.dcids[0], start, arrived))
            contender.service.wait_idle(0.02)
    else:
        make = contender.scan_3d if workload == "3D paced" else contender.scan_2d
        batch = 10 if workload == "3D paced" else 50
        paced = bs.Paced(contender, make, batch, ROUNDS + 3)
        for _ in range(ROUNDS + 3):
            (scan,), _ = paced.setup()
            start = time.perf_counter()
            bs.publish(contender.amqp, [scan.last])
            arrived, _ = contender.results.wait([scan])
            out.append((scan.dcids[0], start, arrived))
    return out[3:]  # not the first rounds: warm-up


def describe(contender: bs.Contender, workload: str, rounds: list[tuple[int, float, float]]) -> list[str]:
    records = {}
    for line in Path(contender.timings).read_text().splitlines():  # type: ignore[arg-type]
        r = json.loads(line)
        records[r["dcid"]] = r
    joined = [(records[d], start, arrived) for d, start, arrived in rounds if d in records]
    origin = "the last image's confirm" if "burst" in workload else "the last image's publish"
    segments: dict[tuple[str, str], list[float]] = {}
    for r, start, arrived in joined:
        marks = [(origin, start)] + [(name, r[step][k]) for name, step, k in MARKS if step in r]
        marks.append(("result arrived at the bench", arrived))
        for (a, ta), (b, tb) in zip(marks, marks[1:]):
            segments.setdefault((a, b), []).append((tb - ta) * 1e3)
    total = [(a - s) * 1e3 for _, s, a in joined]
    lines = [f"{workload}, {contender.name}: {len(joined)} rounds, {origin} -> the result: median {statistics.median(total):.2f} ms; "
             "each step's median (p90), ms:"]
    for (a, b), ms in segments.items():
        if len(ms) >= len(joined) // 2:
            ms.sort()
            lines.append(f"    {a:>30} -> {b:<32} {statistics.median(ms):8.3f} ({ms[int(0.9 * (len(ms) - 1))]:.3f})")
    messages = statistics.median(r["messages"] for r, _, _ in joined)
    inside = statistics.median(r["inside deliveries"] * 1e3 for r, _, _ in joined)
    lines.append(f"    deliveries since the previous commit: {messages:.0f}, {inside:.2f} ms inside them "
                 f"({inside / max(messages, 1) * 1e3:.1f} µs each)")

    def collections(r: dict, since: float, until: float) -> tuple[float, list[int]]:
        hits = [(t1 - t0, g) for t0, t1, g in r.get("gc", []) if since <= t0 <= until]
        return sum(d for d, _ in hits) * 1e3, [g for _, g in hits]

    on_path = [collections(r, r["its read"][0], r.get("tx.commit written", r["tx.commit called"])[0])
               for r, _, _ in joined if "its read" in r]
    whole = [collections(r, r.get("first delivery", [0])[0], r["tx.commit-ok"][0]) for r, _, _ in joined]
    gens = sorted({g for _, gs in on_path for g in gs})
    lines.append(f"    gc between the last read and the write of tx.commit: median {statistics.median(d for d, _ in on_path):.3f} ms, "
                 f"worst {max(d for d, _ in on_path):.3f} ms, in {sum(1 for d, _ in on_path if d)} of {len(on_path)} rounds "
                 f"(generations {gens}); over the round: median {statistics.median(d for d, _ in whole):.3f} ms")
    return lines


@pytest.mark.parametrize("workload", ["3D burst", "3D paced", "2D paced"])
def test_where_the_time_goes(timed, workload, note):
    for line in describe(timed, workload, rounds_of(timed, workload)):
        note(line)
