"""A simulated grid scan: the grids a beamline scans and what is on the pin.

A scan file is JSON. Its grids (one for 2D; two for 3D, xy then xz) carry
ISPyB's ``gridinfo`` keys, and the spots each image shows come either

* from a **recording**: each grid's ``counts``, in acquisition order (the
  files ``zocalo-xrc centre`` reads, e.g. ``examples/scan3d.json``), or
* from a **model** of the sample: ``crystals`` (ellipsoids, in mm from the
  corner of the first box: ``x`` along both grids, ``y`` down the xy grid,
  ``z`` down the xz grid), a mean ``background`` of stray spots per image,
  and a ``seed`` for the Poisson noise. No crystals and no background is a
  pin with nothing that diffracts.

An image of the xy grid looks along ``z``: its spots grow with the length
of crystal the beam crosses there, and likewise along ``y`` for the xz
grid. So the model's two grids are two honest projections of one volume.

``lost_frames``: that many frames at the end of each grid never come out of
per-image analysis (a spot finder that dies), so the scan never completes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .._text import quoted, read_json
from ..client import ZocaloStartInfo
from ..grid import GridInfo, reshape_grid


class ScanFileError(ValueError):
    """A scan file that does not describe a scan; says where."""


def check_name(name: str) -> str:
    """A scan's name (the detector file name the beamline sends, and the
    start of its data file's): a plain name, never a path; else ValueError."""
    if (not isinstance(name, str) or not name or name in (".", "..")
            or any(c in name for c in ("/", "\\", "\0")) or name != name.strip()):
        raise ValueError(f"scan name {quoted(name)}: expected a plain file name (not empty, no '/' or '\\', "
                         "not '.' or '..', no leading or trailing spaces)")
    return name


@dataclass(frozen=True)
class Crystal:
    centre_mm: tuple[float, float, float]
    size_mm: tuple[float, float, float]
    spots: float

    @classmethod
    def parse(cls, where: str, value: Any) -> Crystal:
        if not isinstance(value, Mapping):
            raise ScanFileError(f"{where}: expected an object with centre_mm, size_mm and spots")
        try:
            centre = _triple(value["centre_mm"])
            size = _triple(value["size_mm"])
            spots = float(value["spots"])
        except KeyError as e:
            raise ScanFileError(f"{where}: missing {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ScanFileError(f"{where}: {e}") from None
        if min(size) <= 0 or spots < 0 or not np.isfinite([*centre, *size, spots]).all():
            raise ScanFileError(f"{where}: sizes must be > 0 and spots >= 0, all finite")
        return cls(centre, size, spots)


def _triple(value: Any) -> tuple[float, float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ValueError(f"expected [x, y, z] in mm, got {quoted(value)}")
    x, y, z = (float(v) for v in value)
    return (x, y, z)


@dataclass(frozen=True)
class Scan:
    """One grid scan to simulate: its grids (xy first), and the spot counts
    per-image analysis finds on each image."""

    grids: tuple[GridInfo, ...]
    beamline: str = "i03"
    sample_id: int | None = None
    recorded: tuple[tuple[int, ...], ...] | None = None
    crystals: tuple[Crystal, ...] = ()
    background: float = 0.0
    seed: int = 0
    lost_frames: int = 0
    note: str = ""

    @property
    def experiment_type(self) -> str:
        """ISPyB's experiment type for the scan's data collection group."""
        return "Mesh3D" if len(self.grids) == 2 else "Mesh"

    @classmethod
    def load(cls, path: Path | str) -> Scan:
        path = Path(path)
        data = read_json(path, ScanFileError)
        try:
            return cls.from_dict(data)
        except ScanFileError as e:
            raise ScanFileError(f"{path}: {e}") from None

    @classmethod
    def from_dict(cls, data: Any) -> Scan:
        if not isinstance(data, Mapping):
            raise ScanFileError("expected an object with grids (or a 2D file's counts and gridinfo)")
        raw = data.get("grids")
        top = raw is None and "gridinfo" in data  # a 2D recording: one grid at the top level
        if top:
            raw = [{k: data[k] for k in ("gridinfo", "counts") if k in data}]
        if not isinstance(raw, list) or len(raw) not in (1, 2):
            raise ScanFileError("grids: expected a list of one grid (2D) or two (3D: xy, then xz)")
        grids, recorded = [], []
        for k, g in enumerate(raw):
            at = "" if top else f"grids[{k}]"  # where the file holds the grid
            if not isinstance(g, Mapping) or "gridinfo" not in g:
                raise ScanFileError(f"{at}: expected an object with gridinfo")
            try:
                grids.append(GridInfo.from_ispyb(g["gridinfo"]))
            except ValueError as e:  # its message starts with "gridinfo"
                raise ScanFileError(f"{at}.{e}" if at else str(e)) from None
            if "counts" in g:
                recorded.append(_counts(f"{at}.counts" if at else "counts", g["counts"], grids[-1].image_count))
        if len(grids) == 2 and grids[0].steps_x != grids[1].steps_x:
            raise ScanFileError(f"grids: the xy and xz grids must share x (steps_x {grids[0].steps_x} "
                                f"and {grids[1].steps_x})")
        if recorded and len(recorded) != len(grids):
            raise ScanFileError("grids: give counts for every grid or for none (then crystals model the sample)")
        crystals = data.get("crystals", [])
        if recorded and crystals:
            raise ScanFileError("give recorded counts or crystals, not both")
        if not isinstance(crystals, list):
            raise ScanFileError("crystals: expected a list")
        beamline = data.get("beamline", "i03")
        if not isinstance(beamline, str) or not beamline.isidentifier():
            raise ScanFileError(f"beamline: expected a name like 'i03', got {quoted(beamline)}")
        return cls(
            grids=tuple(grids),
            beamline=beamline,
            sample_id=_optional_int("sample_id", data.get("sample_id")),
            recorded=tuple(recorded) if recorded else None,
            crystals=tuple(Crystal.parse(f"crystals[{k}]", c) for k, c in enumerate(crystals)),
            background=_non_negative("background", data.get("background", 0.0)),
            seed=_optional_int("seed", data.get("seed", 0)) or 0,
            lost_frames=_optional_int("lost_frames", data.get("lost_frames", 0)) or 0,
            note=str(data.get("note", "")),
        )

    def start_infos(self, dcids: Sequence[int], filename: str) -> list[ZocaloStartInfo]:
        """What the beamline says at ``start`` for each grid, given the DCIDs
        ISPyB gave them: both grids are in one detector file ``filename``, the
        second's frames after the first's (``message_index`` 0, then 1)."""
        infos, first = [], 0
        for k, (dcid, grid) in enumerate(zip(dcids, self.grids)):
            infos.append(ZocaloStartInfo(dcid, filename, first, grid.image_count, k))
            first += grid.image_count
        return infos

    def describe_grids(self, dcids: Sequence[int]) -> str:
        """The grids as ISPyB registered them: ``DCID 5 (14 x 9)``, or
        ``DCIDs 5 (20 x 12), 6 (20 x 10)``."""
        grids = ", ".join(f"{d} ({g.steps_x} x {g.steps_y})" for d, g in zip(dcids, self.grids))
        return f"DCID{'s' if len(self.grids) > 1 else ''} {grids}"

    @property
    def each_grid(self) -> str:
        """How to say "for every grid" of this scan."""
        return "each grid" if len(self.grids) > 1 else "the grid"

    def to_dict(self) -> dict[str, Any]:
        """The scan file's contents (what :meth:`from_dict` reads back)."""
        grids: list[dict[str, Any]] = [{"gridinfo": g.to_ispyb()} for g in self.grids]
        if self.recorded is not None:
            for g, counts in zip(grids, self.recorded):
                g["counts"] = list(counts)
        d: dict[str, Any] = {"note": self.note, "beamline": self.beamline, "sample_id": self.sample_id,
                             "grids": grids}
        if self.recorded is None:
            d.update(crystals=[{"centre_mm": list(c.centre_mm), "size_mm": list(c.size_mm), "spots": c.spots}
                               for c in self.crystals],
                     background=self.background, seed=self.seed)
        if self.lost_frames:
            d["lost_frames"] = self.lost_frames
        return d

    def counts(self, k: int) -> np.ndarray:
        """Grid ``k``'s spot counts in acquisition order (image 1 first)."""
        if self.recorded is not None:
            return np.asarray(self.recorded[k], dtype=np.int64)
        grid = self.grids[k]
        expected = self.expected(k)  # A[x][v]
        rng = np.random.default_rng([self.seed, k])
        noisy = rng.poisson(expected + self.background).astype(np.int64)
        # image n shows box order[n]: invert the scan's snake/orientation through the core's own mapping
        order = reshape_grid(np.arange(grid.image_count), grid)
        counts = np.empty(grid.image_count, dtype=np.int64)
        counts[order.ravel()] = noisy.ravel()
        return counts

    def expected(self, k: int) -> np.ndarray:
        """The model's mean spots per box of grid ``k`` (no noise), ``A[x][v]``
        with ``v`` = y for the xy grid, z for the xz grid."""
        grid = self.grids[k]
        x = (np.arange(grid.steps_x) + 0.5) * grid.dx_mm
        v = (np.arange(grid.steps_y) + 0.5) * grid.dy_mm
        across = 1 + k  # the xy grid's second axis is y, the xz grid's is z
        total = np.zeros((grid.steps_x, grid.steps_y))
        for c in self.crystals:
            rx = (x[:, None] - c.centre_mm[0]) / (c.size_mm[0] / 2)
            rv = (v[None, :] - c.centre_mm[across]) / (c.size_mm[across] / 2)
            total += c.spots * np.sqrt(np.clip(1.0 - rx**2 - rv**2, 0.0, None))  # chord length / diameter
        return total


def _counts(where: str, value: Any, n: int) -> tuple[int, ...]:
    """A grid's spot counts, or what is wrong and where: ``where[i]`` is the
    ``i``-th count as the file holds it (the image numbered ``i + 1``)."""
    if not isinstance(value, list) or len(value) != n:
        got = f"{len(value)} counts" if isinstance(value, list) else quoted(value)
        raise ScanFileError(f"{where}: expected a list of {n} counts (steps_x * steps_y), got {got}")
    for i, c in enumerate(value):
        if isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise ScanFileError(f"{where}[{i}]: expected a count (a whole number >= 0), got {quoted(c)}")
    return tuple(value)


def _optional_int(key: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ScanFileError(f"{key}: expected an integer, got {quoted(value)}")
    return value


def _non_negative(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ScanFileError(f"{key}: expected a number >= 0, got {quoted(value)}")
    return float(value)
