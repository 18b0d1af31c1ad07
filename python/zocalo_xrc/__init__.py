"""zocalo-xrc: X-ray centring for synchrotron macromolecular crystallography.

The centring core is Rust (``zocalo_xrc._native``); this package gives it typed
Python faces.
"""

from collections.abc import Sequence as _Sequence

from ._native import XrcResults
from ._results import GridScan2DResult, XrcResult
from .centring import (
    MULTIPIN_THRESHOLD,
    MULTIPIN_THRESHOLD_ABSOLUTE,
    GridScan,
    centre_2d,
    centre_3d,
    centre_3d_scans,
    well_limits,
)
from .config import ConfigurationError, ConnectionSettings
from .geometry import GridGeometry, MotorPosition, OutsideGridError
from .grid import GridInfo, reshape_grid
from .messages import ResultMessage, ResultPayloadError, build_result_message, parse_result_message
from .transport import InProcessTransport, Transport, TransportError, UnroutableError
from .zocalo import (
    NoResultsFromZocaloError,
    Source,
    SourceComparison,
    ZocaloResults,
    ZocaloStartInfo,
    ZocaloTrigger,
)

_Sequence.register(XrcResults)

__all__ = [
    "ConfigurationError",
    "ConnectionSettings",
    "InProcessTransport",
    "NoResultsFromZocaloError",
    "Source",
    "SourceComparison",
    "Transport",
    "TransportError",
    "UnroutableError",
    "ZocaloResults",
    "ZocaloStartInfo",
    "ZocaloTrigger",
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
