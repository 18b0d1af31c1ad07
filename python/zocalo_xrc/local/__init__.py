"""Local Zocalo: the whole loop from trigger to result on one machine
(zocalo's dispatcher and recipes, ISPyB, Mimas, simulated per-image analysis,
the X-ray centring service). Needs the ``[local]`` extra."""

from .._extras import require

require("zocalo_xrc.local", "local", "workflows", "zocalo", "ispyb", "sqlalchemy")

from .ispyb import RegisteredScan  # noqa: E402 (after the check that names the extra)
from .scan import Crystal, Scan, ScanFileError  # noqa: E402
from .settings import Settings  # noqa: E402
from .zocalo import BrokerInUseError, LocalZocalo  # noqa: E402

__all__ = ["BrokerInUseError", "Crystal", "LocalZocalo", "RegisteredScan", "Scan", "ScanFileError", "Settings"]
