"""Grid descriptions as ISPyB stores them, and the layout of counts on a grid."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Literal, Mapping

import numpy as np

from . import _native
from ._counts import counts_array
from ._text import finite_float, quoted

Orientation = Literal["horizontal", "vertical"]

#: ISPyB / recipe key -> GridInfo attribute, for the floating-point fields.
_FLOAT_KEYS = {
    "dx_mm": "dx_mm",
    "dy_mm": "dy_mm",
    "micronsPerPixelX": "microns_per_pixel_x",
    "micronsPerPixelY": "microns_per_pixel_y",
    "snapshot_offsetXPixel": "snapshot_offset_x_px",
    "snapshot_offsetYPixel": "snapshot_offset_y_px",
}
_POSITIVE = {"dx_mm", "dy_mm", "micronsPerPixelX", "micronsPerPixelY"}


@dataclass(frozen=True, slots=True)
class GridInfo:
    """One grid scan: its size, how it was scanned, and where it sits on the
    sample camera's snapshot. Build it from ISPyB's keys with :meth:`from_ispyb`."""

    steps_x: int
    steps_y: int
    dx_mm: float
    dy_mm: float
    microns_per_pixel_x: float
    microns_per_pixel_y: float
    snapshot_offset_x_px: float
    snapshot_offset_y_px: float
    snaked: bool
    orientation: Orientation

    @classmethod
    def from_ispyb(cls, gridinfo: Mapping[str, Any]) -> GridInfo:
        """Read the ISPyB / recipe ``gridinfo`` keys. Steps may be whole floats
        (``14.0``) and ``snaked`` may be 0/1; anything else wrong raises a
        ``ValueError`` naming the key. Extra keys are ignored."""
        if not isinstance(gridinfo, Mapping):
            raise ValueError(f"gridinfo: expected a mapping, got {type(gridinfo).__name__}")

        def get(key: str) -> Any:
            try:
                return gridinfo[key]
            except KeyError:
                raise ValueError(f"gridinfo: missing key {quoted(key)}") from None

        fields: dict[str, Any] = {key: _steps(key, get(key)) for key in ("steps_x", "steps_y")}
        for key, attr in _FLOAT_KEYS.items():
            fields[attr] = _number(key, get(key), positive=key in _POSITIVE)
        fields["snaked"] = _flag("snaked", get("snaked"))
        fields["orientation"] = _orientation(get("orientation"))
        return cls(**fields)

    def to_ispyb(self) -> dict[str, Any]:
        """The ISPyB keys of this grid."""
        d: dict[str, Any] = {"steps_x": self.steps_x, "steps_y": self.steps_y}
        d.update({key: getattr(self, attr) for key, attr in _FLOAT_KEYS.items()})
        d["snaked"] = self.snaked
        d["orientation"] = self.orientation
        return d

    @property
    def image_count(self) -> int:
        return self.steps_x * self.steps_y

    @property
    def box_size_px(self) -> tuple[float, float]:
        """One grid box on the snapshot, in pixels."""
        return (
            1000 * self.dx_mm / self.microns_per_pixel_x,
            1000 * self.dy_mm / self.microns_per_pixel_y,
        )


#: The most boxes along one side of a grid (beamline grids have tens to hundreds).
MAX_STEPS = 2**31 - 1


def _steps(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"gridinfo: {key} must be a number, got {quoted(value)}")
    if not isinstance(value, numbers.Integral) and not (math.isfinite(value) and float(value).is_integer()):
        raise ValueError(f"gridinfo: {key} must be a whole number, got {quoted(value)}")
    whole = int(value) if isinstance(value, numbers.Integral) else int(float(value))
    if whole < 1:
        raise ValueError(f"gridinfo: {key} must be positive, got {quoted(value)}")
    if whole > MAX_STEPS:
        raise ValueError(f"gridinfo: {key} must be at most {MAX_STEPS}, got {quoted(value)}")
    return whole


def _number(key: str, value: Any, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"gridinfo: {key} must be a number, got {quoted(value)}")
    f = finite_float(value)
    if f is None:
        raise ValueError(f"gridinfo: {key} must be finite, got {quoted(value)}")
    if positive and f <= 0:
        raise ValueError(f"gridinfo: {key} must be positive, got {quoted(value)}")
    return f


def _flag(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    raise ValueError(f"gridinfo: {key} must be true/false or 0/1, got {quoted(value)}")


def _orientation(value: Any) -> Orientation:
    if isinstance(value, str) and value.lower() in ("horizontal", "vertical"):
        return value.lower()  # type: ignore[return-value]
    raise ValueError(f"gridinfo: orientation must be 'horizontal' or 'vertical', got {quoted(value)}")


def reshape_grid(
    counts: Any,
    grid: GridInfo | None = None,
    *,
    steps_x: int | None = None,
    steps_y: int | None = None,
    snaked: bool | None = None,
    orientation: Orientation | None = None,
) -> np.ndarray:
    """Counts in acquisition order -> ``A[x][y]``, an int64 array of shape
    ``(steps_x, steps_y)``. Give a :class:`GridInfo`, or the four scan values."""
    if grid is not None:
        if any(v is not None for v in (steps_x, steps_y, snaked, orientation)):
            raise TypeError("reshape_grid: give either grid or steps_x/steps_y/snaked/orientation, not both")
        steps_x, steps_y, snaked, orientation = grid.steps_x, grid.steps_y, grid.snaked, grid.orientation
    elif steps_x is None or steps_y is None or snaked is None or orientation is None:
        raise TypeError("reshape_grid: needs grid, or all of steps_x, steps_y, snaked and orientation")
    return _native.reshape_grid(counts_array(counts, 1, "counts"), steps_x, steps_y, snaked, orientation)
