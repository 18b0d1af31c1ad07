"""Grid descriptions as ISPyB stores them, and the layout of counts on a grid."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping

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

    def __post_init__(self) -> None:
        """Checked as :meth:`from_ispyb` checks (errors name the attribute),
        and held as plain ints, floats and a bool."""
        for key, attr, check in _CHECKS:
            object.__setattr__(self, attr, check(f"GridInfo: {attr}", getattr(self, attr)))

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

        return cls(**{attr: check(f"gridinfo: {key}", get(key)) for key, attr, check in _CHECKS})

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


# Each check gives the value as GridInfo holds it, or raises a ValueError
# naming it (``name``: "gridinfo: steps_x", "steps_x", ...).

def _steps(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {quoted(value)}")
    if not isinstance(value, numbers.Integral) and not (math.isfinite(value) and float(value).is_integer()):
        raise ValueError(f"{name} must be a whole number, got {quoted(value)}")
    whole = int(value) if isinstance(value, numbers.Integral) else int(float(value))
    if whole < 1:
        raise ValueError(f"{name} must be positive, got {quoted(value)}")
    if whole > MAX_STEPS:
        raise ValueError(f"{name} must be at most {MAX_STEPS}, got {quoted(value)}")
    return whole


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {quoted(value)}")
    f = finite_float(value)
    if f is None:
        raise ValueError(f"{name} must be finite, got {quoted(value)}")
    return f


def _positive(name: str, value: Any) -> float:
    f = _number(name, value)
    if f <= 0:
        raise ValueError(f"{name} must be positive, got {quoted(value)}")
    return f


def _flag(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    raise ValueError(f"{name} must be true/false or 0/1, got {quoted(value)}")


def _orientation(name: str, value: Any) -> Orientation:
    if isinstance(value, str) and value.lower() in ("horizontal", "vertical"):
        return value.lower()  # type: ignore[return-value]
    raise ValueError(f"{name} must be 'horizontal' or 'vertical', got {quoted(value)}")


#: (ISPyB key, GridInfo attribute, check) of every field.
_CHECKS: list[tuple[str, str, Callable[[str, Any], Any]]] = [
    ("steps_x", "steps_x", _steps),
    ("steps_y", "steps_y", _steps),
    *((key, attr, _positive if key in _POSITIVE else _number) for key, attr in _FLOAT_KEYS.items()),
    ("snaked", "snaked", _flag),
    ("orientation", "orientation", _orientation),
]


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
    else:
        steps_x, steps_y = _steps("steps_x", steps_x), _steps("steps_y", steps_y)
        snaked, orientation = _flag("snaked", snaked), _orientation("orientation", orientation)
    return _native.reshape_grid(counts_array(counts, 1, "counts"), steps_x, steps_y, snaked, orientation)
