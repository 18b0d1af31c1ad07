"""Bluesky's side: an ophyd-async device that reads Zocalo's X-ray centring
results into a plan, and a document callback that triggers Zocalo for a
plan's collections (``pip install 'zocalo-xrc[bluesky]'``)."""

from .._extras import require

require("zocalo_xrc.bluesky", "bluesky", "bluesky", "ophyd_async")

from .callback import (  # noqa: E402 (after the check that names the extra)
    FILENAME_KEY,
    ZOCALO_HW_READ,
    NoCollectionsError,
    ZocaloCallback,
    start_infos_from_omega_map,
)
from .device import NO_SAMPLE_ID, NoResultsFromZocaloError, ZocaloResults, ZocaloSource

__all__ = [
    "FILENAME_KEY",
    "NO_SAMPLE_ID",
    "ZOCALO_HW_READ",
    "NoCollectionsError",
    "NoResultsFromZocaloError",
    "ZocaloCallback",
    "ZocaloResults",
    "ZocaloSource",
    "start_infos_from_omega_map",
]
