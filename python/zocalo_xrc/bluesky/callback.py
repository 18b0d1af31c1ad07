"""A bluesky document callback that triggers Zocalo for the collections of a
plan, with mx-bluesky 1.6.16's ``ZocaloCallback`` semantics:

* the start of the ``triggering_plan`` run (its ``subplan_name``) is sent
  to the start-info generator, which yields the collections' start infos
  (DCID, frames, message index);
* the event of the ``zocalo_read_hardware_plan`` stream gives the file name
  (``eiger_odin_file_writer_id``): every collection's ``start`` is sent
  then, pipelined and confirmed by the broker;
* the run's stop sends every collection's ``end``; a run that started no
  collection by then is an error.

A broker that refuses or does not confirm a trigger is an error raised
from the callback, which the RunEngine hands to the plan (unless told to
ignore callback errors). It works subscribed to the RunEngine and as the
``emit`` target of another callback (mx-bluesky's ISPyB callback), and
takes mx-bluesky's start-info generators as they are.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Iterable, Mapping
from typing import Any

from bluesky.callbacks import CallbackBase
from event_model.documents import Event, EventDescriptor, RunStart, RunStop

from ..client import Connection, StartInfo, ZocaloStartInfo, ZocaloTrigger
from .device import ZocaloResults

log = logging.getLogger(__name__)

#: mx-bluesky's name for the stream whose event carries the file name.
ZOCALO_HW_READ = "zocalo_read_hardware_plan"
#: The data key of that event that names the detector's file.
FILENAME_KEY = "eiger_odin_file_writer_id"

StartInfoGenerator = Generator[list[Any], dict[str, Any], None]


class NoCollectionsError(RuntimeError):
    """The triggering plan ended without a collection to process."""


def start_infos_from_omega_map(omega_positions: Iterable[int]) -> StartInfoGenerator:
    """mx-bluesky's generator for grid scans keyed by omega: the run's start
    document carries ``omega_to_scan_spec`` (omega -> the scan's points by
    axis, as mx-bluesky writes it; or a number of frames, or a scan spec) and
    ``grid_plane_to_id_map`` (omega -> DCID). Frames are numbered on through
    the grids, message index by grid."""
    doc = yield []
    infos: list[Any] = []
    start = 0
    for index, omega in enumerate(str(o) for o in omega_positions):
        frames = _frames(doc["omega_to_scan_spec"][omega])
        infos.append(ZocaloStartInfo(int(doc["grid_plane_to_id_map"][omega]), None, start, frames, index))
        start += frames
    yield infos


def _frames(spec: Any) -> int:
    """Frames of a grid: a count; a scan spec (``frames()``); or, as
    mx-bluesky's start documents carry it, the scan's points by axis."""
    if isinstance(spec, int):
        return spec
    if isinstance(spec, Mapping):
        return len(next(iter(spec.values())))
    if hasattr(spec, "frames"):
        return len(spec.frames())
    return len(spec)


class ZocaloCallback(CallbackBase):
    """Sends ``start`` and ``end`` to Zocalo for the collections of every run
    of ``triggering_plan`` (see the module text). ``zocalo_environment``
    (mx-bluesky's) or ``connection`` says where Zocalo is. With ``results``,
    the device is told each collection it triggers (:meth:`ZocaloResults.expect`),
    so that its next trigger waits for that collection's result only."""

    def __init__(
        self,
        triggering_plan: str,
        zocalo_environment: str | None = None,
        start_info_generator_factory: Callable[[], StartInfoGenerator] | None = None,
        *,
        connection: Connection = None,
        results: ZocaloResults | None = None,
    ) -> None:
        super().__init__()
        if start_info_generator_factory is None:
            raise TypeError("ZocaloCallback needs a start_info_generator_factory (mx-bluesky's, or "
                            "zocalo_xrc.bluesky.start_infos_from_omega_map(...) in a lambda)")
        if zocalo_environment is not None and connection is not None:
            raise ValueError("give zocalo_environment or connection, not both")
        self.triggering_plan = triggering_plan
        self._connection: Connection = connection if connection is not None else zocalo_environment
        self._trigger: ZocaloTrigger | None = None
        self.results = results
        self._factory = start_info_generator_factory
        self._reset()

    @property
    def trigger(self) -> ZocaloTrigger:
        """The trigger, made when first needed: the configuration is read then,
        as mx-bluesky's callback reads it (not when the callback is made)."""
        if self._trigger is None:
            self._trigger = ZocaloTrigger(self._connection)
        return self._trigger

    def _reset(self) -> None:
        self.run_uid: str | None = None
        self.pending: list[StartInfo] = []
        self.started: list[StartInfo] = []
        self.descriptors: dict[str, EventDescriptor] = {}
        self._generator = self._factory()
        next(self._generator)  # primed: it waits for the start document

    def start(self, doc: RunStart) -> RunStart:
        if self.triggering_plan and doc.get("subplan_name") == self.triggering_plan:
            self.run_uid = doc.get("uid")
        if self.run_uid:
            try:
                self.pending.extend(self._generator.send(dict(doc)))
            except StopIteration:  # a run inside the triggering one: the generator has given its infos
                pass
        return doc

    def descriptor(self, doc: EventDescriptor) -> EventDescriptor:
        self.descriptors[doc["uid"]] = doc
        return doc

    def event(self, doc: Event) -> Event:
        descriptor = self.descriptors.get(doc["descriptor"])
        if descriptor is None or descriptor.get("name") != ZOCALO_HW_READ or not self.pending:
            return doc
        filename = _filename(doc["data"])
        infos, self.pending = self.pending, []
        for info in infos:
            info.filename = filename  # type: ignore[misc]  # mx-bluesky sets it so; ZocaloStartInfo allows it
        self.trigger.run_start(*infos)  # pipelined, each confirmed: a refusal is raised here
        self.started.extend(infos)
        if self.results is not None:
            self.results.expect(dcids=[info.ispyb_dcid for info in self.started])
        log.info("Zocalo started for DCID %s", ", ".join(str(i.ispyb_dcid) for i in infos))
        return doc

    def stop(self, doc: RunStop) -> RunStop:
        if doc.get("run_start") != self.run_uid or self.run_uid is None:
            return doc
        try:
            if not self.started:
                raise NoCollectionsError(f"no collection (DCID) to process by the end of {self.triggering_plan}: "
                                         f"no {ZOCALO_HW_READ} event came with the run's start infos")
            self.trigger.run_end(*(info.ispyb_dcid for info in self.started))
        finally:
            self._reset()
        return doc


def _filename(data: dict[str, Any]) -> str:
    for key, value in data.items():  # the key as the device names it, with or without its device's prefix
        if key == FILENAME_KEY or key.endswith(f"-{FILENAME_KEY}") or key.endswith(f"_{FILENAME_KEY}"):
            return str(value)
    raise KeyError(f"the {ZOCALO_HW_READ} event has no {FILENAME_KEY} (it has {', '.join(sorted(data))})")
