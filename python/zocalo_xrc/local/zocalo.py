"""Local Zocalo: the whole loop from trigger to result, on one machine.

::

    beamline --processing_recipe--> Dispatcher (zocalo's, ISPyB filters) --> Mimas
    Mimas --processing_recipe--> Dispatcher --> per-image analysis (GPU at start / CPU at end; from pixels or simulated)
      --> X-ray centring (this project's service) --results exchange, xrc.<beamline>--> beamline

Every part is a ``workflows`` service configured by one zocalo configuration
(environment ``local``): recipe directory, logbook, the local settings and,
on RabbitMQ, the broker. :class:`LocalZocalo` runs them

* in threads of this process, on the in-process broker (the default) or on
  RabbitMQ, each through its own workflows transport; or
* as separate ``zocalo.service -s NAME -e local`` processes on RabbitMQ
  (``processes=True``; what ``zocalo-xrc local up`` does), restarted if they die.

ISPyB is the ``ispyb`` package's schema on SQLite (the default, a file in the
state directory) or any SQLAlchemy URL (MariaDB).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..messaging import ConfigurationError, ConnectionSettings, InProcessBroker, Transport, TransportError
from ..messaging.config import looks_like_url
from . import ispyb
from .detector import SimulatedDetector
from .logbook import Logbook
from .scan import Scan, check_name
from .settings import Settings

log = logging.getLogger("zocalo_xrc.local")

ENVIRONMENT = "local"
#: queues the services listen on (and the abort step's)
SERVICE_QUEUES = ("processing_recipe", "mimas", "filewatcher", "per_image_analysis", "per_image_analysis.gpu",
                  "reduce.xray_centering", "reduce.xray_centering.gpu", "xrc.abort")
#: queues workers share (Diamond's per-image analysis workers, on any number of machines); the others
#: have a single active consumer at a time, as Diamond's X-ray centring queues
SHARED_QUEUES = ("filewatcher", "per_image_analysis")
#: broadcasts every workflows frontend uses: commands in, status out
BROADCASTS = ("command", "transient.status")
#: the results queue beamline code expects to find (each registered scan's beamline gets its own too)
DEFAULT_RESULTS_QUEUE = "xrc.i03"


def recipe_directory() -> Path:
    """The recipes shipped in the package (``mimas``, per-image analysis of grid scans)."""
    return Path(str(resources.files("zocalo_xrc.local") / "recipes"))


def default_scan() -> Path:
    """A model of two crystals on a 60 x 30 + 60 x 30 grid (its counts played: the local Zocalo's benches)."""
    return Path(str(resources.files("zocalo_xrc.local") / "scans" / "crystals3d.json"))


#: the demo's detector when it is given no scan file
DEMO_DETECTOR = "eiger2x-1m"


def demo_scan() -> Path:
    """The demo's scan when it is given none: a model of two crystals on a
    20 x 10 + 20 x 10 grid, for frames from pixels (400 frames of a 1M
    detector, about 90 MB; ``examples/model3d.json``)."""
    return Path(str(resources.files("zocalo_xrc.local") / "scans" / "crystals3d-pixels.json"))


class BrokerInUseError(TransportError):
    """The broker already has a Zocalo: a second would take its messages."""


def default_state_directory() -> Path:
    """Where ``zocalo-xrc local`` keeps ISPyB, the scans' data and the logbook
    unless told: ``$XDG_STATE_HOME/zocalo-xrc`` (``~/.local/state/zocalo-xrc``)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "zocalo-xrc"


def service_names(settings: Settings) -> list[str]:
    """The workflows services (entry point names) a local Zocalo runs."""
    names = ["Dispatcher", "Mimas"]
    if "gpu" in settings.pia:
        names += ["PerImageAnalysisGPU", "XRayCenteringGPU"]
    if "cpu" in settings.pia:
        names += ["PerImageAnalysis", "XRayCentering"]
    return names


def service_class(name: str) -> type:
    from importlib.metadata import entry_points

    found = [e for e in entry_points(group="workflows.services") if e.name == name]
    if not found:
        raise LookupError(f"no workflows service {name!r} is installed")
    service: type = found[0].load()
    return service


@dataclass(frozen=True)
class StateDirectory:
    """The files of one local Zocalo: ISPyB (SQLite), scan data, logbook, configuration."""

    path: Path

    @property
    def ispyb_url(self) -> str:
        return f"sqlite:///{self.path / 'ispyb.sqlite'}"

    @property
    def data(self) -> Path:
        return self.path / "data"

    @property
    def logbook(self) -> Path:
        return self.path / "logbook"

    @property
    def zocalo_config(self) -> Path:
        return self.path / "zocalo.yaml"


def zocalo_config_text(state: StateDirectory, settings: Settings, broker: ConnectionSettings | None) -> str:
    """The zocalo configuration (YAML) of a local Zocalo: environment ``local``."""
    import json

    storage = {"plugin": "storage", "zocalo.recipe_directory": str(recipe_directory()),
               "zocalo.dispatcher.logbook_location": str(state.logbook), **settings.storage()}
    blocks: dict[str, Any] = {"storage": storage}
    if broker is not None:
        blocks["rabbitmq"] = {"plugin": "pika", "host": broker.host, "port": broker.port,
                              "username": broker.username, "password": broker.password.reveal(),
                              "vhost": broker.vhost}
    lines = ["version: 1"]  # JSON values are YAML: no quoting rules of our own
    for name, block in blocks.items():
        lines.append(f"{name}:")
        lines += [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in block.items()]
    lines += ["environments:", f"  {ENVIRONMENT}: {json.dumps(list(blocks))}"]
    return "\n".join(lines) + "\n"


class LocalZocalo:
    """The local Zocalo's services, ISPyB and logbook; a context manager.

    ``broker``: None for the in-process broker (this process's embedded one,
    so that ``connection="in-process"`` clients reach it), or an amqp:// URL.
    ``ispyb``: a SQLAlchemy URL; None for SQLite in the state directory.
    ``state``: a directory to keep; None for a temporary one.
    """

    def __init__(self, *, broker: str | ConnectionSettings | None = None, ispyb_url: str | None = None,
                 state: Path | str | None = None, settings: Settings = Settings(), processes: bool = False) -> None:
        if processes and broker is None:
            raise ValueError("separate service processes need a broker they can all reach: give an amqp:// URL")
        if isinstance(broker, str) and not looks_like_url(broker):
            raise ValueError("broker: expected an amqp:// URL")
        self.broker_settings = ConnectionSettings.from_url(broker) if isinstance(broker, str) else broker
        self._temporary = state is None
        self._declared = False  # its queues on the broker (once start has declared them)
        # absolute: services in other processes and directories find the scans' data by it
        self.state = StateDirectory(Path(tempfile.mkdtemp(prefix="zocalo-xrc-local-")) if state is None
                                    else Path(state).resolve())
        self.ispyb_url = ispyb_url or self.state.ispyb_url
        self.settings, self.processes = settings, processes
        self.broker: InProcessBroker | None = None
        self._threads: list[Any] = []
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._supervisor: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._client: Transport | None = None
        try:
            self.db = ispyb.Ispyb(self.ispyb_url)  # a bad URL is an error now, before anything starts
        except BaseException:
            self._remove_temporary()
            raise

    @property
    def where(self) -> str:
        """The broker, without its password."""
        return self.broker_settings.url() if self.broker_settings else "the in-process broker"

    def __repr__(self) -> str:
        return f"LocalZocalo({self.where}, state={str(self.state.path)!r})"

    def describe(self) -> str:
        """One line: broker, ISPyB, what runs and where the state is (no passwords)."""
        kept = "temporary" if self._temporary else str(self.state.path)
        run = "processes" if self.processes else "threads of this process"
        return (f"{self.where}, ISPyB {self.db.url}, per-image analysis "
                f"{'+'.join(sorted(self.settings.pia)).upper()} at {self.settings.frame_rate:g} frames/s, "
                f"services as {run}, state {kept}")

    # lifecycle
    def __enter__(self) -> LocalZocalo:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 30.0) -> None:
        try:
            self._start(timeout)
        except BaseException:
            self.stop()  # a temporary state directory goes too: it may hold the broker's password
            raise
        log.info("local Zocalo up: %s", self)

    def _start(self, timeout: float) -> None:
        for d in (self.state.path, self.state.data, self.state.logbook):
            d.mkdir(parents=True, exist_ok=True)
        self.db.create_schema()
        self._write_config()
        with self._connect() as admin:
            if admin.queue_exists("processing_recipe") and admin.consumer_count("processing_recipe"):
                raise BrokerInUseError(
                    f"processing_recipe on {self.where} already has a consumer: a Zocalo (a dispatcher) is running "
                    "there, and a second would take its messages; use a broker (or vhost) of your own")
            # as zocalo.configure_rabbitmq sets Diamond's up: every service's queue a quorum queue with a
            # delivery limit, dead-lettering to dlq.<queue> (one already there is left as it is)
            for name in SERVICE_QUEUES:
                if not admin.queue_exists(name):
                    admin.declare_work_queue(name, shared=name in SHARED_QUEUES)
            for name in BROADCASTS:
                admin.declare_broadcast(name)
            # results go to the results exchange; dodal's device consumes xrc.i03 and never declares it
            admin.declare_results_queue(DEFAULT_RESULTS_QUEUE)
            self._declared = True
        if self.processes:
            self._start_processes(timeout)
        else:
            self._start_threads(timeout)

    def stop(self, drain_s: float = 5.0) -> None:
        """Stop every service, after up to ``drain_s`` for the work already
        queued (a dispatch, a Mimas step) to be taken: what the services
        hold unfinished goes back to its queue. A temporary state directory
        goes. Safe to call again, and before :meth:`start`."""
        if self._threads and not self._stopping.is_set():
            self._drain(drain_s)
        self._stopping.set()
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()
        if self._threads:
            ispyb.release_waiting()  # a request the Dispatcher holds for an unreachable ISPyB goes back to its queue
        for thread in reversed(self._threads):
            thread.stop()
        self._threads.clear()
        # a workflows frontend killed alone leaves its service process running: stop each one's process group
        for child in self._children.values():
            _signal_group(child, signal.SIGTERM)
        for name, child in self._children.items():
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in 10 s; killing it", name)
                _signal_group(child, signal.SIGKILL)
                child.wait()
        self._children.clear()
        self._drop_leftover_work()
        self.db.close()
        if not self.processes:
            ispyb.configure(None)
            ispyb.close_shared(self.ispyb_url)  # the dispatcher filters' handle: no -wal, -shm left behind
        self._remove_temporary()

    def _drop_leftover_work(self) -> None:
        """A temporary local Zocalo on a broker that outlives it (a demo on
        RabbitMQ, stopped part-way) leaves work whose ISPyB, data and logbook
        go with its state: the next Zocalo there could only dead-letter it.
        Its service queues are emptied (a broker has one local Zocalo at a
        time: the work is this one's)."""
        if not self._temporary or self.broker is not None or not self._declared:
            return
        try:
            with self._connect() as admin:
                dropped = sum(admin.purge_queue(q) for q in SERVICE_QUEUES if admin.queue_exists(q))
        except (TransportError, OSError) as e:
            log.warning("could not empty the service queues of this temporary local Zocalo: %s", e)
            return
        if dropped:
            log.info("dropped %d message(s) of unfinished work left on %s (its state goes with this local Zocalo)",
                     dropped, self.where)

    def _remove_temporary(self) -> None:
        if self._temporary:  # it may hold the broker's password (zocalo.yaml)
            shutil.rmtree(self.state.path, ignore_errors=True)

    def _drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        try:
            with self._connect() as admin:
                queues = [q for q in SERVICE_QUEUES if q != "xrc.abort" and admin.queue_exists(q)]
                while any(admin.message_count(q) for q in queues) and time.monotonic() < deadline:
                    time.sleep(0.05)
        except TransportError as e:
            log.warning("not waiting for queued work: %s", e)

    def _write_config(self) -> None:
        text = zocalo_config_text(self.state, self.settings, self.broker_settings)
        path = self.state.zocalo_config
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it may hold the broker's password
        with os.fdopen(fd, "w") as f:
            f.write(text)

    def _configuration(self) -> Any:
        import zocalo.configuration

        config = zocalo.configuration.from_file(str(self.state.zocalo_config))
        config.activate_environment(ENVIRONMENT)
        return config

    def _start_threads(self, timeout: float) -> None:
        from ..messaging.workflows_inprocess import InProcessWorkflowsTransport
        from .host import ServiceThread

        ispyb.configure(self.ispyb_url)  # for the dispatcher's ISPyB filters in this process
        config = self._configuration()
        if self.broker_settings is None:
            from ..messaging import embedded_broker

            self.broker = embedded_broker()
        for name in service_names(self.settings):
            if self.broker is not None:
                transport: Any = InProcessWorkflowsTransport(self.broker)
            else:
                from workflows.transport.pika_transport import PikaTransport

                transport = PikaTransport()  # the configuration's pika plugin set where it connects
            thread = ServiceThread(service_class(name), transport, environment={"config": config}, name=name)
            thread.start(timeout)
            self._threads.append(thread)

    def _start_processes(self, timeout: float) -> None:
        for name in service_names(self.settings):
            self._children[name] = self._spawn(name)
        # up once every service consumes its queue (or say which has not); zocalo's Dispatcher names none
        waiting = {name: getattr(service_class(name), "queue", "processing_recipe") for name in self._children}
        deadline = time.monotonic() + timeout
        with self._connect() as admin:
            while waiting:
                for name, child in self._children.items():
                    if child.poll() is not None:
                        raise RuntimeError(f"{name} (zocalo.service -s {name}) exited with status {child.returncode} "
                                           "while starting; its log is above")
                waiting = {n: q for n, q in waiting.items() if not admin.consumer_count(q)}
                if waiting and time.monotonic() > deadline:
                    raise TimeoutError(f"not consuming within {timeout:g} s: {', '.join(sorted(waiting))}")
                time.sleep(0.2)
        self._supervisor = threading.Thread(target=self._supervise, name="local Zocalo supervisor", daemon=True)
        self._supervisor.start()

    def _spawn(self, name: str) -> subprocess.Popen[bytes]:
        command = Path(sys.executable).with_name("zocalo.service")
        # HDF5's file lock off, as Diamond's readers run: per-image analysis follows files another process writes
        env = dict(os.environ, ZOCALO_CONFIG=str(self.state.zocalo_config), ZOCALO_XRC_ISPYB=self.ispyb_url,
                   HDF5_USE_FILE_LOCKING="FALSE")
        log.info("starting %s: zocalo.service -s %s -e %s", name, name, ENVIRONMENT)
        return subprocess.Popen([str(command), "-s", name, "-e", ENVIRONMENT], env=env, start_new_session=True)

    def _supervise(self) -> None:
        """A service process that dies is reported and started again."""
        while not self._stopping.wait(1.0):
            for name, child in list(self._children.items()):
                if child.poll() is not None and not self._stopping.is_set():
                    log.error("%s exited with status %s; starting it again", name, child.returncode)
                    self._children[name] = self._spawn(name)

    # for clients
    def transport(self) -> Transport:
        """This project's transport to the local Zocalo's broker, for
        ``ZocaloTrigger``, ``ZocaloResults`` and the Bluesky device: one, made
        on first use and closed when the local Zocalo stops."""
        with self._lock:
            if self._client is None:
                self._client = self._connect()
            return self._client

    def _connect(self) -> Transport:
        if self.broker_settings is None:
            from ..messaging import InProcessTransport, embedded_broker

            return InProcessTransport(embedded_broker())
        from ..messaging.rabbitmq import AmqpTransport

        return AmqpTransport(self.broker_settings)

    def add_scan(self, scan: Scan, name: str | None = None) -> ispyb.RegisteredScan:
        """Register a simulated grid scan in ISPyB: its data (the scan file,
        standing in for the detector's) goes to the state directory."""
        self.transport().declare_results_queue(f"xrc.{scan.beamline}")  # as Diamond has it for every beamline
        return register_scan(self.db, self.state, scan, name)

    def add_detector_scan(self, scan: Scan, name: str | None = None, *, size: str | tuple[int, int] = "1M",
                          frame_rate: float | None = None) -> tuple[ispyb.RegisteredScan, SimulatedDetector]:
        """Register a scan whose data a simulated detector writes (Eiger2 X
        frames, at this local Zocalo's frame rate unless told): the detector
        is armed; its ``write()`` writes the frames."""
        self.transport().declare_results_queue(f"xrc.{scan.beamline}")
        rate = self.settings.frame_rate if frame_rate is None else frame_rate
        return register_detector_scan(self.db, self.state, scan, name, size=size, frame_rate=rate)

    @property
    def services(self) -> dict[str, Any]:
        """The services running in this process's threads, by name (none
        when they are processes)."""
        return {t.name: t.service for t in self._threads}

    def per_image_analysis(self) -> list[Any]:
        """The per-image analysis services running here: their ``progress``."""
        return [s for s in self.services.values() if hasattr(s, "progress")]

    @property
    def logbook(self) -> Logbook:
        return Logbook(self.state.logbook)


def _signal_group(child: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(child.pid, sig)
    except ProcessLookupError:
        pass


def prepare_results_queue(state: StateDirectory, beamline: str) -> None:
    """Where a local Zocalo on RabbitMQ keeps its state (``local up``):
    declare ``xrc.<beamline>`` on its broker, bound to ``results``, as
    Diamond's deployment has it for every beamline. Nothing to do without one."""
    if not state.zocalo_config.exists():
        return
    try:
        settings = ConnectionSettings.from_zocalo_config(ENVIRONMENT, state.zocalo_config)
    except ConfigurationError:
        return  # an in-process local Zocalo's configuration: no broker outside it
    from ..messaging.rabbitmq import AmqpTransport

    with AmqpTransport(settings) as admin:
        admin.declare_results_queue(f"xrc.{beamline}")


def register_scan(db: ispyb.Ispyb, state: StateDirectory, scan: Scan, name: str | None = None) -> ispyb.RegisteredScan:
    """Write a scan's data file and register the scan in ISPyB."""
    import json

    state, stem = _scan_data(state, name)
    template = f"{stem}.json"
    (state.data / template).write_text(json.dumps(scan.to_dict()) + "\n")
    return _register(db, state, scan, template)


def register_detector_scan(db: ispyb.Ispyb, state: StateDirectory, scan: Scan, name: str | None = None, *,
                           size: str | tuple[int, int] = "1M",
                           frame_rate: float = 500.0) -> tuple[ispyb.RegisteredScan, SimulatedDetector]:
    """Arm a simulated detector for a scan (its master file is written) and
    register the scan in ISPyB with the master as its data; the detector
    writes the frames when told (:meth:`SimulatedDetector.write`)."""
    state, stem = _scan_data(state, name)
    detector = SimulatedDetector(scan, state.data, stem, size=size, frame_rate=frame_rate)
    return _register(db, state, scan, detector.master.name), detector


def _scan_data(state: StateDirectory, name: str | None) -> tuple[StateDirectory, str]:
    """Where a scan's data goes, and the start of its file names."""
    filename = check_name("scan" if name is None else name)  # a name, not a path: the data stays in the state directory
    state = StateDirectory(state.path.resolve())  # ISPyB keeps where the data is for other processes
    state.data.mkdir(parents=True, exist_ok=True)
    return state, f"{filename}_{uuid.uuid4().hex[:8]}"  # scans may share a detector file name


def _register(db: ispyb.Ispyb, state: StateDirectory, scan: Scan, template: str) -> ispyb.RegisteredScan:
    return db.add_scan(beamline=scan.beamline, grids=[g.to_ispyb() for g in scan.grids],
                       experiment_type=scan.experiment_type, sample_id=scan.sample_id,
                       image_directory=str(state.data), file_template=template)


__all__ = ["BrokerInUseError", "LocalZocalo", "StateDirectory", "register_detector_scan", "register_scan", "recipe_directory", "service_names"]
