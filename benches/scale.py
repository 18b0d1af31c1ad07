"""The benches' quick mode: ``ZOCALO_XRC_BENCH_SCALE=0.1`` runs a tenth of
every bench's rounds (at least one), ``1`` (the default) all of them."""

import os

_VALUE = os.environ.get("ZOCALO_XRC_BENCH_SCALE", "1")
try:
    SCALE = float(_VALUE)
except ValueError:
    SCALE = -1.0
if not 0 < SCALE <= 1:
    raise ValueError(f"ZOCALO_XRC_BENCH_SCALE must be a number in (0, 1], not {_VALUE!r}")


def scaled(rounds: int) -> int:
    """The rounds to run of a bench that asks for ``rounds``."""
    return max(1, round(rounds * SCALE))
