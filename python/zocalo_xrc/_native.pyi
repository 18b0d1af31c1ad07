"""The Rust core of zocalo-xrc (PyO3). Users reach it through ``zocalo_xrc``."""

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal, overload

import numpy as np
import numpy.typing as npt

from ._results import GridScan2DResult, XrcResult

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
) -> GridScan2DResult: ...
def centre_3d(
    xy: npt.NDArray[np.int64],
    xz: npt.NDArray[np.int64],
    threshold: float,
    threshold_absolute: float,
    sample_id: int | None,
    multipin_sample_ids: Mapping[int, int],
    well_limits: list[tuple[float, float]],
    max_runs: int,
) -> XrcResults:
    """Raises ValueError (bad input, more than ``max_runs`` runs), MemoryError,
    or what a signal handler raises (KeyboardInterrupt): the call checks for
    signals every few milliseconds of scanning."""

MAX_RUNS: int

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
    def at_least(
        self, *, max_count: float | None = None, total_count: float | None = None, n_voxels: int | None = None
    ) -> XrcResults:
        """The results with at least these counts, order kept."""

class ResultPayloadError(ValueError):
    """A results message that is not what the wire format says. The message
    starts with the JSON path (``payload.results[3].bounding_box[1]: ...``)."""

    path: str

class ResultMessage:
    """A decoded results message."""

    @property
    def results(self) -> XrcResults | tuple[GridScan2DResult, ...]:
        """``XrcResults`` for a 3D payload; a 1-tuple of ``GridScan2DResult`` for 2D."""
    @property
    def type(self) -> Literal["2d", "3d"]: ...
    @property
    def status(self) -> str | None:
        """The payload's status; None for the old bare list of results."""
    @property
    def dcid(self) -> int | None: ...
    @property
    def dcgid(self) -> int | None: ...
    @property
    def gpu(self) -> bool:
        """True when the counts came from the GPU spot finder."""
    @property
    def environment_id(self) -> str | None: ...
    @property
    def no_crystal(self) -> bool:
        """Zocalo answered, and found no crystal (not the same as no answer)."""

def parse_result_message(body: bytes | bytearray | memoryview | str) -> ResultMessage:
    """Decode a results message: a recipe envelope, a bare payload or the old
    bare list of 3D results. Raises ``ResultPayloadError``."""

def build_result_message(
    results: XrcResults | Iterable[XrcResult] | GridScan2DResult | Iterable[GridScan2DResult],
    dcid: int,
    dcgid: int | None,
    gpu: bool,
    beamline: str,
    environment_id: str,
    status: str,
) -> bytes: ...

def pia_fields(
    body: bytes,
) -> tuple[int, tuple[int, ...], str, tuple[int, int], int, int, float | None] | None:
    """What the X-ray centring service takes from a plain per-image message:
    ``(dcid, group DCIDs ascending, experiment_type, (start, end) of the
    current step's gridinfo object in ``body``, file_number, n_spots_total,
    file-seen-at)``; None for anything else, which the caller reads the slow
    way (that decides, with the reason)."""

class Spots:
    """The spots of one frame: columns, one entry per spot."""

    @property
    def n_strong_pixels(self) -> int: ...
    def __len__(self) -> int: ...
    @property
    def centroid(self) -> npt.NDArray[np.float64]: ...
    @property
    def size(self) -> npt.NDArray[np.int64]: ...
    @property
    def intensity(self) -> npt.NDArray[np.float64]: ...
    @property
    def bounding_box(self) -> npt.NDArray[np.int64]: ...

class Finder:
    def __init__(
        self,
        mask: npt.NDArray[np.bool_] | None,
        trusted_max: float | None,
        algorithm: str,
        kernel_size: tuple[int, int],
        sigma_background: float,
        sigma_strong: float,
        global_threshold: float,
        min_local: int,
        gain: float | None,
        min_spot_size: int,
        max_spot_size: int | None,
        max_separation: float | None,
    ) -> None: ...
    def find(self, image: npt.NDArray[Any]) -> Spots: ...
    def strong_pixels(self, image: npt.NDArray[Any]) -> npt.NDArray[np.bool_]: ...
    def find_many(self, images: list[npt.NDArray[Any]], threads: int) -> list[Spots]: ...
    def find_chunks(self, chunks: list[bytes], dtype: str, shape: tuple[int, int], threads: int) -> list[Spots]: ...
    def find_chunks_at(
        self, path: str, extents: list[tuple[int, int]], dtype: str, shape: tuple[int, int], threads: int
    ) -> list[Spots]: ...

def decode_bslz4(chunk: bytes, dtype: str, shape: list[int]) -> npt.NDArray[Any]: ...
