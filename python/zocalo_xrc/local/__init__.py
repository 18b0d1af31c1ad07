"""Local Zocalo: the whole loop from trigger to result on one machine
(zocalo's dispatcher and recipes, ISPyB, Mimas, simulated per-image analysis,
the X-ray centring service). Needs the ``[local]`` extra."""

from .ispyb import RegisteredScan
from .scan import Crystal, Scan, ScanFileError
from .settings import Settings
from .zocalo import BrokerInUseError, LocalZocalo

__all__ = ["BrokerInUseError", "Crystal", "LocalZocalo", "RegisteredScan", "Scan", "ScanFileError", "Settings"]
