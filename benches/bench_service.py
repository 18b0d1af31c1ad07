"""The X-ray centring service against Diamond's way of doing the same job, on
one private RabbitMQ broker, with the same messages, in one pytest run.

Contenders, each a process of its own consuming a queue declared as Diamond
declares it (quorum, single active consumer, delivery limit 5, dead-letter
to ``dlq.<queue>``) and sending results to ``xrc.<beamline>`` on the topic
exchange ``results``:

* ``zocalo-xrc``: ``python -m zocalo_xrc service --queue Q --broker URL --declare``;
* the peer (``peer_xrc_service.py``): a ``workflows`` ``CommonService`` doing
  what ``DLSXRayCentering`` does, under a ``workflows`` Frontend with a
  ``PikaTransport``, as ``zocalo.service`` runs it;
* the floor (``floor_xrc_service.py``): plain pika that only counts each
  group's messages and, on the last, publishes a dummy result and acks the
  group in one transaction: what any service must at least spend on this
  broker. Its results are checked only for being one per scan; ``ours -
  floor`` is printed at the end of the session.

The broker keeps its data on tmpfs (``benches/conftest.py``; the summary says so).

The per-image messages are what a ``workflows`` RecipeWrapper at GPU PIA's
step sends for the recipe of ``xrc-service.md`` §6 (``pia_messages.py``);
each round is a fresh scan with DCIDs of its own. Workloads (``xrc-service.md``
§5 has Diamond's numbers on this machine):

* ingest, 3D scans preloaded: the scans wait in the queue, the service is
  let at them (a bench consumer that was the queue's single active consumer
  goes away), time until every result is on ``xrc.<beamline>``, recorded per
  message (Diamond: ~450 messages/s). One scan (3,600 messages) for both;
  ten for ours only, where the broker's delivery from a quorum queue's
  backlog, not the service, is the limit;
* 3D 60x30+60x30 burst: all 3,600 images published as fast as the broker
  confirms them; from the last image's confirm to the result's arrival
  (Diamond: 6.5 s p50);
* 2D 20x10 burst: the same for a 2D scan's 200 images;
* 3D paced: all but the last image published and taken by the service (the
  queue empty and the service's processes idle), then the last image; from
  its publish to the result (Diamond: 0.23 s at 250 images/s). From the
  publish, not the confirm: a quorum queue can confirm a message after it
  has delivered it, so a fast service's result may "arrive before" the
  confirm;
* 2D 20x10 paced: the same for a 2D scan (Diamond: 22 ms p50, 45 ms p99).

Every result (but the floor's dummies) is checked: equal to the centring of
the same counts by the core, the same for ours and the peer, the bigger
crystal first; nothing aborted or dead-lettered, no result twice. Under ``--benchmark-disable`` (the default)
each contender runs each workload once.

Each round's interval is measured inside the round (from a publish or its
confirm, or from the moment the service may consume, to a result's arrival)
and handed to pytest-benchmark as that round's time through a timer the round
advances (:class:`Stopwatch`, named by pytest-benchmark's ``benchmark`` marker); ingest hands over the time per message.
"""

from __future__ import annotations

import os
import queue
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pika
import pytest

import pia_messages as pm
from scale import scaled
import zocalo_xrc as zx
from zocalo_xrc.messaging import QueueSpec
from zocalo_xrc.messaging.rabbitmq import AmqpTransport

SUITE = "xrc service"
OURS = "zocalo-xrc"
PEER = "workflows DLSXRayCentering"
FLOOR = "floor (plain pika)"  # benches/conftest.py prints ours - floor
BENCHES = Path(__file__).resolve().parent

# rounds with --benchmark-enable: the peer is slow, so it gets fewer; ours and the
# floor the same, at least 100 where a p99 is wanted
INGEST_ROUNDS = {(OURS, 1): 10, (FLOOR, 1): 10, (PEER, 1): 3, (OURS, 10): 1, (FLOOR, 10): 1}  # by 3D scans preloaded
BURST_3D_ROUNDS = {OURS: 100, FLOOR: 100, PEER: 2}
BURST_2D_ROUNDS = {OURS: 200, FLOOR: 200, PEER: 20}
PACED_3D_ROUNDS = {OURS: 100, FLOOR: 100, PEER: 2}
PACED_3D_BATCH = {OURS: 10, FLOOR: 10, PEER: 2}  # scans preloaded (all but their last image) at a time
PACED_2D_ROUNDS = {OURS: 200, FLOOR: 200, PEER: 100}
PACED_2D_BATCH = {OURS: 50, FLOOR: 50, PEER: 20}

#: every result of a workload, by contender (for ours == peer)
RESULTS: dict[str, dict[str, object]] = {}


# ---- expected results -------------------------------------------------------------------------


def _expected_3d() -> zx.XrcResults:
    xy, xz = pm.crystal_3d()
    grid = zx.GridInfo.from_ispyb(pm.GRIDINFO_3D)
    return zx.centre_3d(zx.reshape_grid(pm.acquisition_order(xy, pm.GRIDINFO_3D), grid),
                        zx.reshape_grid(pm.acquisition_order(xz, pm.GRIDINFO_3D), grid),
                        threshold=0.25, threshold_absolute=0, sample_id=pm.SAMPLE_ID)


def _expected_2d() -> tuple[zx.GridScan2DResult]:
    grid = zx.GridInfo.from_ispyb(pm.GRIDINFO_2D)
    return (zx.centre_2d(pm.acquisition_order(pm.crystal_2d(), pm.GRIDINFO_2D), grid, sample_id=pm.SAMPLE_ID),)


EXPECTED_3D = _expected_3d()
EXPECTED_2D = _expected_2d()


def test_the_synthetic_crystals_are_found():
    """The scans are not trivial: two crystals in 3D, the bigger first, each
    where it was put; one crystal in 2D."""
    assert len(EXPECTED_3D) == 2
    for result, (centre, _, _) in zip(EXPECTED_3D, pm.CRYSTALS_3D):
        assert all(abs(c - (e + 0.5)) < 0.6 for c, e in zip(result.centre_of_mass, centre))
    (r2,) = EXPECTED_2D
    assert r2.status == "ok"
    assert all(abs(c - (e + 0.5)) < 0.6 for c, e in zip(r2.centre_of_mass, pm.CRYSTAL_2D[0]))


def check(workload: str, contender: str, scan: pm.Scan, message: zx.ResultMessage) -> None:
    """The result of ``scan`` (every round's): the core's centring of the
    same counts, the same as the other contender's (the floor's: a dummy of
    the scan's kind)."""
    assert message.type == scan.kind and message.status == "success"
    assert message.dcid in scan.dcids
    if contender == FLOOR:
        return
    assert message.results == (EXPECTED_3D if scan.kind == "3d" else EXPECTED_2D)
    seen = RESULTS.setdefault(workload, {})
    seen.setdefault(contender, message.results)
    for other in seen.values():
        assert message.results == other


# ---- the timer -----------------------------------------------------------------------------------


class Stopwatch:
    """A pytest-benchmark timer that a round advances by the interval it
    measured itself: pytest-benchmark reads it before and after the round, so
    the round's recorded time is exactly what it added."""

    def __init__(self) -> None:
        self.now = 0.0

    def read(self) -> float:
        return self.now

    def add(self, seconds: float) -> None:
        self.now += seconds


#: the timer of the benches that measure their rounds themselves: pytest-benchmark's
#: ``benchmark`` marker names it (``@pytest.mark.benchmark(timer=STOPWATCH.read)``)
STOPWATCH = Stopwatch()
timed_by_the_round = pytest.mark.benchmark(timer=STOPWATCH.read)


@pytest.fixture
def stopwatch():
    """The round's stopwatch (the tests marked :data:`timed_by_the_round` are timed by it)."""
    return STOPWATCH


# ---- the contenders as processes ----------------------------------------------------------------


#: every service process started, stopped at the latest when its contender's tests end
STARTED: list[Service] = []


class Service:
    """One contender's service process (a process group of its own); with
    ``timings``, under ``timed_service.py``, which writes its timestamps there."""

    def __init__(self, contender: str, url: str, queue_name: str, log: Path, timings: Path | None = None) -> None:
        if contender == OURS:
            argv = [sys.executable, "-m", "zocalo_xrc", "service", "--queue", queue_name, "--broker", url,
                    "--declare", "--log-level", "WARNING"]
        else:
            module = "floor_xrc_service" if contender == FLOOR else "peer_xrc_service"
            argv = [sys.executable, "-m", module, "--broker", url, "--queue", queue_name]
        if timings is not None:
            argv = [sys.executable, "-m", "timed_service", str(timings), *argv[1:]]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCHES), str(BENCHES.parent / "tests"),
                                                            os.environ.get("PYTHONPATH", "")]),
               "OPENBLAS_NUM_THREADS": "1"}
        self.log, self.queue, self.contender = log, queue_name, contender
        self.children: list[int] = []
        with open(log, "ab") as out:
            self.process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        STARTED.append(self)

    def wait_consuming(self, timeout: float = 60.0) -> Service:
        """Until the service says it consumes its queue (on a single-active-consumer
        queue it may be waiting behind another consumer)."""
        marker = {OURS: b"X-ray centring service consuming", FLOOR: b"X-ray centring floor consuming",
                  PEER: b"X-ray centring peer consuming"}[self.contender]
        deadline = time.monotonic() + timeout
        while marker not in self.log.read_bytes():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"the service did not start consuming {self.queue}:\n{self.tail()}")
            time.sleep(0.02)
        self.children = self._tree()[0][1:]
        return self

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def alive(self) -> None:
        assert self.process.poll() is None, f"the service died:\n{self.tail()}"

    def _tree(self) -> tuple[list[int], int]:
        """The process and its descendants (a Frontend's service is a child),
        and their CPU time from the scheduler's nanosecond counters."""
        total, pids, seen = 0, [self.process.pid], []
        while pids:
            pid = pids.pop()
            try:
                tasks = os.listdir(f"/proc/{pid}/task")
            except FileNotFoundError:
                continue
            seen.append(pid)
            for tid in tasks:
                try:
                    total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
                    pids += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
                except (FileNotFoundError, ProcessLookupError, ValueError):
                    pass
        return seen, total

    def cpu_ns(self) -> int:
        return self._tree()[1]

    def wait_idle(self, quiet: float = 0.05, timeout: float = 120.0) -> None:
        """Until the processes have used (almost) no CPU for ``quiet`` seconds."""
        deadline = time.monotonic() + timeout
        tick = 0.01
        last, quiet_since = self.cpu_ns(), time.monotonic()
        while time.monotonic() - quiet_since < quiet:
            time.sleep(tick)
            now = self.cpu_ns()
            if now - last > 0.1 * tick * 1e9:  # more than 10% of a core: still working
                quiet_since = time.monotonic()
            last = now
            if time.monotonic() > deadline:
                raise AssertionError(f"the service never went idle:\n{self.tail()}")
        self.alive()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # a Frontend then ends its service
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)  # not yet reaped: the group is still ours
                self.process.wait(10)
        for pid in self.children:  # a Frontend's service, should it outlive its frontend
            try:
                if os.getpgid(pid) == self.process.pid:
                    os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class Results:
    """A plain consumer of ``xrc.<beamline>``: each result with the time it arrived."""

    def __init__(self, transport: AmqpTransport, name: str) -> None:
        self.arrived: queue.Queue[tuple[float, bytes]] = queue.Queue()

        def on_result(delivery) -> None:
            self.arrived.put((time.perf_counter(), delivery.body))
            delivery.ack()

        self.subscription = transport.subscribe(QueueSpec(name), on_result, prefetch=100)

    def wait(self, scans: list[pm.Scan], timeout: float = 120.0) -> tuple[float, list[zx.ResultMessage]]:
        """The result of each of ``scans``: when the last arrived, and the results in the order of ``scans``."""
        by_dcid = {d: k for k, s in enumerate(scans) for d in s.dcids}
        got: dict[int, zx.ResultMessage] = {}
        deadline = time.monotonic() + timeout
        last = 0.0
        while len(got) < len(scans):
            try:
                t, body = self.arrived.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"{len(scans) - len(got)} of {len(scans)} results never came") from None
            message = zx.parse_result_message(body)
            k = by_dcid.get(message.dcid)
            assert k is not None and k not in got, f"a result nobody waits for: DCID {message.dcid}"
            got[k], last = message, t
        return last, [got[k] for k in range(len(scans))]


def publish(amqp: AmqpTransport, messages: list[pm.Message]) -> float:
    """Publish (confirmed, all in flight at once); the time of the last confirm."""
    confirmed: list[float] = []

    def stamp(_f) -> None:
        confirmed.append(time.perf_counter())

    futures = []
    for m in messages:
        f = amqp.publish(m.exchange, m.routing_key, m.body, m.headers)
        f.add_done_callback(stamp)
        futures.append(f)
    for f in futures:
        f.result(60)
    return max(confirmed)


class Contender:
    """One contender's queues, results consumer and long-running service."""

    def __init__(self, name: str, rabbit_url: str, amqp: AmqpTransport, receiver: AmqpTransport,
                 logs: Path, timings: Path | None = None) -> None:
        tag = {OURS: "ours", FLOOR: "floor", PEER: "peer"}[name]
        unique = uuid.uuid4().hex[:6]
        self.name, self.url, self.amqp, self.logs, self.timings = name, rabbit_url, amqp, logs, timings
        self.beamline = f"bench{tag}{unique}"
        self.queue = f"reduce.xray_centering.gpu.bench-{tag}-{unique}"
        self.ingest_queue = f"{self.queue}.ingest"
        self.abort_queue = f"abort.{self.beamline}"
        for q in (self.queue, self.ingest_queue):
            amqp.declare_work_queue(q)
        amqp.declare_results_queue(f"xrc.{self.beamline}")
        amqp.declare_queue(self.abort_queue)
        self.results = Results(receiver, f"xrc.{self.beamline}")
        self.service = self.start(self.queue)

    def start(self, queue_name: str) -> Service:
        return Service(self.name, self.url, queue_name, self.logs / f"{queue_name}.{uuid.uuid4().hex[:6]}.log",
                       self.timings).wait_consuming()

    def scan_3d(self, queue_name: str | None = None) -> pm.Scan:
        return pm.scan_3d(pm.Offsets.take(), queue=queue_name or self.queue, beamline=self.beamline,
                          abort_queue=self.abort_queue)

    def scan_2d(self) -> pm.Scan:
        return pm.scan_2d(pm.Offsets.take(), queue=self.queue, beamline=self.beamline, abort_queue=self.abort_queue)

    def wait_taken(self, queue_name: str | None = None, quiet: float = 0.05) -> None:
        """Until the service has every message of its queue and is done with them."""
        q = queue_name or self.queue
        deadline = time.monotonic() + 120
        while self.amqp.message_count(q) > 0:
            assert time.monotonic() < deadline, f"the service does not take the messages of {q}"
            self.service.alive()
            time.sleep(0.01)
        self.service.wait_idle(quiet)

    def close(self) -> None:
        while STARTED:
            STARTED.pop().stop()
        self.results.subscription.cancel()
        extra = self.results.arrived.qsize()
        problems = {q: self.amqp.message_count(q) for q in (self.abort_queue, f"dlq.{self.queue}",
                                                             f"dlq.{self.ingest_queue}")}
        for q in (self.queue, self.ingest_queue, f"dlq.{self.queue}", f"dlq.{self.ingest_queue}",
                  f"xrc.{self.beamline}", f"dlq.xrc.{self.beamline}", self.abort_queue):
            self.amqp.delete_queue(q)
        assert not extra, f"{extra} result(s) nobody waited for (a result sent twice?)"
        assert not any(problems.values()), f"aborted or dead-lettered: {problems}"


# ---- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def amqp(rabbit, note):
    where = {True: "on tmpfs", False: "on disk", None: "wherever the external broker keeps it"}[rabbit.tmpfs]
    note(f"{SUITE}: the broker's data {where}" + (f" ({rabbit.base})" if rabbit.tmpfs is not None else ""))
    t = AmqpTransport(zx.ConnectionSettings.from_url(rabbit.url), connection_name="bench xrc service, publisher")
    yield t
    t.close()


@pytest.fixture(scope="module")
def receiver(rabbit):
    t = AmqpTransport(zx.ConnectionSettings.from_url(rabbit.url), connection_name="bench xrc service, results")
    yield t
    t.close()


@pytest.fixture(scope="module", params=[OURS, FLOOR, PEER])
def contender(request, rabbit, amqp, receiver, tmp_path_factory):
    c = Contender(request.param, rabbit.url, amqp, receiver, tmp_path_factory.mktemp("xrc-service-logs"))
    yield c
    c.close()


def rounds_of(benchmark, rounds: int) -> tuple[int, int]:
    """(rounds to ask ``record`` for, rounds it runs: the quick mode's share
    of them (:mod:`scale`) and its warm-up ones)."""
    if benchmark.disabled:
        return 1, 1
    return rounds, scaled(rounds) + min(20, scaled(rounds) // 10)


def summary(benchmark, note, workload: str, contender: Contender) -> None:
    """p50 and p99 (or the worst, with fewer than 100 rounds) of the rounds, in ms."""
    if benchmark.stats is None:
        return
    data = sorted(benchmark.stats.stats.data)
    p50 = statistics.median(data)
    tail = (f"p99 {statistics.quantiles(data, n=100)[98] * 1e3:.1f} ms" if len(data) >= 100
            else f"worst {data[-1] * 1e3:.1f} ms")
    note(f"{workload}, {contender.name}: p50 {p50 * 1e3:.1f} ms, {tail} ({len(data)} rounds)")


# ---- the workloads ---------------------------------------------------------------------------------------


@timed_by_the_round
@pytest.mark.parametrize("backlog", [1, 10], ids=["1 scan", "10 scans"])
def test_ingest_preloaded(record, benchmark, stopwatch, contender, amqp, note, backlog):
    """3D scans wait in the queue; the service is let at them; time per message
    until every result is in. One scan's backlog for both; ten for ours (where
    the broker's delivery from a quorum queue's backlog is the limit)."""
    if backlog > 1 and contender.name == PEER:
        pytest.skip("the peer (~1.6k messages/s, slower as a backlog goes on) would take 30 s or more a round; "
                    "one scan's backlog measures it")
    scans_per_round = min(backlog, 2) if benchmark.disabled else backlog
    n_messages = scans_per_round * 3600
    rounds, _ = rounds_of(benchmark, INGEST_ROUNDS[(contender.name, backlog)])
    q = contender.ingest_queue
    running: list[Service] = []
    rates: list[float] = []

    def setup():
        for s in running:
            s.stop()
        running.clear()
        # a bench consumer is the single active consumer; the service waits behind it
        blocker = pika.BlockingConnection(pika.URLParameters(contender.url))
        channel = blocker.channel()
        channel.basic_qos(prefetch_count=1)
        channel.basic_consume(q, lambda *_: None)
        running.append(contender.start(q))
        scans = [contender.scan_3d(q) for _ in range(scans_per_round)]
        publish(amqp, [m for s in scans for m in s.messages])
        return (blocker, scans), {}

    def ingest(blocker, scans):
        t0 = time.perf_counter()
        blocker.close()  # its one unacked message goes back; the service becomes the active consumer
        last, messages = contender.results.wait(scans)
        stopwatch.add((last - t0) / n_messages)
        rates.append(n_messages / (last - t0))
        for scan, message in zip(scans, messages):
            check("ingest", contender.name, scan, message)

    workload = f"ingest: {backlog} 3D scan{'s' if backlog > 1 else ''} preloaded ({backlog * 3600:,} msgs), per message"
    record(SUITE, workload, contender.name, ingest, rounds=rounds, setup=setup)
    for s in running:
        s.stop()
    rates = rates[-rounds:]  # not the warm-up round
    note(f"ingest, {n_messages:,} messages preloaded, {contender.name}: {statistics.median(rates):,.0f} "
                f"messages/s (median of {len(rates)} round(s))")


@timed_by_the_round
@pytest.mark.parametrize("kind", ["3D", "2D"])
def test_burst(kind, record, benchmark, stopwatch, contender, amqp, note):
    """All of a scan's images as fast as the broker takes them; from the last
    image's confirm to the result."""
    rounds_by, scan_of, workload = {
        "3D": (BURST_3D_ROUNDS, contender.scan_3d, "3D 60x30+60x30 burst: last image -> result"),
        "2D": (BURST_2D_ROUNDS, contender.scan_2d, "2D 20x10 burst: last image -> result"),
    }[kind]
    rounds, _ = rounds_of(benchmark, rounds_by[contender.name])

    def setup():
        return (scan_of(),), {}

    def burst(scan):
        confirmed = publish(amqp, scan.messages)
        arrived, (message,) = contender.results.wait([scan])
        stopwatch.add(arrived - confirmed)
        check(scan.kind, contender.name, scan, message)

    record(SUITE, workload, contender.name, burst, rounds=rounds, setup=setup)
    contender.service.alive()
    summary(benchmark, note, workload, contender)


class Paced:
    """Scans whose images but the last are preloaded and taken by the
    service, a batch at a time; each round publishes one scan's last image."""

    def __init__(self, contender: Contender, make, batch: int, total: int) -> None:
        self.contender, self.make, self.batch, self.left = contender, make, batch, total
        self.ready: list[pm.Scan] = []

    def setup(self):
        if not self.ready:
            self.ready = [self.make() for _ in range(max(1, min(self.batch, self.left)))]
            publish(self.contender.amqp, [m for s in self.ready for m in s.messages[:-1]])
            self.contender.wait_taken()
        else:
            self.contender.service.wait_idle(0.02)  # done with the previous round
        self.left -= 1
        return (self.ready.pop(0),), {}

    def last_image(self, stopwatch: Stopwatch):
        def run(scan):
            # from the publish, not its confirm: a quorum queue may confirm
            # after it has delivered (a fast result then "comes before" the confirm)
            published = time.perf_counter()
            publish(self.contender.amqp, [scan.last])
            arrived, (message,) = self.contender.results.wait([scan])
            stopwatch.add(arrived - published)
            check(scan.kind, self.contender.name, scan, message)

        return run


@timed_by_the_round
@pytest.mark.parametrize("kind", ["3D", "2D"])
def test_paced(kind, record, benchmark, stopwatch, contender, note):
    rounds_by, batch_by, scan, workload = {
        "3D": (PACED_3D_ROUNDS, PACED_3D_BATCH, contender.scan_3d, "3D paced: last image -> result"),
        "2D": (PACED_2D_ROUNDS, PACED_2D_BATCH, contender.scan_2d, "2D 20x10 paced: last image -> result"),
    }[kind]
    rounds, total = rounds_of(benchmark, rounds_by[contender.name])
    paced = Paced(contender, scan, batch_by[contender.name], total)
    record(SUITE, workload, contender.name, paced.last_image(stopwatch), rounds=rounds, setup=paced.setup)
    contender.service.alive()
    summary(benchmark, note, workload, contender)
