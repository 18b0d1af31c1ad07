"""The Rust core of zocalo-xrc (PyO3). Users reach it through ``zocalo_xrc``."""

from collections.abc import Iterable, Iterator, Mapping
from typing import Literal, overload

import numpy as np
import numpy.typing as npt

from ._results import XrcResult

SortKey = Literal["max_count", "total_count", "n_voxels"]

def reshape_grid(
    counts: npt.NDArray[np.int64],
    steps_x: int,
    steps_y: int,
    snaked: bool,
    orientation: str,
) -> npt.NDArray[np.int64]: ...
def well_limits(loop_type: str, dx_mm: float) -> list[tuple[float, float]]: ...
def centre_2d(
    counts: npt.NDArray[np.int64],
    steps_x: int,
    steps_y: int,
    snaked: bool,
    orientation: str,
    snapshot: tuple[float, float, float, float, float, float],
    sample_id: int | None,
    multipin_sample_ids: Mapping[int, int],
    well_limits: list[tuple[float, float]],
) -> dict[str, object]: ...
def centre_3d(
    xy: npt.NDArray[np.int64],
    xz: npt.NDArray[np.int64],
    threshold: float,
    threshold_absolute: float,
    sample_id: int | None,
    multipin_sample_ids: Mapping[int, int],
    well_limits: list[tuple[float, float]],
) -> XrcResults: ...

class XrcResults:
    """3D X-ray centring results: a sequence of ``XrcResult`` held as columns.

    Indexing or iterating makes ``XrcResult`` objects; the column properties
    give numpy arrays without making any."""

    def __init__(self, results: Iterable[XrcResult] | None = None) -> None: ...
    def __len__(self) -> int: ...
    @overload
    def __getitem__(self, index: int) -> XrcResult: ...
    @overload
    def __getitem__(self, index: slice) -> XrcResults: ...
    def __iter__(self) -> Iterator[XrcResult]: ...
    def __eq__(self, other: object) -> bool: ...
    @property
    def centre_of_mass(self) -> npt.NDArray[np.float64]:
        """``(N, 3)`` float64."""
    @property
    def max_voxel(self) -> npt.NDArray[np.int64]:
        """``(N, 3)`` int64."""
    @property
    def bounding_box(self) -> npt.NDArray[np.int64]:
        """``(N, 2, 3)`` int64, half-open."""
    @property
    def max_count(self) -> npt.NDArray[np.float64]: ...
    @property
    def total_count(self) -> npt.NDArray[np.float64]: ...
    @property
    def n_voxels(self) -> npt.NDArray[np.int64]: ...
    @property
    def sample_id(self) -> np.ma.MaskedArray:
        """int64, masked where a result has no sample id."""
    def sorted(self, by: SortKey = "max_count", descending: bool = True) -> XrcResults:
        """A stably sorted copy, largest first unless ``descending=False``."""
    def to_dicts(self) -> list[dict[str, object]]:
        """The wire shape of each result, keys in wire order."""
    def to_json(self) -> str:
        """A JSON list, byte for byte what ``json.dumps(self.to_dicts())`` writes."""
