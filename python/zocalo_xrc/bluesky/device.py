"""An ophyd-async device that hands a plan Zocalo's X-ray centring results:
usable where beamlines use dodal's ``ZocaloResults`` (dls-dodal 3.0.5),
with its constructor and signal names, so that dodal's
``get_full_processing_results`` and any ``bps.rd(zocalo.centre_of_mass)``
work unchanged.

Unlike dodal's, its signals say what they hold: ``centre_of_mass`` is an
``(N, 3)`` float64 array (dodal declares a 1-D array and stores ``N x 3``),
coordinates are int64 (no uint64 wrap of a negative one), counts float64 as
the wire carries them; ``describe()`` gives the shapes that are read. Stale
results are settled at staging, not waited out for 2 s; waiting never blocks
the event loop, and has one deadline. A trigger whose plan ended (it raised,
or was aborted) stops waiting when the RunEngine unstages the device, or at
the next stage or trigger: it never takes the next run's result.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Iterable

import numpy as np
from bluesky.protocols import Stageable, Triggerable
from ophyd_async.core import AsyncStatus, StandardReadable, StandardReadableFormat, soft_signal_r_and_setter

from .. import client
from .._native import XrcResults
from ..client import NoResultsFromZocaloError, Source
from ..messaging import Transport
from ..messaging.config import ConnectionSettings

__all__ = ["NoResultsFromZocaloError", "ZocaloResults", "ZocaloSource"]

log = logging.getLogger(__name__)

#: dodal's values: ``ZocaloSource.CPU``, ``"GPU"``; ours add ``"EITHER"`` (the first to come).
ZocaloSource = Source

#: dodal's value for a result with no sample.
NO_SAMPLE_ID = -1


def _source(value: Any) -> Source:
    """A source as dodal's ``ZocaloSource`` (a ``StrEnum``) or its value, or ours."""
    if isinstance(value, Source):
        return value
    text = str(getattr(value, "value", value)).upper()
    try:
        return Source[text]
    except KeyError:
        raise ValueError(f"results_source: expected CPU, GPU or EITHER, got {value!r}") from None


class ZocaloResults(StandardReadable, Triggerable, Stageable):
    """Zocalo's X-ray centring results as signals.

    ``stage()`` subscribes to ``channel`` (``xrc.<beamline>``) and settles
    the results already waiting there: they are stale. ``trigger()``
    completes with the first result of ``results_source`` that arrives
    after staging, or, once told the collection (:meth:`expect`), with that
    collection's result only; :class:`NoResultsFromZocaloError` after
    ``timeout_s`` (no crystal is a result with no rows, not an error).
    ``unstage()`` releases the queue; unread results stay there. Each of them
    keeps to ``timeout_s`` (staging too: a broker that cannot be reached is a
    :class:`~zocalo_xrc.TransportError` by then, saying why).

    A result that comes again (the same ``message_id`` or the same bytes:
    Zocalo's service can send one twice when the broker dies in the middle
    of its commit) is acked and never handed to a later trigger.

    ``zocalo_environment`` (dodal's) or ``connection`` (an ``amqp://`` URL,
    ``"in-process"``, settings or a transport) says where Zocalo is;
    neither: the default environment, as :class:`~zocalo_xrc.ZocaloResults`.
    """

    def __init__(
        self,
        name: str = "zocalo",
        zocalo_environment: str | None = None,
        channel: str = "xrc.i03",
        sort_key: str = "max_count",
        timeout_s: float = 180.0,
        results_source: Any = Source.CPU,
        *,
        connection: str | ConnectionSettings | Transport | None = None,
        compare_sources: bool = False,
    ) -> None:
        if zocalo_environment is not None and connection is not None:
            raise ValueError("give zocalo_environment or connection, not both")
        if not channel.startswith("xrc."):
            raise ValueError(f"channel: expected xrc.<beamline>, got {channel!r}")
        self.channel, self.timeout_s, self.results_source = channel, timeout_s, results_source  # as given (dodal's)
        self.sort_key = str(getattr(sort_key, "value", sort_key))
        if self.sort_key not in ("max_count", "total_count", "n_voxels"):
            raise ValueError(f"sort_key must be max_count, total_count or n_voxels, got {sort_key!r}")
        self._connection = connection if connection is not None else zocalo_environment
        self._source, self._compare_sources = _source(results_source), compare_sources
        self._receiver: client.ZocaloResults | None = None
        self._expected: tuple[frozenset[int], int | None] | None = None
        self._staged = False
        self._settled = 0  # results waiting when the device was staged: stale, settled
        self._waiting: asyncio.Task[Any] | None = None  # the trigger waiting for a result, if one is

        self.centre_of_mass, self._set_centre_of_mass = soft_signal_r_and_setter(np.ndarray, np.zeros((0, 3)))
        self.bounding_box, self._set_bounding_box = soft_signal_r_and_setter(np.ndarray, np.zeros((0, 2, 3), np.int64))
        self.max_voxel, self._set_max_voxel = soft_signal_r_and_setter(np.ndarray, np.zeros((0, 3), np.int64))
        self.max_count, self._set_max_count = soft_signal_r_and_setter(np.ndarray, np.zeros(0))
        self.n_voxels, self._set_n_voxels = soft_signal_r_and_setter(np.ndarray, np.zeros(0, np.int64))
        self.total_count, self._set_total_count = soft_signal_r_and_setter(np.ndarray, np.zeros(0))
        self.sample_id, self._set_sample_id = soft_signal_r_and_setter(np.ndarray, np.zeros(0, np.int64))
        self.ispyb_dcid, self._set_dcid = soft_signal_r_and_setter(int, 0)
        self.ispyb_dcgid, self._set_dcgid = soft_signal_r_and_setter(int, 0)
        self.add_readables(
            [self.max_voxel, self.max_count, self.n_voxels, self.total_count, self.centre_of_mass,
             self.bounding_box, self.sample_id, self.ispyb_dcid, self.ispyb_dcgid],
            StandardReadableFormat.HINTED_SIGNAL,
        )
        super().__init__(name)

    @property
    def receiver(self) -> client.ZocaloResults:
        """The client underneath (:attr:`~zocalo_xrc.ZocaloResults.last_message`,
        :attr:`~zocalo_xrc.ZocaloResults.last_comparison`), made when first
        needed: the broker configuration is read then, not when the device is
        made (a beamline makes its devices before it has a broker)."""
        if self._receiver is None:
            self._receiver = client.ZocaloResults(
                self._connection, beamline=self.channel.removeprefix("xrc."), queue=self.channel,
                sort_key=self.sort_key,  # type: ignore[arg-type]
                timeout_s=self.timeout_s, source=self._source, compare_sources=self._compare_sources,
            )
        return self._receiver

    def expect(self, dcids: int | Iterable[int] | None = None, dcgid: int | None = None) -> None:
        """The next trigger waits for this collection's result only (a callback
        that sent the collection's start says so); ``expect()`` with neither
        goes back to the first result that comes."""
        ids = frozenset([dcids] if isinstance(dcids, int) else (dcids or ()))
        self._expected = (ids, dcgid) if ids or dcgid is not None else None

    @AsyncStatus.wrap
    async def stage(self) -> None:
        """Subscribe, settling what was waiting (stale results) at once; a
        trigger still waiting from an earlier plan stops. Within the device's
        ``timeout_s``, or :class:`~zocalo_xrc.TransportError` saying why not."""
        await self._stop_waiting()
        await self._settle(self.timeout_s)

    async def _settle(self, timeout_s: float) -> None:
        self._settled = await asyncio.to_thread(self.receiver.settle_waiting, timeout_s=timeout_s)
        self._staged = True

    @AsyncStatus.wrap
    async def unstage(self) -> None:
        """Release the queue: results not read stay there for the next reader.
        A trigger still waiting stops at once (the RunEngine unstages a plan's
        devices when the plan raises or is aborted; it does not cancel their
        triggers)."""
        self._staged = False
        self._expected = None
        waiting = self._cancel_waiting()
        if self._receiver is not None:
            self._receiver.close()  # never waits; here, so that a stage that follows comes after it
        if waiting is not None:
            await asyncio.wait([waiting])

    def _cancel_waiting(self) -> asyncio.Task[Any] | None:
        """Cancel the trigger waiting for a result, unless it is the caller."""
        task = self._waiting
        if task is None or task.done() or task is asyncio.current_task():
            return None
        log.info("%s: a trigger from before is still waiting for a result; it stops (its plan has ended)", self.name)
        task.cancel()
        return task

    async def _stop_waiting(self) -> None:
        task = self._cancel_waiting()
        if task is not None:
            await asyncio.wait([task])

    @AsyncStatus.wrap
    async def trigger(self) -> None:
        """Complete with the next result (see the class), within the device's
        ``timeout_s``, staging included if nothing staged the device. A
        trigger still waiting from before stops: the newest one waits."""
        deadline = time.monotonic() + self.timeout_s
        await self._stop_waiting()
        self._waiting = asyncio.current_task()
        try:
            timeout_s = self.timeout_s
            if not self._staged:  # the first trigger subscribes if nothing did
                await self._settle(timeout_s)
                timeout_s = max(0.0, round(deadline - time.monotonic(), 3))
            expected, self._expected = self._expected, None
            if expected is None:
                results = await self.receiver.trigger_async(any_collection=True, timeout_s=timeout_s)
            else:
                results = await self.receiver.trigger_async(dcids=expected[0], dcgid=expected[1], timeout_s=timeout_s)
        except NoResultsFromZocaloError as e:
            raise NoResultsFromZocaloError(f"{e}: {self.name} reads the results of collections that end after it "
                                           f"is staged ({self._settled} waiting when it was staged, stale, were "
                                           "settled); start Zocalo after staging, as ZocaloCallback does") from None
        finally:
            if self._waiting is asyncio.current_task():
                self._waiting = None
        message = self.receiver.last_message
        assert message is not None
        self._put(results, message.dcid, message.dcgid)

    def _put(self, results: XrcResults, dcid: int | None, dcgid: int | None) -> None:
        self._set_centre_of_mass(results.centre_of_mass.reshape(-1, 3))
        self._set_bounding_box(results.bounding_box.reshape(-1, 2, 3))
        self._set_max_voxel(results.max_voxel.reshape(-1, 3))
        self._set_max_count(results.max_count)
        self._set_n_voxels(results.n_voxels)
        self._set_total_count(results.total_count)
        self._set_sample_id(np.ma.filled(results.sample_id, NO_SAMPLE_ID).astype(np.int64))
        self._set_dcid(dcid if dcid is not None else 0)
        self._set_dcgid(dcgid if dcgid is not None else 0)
