"""Mimas: decides which processing runs for a data collection.

The beamline sends ``{"recipes": ["mimas"], "parameters": {"ispyb_dcid": N,
"event": "start"|"end", ...}}``; the dispatcher fills in what ISPyB knows of
the collection and hands it to this service on the ``mimas`` queue. For a
grid scan (ISPyB has its grid), Mimas asks the dispatcher for

* GPU per-image analysis at ``start`` (it follows the detector as it
  writes; results carry ``"gpu": true``), and
* CPU per-image analysis at ``end`` (the data is all written): for a
  detector's files as Diamond's CPU path runs, a file watcher sending an
  image at a time to per-image analysis workers sharing a queue,

each feeding X-ray centring, so each yields one result per scan. Which of the
two run is the ``zocalo_xrc.pia`` setting (``gpu``, ``cpu`` or both). Other
collections need nothing here, and say so in the log.
"""

from __future__ import annotations

import uuid
from typing import Any, Mapping

import workflows.recipe
from workflows.services.common_service import CommonService

from . import logbook
from .settings import Settings

GPU_RECIPE = "per-image-analysis-gridscan-gpu"
CPU_RECIPE = "per-image-analysis-gridscan"
#: CPU per-image analysis of a detector's files, as Diamond's: a file watcher, then workers taking an image each
CPU_FILES_RECIPE = "per-image-analysis-gridscan-files"
#: what the beamline's start message says about the frames, passed on to per-image analysis
FRAME_KEYS = ("filename", "start_frame_index", "number_of_frames", "message_index")


def given(value: Any) -> Any:
    """A recipe parameter the dispatcher could not fill stays ``"{name}"``: None."""
    if isinstance(value, str) and value.startswith("{") and value.endswith("}"):
        return None
    return value


def decide(parameters: Mapping[str, Any], pia: frozenset[str]) -> tuple[list[dict[str, Any]], str]:
    """The dispatcher requests for one Mimas step, and why (for the log)."""
    event, dcid = given(parameters.get("event")), given(parameters.get("dcid"))
    if dcid is None:
        return [], "no DCID: nothing to run"
    if given(parameters.get("gridinfo")) is None and given(parameters.get("experiment_type")) is None:
        return [], f"DCID {dcid} is not in ISPyB (or the dispatcher has no ISPyB filter): nothing to run"
    if not isinstance(given(parameters.get("gridinfo")), Mapping) or not parameters["gridinfo"]:
        kind = given(parameters.get("experiment_type")) or "unknown"
        return [], f"DCID {dcid} ({kind}) is not a grid scan: nothing to run"
    wanted = {"start": ("gpu", GPU_RECIPE), "end": ("cpu", CPU_RECIPE)}.get(event)
    if wanted is None:
        return [], f"DCID {dcid}: unknown event {event!r}: nothing to run"
    kind, recipe = wanted
    template = given(parameters.get("image_template"))
    if kind == "cpu" and isinstance(template, str) and not template.endswith(".json"):  # a detector's files
        recipe = CPU_FILES_RECIPE
    if kind not in pia:
        return [], f"DCID {dcid} {event}: {kind.upper()} per-image analysis is off here"
    request: dict[str, Any] = {"ispyb_dcid": int(dcid), "guid": str(uuid.uuid4())}
    if given(parameters.get("guid")):
        request["parent_guid"] = parameters["guid"]
    for key in FRAME_KEYS:
        if given(parameters.get(key)) is not None:
            request[key] = parameters[key]
    return [{"recipes": [recipe], "parameters": request}], f"DCID {dcid} {event}: {recipe} as {request['guid']}"


class Mimas(CommonService):
    """The ``mimas`` queue's service for the local Zocalo."""

    _service_name = "Mimas (zocalo-xrc)"
    _logger_name = "zocalo_xrc.local.mimas"
    queue = "mimas"

    def initializing(self) -> None:
        self.settings = Settings.of(self.config)
        self.journal = logbook.attach(self)
        workflows.recipe.wrap_subscribe(self._transport, self.queue, self.on_step, acknowledgement=True,
                                        log_extender=self.extend_log)

    def in_shutdown(self) -> None:
        logbook.detach(self)

    def on_step(self, rw: workflows.recipe.RecipeWrapper, header: Mapping[str, Any], message: Any) -> None:
        requests, why = decide(rw.recipe_step.get("parameters") or {}, self.settings.pia)
        transport = rw.transport  # the service's, by which the step came
        txn = transport.transaction_begin(subscription_id=header["subscription"])
        transport.ack(header, transaction=txn)
        for request in requests:
            transport.send("processing_recipe", request, transaction=txn)
        transport.transaction_commit(txn)
        self.log.info("Mimas: %s", why)
