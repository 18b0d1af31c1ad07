"""Typed X-ray centring results, shaped exactly like Diamond's wire format."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Coordinate = tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class XrcResult:
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

    def to_dict(self) -> dict[str, Any]:
        """The wire shape: the same keys, in the same order, as the service sends."""
        return {
            "centre_of_mass": list(self.centre_of_mass),
            "max_voxel": list(self.max_voxel),
            "max_count": self.max_count,
            "n_voxels": self.n_voxels,
            "total_count": self.total_count,
            "sample_id": self.sample_id,
            "bounding_box": [list(self.bounding_box[0]), list(self.bounding_box[1])],
        }


@dataclass(frozen=True, slots=True)
class GridScan2DResult:
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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GridScan2DResult:
        """Build from the wire shape (lists become tuples)."""

        def tup(v: Any) -> Any:
            return None if v is None else tuple(v)

        region = d["best_region"]
        return cls(
            centre_of_mass=tup(d["centre_of_mass"]),
            max_voxel=tup(d["max_voxel"]),
            max_count=d["max_count"],
            n_voxels=d["n_voxels"],
            total_count=d["total_count"],
            sample_id=d["sample_id"],
            steps=tuple(d["steps"]),
            box_size_px=tuple(d["box_size_px"]),
            snapshot_offset=tuple(d["snapshot_offset"]),
            centre_x=d["centre_x"],
            centre_y=d["centre_y"],
            centre_x_box=d["centre_x_box"],
            centre_y_box=d["centre_y_box"],
            status=d["status"],
            message=d["message"],
            best_image=d["best_image"],
            reflections_in_best_image=d["reflections_in_best_image"],
            best_region=None if region is None else tuple(tuple(c) for c in region),
        )

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        """The wire shape: the same keys, in the same order, as the service sends."""

        def lst(v: Any) -> Any:
            return None if v is None else list(v)

        return {
            "centre_of_mass": lst(self.centre_of_mass),
            "max_voxel": lst(self.max_voxel),
            "max_count": self.max_count,
            "n_voxels": self.n_voxels,
            "total_count": self.total_count,
            "sample_id": self.sample_id,
            "steps": list(self.steps),
            "box_size_px": list(self.box_size_px),
            "snapshot_offset": list(self.snapshot_offset),
            "centre_x": self.centre_x,
            "centre_y": self.centre_y,
            "centre_x_box": self.centre_x_box,
            "centre_y_box": self.centre_y_box,
            "status": self.status,
            "message": self.message,
            "best_image": self.best_image,
            "reflections_in_best_image": self.reflections_in_best_image,
            "best_region": None if self.best_region is None else [list(c) for c in self.best_region],
        }
