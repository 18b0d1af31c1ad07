"""Per-image spot counts assembled into grids, grids into groups, and the
centring of a group once it is complete (``docs/wire-format.md`` §2,
``docs/algorithm.md``).

No I/O here: :class:`Assembly` takes one parsed message at a time and says
what became of it. Unlike Diamond's service it counts *distinct* images (a
duplicate changes nothing), starts from zeros, rejects an image number out of
range or a grid that changed, and rejects a group whose grids disagree without
touching any other group.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from .._native import XrcResults, pia_fields
from .._results import GridScan2DResult
from .._text import finite_float, quoted
from ..centring import MULTIPIN_THRESHOLD, MULTIPIN_THRESHOLD_ABSOLUTE, GridScan, centre_2d, centre_3d_scans, well_limits
from ..grid import GridInfo
from .recipe import Envelope, EnvelopeError

#: The most images one grid may have (a grid costs 9 bytes an image while open).
MAX_GRID_IMAGES = 1 << 24


class MessageRejected(ValueError):
    """This message cannot be used (dead-letter it, with this reason); its
    group is not harmed."""


class GroupRejected(ValueError):
    """The group this message belongs to cannot be centred (abort it, with
    this reason); other groups are not harmed."""

    def __init__(self, message: str, group: Group | None = None) -> None:
        super().__init__(message)
        self.group = group


@dataclass(frozen=True)
class PiaMessage:
    """One per-image analysis result, as the centring step receives it. The
    plain, well-formed message is read in one pass by the core
    (:func:`~zocalo_xrc._native.pia_fields`); anything else through the whole
    envelope, which accepts or rejects it with the reason. The envelope,
    ``gridinfo`` and ``parameters`` are read when first asked for."""

    dcid: int
    group_dcids: tuple[int, ...]  # the group's DCIDs, ascending, this one included
    experiment_type: str
    file_number: int
    spots: int
    seen_at: float | None
    gridinfo_json: bytes  # the current step's gridinfo as written: the same bytes, the same grid
    body: bytes = field(repr=False)
    _envelope: Envelope | None = field(default=None, repr=False, compare=False)

    @property
    def is_3d(self) -> bool:
        return len(self.group_dcids) > 1

    @property
    def envelope(self) -> Envelope:
        if self._envelope is None:
            object.__setattr__(self, "_envelope", Envelope.parse(self.body))
        assert self._envelope is not None
        return self._envelope

    @property
    def gridinfo(self) -> Mapping[str, Any]:
        gridinfo: Mapping[str, Any] = self.envelope.step["gridinfo"]
        return gridinfo

    @property
    def parameters(self) -> Mapping[str, Any]:
        parameters: Mapping[str, Any] = self.envelope.step["parameters"]
        return parameters

    @classmethod
    def parse(cls, body: bytes) -> PiaMessage:
        """The message in ``body``; :class:`~.recipe.EnvelopeError` or
        :class:`MessageRejected` (or :class:`GroupRejected` for a group that
        cannot be) names what is wrong."""
        fields = pia_fields(body)
        if fields is None:
            return cls.from_envelope(Envelope.parse(body), body)
        dcid, group, experiment_type, (start, end), file_number, spots, seen_at = fields
        return cls(dcid, group, experiment_type, file_number, spots, seen_at, body[start:end], body)

    @classmethod
    def from_envelope(cls, envelope: Envelope, body: bytes = b"") -> PiaMessage:
        """The message of a recipe envelope whose current step is the centring
        step; :class:`MessageRejected` (or :class:`GroupRejected` for a group
        that cannot be) names what is wrong."""
        step = envelope.step
        parameters = step.get("parameters")
        if not isinstance(parameters, dict):
            raise MessageRejected("the current step has no parameters")
        dcid = _id("parameters.dcid", parameters.get("dcid"))
        others = parameters.get("dcg_dcids") or []
        if not isinstance(others, list):
            raise MessageRejected(f"parameters.dcg_dcids: expected a list of DCIDs, got {quoted(others)}")
        other_ids = [_id(f"parameters.dcg_dcids[{k}]", d) for k, d in enumerate(others)]
        experiment_type = parameters.get("experiment_type") or ""
        if dcid in other_ids:
            raise GroupRejected(f"DCID {dcid} names itself among the other grids of its group (dcg_dcids)")
        group = tuple(sorted({dcid, *other_ids}))
        if len(group) > 2:
            raise GroupRejected(f"DCIDs {', '.join(map(str, group))}: a group of {len(group)} grids; 3D centring takes 2")
        if len(group) == 1 and experiment_type == "Mesh3D":
            raise GroupRejected(f"DCID {dcid}: a Mesh3D grid with no other grid in its group (dcg_dcids is empty)")
        gridinfo = step.get("gridinfo")
        if not isinstance(gridinfo, dict):
            raise MessageRejected("the current step has no gridinfo")
        payload = envelope.payload
        if not isinstance(payload, dict):
            raise MessageRejected(f"payload: expected an object, got {type(payload).__name__}")
        file_number = _count("payload.file-number", payload.get("file-number"), least=1)
        spots = _count("payload.n_spots_total", payload.get("n_spots_total"), least=0)
        seen_at = payload.get("file-seen-at")
        if seen_at is not None and finite_float(seen_at) is None:
            raise MessageRejected(f"payload.file-seen-at: expected a time, got {quoted(seen_at)}")
        return cls(dcid, group, str(experiment_type), file_number, spots, None if seen_at is None else float(seen_at),
                   json.dumps(gridinfo).encode(), body, envelope)


def _id(name: str, value: Any) -> int:
    """A DCID: an integer, or a string of ASCII digits (as Zocalo often sends
    it; ``"²"`` and ``"١٢٣"`` are digits to Python, not DCIDs)."""
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit() and len(value.strip()) <= 18:
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise MessageRejected(f"{name}: expected a DCID, got {quoted(value)}")


def _count(name: str, value: Any, *, least: int) -> int:
    f = finite_float(value)
    if f is None:
        raise MessageRejected(f"{name}: expected a whole number, got {quoted(value)}")
    if not f.is_integer() or f < least or f >= 2**63:
        raise MessageRejected(f"{name}: expected a whole number of at least {least}, got {quoted(value)}")
    return int(f)


@dataclass
class Grid:
    """One grid's counts as they arrive: distinct images, zero-filled."""

    dcid: int
    gridinfo_json: bytes
    gridinfo: Mapping[str, Any]
    grid: GridInfo
    parameters: Mapping[str, Any]
    counts: np.ndarray
    seen: np.ndarray
    images: int = 0
    newest_seen_at: float | None = None

    @classmethod
    def first(cls, message: PiaMessage) -> Grid:
        """The grid of its first message, checked: its gridinfo, its size, and
        that the step's outputs lead to steps of the recipe."""
        try:
            envelope = message.envelope
            for output in ("success", "abort"):
                envelope.targets(output)
            grid = GridInfo.from_ispyb(message.gridinfo)
        except (EnvelopeError, ValueError) as e:
            raise MessageRejected(str(e)) from None
        n = grid.image_count
        if n > MAX_GRID_IMAGES:
            raise MessageRejected(f"DCID {message.dcid}: a grid of {n} images ({grid.steps_x} x {grid.steps_y}); "
                                  f"the service takes grids of up to {MAX_GRID_IMAGES}")
        return cls(message.dcid, message.gridinfo_json, dict(message.gridinfo), grid, message.parameters,
                   np.zeros(n, np.int64), np.zeros(n, bool))

    @property
    def complete(self) -> bool:
        return self.images == len(self.counts)

    def missing(self, at_most: int = 20) -> str:
        """The image numbers that never came, briefly."""
        numbers_ = np.flatnonzero(~self.seen)[:at_most] + 1
        more = len(self.counts) - self.images - len(numbers_)
        return ", ".join(map(str, numbers_)) + (f" and {more} more" if more > 0 else "")


class Fate(enum.Enum):
    ADDED = "added"
    DUPLICATE = "duplicate"
    COMPLETE = "complete"  # the group is complete with this message: centre it


@dataclass
class Group:
    """The grids of one data-collection group (one grid for a 2D scan)."""

    dcids: tuple[int, ...]
    grids: dict[int, Grid] = field(default_factory=dict)
    remaining: int = 0  # images of its grids not yet in (asked of every message: kept, not counted)

    @property
    def complete(self) -> bool:
        return self.remaining == 0 and len(self.grids) == len(self.dcids)

    @property
    def newest_seen_at(self) -> float | None:
        times = [g.newest_seen_at for g in self.grids.values() if g.newest_seen_at is not None]
        return max(times) if times else None

    def describe(self) -> str:
        kind = "3D group" if len(self.dcids) > 1 else "2D grid"
        return f"{kind} DCID {', '.join(map(str, self.dcids))}"

    def missing(self) -> str:
        """What never came, grid by grid."""
        parts = []
        for dcid in self.dcids:
            grid = self.grids.get(dcid)
            if grid is None:
                parts.append(f"DCID {dcid}: no image at all")
            elif not grid.complete:
                parts.append(f"DCID {dcid}: images {grid.missing()}")
        return "; ".join(parts) or "nothing"


class Assembly:
    """Every open group, by DCID."""

    def __init__(self) -> None:
        self.groups: dict[tuple[int, ...], Group] = {}
        self._group_of: dict[int, tuple[int, ...]] = {}

    def add(self, message: PiaMessage) -> tuple[Fate, Group]:
        """Take one message. Raises :class:`MessageRejected` for a message
        that cannot count (its group goes on) and :class:`GroupRejected` for a
        group that cannot be centred (the caller aborts it: :meth:`drop`).
        Every check comes before any change: a rejected message changes
        nothing."""
        group, grid = self._place(message)
        n = len(grid.counts)
        if message.file_number > n:
            raise MessageRejected(f"DCID {message.dcid}: image {message.file_number} is out of range 1..{n}")
        self._keep(group, grid)
        i = message.file_number - 1
        if message.seen_at is not None:
            grid.newest_seen_at = max(grid.newest_seen_at or message.seen_at, message.seen_at)
        if grid.seen[i]:
            return Fate.DUPLICATE, group
        grid.seen[i] = True
        grid.counts[i] = message.spots
        grid.images += 1
        group.remaining -= 1
        return (Fate.COMPLETE if group.complete else Fate.ADDED), group

    def restore(self, first: PiaMessage, seen: np.ndarray, counts: np.ndarray,
                newest_seen_at: float | None) -> tuple[Fate, Group]:
        """Take what a checkpoint holds of one grid: its ``first`` message and
        the counts of the images ``seen`` (a mask over the grid's images),
        merged with what is here (an image already here keeps its count).
        Checked before any change, as :meth:`add`."""
        group, grid = self._place(first)
        n = len(grid.counts)
        if len(seen) < n or seen[n:].any() or int(seen[:n].sum()) != len(counts):  # a mask is padded to whole bytes
            raise MessageRejected(f"DCID {first.dcid}: a checkpoint's {int(seen.sum())} images and {len(counts)} "
                                  f"counts do not fit a grid of {n} images")
        seen = seen[:n]
        self._keep(group, grid)
        new = seen & ~grid.seen
        grid.counts[new] = counts[new[seen]]
        grid.seen |= new
        added = int(new.sum())
        grid.images += added
        group.remaining -= added
        if newest_seen_at is not None:
            grid.newest_seen_at = max(grid.newest_seen_at or newest_seen_at, newest_seen_at)
        if not new.any():
            return Fate.DUPLICATE, group
        return (Fate.COMPLETE if group.complete else Fate.ADDED), group

    def _place(self, message: PiaMessage) -> tuple[Group, Grid]:
        """The group and grid ``message`` belongs to, checked, made anew (not
        yet kept: :meth:`_keep`) where there is none."""
        key = self._group_of.get(message.dcid)
        if key is not None and key != message.group_dcids:
            raise MessageRejected(f"DCID {message.dcid} belongs to group {', '.join(map(str, key))}, but this "
                                  f"message puts it in {', '.join(map(str, message.group_dcids))}")
        group = self.groups.get(message.group_dcids)
        if group is None:
            clash = [d for d in message.group_dcids if d in self._group_of]
            if clash:
                raise MessageRejected(f"DCID {clash[0]} already belongs to group "
                                      f"{', '.join(map(str, self._group_of[clash[0]]))}")
            group = Group(message.group_dcids)
        grid = group.grids.get(message.dcid)
        if grid is None:
            grid = Grid.first(message)
            others = list(group.grids.values())
            if others and others[0].grid.steps_x != grid.grid.steps_x:
                raise GroupRejected(f"{group.describe()}: the grids disagree on steps_x "
                                    f"({others[0].grid.steps_x} and {grid.grid.steps_x})",
                                    group if group.dcids in self.groups else None)
        elif message.gridinfo_json != grid.gridinfo_json and dict(message.gridinfo) != grid.gridinfo:
            raise MessageRejected(f"DCID {message.dcid}: this message's gridinfo differs from the grid's first")
        return group, grid

    def _keep(self, group: Group, grid: Grid) -> None:
        """Keep a checked group and grid (the first time: register them)."""
        if group.dcids not in self.groups:
            self.groups[group.dcids] = group
            for d in group.dcids:
                self._group_of[d] = group.dcids
        if grid.dcid not in group.grids:
            group.grids[grid.dcid] = grid
            group.remaining += len(grid.counts) - grid.images

    def drop(self, group: Group) -> None:
        """Forget a group (centred, aborted or rejected)."""
        if self.groups.get(group.dcids) is group:
            del self.groups[group.dcids]
            for d in group.dcids:
                self._group_of.pop(d, None)


def _pin(parameters: Mapping[str, Any], dx_mm: float) -> dict[str, Any]:
    """Sample ids and wells of a step's parameters, as the core takes them."""
    loop_type = parameters.get("loop_type")
    return {
        "sample_id": parameters.get("sample_id"),
        "multipin_sample_ids": parameters.get("msp_sample_ids") or None,
        "well_limits": well_limits(loop_type, dx_mm) if isinstance(loop_type, str) and loop_type else None,
    }


def centre(group: Group) -> XrcResults | GridScan2DResult:
    """The result of a complete group: 2D for one grid, 3D for two (the
    lower DCID is xy). Thresholds: the ``_msp`` pair on a multi-sample pin,
    else the single-pin pair, each with the service's defaults."""
    if not group.complete:
        raise ValueError(f"{group.describe()} is not complete")
    grids = [group.grids[d] for d in group.dcids]
    first = grids[0]
    parameters = first.parameters
    try:
        if len(grids) == 1:
            return centre_2d(first.counts, first.grid, **_pin(parameters, first.grid.dx_mm))
        multi = bool(parameters.get("msp_sample_ids"))
        threshold = parameters.get("threshold_msp" if multi else "threshold", MULTIPIN_THRESHOLD if multi else 0.25)
        absolute = parameters.get("threshold_absolute_msp" if multi else "threshold_absolute",
                                  MULTIPIN_THRESHOLD_ABSOLUTE if multi else 0)
        scans = [GridScan(g.dcid, g.counts, g.grid) for g in grids]
        return centre_3d_scans(*scans, threshold=threshold, threshold_absolute=absolute,
                               **_pin(parameters, first.grid.dx_mm))
    except ValueError as e:
        raise GroupRejected(f"{group.describe()}: {e}", group) from None
