"""A grid scan's Zocalo side as a beamline runs it with dls-dodal: run in
dodal's own venv by tests/test_dodal.py, importing nothing of zocalo-xrc.

dodal's ``ZocaloTrigger`` sends ``run_start``/``run_end`` from a RunEngine
callback (as Hyperion's zocalo callback does: a start per grid when the
collection's run opens, an end per DCID when it closes), and dodal's
``ZocaloResults`` device, staged before the collection, is triggered and
read in the same plan. Both find the broker through ``$ZOCALO_CONFIG`` and
the environment named on the command line.

Talks on stdin/stdout, one line each:
  out ``ready``            the device is staged (subscribed, stale results cleared)
  in  registration JSON    ``local add-scan --json``'s line: DCIDs, DCGID, file name, starts
  out ``started``          every grid's start sent
  in  ``written``          the detector has written every frame
  out results JSON         what the device reads, and what get_full_processing_results gives
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Generator
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
from bluesky.run_engine import RunEngine
from bluesky.utils import Msg
from dodal.devices.zocalo import (  # type: ignore[import-untyped]
    ZocaloResults, ZocaloStartInfo, ZocaloTrigger, get_full_processing_results)
from dodal.devices.zocalo.zocalo_results import ZOCALO_STAGE_GROUP  # type: ignore[import-untyped]
from ophyd_async.core import init_devices

COLLECTION = "do_gridscan"
SIGNALS = ("centre_of_mass", "max_voxel", "max_count", "n_voxels", "total_count", "bounding_box", "sample_id",
           "ispyb_dcid", "ispyb_dcgid")


class ZocaloCallback:
    """Starts and ends the collection's Zocalo jobs from the run's documents."""

    def __init__(self, trigger: ZocaloTrigger) -> None:
        self.trigger = trigger
        self.run: str | None = None
        self.dcids: list[int] = []

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        if name == "start" and doc.get("plan_name") == COLLECTION:
            self.run, self.dcids = doc["uid"], [s["ispyb_dcid"] for s in doc["zocalo_starts"]]
            for s in doc["zocalo_starts"]:
                self.trigger.run_start(ZocaloStartInfo(**s))
        elif name == "stop" and doc["run_start"] == self.run:
            for dcid in self.dcids:
                self.trigger.run_end(dcid)


def say(line: str) -> None:
    print(line, flush=True)


async def line_from_caller(into: list[str]) -> None:
    into.append(await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline))


def grid_scan(zocalo: ZocaloResults, out: dict[str, Any]) -> Generator[Msg, Any, None]:
    yield from bps.stage(zocalo, group=ZOCALO_STAGE_GROUP)
    yield from bps.wait(ZOCALO_STAGE_GROUP)
    say("ready")
    lines: list[str] = []
    yield from bps.wait_for([lambda: line_from_caller(lines)])
    registered = json.loads(lines[-1])
    starts = [{k: s["parameters"][k] for k in ("ispyb_dcid", "start_frame_index", "number_of_frames",
                                                "message_index")} | {"filename": registered["filename"]}
              for s in registered["starts"]]

    @bpp.run_decorator(md={"plan_name": COLLECTION, "zocalo_starts": starts})  # type: ignore[untyped-decorator]
    def collection() -> Generator[Msg, Any, None]:
        yield from bps.null()  # the start document is out: the callback has sent the starts
        say("started")
        yield from bps.wait_for([lambda: line_from_caller(lines)])  # the detector writes meanwhile

    yield from collection()  # closed: the callback has sent the ends
    yield from bps.trigger(zocalo, wait=True)
    for name in SIGNALS:
        value = yield from bps.rd(getattr(zocalo, name))
        out[name] = value.tolist() if hasattr(value, "tolist") else value
    out["full_processing_results"] = yield from get_full_processing_results(zocalo)
    yield from bps.unstage(zocalo)


def main() -> int:
    environment = sys.argv[1]
    RE = RunEngine({})
    RE.subscribe(ZocaloCallback(ZocaloTrigger(environment)))  # type: ignore[no-untyped-call]
    with init_devices():
        zocalo = ZocaloResults(name="zocalo", zocalo_environment=environment, timeout_s=float(sys.argv[2]))
    out: dict[str, Any] = {}
    RE(grid_scan(zocalo, out))
    say(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
