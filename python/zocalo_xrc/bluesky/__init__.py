"""Bluesky's side: an ophyd-async device that reads Zocalo's X-ray centring
results into a plan (``pip install 'zocalo-xrc[bluesky]'``)."""

from .device import NO_SAMPLE_ID, NoResultsFromZocaloError, ZocaloResults, ZocaloSource

__all__ = ["NO_SAMPLE_ID", "NoResultsFromZocaloError", "ZocaloResults", "ZocaloSource"]
