"""zocalo-xrc: X-ray centring for synchrotron macromolecular crystallography.

The centring core is Rust (``zocalo_xrc._native``); this package gives it typed
Python faces.
"""

from collections.abc import Sequence as _Sequence
from typing import TYPE_CHECKING
from importlib.metadata import PackageNotFoundError as _NotInstalled
from importlib.metadata import version as _version

from ._native import XrcResults
from ._results import GridScan2DResult, XrcResult
from ._native import MAX_RUNS
from .centring import (
    MULTIPIN_THRESHOLD,
    MULTIPIN_THRESHOLD_ABSOLUTE,
    GridScan,
    centre_2d,
    centre_3d,
    centre_3d_scans,
    well_limits,
)
from .messaging import ConfigurationError, ConnectionSettings
from .geometry import GridGeometry, MotorPosition, OutsideGridError
from .grid import GridInfo, reshape_grid
from .pia.finder import SpotFinder, Spots
from .messages import ResultMessage, ResultPayloadError, build_result_message, parse_result_message
from .messaging import ConnectionLostError, InProcessTransport, QueueInUseError, Transport, TransportError, UnroutableError
from .client import (
    IN_PROCESS,
    NoResultsFromZocaloError,
    Source,
    SourceComparison,
    ZocaloResults,
    ZocaloResults2D,
    ZocaloStartInfo,
    TriggerTimeoutError,
    ZocaloTrigger,
)

try:
    __version__ = _version("zocalo-xrc")
except _NotInstalled:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

_Sequence.register(XrcResults)


if TYPE_CHECKING:
    from .pia.images import Images, ImagesError, open_images


def __getattr__(name: str) -> object:
    # reading images pulls h5py in: only when asked for
    if name in ("open_images", "Images", "ImagesError"):
        from .pia import images

        return getattr(images, name)
    raise AttributeError(f"module 'zocalo_xrc' has no attribute {name!r}")

__all__ = [
    "IN_PROCESS",
    "Images",
    "ImagesError",
    "SpotFinder",
    "Spots",
    "open_images",
    "__version__",
    "ConfigurationError",
    "ConnectionLostError",
    "QueueInUseError",
    "TriggerTimeoutError",
    "ConnectionSettings",
    "InProcessTransport",
    "NoResultsFromZocaloError",
    "Source",
    "SourceComparison",
    "Transport",
    "TransportError",
    "UnroutableError",
    "ZocaloResults",
    "ZocaloResults2D",
    "ZocaloStartInfo",
    "ZocaloTrigger",
    "MAX_RUNS",
    "MULTIPIN_THRESHOLD",
    "MULTIPIN_THRESHOLD_ABSOLUTE",
    "MotorPosition",
    "OutsideGridError",
    "ResultMessage",
    "ResultPayloadError",
    "GridGeometry",
    "GridInfo",
    "GridScan",
    "GridScan2DResult",
    "XrcResult",
    "XrcResults",
    "build_result_message",
    "centre_2d",
    "centre_3d",
    "centre_3d_scans",
    "parse_result_message",
    "reshape_grid",
    "well_limits",
]
