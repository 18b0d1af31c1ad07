"""The peer of the X-ray centring service bench: the job done the way
Diamond's ``DLSXRayCentering`` (python-dlstbx) does it, run the way a Zocalo
installation runs it.

* A ``workflows`` ``CommonService`` that subscribes with
  ``workflows.recipe.wrap_subscribe(..., acknowledgement=True,
  prefetch_count=65535)``, validates each message with pydantic, keeps per-DCID
  counts in numpy arrays, holds every message's header unacked until its scan
  is complete, and decides completeness by counting messages (as Diamond
  does: a duplicate would complete a grid early; the bench sends none).
* A complete grid (2D) or group (3D: this grid and every grid of
  ``dcg_dcids``) is centred with numpy/scipy the plain way (a dense volume,
  ``scipy.ndimage.label``; ``xrc-algorithm.md``), then, in one workflows
  transaction on the subscription's channel, every held header is acked and
  the result is sent to the step's ``success`` output, and committed.
  As at Diamond, a 3D result goes through the recipe of whichever grid
  completed last.
* :func:`main` runs it under a ``workflows.frontend.Frontend`` (the service
  in a process of its own, status reports to the frontend, the frontend's
  status broadcasts and command channel), with a ``PikaTransport``, as
  ``zocalo.service`` (Diamond's ``dlstbx.service``) does::

      python -m peer_xrc_service --broker amqp://guest:guest@127.0.0.1:5672/%2F --queue reduce.xray_centering

  SIGTERM stops it (the frontend ends the service; unacked messages go back
  to the queue).

Where the time goes: the service itself needs ~0.1 ms of CPU a message, its
frontend ten times that (10,000 messages of 2D scans: 1.2 s of the service's
CPU, 11 s of the frontend's). With ``verbose_service`` (zocalo.service sets it) every
message's debug record and two status changes go through a pipe to the
frontend, and for each log record ``Frontend.parse_band_log`` calls
``get_status()``, whose utilisation report walks every status change of the
last 6 s: the longer a backlog lasts, the more each message costs (about
1,600 messages/s for one scan's backlog here, about 850/s after ~10 s).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
import urllib.parse
from typing import Any, List, Optional

import numpy as np
import pika
import pydantic
import scipy.ndimage as ndi

import reference  # tests/reference.py: the plain 2D centring
import workflows.frontend
import workflows.recipe
from workflows.services.common_service import CommonService
from workflows.transport.pika_transport import PikaTransport


class GridInfo(pydantic.BaseModel):
    """The subset of ISPyB's GridInfo the service needs."""

    steps_x: int
    steps_y: int
    dx_mm: float
    dy_mm: float
    micronsPerPixelX: float
    micronsPerPixelY: float
    snapshot_offsetXPixel: float
    snapshot_offsetYPixel: float
    snaked: bool
    orientation: str

    @property
    def image_count(self) -> int:
        return self.steps_x * self.steps_y


class Parameters(pydantic.BaseModel):
    dcid: int
    experiment_type: str
    dcg_dcids: Optional[List[int]] = None
    sample_id: Optional[int] = None
    threshold: float = 0.25
    threshold_absolute: float = 0


class RecipeStep(pydantic.BaseModel):
    parameters: Parameters
    gridinfo: GridInfo


class Message(pydantic.BaseModel):
    file_number: pydantic.PositiveInt = pydantic.Field(alias="file-number")
    n_spots_total: pydantic.NonNegativeInt
    file_seen_at: pydantic.NonNegativeFloat = pydantic.Field(alias="file-seen-at")
    file: str


class CenteringData:
    def __init__(self, gridinfo: GridInfo, parameters: Parameters, rw: Any) -> None:
        self.gridinfo, self.parameters, self.recipewrapper = gridinfo, parameters, rw
        self.headers: list[dict[str, Any]] = []
        self.last_activity = time.time()
        self.last_file_seen_at = 0.0
        self.data = np.zeros(gridinfo.image_count, dtype=int)  # Diamond: np.empty (the same if each image comes once)

    @property
    def images_seen(self) -> int:
        return len(self.headers)  # messages, not images: as Diamond counts


class PeerXRayCentering(CommonService):
    """Per-image spot counts in, X-ray centring results out, Diamond's way."""

    _service_name = "DLS X-Ray Centering (bench peer)"
    _logger_name = "dlstbx.services.xray-centering"

    def initializing(self):
        self.log.info("X-Ray centering service starting up")
        self._centering_data: dict[int, CenteringData] = {}
        self._centering_lock = threading.Lock()
        self._next_garbage_collection = time.time() + 60
        self._register_idle(60, self.garbage_collect)
        workflows.recipe.wrap_subscribe(
            self._transport,
            self._environment["queue"],
            self.add_pia_result,
            acknowledgement=True,
            exclusive=True,  # ignored on RabbitMQ: the queue is single-active-consumer
            prefetch_count=65535,
            log_extender=self.extend_log,
        )
        self.log.info("X-ray centring peer consuming %s", self._environment["queue"])

    def garbage_collect(self):
        """Throw away partial scan results after a while."""
        self._next_garbage_collection = time.time() + 60
        with self._centering_lock:
            for dcid in list(self._centering_data):
                cd = self._centering_data[dcid]
                if time.time() - cd.last_activity > 15 * 60:
                    self.log.info("Expiring X-Ray Centering session for DCID %r", dcid)
                    rw = cd.recipewrapper
                    txn = rw.transport.transaction_begin(subscription_id=cd.headers[0]["subscription"])
                    for header in cd.headers:
                        rw.transport.ack(header, transaction=txn)
                    rw.send_to("abort", {}, transaction=txn)
                    rw.transport.transaction_commit(txn)
                    del self._centering_data[dcid]

    def add_pia_result(self, rw, header, message):
        """Process incoming PIA result."""
        try:
            step = RecipeStep(**rw.recipe_step)
            parameters, gridinfo = step.parameters, step.gridinfo
            message = Message(**message)
        except (pydantic.ValidationError, TypeError) as e:
            self.log.error("X-ray centering service called with invalid parameters: %s", e)
            rw.transport.nack(header)
            return
        dcid, dcg_dcids = parameters.dcid, parameters.dcg_dcids or []

        with self._centering_lock:
            cd = self._centering_data.get(dcid)
            if cd is None:
                cd = self._centering_data[dcid] = CenteringData(gridinfo, parameters, rw)
                self.log.info(f"First record arrived for X-ray centering on DCID {dcid}, "
                              f"{gridinfo.steps_x} x {gridinfo.steps_y} grid, {gridinfo.image_count} images in total")
            cd.last_activity = time.time()
            cd.headers.append(header)
            self.log.debug("Received PIA result for DCID %d image %d, %d of %d expected results",
                           dcid, message.file_number, cd.images_seen, gridinfo.image_count)
            cd.data[message.file_number - 1] = message.n_spots_total
            cd.last_file_seen_at = max(cd.last_file_seen_at, message.file_seen_at)

            if dcg_dcids and cd.images_seen == gridinfo.image_count:
                group = [dcid] + list(dcg_dcids)
                if all(d in self._centering_data and self._centering_data[d].images_seen ==
                       self._centering_data[d].gridinfo.image_count for d in group):
                    self.log.info(f"All records arrived for X-ray centering on DCIDs {group}")
                    grids = [self._centering_data[d] for d in sorted(group)]  # the lower DCID is xy
                    xy, xz = (reshape(g.data, g.gridinfo) for g in grids)
                    results = centre_3d(xy, xz, threshold=parameters.threshold,
                                        threshold_absolute=parameters.threshold_absolute,
                                        sample_id=grids[0].parameters.sample_id)
                    self.log.info("3D X-ray centring result for DCIDs %s: %d found, %.3f s after the newest image",
                                  group, len(results), time.time() - max(g.last_file_seen_at for g in grids))
                    self._send(rw, header, [h for g in grids for h in g.headers],
                               {"results": results, "status": "success", "type": "3d"})
                    for d in group:
                        del self._centering_data[d]

            elif parameters.experiment_type != "Mesh3D" and cd.images_seen == gridinfo.image_count:
                self.log.info("All records arrived for X-ray centering on DCID %d", dcid)
                result = centre_2d(cd.data, gridinfo, sample_id=parameters.sample_id)
                self.log.info({"dcid": dcid, "latency": round(time.time() - cd.last_file_seen_at, 3)})
                self._send(rw, header, cd.headers, {"results": [result], "status": "success", "type": "2d"})
                del self._centering_data[dcid]

        if self._next_garbage_collection < time.time():
            self.garbage_collect()

    def _send(self, rw, header, headers, payload):
        """Ack every held message and send the result, in one transaction."""
        txn = rw.transport.transaction_begin(subscription_id=header["subscription"])
        for h in headers:
            rw.transport.ack(h, transaction=txn)
        rw.set_default_channel("success")
        rw.send_to("success", payload, transaction=txn)
        rw.transport.transaction_commit(txn)


# ---- the centring, with numpy and scipy the plain way (xrc-algorithm.md) -------------------


def reshape(counts: np.ndarray, gi: GridInfo) -> np.ndarray:
    """Counts in acquisition order -> ``A[x][y]``."""
    data = np.array(counts, dtype=np.int64)
    if gi.orientation == "vertical":
        data = data.reshape(gi.steps_x, gi.steps_y)
        if gi.snaked:
            data[1::2, :] = data[1::2, ::-1]
    else:
        data = data.reshape(gi.steps_y, gi.steps_x).T.copy()
        if gi.snaked:
            data[:, 1::2] = data[::-1, 1::2]
    return data


def centre_3d(xy: np.ndarray, xz: np.ndarray, threshold: float = 0.25, threshold_absolute: float = 0,
              sample_id: int | None = None) -> list[dict[str, Any]]:
    """A single-pin 3D centring: the volume ``xy[x,y] * xz[x,z]``, voxels of at
    least ``threshold`` of its maximum, 26-connected regions, each region's
    statistics; sorted by total count, largest first."""
    xy, xz = xy.copy(), xz.copy()
    xy[xy < threshold_absolute] = 0
    xz[xz < threshold_absolute] = 0
    volume = xy[:, :, None] * xz[:, None, :]
    m = int(volume.max())
    if m == 0:
        return []
    kept = volume * (volume.astype(float) >= threshold * float(m))
    labels, n = ndi.label(kept, structure=np.ones((3, 3, 3)))
    index = np.arange(1, n + 1)
    coms = ndi.center_of_mass(kept, labels, index)
    maxima = ndi.maximum_position(kept, labels, index)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    totals = ndi.sum_labels(kept, labels, index)
    results = []
    for k, box in enumerate(ndi.find_objects(labels)):
        mv = tuple(int(i) for i in maxima[k])
        results.append({
            "centre_of_mass": [float(c) + 0.5 for c in coms[k]],
            "max_voxel": list(mv),
            "max_count": float(kept[mv]),
            "n_voxels": int(sizes[k]),
            "total_count": float(int(totals[k])),
            "sample_id": sample_id,
            "bounding_box": [[s.start for s in box], [s.stop for s in box]],
        })
    results.sort(key=lambda r: r["total_count"], reverse=True)
    return results


def centre_2d(counts: np.ndarray, gi: GridInfo, sample_id: int | None = None) -> dict[str, Any]:
    """The 2D centring, the plain numpy/scipy way of the tests' reference
    (tests/reference.py): the largest 8-connected region of cells of at
    least half the maximum count."""
    return reference.centre_2d(counts, gi.model_dump(), sample_id)


# ---- run as a Zocalo installation does ---------------------------------------------------


def transport_factory(url: str):
    """A factory of PikaTransports for the broker at ``url`` (what
    ``workflows.transport.lookup`` plus zocalo's configuration give)."""
    u = urllib.parse.urlsplit(url)
    config = {"--rabbit-host": u.hostname, "--rabbit-port": u.port or 5672,
              "--rabbit-user": urllib.parse.unquote(u.username or "guest"),
              "--rabbit-pass": urllib.parse.unquote(u.password or "guest"),
              "--rabbit-vhost": urllib.parse.unquote(u.path[1:]) if len(u.path) > 1 else "/"}

    def make() -> PikaTransport:
        t = PikaTransport()
        t.config = dict(config)
        return t

    return make


def declare_zocalo_exchanges(url: str) -> None:
    """The exchanges every Zocalo broker has: the frontends' status broadcasts
    and their command channel (a frontend's broadcast to a missing exchange
    would close its channel)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        for name in ("transient.status", "command"):
            channel.exchange_declare(name, exchange_type="fanout", durable=True)
    finally:
        connection.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", required=True, help="amqp://user:password@host:port/vhost")
    parser.add_argument("--queue", required=True, help="the queue of per-image messages")
    args = parser.parse_args(argv)

    # zocalo.service's logging: the console at INFO, workflows at INFO, the rest at WARNING
    console = logging.StreamHandler()
    console.setLevel(logging.INFO)
    logging.getLogger().addHandler(console)
    logging.getLogger().setLevel(logging.WARN)
    logging.getLogger("workflows").setLevel(logging.INFO)

    declare_zocalo_exchanges(args.broker)
    factory = transport_factory(args.broker)
    # as zocalo.service starts a service: verbose_service, a command channel, the service's environment
    frontend = workflows.frontend.Frontend(transport=factory, service=PeerXRayCentering,
                                           transport_command_channel="command", verbose_service=True,
                                           environment={"queue": args.queue})

    def stop(*_: Any) -> None:
        frontend.shutdown = True

    signal.signal(signal.SIGTERM, stop)
    print(f"peer X-ray centring service consuming {args.queue}", flush=True)
    frontend.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
