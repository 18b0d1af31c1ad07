"""From grid boxes to motor positions, as Bluesky plans use centring results.

Results count boxes with box centres on half-integers. Plans subtract 0.5 so
that box ``k`` is centred on ``k``, then move to ``start + step * boxes`` on
each axis (``zocalo-wire`` consumers, spec §5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from ._results import GridScan2DResult, XrcResult

Vector = tuple[float, ...]


class OutsideGridError(ValueError):
    """A position lies outside the scanned grid."""


@dataclass(frozen=True, slots=True)
class MotorPosition:
    """A result in motor coordinates (mm): the centre to move to and the
    bounding box's two corners."""

    centre_mm: Vector
    bounding_box_mm: tuple[Vector, Vector]


@dataclass(frozen=True, slots=True)
class GridGeometry:
    """Where a grid scan was taken: start, step and number of boxes per axis.
    ``z`` is for 3D scans (the xz grid); leave it out for a 2D scan."""

    x_start_mm: float
    x_step_mm: float
    x_steps: int
    y_start_mm: float
    y_step_mm: float
    y_steps: int
    z_start_mm: float | None = None
    z_step_mm: float | None = None
    z_steps: int | None = None

    def __post_init__(self) -> None:
        z = (self.z_start_mm, self.z_step_mm, self.z_steps)
        if any(v is None for v in z) and not all(v is None for v in z):
            raise ValueError("GridGeometry: give all of z_start_mm, z_step_mm and z_steps, or none")
        for axis in self._axes():
            if axis[3] < 1:
                raise ValueError(f"GridGeometry: {axis[0]}_steps must be positive, got {axis[3]}")

    def _axes(self) -> list[tuple[str, float, float, int]]:
        axes = [("x", self.x_start_mm, self.x_step_mm, self.x_steps), ("y", self.y_start_mm, self.y_step_mm, self.y_steps)]
        if self.z_steps is not None:
            axes.append(("z", self.z_start_mm, self.z_step_mm, self.z_steps))  # type: ignore[arg-type]
        return axes

    def boxes_to_mm(self, boxes: Vector) -> Vector:
        """Positions in boxes (box ``k`` centred on ``k``) to mm. Raises
        :class:`OutsideGridError` for a position outside ``[-0.5, steps - 0.5]``."""
        axes = self._axes()
        if len(boxes) != len(axes):
            raise ValueError(f"expected {len(axes)} coordinates for this grid, got {len(boxes)}")
        out = []
        for (name, start, step, steps), b in zip(axes, boxes):
            if not -0.5 <= b <= steps - 0.5:
                raise OutsideGridError(f"{name} = {b} boxes is outside the grid (-0.5 to {steps - 0.5})")
            out.append(start + step * b)
        return tuple(out)

    def to_motor(self, result: Union[XrcResult, GridScan2DResult]) -> MotorPosition:
        """A 3D result (this geometry needs z) or a 2D result (no z) in mm."""
        if isinstance(result, XrcResult):
            if self.z_steps is None:
                raise ValueError("a 3D result needs a GridGeometry with z")
            lower, upper = result.bounds_in_boxes
            return MotorPosition(self.boxes_to_mm(result.centre_in_boxes), (self.boxes_to_mm(lower), self.boxes_to_mm(upper)))
        if isinstance(result, GridScan2DResult):
            if self.z_steps is not None:
                raise ValueError("a 2D result needs a GridGeometry without z")
            bounds = result.region_bounds
            if not result.ok or result.centre_of_mass is None or bounds is None:
                raise ValueError(f"a 2D result with status {result.status!r} has no position")
            centre = tuple(c - 0.5 for c in result.centre_of_mass)
            low, high = (tuple(c - 0.5 for c in corner) for corner in bounds)
            return MotorPosition(self.boxes_to_mm(centre), (self.boxes_to_mm(low), self.boxes_to_mm(high)))
        raise TypeError(f"to_motor: expected an XrcResult or a GridScan2DResult, got {type(result).__name__}")
