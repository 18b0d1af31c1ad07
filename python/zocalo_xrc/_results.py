"""Typed X-ray centring results, shaped exactly like Diamond's wire format."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

Coordinate = tuple[int, int, int]


def _as_lists(v: Any) -> Any:
    return [_as_lists(x) for x in v] if isinstance(v, tuple) else v


def _as_tuples(v: Any) -> Any:
    return tuple(_as_tuples(x) for x in v) if isinstance(v, list) else v


class _WireShape:
    """Field order is wire order: tuples travel as JSON lists."""

    __slots__ = ()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        """Build from the wire shape (lists become tuples)."""
        return cls(**{f.name: _as_tuples(d[f.name]) for f in fields(cls)})  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        """The wire shape: the same keys, in the same order, as the service sends."""
        return {f.name: _as_lists(getattr(self, f.name)) for f in fields(self)}  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class XrcResult(_WireShape):
    """One diffracting region of a 3D scan, in grid boxes.

    ``centre_of_mass`` puts box centres on half-integers; ``max_voxel`` is an
    integer box index; ``bounding_box`` is half-open, ``(lower, upper)``.
    """

    centre_of_mass: tuple[float, float, float]
    max_voxel: Coordinate
    max_count: float
    n_voxels: int
    total_count: float
    sample_id: int | None
    bounding_box: tuple[Coordinate, Coordinate]

    @property
    def centre_in_boxes(self) -> tuple[float, float, float]:
        """``centre_of_mass - 0.5``: box ``k`` centred on ``k``, as plans use it."""
        x, y, z = self.centre_of_mass
        return (x - 0.5, y - 0.5, z - 0.5)

    @property
    def bounds_in_boxes(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """Both bounding-box corners less 0.5, on the same footing as :attr:`centre_in_boxes`."""
        lo, hi = self.bounding_box
        return (tuple(c - 0.5 for c in lo), tuple(c - 0.5 for c in hi))  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class GridScan2DResult(_WireShape):
    """The result of a 2D scan. ``status`` is ``"ok"`` or ``"fail"`` (no spots);
    on failure every optional field is ``None``."""

    centre_of_mass: tuple[float, float] | None
    max_voxel: tuple[int, int] | None
    max_count: float | None
    n_voxels: int | None
    total_count: float | None
    sample_id: int | None
    steps: tuple[int, int]
    box_size_px: tuple[float, float]
    snapshot_offset: tuple[float, float]
    centre_x: float | None
    centre_y: float | None
    centre_x_box: float | None
    centre_y_box: float | None
    status: str
    message: str
    best_image: int | None
    reflections_in_best_image: int | None
    best_region: tuple[tuple[int, int], ...] | None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def region_bounds(self) -> tuple[tuple[int, int], tuple[int, int]] | None:
        """The best region's box bounds, half-open like a 3D bounding box:
        ``((min x, min y), (max x + 1, max y + 1))``; None without a region."""
        if not self.best_region:
            return None
        ys = [c[0] for c in self.best_region]
        xs = [c[1] for c in self.best_region]
        return (min(xs), min(ys)), (max(xs) + 1, max(ys) + 1)
