"""X-ray centring: per-image spot counts in, typed results out.

The work is done by the Rust core with the GIL released; this module checks and
converts arguments. See ``docs/algorithm.md`` for the algorithm.
"""

from __future__ import annotations

import numbers
from typing import Any, Mapping, NamedTuple, Sequence

from . import _native
from ._counts import counts_array
from ._native import MAX_RUNS, XrcResults
from ._results import GridScan2DResult
from ._text import finite_float, quoted
from .grid import GridInfo, reshape_grid

#: The thresholds Diamond's service uses on multi-sample pins.
MULTIPIN_THRESHOLD = 0.25
MULTIPIN_THRESHOLD_ABSOLUTE = 3


def well_limits(loop_type: str, dx_mm: float) -> list[tuple[float, float]]:
    """Lower and upper x limit, in grid boxes, of each well of a multi-sample pin
    of ``loop_type`` ``"multipin_{n}x{w}+{o}"`` scanned with boxes ``dx_mm`` wide.
    Any other loop type has no wells."""
    if not isinstance(loop_type, str):
        raise ValueError(f"loop_type: expected a string, got {type(loop_type).__name__}")
    width = _finite("dx_mm", dx_mm)
    if width <= 0:
        raise ValueError(f"dx_mm must be positive (a box's width), got {quoted(dx_mm)}")
    return _native.well_limits(loop_type, width)


def centre_2d(
    counts: Any,
    grid: GridInfo,
    *,
    sample_id: int | None = None,
    multipin_sample_ids: Mapping[int | str, int] | None = None,
    well_limits: Sequence[tuple[float, float]] | None = None,
) -> GridScan2DResult:
    """Centre one grid. ``counts`` holds one spot count per image, in acquisition order."""
    if not isinstance(grid, GridInfo):
        raise ValueError(f"grid: expected a GridInfo, got {type(grid).__name__}")
    return _native.centre_2d(
        counts_array(counts, 1, "counts"),
        grid.steps_x,
        grid.steps_y,
        grid.snaked,
        grid.orientation,
        (
            grid.dx_mm,
            grid.dy_mm,
            grid.microns_per_pixel_x,
            grid.microns_per_pixel_y,
            grid.snapshot_offset_x_px,
            grid.snapshot_offset_y_px,
        ),
        _sample_id("sample_id", sample_id),
        _multipin_ids(multipin_sample_ids),
        _well_limits(well_limits),
    )


def centre_3d(
    xy: Any,
    xz: Any,
    *,
    threshold: float = 0.25,
    threshold_absolute: float = 0,
    sample_id: int | None = None,
    multipin_sample_ids: Mapping[int | str, int] | None = None,
    well_limits: Sequence[tuple[float, float]] | None = None,
    max_runs: int = MAX_RUNS,
) -> XrcResults:
    """Centre two grids that share x: ``xy`` of shape ``(nx, ny)`` and ``xz`` of
    shape ``(nx, nz)``, both laid out ``A[x][...]`` (see :func:`reshape_grid`).
    Results come sorted by ``total_count``, largest first. ``threshold`` is a
    fraction of the largest voxel, from 0 to 1; ``threshold_absolute`` a
    count, 0 or more (``docs/algorithm.md``).

    Memory beyond the inputs is a few words per x, y and z, ~12 to ~100 bytes
    per *run* (a stretch of kept voxels along z; the more distinct cut-offs
    the rows have, the more) plus ~280 per separate region (its statistics
    and result), with at most ``max_runs`` runs (default 2^21: at most ~200 MB
    of runs, ~600 MB when every run is a region of its own): a volume that
    splits into more raises ``ValueError``; memory that cannot be had,
    ``MemoryError``. Time is the grids read once plus ``ny + nz`` per x with
    kept voxels plus the runs, not the volume; the call stops on Ctrl-C (it
    checks for signals every few ms)."""
    if isinstance(max_runs, bool) or not isinstance(max_runs, numbers.Integral) or not 0 < max_runs < 2**32:
        raise ValueError(f"max_runs must be an integer from 1 to 2^32 - 1, got {quoted(max_runs)}")
    return _native.centre_3d(
        counts_array(xy, 2, "xy"),
        counts_array(xz, 2, "xz"),
        _fraction("threshold", threshold),
        _count("threshold_absolute", threshold_absolute),
        _sample_id("sample_id", sample_id),
        _multipin_ids(multipin_sample_ids),
        _well_limits(well_limits),
        int(max_runs),
    )


class GridScan(NamedTuple):
    """One grid of a 3D scan as it was collected: its DCID, its counts in
    acquisition order, and its grid description."""

    dcid: int
    counts: Any
    grid: GridInfo


def centre_3d_scans(first: GridScan, second: GridScan, **kwargs: Any) -> XrcResults:
    """Centre the two grids of one data-collection group from their counts in
    acquisition order. The grid with the lower DCID is ``xy``; keyword arguments
    are those of :func:`centre_3d`."""
    if first.dcid == second.dcid:
        raise ValueError(f"the two grids must be different data collections, both have DCID {first.dcid}")
    xy, xz = sorted((first, second), key=lambda s: s.dcid)
    return centre_3d(
        _reshape(xy, "xy"),
        _reshape(xz, "xz"),
        **kwargs,
    )


def _reshape(scan: GridScan, name: str) -> Any:
    try:
        return reshape_grid(scan.counts, scan.grid)
    except ValueError as e:
        raise ValueError(f"{name} (DCID {scan.dcid}): {e}") from None


def _finite(name: str, value: Any) -> float:
    f = finite_float(value)
    if f is None:
        raise ValueError(f"{name} must be a finite number, got {quoted(value)}")
    return f


def _fraction(name: str, value: Any) -> float:
    f = _finite(name, value)
    if not 0 <= f <= 1:
        raise ValueError(f"{name} must be from 0 to 1 (a fraction of the largest voxel), got {quoted(value)}")
    return f


def _count(name: str, value: Any) -> float:
    f = _finite(name, value)
    if f < 0:
        raise ValueError(f"{name} must be 0 or more (a spot count), got {quoted(value)}")
    return f


def _sample_id(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer or None, got {quoted(value)}")
    whole = int(value)
    if not -(2**63) <= whole < 2**63:
        raise ValueError(f"{name} must fit in 64 bits, got {quoted(value)}")
    return whole


def _multipin_ids(ids: Mapping[int | str, int] | None) -> dict[int, int]:
    """Well number (1-based; JSON sends it as a string) -> sample id."""
    if ids is None:
        return {}
    out = {}
    for well, sid in ids.items():
        try:
            number = int(well)
        except (TypeError, ValueError):
            raise ValueError(f"multipin_sample_ids: well number {quoted(well)} is not an integer") from None
        if not 1 <= number < 2**63:
            raise ValueError(f"multipin_sample_ids: well number {quoted(well)} is out of range (wells are numbered from 1)")
        value = _sample_id(f"multipin_sample_ids[{quoted(well)}]", sid)
        if value is None:
            raise ValueError(f"multipin_sample_ids[{quoted(well)}] must be a sample id, got None")
        out[number] = value
    return out


def _well_limits(limits: Sequence[tuple[float, float]] | None) -> list[tuple[float, float]]:
    if limits is None:
        return []
    out = []
    for k, pair in enumerate(limits):
        try:
            lo, hi = pair
        except (TypeError, ValueError):
            raise ValueError(f"well_limits[{k}]: expected a (lower, upper) pair, got {quoted(pair)}") from None
        lower, upper = _finite(f"well_limits[{k}][0]", lo), _finite(f"well_limits[{k}][1]", hi)
        if lower > upper:
            raise ValueError(f"well_limits[{k}]: the lower limit {quoted(lo)} is above the upper {quoted(hi)}")
        out.append((lower, upper))
    return out
