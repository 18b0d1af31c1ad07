"""Detector images from Eiger/Odin HDF5 files or numpy arrays.

``open_images(path)`` takes a master file (``/entry/data/data_00000N``
external links, as the DECTRIS filewriter writes, or an ``/entry/data/data``
dataset, virtual as Odin writes it or plain as in a data file), a single data
file, or a ``.npy`` array (2D: one frame, 3D: frames). Frames are read from
the data files themselves (a virtual dataset is followed to its sources, so a
missing source is an error, not a frame of fill values).

The detector's pixel mask (``pixel_mask``, 0 = good), trusted maximum
(``saturation_value``, else ``detectorSpecific/countrate_correction_count_cutoff``)
and geometry (beam centre, distance, pixel size, wavelength) come from the
NeXus fields the Eiger writes; each is None when the file has no such field.
"""

from __future__ import annotations

import bisect
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np
from numpy.typing import NDArray

from .. import _native
from .resolution import Geometry

try:  # the [pia] extra: .npy arrays are read without it
    import h5py  # type: ignore[import-untyped]
    import hdf5plugin  # noqa: F401  (registers the Eiger's filters with h5py)
except ImportError:  # pragma: no cover - exercised without the extra
    h5py = None

if TYPE_CHECKING:
    from .finder import SpotFinder

__all__ = ["Geometry", "Images", "ImagesError", "open_images"]

#: HDF5's id of the bitshuffle filter; its 5th parameter 2 means LZ4 as well.
BITSHUFFLE = 32008
BITSHUFFLE_LZ4 = 2

DETECTOR = "/entry/instrument/detector"
BEAM = "/entry/instrument/beam"

_LENGTH_MM = {"m": 1000.0, "mm": 1.0, "um": 1e-3, "µm": 1e-3, "microns": 1e-3, "nm": 1e-6}
_WAVELENGTH_A = {"angstrom": 1.0, "angstroms": 1.0, "a": 1.0, "å": 1.0, "nm": 10.0, "m": 1e10}


class ImagesError(ValueError):
    """Images cannot be read: the message names the file and what is wrong."""


@dataclass(frozen=True, slots=True)
class _Segment:
    """Frames ``start .. start + count`` of the scan are frames
    ``offset .. offset + count`` of ``dataset`` in ``filename``."""

    start: int
    count: int
    offset: int
    dataset: Any  # an h5py.Dataset
    filename: str


class Images:
    """The frames of one scan, 2D numpy arrays: ``len()``, iteration and
    ``images[i]``. Use as a context manager (it holds the files open)."""

    def __init__(
        self,
        path: Path,
        shape: tuple[int, int],
        dtype: np.dtype[Any],
        segments: list[_Segment],
        files: list[Any],
        *,
        mask: Union[NDArray[np.bool_], Callable[[], Optional[NDArray[np.bool_]]], None] = None,
        trusted_max: Optional[float] = None,
        geometry: Optional[Geometry] = None,
        array: Optional[NDArray[Any]] = None,
        length: int = 0,
    ) -> None:
        self.path = path
        #: (height, width) of one frame and its dtype (what a raw chunk decodes into).
        self.shape = shape
        self.dtype = dtype
        self._mask = mask
        self.trusted_max = trusted_max
        self.geometry = geometry
        self._segments = sorted(segments, key=lambda s: s.start)
        self._starts = [s.start for s in self._segments]
        self._files = files
        self._array = array
        self._length = len(array) if array is not None else length
        self._bslz4: dict[int, bool] = {}

    def __len__(self) -> int:
        return self._length

    @property
    def mask(self) -> Optional[NDArray[np.bool_]]:
        """True = good pixel (from ``pixel_mask == 0``); None when the file
        has none. Read when first asked for, while the files are open: a
        follower opening a growing file again for each frame never reads a
        4M mask (16 MB, ~30 ms) more than once."""
        if callable(self._mask):
            self._mask = self._mask()
        return self._mask

    def __iter__(self) -> Iterator[NDArray[Any]]:
        for i in range(len(self)):
            yield self[i]

    def _index(self, index: int) -> int:
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"frame index must be an integer, not {type(index).__name__}")
        i = int(index) + (len(self) if index < 0 else 0)
        if not 0 <= i < len(self):
            raise IndexError(f"{self.path}: frame {index} out of range (0..{len(self) - 1})")
        return i

    def _segment(self, i: int) -> _Segment:
        n = bisect.bisect_right(self._starts, i) - 1
        if n >= 0 and i < self._segments[n].start + self._segments[n].count:
            return self._segments[n]
        raise ImagesError(f"{self.path}: frame {i} has no source (not written yet?)")

    def __getitem__(self, index: int) -> NDArray[Any]:
        i = self._index(index)
        if self._array is not None:
            frame: NDArray[Any] = self._array[i]
            return frame
        chunk = self.bslz4_chunk(i)
        if chunk is not None:
            try:
                decoded: NDArray[Any] = _native.decode_bslz4(chunk, self.dtype.name, list(self.shape))
            except (ValueError, TypeError) as error:
                raise self.corrupt(i, str(error)) from None
            return decoded
        segment = self._segment(i)
        k = segment.offset + i - segment.start
        try:
            frame = segment.dataset[k]
        except (OSError, RuntimeError, ValueError) as error:
            raise self.corrupt(i, _first_line(error)) from None
        return frame

    def corrupt(self, index: int, reason: str) -> ImagesError:
        """The error for frame ``index`` that cannot be decoded, naming the file."""
        if self._array is not None:
            return ImagesError(f"{self.path}: frame {index} cannot be read: {reason}")
        segment = self._segment(index)
        k = segment.offset + index - segment.start
        return ImagesError(f"{segment.filename}: frame {index} ({segment.dataset.name}[{k}]) cannot be decoded: {reason}")

    def bslz4_chunk(self, index: int) -> Optional[bytes]:
        """Frame ``index``'s raw chunk when it is bitshuffle-LZ4 alone (what
        the Eiger writes), for the Rust core to decode; else None."""
        i = self._index(index)
        if self._array is not None:
            return None
        segment = self._segment(i)
        dataset = segment.dataset
        if not self._whole_bslz4(segment):
            return None
        k = segment.offset + i - segment.start
        try:
            skipped, data = dataset.id.read_direct_chunk((k, 0, 0))
        except (OSError, RuntimeError, KeyError) as error:
            raise _no_chunk(segment, i, k, error) from None
        return None if skipped else bytes(data)

    def bslz4_extents(self, frames: range) -> Optional[tuple[str, list[tuple[int, int]]]]:
        """Where the raw chunks of ``frames`` lie when they are bitshuffle-LZ4
        alone and in one file: its path and each chunk's first byte and
        length, for the Rust core to read (in its threads, without the GIL);
        else None (read them with ``bslz4_chunk``)."""
        if self._array is not None or not len(frames):
            return None
        first, last = self._index(frames[0]), self._index(frames[-1])
        segment = self._segment(first)
        if last >= segment.start + segment.count or not self._whole_bslz4(segment):
            return None
        dataset = segment.dataset
        base = int(dataset.file.userblock_size)  # chunk addresses count from the end of a user block
        extents = []
        for i in range(first, last + 1):
            k = segment.offset + i - segment.start
            try:
                info = dataset.id.get_chunk_info_by_coord((k, 0, 0))
            except (OSError, RuntimeError, KeyError, ValueError) as error:
                raise _no_chunk(segment, i, k, error) from None
            if info.byte_offset is None or info.filter_mask != 0:
                return None  # not written, or a filter skipped: as bslz4_chunk finds out
            extents.append((base + int(info.byte_offset), int(info.size)))
        return str(dataset.file.filename), extents

    def _whole_bslz4(self, segment: _Segment) -> bool:
        """Whether the chunks of ``segment``'s dataset are whole frames in bitshuffle-LZ4 alone."""
        dataset = segment.dataset
        key = id(dataset)
        if key not in self._bslz4:
            self._bslz4[key] = dataset.chunks == (1, *self.shape) and _filters(dataset) == ((BITSHUFFLE, BITSHUFFLE_LZ4),)
        return self._bslz4[key]

    def spot_finder(self, **options: Any) -> SpotFinder:
        """A ``SpotFinder`` with this detector's mask and trusted maximum
        (other parameters as ``SpotFinder`` takes them)."""
        from .finder import SpotFinder

        return SpotFinder(self.mask, trusted_max=options.pop("trusted_max", self.trusted_max), **options)

    def raw_chunk(self, index: int) -> tuple[tuple[int, ...], bytes]:
        """Frame ``index`` as stored: the HDF5 filter ids applied to it, in
        the order they were applied (empty: raw ``dtype``/``shape`` bytes),
        and its bytes, read with ``read_direct_chunk`` (no decoding)."""
        i = self._index(index)
        if self._array is not None:
            return (), np.ascontiguousarray(self._array[i]).tobytes()
        segment = self._segment(i)
        dataset = segment.dataset
        k = segment.offset + i - segment.start
        if dataset.chunks != (1, *self.shape):
            raise ImagesError(
                f"{segment.filename}: {dataset.name} is stored in chunks of"
                f" {dataset.chunks}, not one chunk per frame {(1, *self.shape)}"
            )
        try:
            skipped, data = dataset.id.read_direct_chunk((k, 0, 0))
        except (OSError, RuntimeError, KeyError) as error:
            raise ImagesError(
                f"{segment.filename}: frame {i} ({dataset.name}[{k}]) has no"
                f" readable chunk: {_first_line(error)}"
            ) from None
        plist = dataset.id.get_create_plist()
        filters = tuple(
            plist.get_filter(n)[0]
            for n in range(plist.get_nfilters())
            if not skipped & (1 << n)
        )
        return filters, bytes(data)

    def close(self) -> None:
        for handle in self._files:
            handle.close()
        self._files.clear()

    def __enter__(self) -> Images:
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Images({str(self.path)!r}, {len(self)} frames of {self.shape} {self.dtype})"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def open_images(path: Union[str, os.PathLike[str]], *, detector: Optional[Images] = None) -> Images:
    """Open a master file, a data file or a ``.npy`` array for reading
    frames. ``detector``: the same file opened before (open or closed),
    whose mask, trusted maximum and geometry are taken instead of read again
    (what a follower of a growing file does, opening it again per frame)."""
    path = Path(path)
    if not path.exists():
        raise ImagesError(f"{path}: no such file")
    if path.suffix == ".npy":
        return _open_npy(path)
    return _open_hdf5(path, detector)


def _open_npy(path: Path) -> Images:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ImagesError(f"{path}: not a readable .npy array: {_first_line(error)}") from None
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise ImagesError(f"{path}: a {array.ndim}D array; frames are 2D (or 3D: frames x height x width)")
    _check_frames(path, array.shape, array.dtype)
    return Images(path, (array.shape[1], array.shape[2]), array.dtype, [], [], array=array)


def _check_frames(path: Union[Path, str], shape: tuple[int, ...], dtype: np.dtype[Any]) -> None:
    if len(shape) != 3:
        raise ImagesError(f"{path}: image data is {len(shape)}D, not frames x height x width")
    if shape[1] == 0 or shape[2] == 0:
        raise ImagesError(f"{path}: frames of shape {shape[1:]} are empty")
    if dtype.kind not in "uif":
        raise ImagesError(f"{path}: image data of type {dtype} is not numbers")


def _filters(dataset: Any) -> tuple[tuple[int, int], ...]:
    """A dataset's filters: (id, bitshuffle's compression or 0) each."""
    plist = dataset.id.get_create_plist()
    out = []
    for n in range(plist.get_nfilters()):
        code, _, values, _ = plist.get_filter(n)
        out.append((int(code), int(values[4]) if code == BITSHUFFLE and len(values) > 4 else 0))
    return tuple(out)


def _open_hdf5(path: Path, detector: Optional[Images] = None) -> Images:
    if h5py is None:
        raise ImagesError(f"{path}: reading HDF5 needs h5py and hdf5plugin: pip install 'zocalo-xrc[pia]'")
    try:
        master = h5py.File(path, "r")
    except OSError as error:
        raise ImagesError(f"{path}: not an HDF5 file ({_first_line(error)})") from None
    files: list[Any] = [master]
    try:
        segments, length = _segments(path, master, files)
        for segment in segments:
            _check_frames(segment.filename, segment.dataset.shape, segment.dataset.dtype)
        first = segments[0].dataset
        shape = (int(first.shape[1]), int(first.shape[2]))
        for segment in segments:
            if tuple(segment.dataset.shape[1:]) != shape:
                raise ImagesError(
                    f"{segment.filename}: frames of {segment.dataset.shape[1:]}, but"
                    f" {segments[0].filename} has {shape}"
                )
        if detector is not None and detector.shape == shape:  # the detector as read before
            mask, trusted_max, geometry = detector._mask, detector.trusted_max, detector.geometry
        else:
            mask, trusted_max, geometry = _mask(path, master, shape), _trusted_max(master), _geometry(path, master, shape)
        return Images(path, shape, np.dtype(first.dtype), segments, files, length=length,
                      mask=mask, trusted_max=trusted_max, geometry=geometry)
    except BaseException:
        for handle in files:
            handle.close()
        raise


def _no_chunk(segment: _Segment, i: int, k: int, error: Exception) -> ImagesError:
    """The error for frame ``i`` (``k`` of ``segment``'s dataset) whose chunk cannot be found or read."""
    return ImagesError(
        f"{segment.filename}: frame {i} ({segment.dataset.name}[{k}]) has no readable chunk: {_first_line(error)}"
    )


def _segments(path: Path, master: Any, files: list[Any]) -> tuple[list[_Segment], int]:
    """Where each frame is, and how many frames the scan has."""
    data = master.get("/entry/data", getlink=False)
    if not isinstance(data, h5py.Group):
        raise ImagesError(f"{path}: no /entry/data group: not an Eiger/NeXus image file")
    names = sorted(n for n in data if n.startswith("data_") and n[5:].isdigit())
    if names:  # the DECTRIS filewriter: data_000001, data_000002 ... links
        targets = [_follow(path, master, f"/entry/data/{n}", files) for n in names]
    elif "data" in data:  # a data file, or an Odin master (a virtual dataset)
        targets = [_follow(path, master, "/entry/data/data", files)]
    else:
        raise ImagesError(f"{path}: /entry/data has no data or data_00000N datasets")
    segments: list[_Segment] = []
    start = 0
    for dataset, filename in targets:
        if dataset.is_virtual:
            sources = _virtual_sources(path, dataset, files)
        else:
            sources = [(0, int(dataset.shape[0]), 0, dataset, filename)]
        for v_start, count, offset, source, source_name in sources:
            segments.append(_Segment(start + v_start, count, offset, source, source_name))
        start += int(dataset.shape[0])
    segments = [s for s in segments if s.count > 0]
    if not segments:
        raise ImagesError(f"{path}: no frames in {', '.join(names) or '/entry/data/data'}")
    return segments, start


def _follow(path: Path, handle: Any, name: str, files: list[Any]) -> tuple[Any, str]:
    """The dataset at ``name`` in ``handle`` (file ``path``), following an
    external link by opening its file ourselves (so a missing one is named)."""
    link = handle.get(name, getlink=True)
    if link is None:
        raise ImagesError(f"{path}: no {name}")
    if isinstance(link, h5py.ExternalLink):
        target = Path(link.filename)
        if not target.is_absolute():
            target = path.parent / target
        if not target.exists():
            raise ImagesError(
                f"{path}: {name} links to {link.filename}:{link.path}, but {target} does not exist"
            )
        try:
            other = h5py.File(target, "r")
        except OSError as error:
            raise ImagesError(
                f"{path}: {name} links to {target}, which is not an HDF5 file ({_first_line(error)})"
            ) from None
        files.append(other)
        return _follow(target, other, link.path, files)
    try:
        dataset = handle[name]
    except (KeyError, OSError) as error:
        raise ImagesError(f"{path}: {name} cannot be opened: {_first_line(error)}") from None
    if not isinstance(dataset, h5py.Dataset):
        raise ImagesError(f"{path}: {name} is not a dataset")
    return dataset, str(path)


def _virtual_sources(
    path: Path, dataset: Any, files: list[Any]
) -> list[tuple[int, int, int, Any, str]]:
    """(first frame, frames, first source frame, source dataset, file) for
    each run of whole frames a virtual dataset maps from one source (Odin's
    are blocks, maybe interleaved between its writers)."""
    result = []
    for source in dataset.virtual_sources():
        if source.file_name == ".":
            target, handle = path, dataset.file
        else:
            target = Path(source.file_name)
            if not target.is_absolute():
                target = path.parent / target
            if not target.exists():
                v = _selected_frames(path, dataset.name, source.vspace, dataset.shape)
                raise ImagesError(
                    f"{path}: {dataset.name} frames {v[0]}..{v[-1]} come from"
                    f" {source.file_name}, but {target} does not exist"
                )
            handle = h5py.File(target, "r")
            files.append(handle)
        frames, name = _follow(target, handle, source.dset_name, files)
        v = _selected_frames(path, dataset.name, source.vspace, dataset.shape)
        s = _selected_frames(target, source.dset_name, source.src_space, frames.shape)
        if v.size != s.size:
            raise ImagesError(f"{path}: {dataset.name} maps {v.size} frames from {s.size} in {target}")
        breaks = np.flatnonzero((np.diff(v) != 1) | (np.diff(s) != 1)) + 1
        for run_v, run_s in zip(np.split(v, breaks), np.split(s, breaks)):
            result.append((int(run_v[0]), int(run_v.size), int(run_s[0]), frames, name))
    return result


def _selected_frames(
    path: Path, name: str, space: Any, shape: tuple[int, ...]
) -> NDArray[np.int64]:
    """The frames (whole ones) a virtual-dataset mapping selects from a
    dataset of ``shape``, in order."""
    kind = space.get_select_type()
    if kind == h5py.h5s.SEL_ALL:  # (its dataspace may be stored as a scalar)
        return np.arange(shape[0], dtype=np.int64)
    frames = np.zeros(0, dtype=np.int64)
    if kind == h5py.h5s.SEL_HYPERSLABS:
        blocks = space.get_select_hyper_blocklist()
        frames = np.unique(np.concatenate([np.arange(int(b[0][0]), int(b[1][0]) + 1, dtype=np.int64) for b in blocks]))
    per_frame = int(np.prod(shape[1:]))
    if frames.size == 0 or frames.size * per_frame != space.get_select_npoints():
        raise ImagesError(f"{path}: {name} maps parts of frames, not whole frames")
    return frames


def _scalar(master: Any, name: str) -> Optional[Any]:
    item = master.get(name)
    if not isinstance(item, h5py.Dataset) or item.size != 1:
        return None
    return item[()].reshape(()).item() if item.shape else item[()]


def _units(master: Any, name: str) -> Optional[str]:
    units = master[name].attrs.get("units")
    if units is None:
        return None
    if isinstance(units, np.ndarray):
        units = units.reshape(-1)[0]
    return (units.decode() if isinstance(units, bytes) else str(units)).strip().lower()


def _length_mm(path: Path, master: Any, name: str, default_units: str) -> Optional[float]:
    value = _scalar(master, name)
    if value is None:
        return None
    units = _units(master, name) or default_units
    if units not in _LENGTH_MM:
        raise ImagesError(f"{path}: {name} has units {units!r}, not a length")
    return float(value) * _LENGTH_MM[units]


def _mask(path: Path, master: Any, shape: tuple[int, int]) -> Optional[Callable[[], NDArray[np.bool_]]]:
    """The pixel mask's reader, once its shape is checked (its values are read when asked for)."""
    for name in (f"{DETECTOR}/pixel_mask", f"{DETECTOR}/detectorSpecific/pixel_mask"):
        item = master.get(name)
        if item is not None:
            found = tuple(item.shape)
            if len(found) > 2 and math.prod(found[:-2]) == 1:  # some writers keep a leading axis of 1
                found = found[-2:]
            if found != shape:
                raise ImagesError(f"{path}: {name} is {found}, but frames are {shape}")

            def read(name: str = name) -> NDArray[np.bool_]:  # from the file, open or not
                with h5py.File(path, "r") as f:
                    good: NDArray[np.bool_] = np.asarray(f[name][()]).reshape(shape) == 0
                return good

            return read
    return None


def _trusted_max(master: Any) -> Optional[float]:
    for name in (
        f"{DETECTOR}/saturation_value",
        f"{DETECTOR}/detectorSpecific/countrate_correction_count_cutoff",
    ):
        value = _scalar(master, name)
        if value is not None:
            return float(value)
    return None


def _geometry(path: Path, master: Any, shape: tuple[int, int]) -> Optional[Geometry]:
    bx = _scalar(master, f"{DETECTOR}/beam_center_x")
    by = _scalar(master, f"{DETECTOR}/beam_center_y")
    distance = _length_mm(path, master, f"{DETECTOR}/detector_distance", "m")
    if distance is None:  # NXmx's name, as Odin writes it
        distance = _length_mm(path, master, f"{DETECTOR}/distance", "m")
    px = _length_mm(path, master, f"{DETECTOR}/x_pixel_size", "m")
    py = _length_mm(path, master, f"{DETECTOR}/y_pixel_size", "m")
    wavelength = None
    for name in (f"{BEAM}/incident_wavelength", "/entry/sample/beam/incident_wavelength"):
        value = _scalar(master, name)
        if value is not None:
            units = _units(master, name) or "angstrom"
            if units not in _WAVELENGTH_A:
                raise ImagesError(f"{path}: {name} has units {units!r}, not a wavelength")
            wavelength = float(value) * _WAVELENGTH_A[units]
            break
    if bx is None or by is None or distance is None or px is None or py is None:
        return None
    if wavelength is None:
        return None
    try:
        return Geometry(
            beam_centre_px=(float(bx), float(by)),
            distance_mm=distance,
            pixel_size_mm=(px, py),
            wavelength_A=wavelength,
            image_size=(shape[1], shape[0]),
        )
    except ValueError as error:
        raise ImagesError(f"{path}: {error}") from None
