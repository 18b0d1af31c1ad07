"""Simulated Eiger2 X frames, and files written as the Eiger/Odin write them.

Frames: Poisson background (flat, optionally rising towards the beam and with
hexagonal-ice rings), Gaussian spots, module gaps and dead pixels flagged with
the detector's invalid value (2^32-1 in uint32 data, -1 read as int32), hot
pixels (masked) and a few overloaded pixels (2^32-2, unmasked, above the
trusted maximum). Everything is drawn from a seeded numpy Generator: the same
seed and frame index give the same frame.

Files: ``<name>_master.h5`` with the NeXus metadata and
``/entry/data/data_000001...`` external links to ``<name>_data_00000N.h5``,
each holding ``/entry/data/data`` (frames x height x width, one chunk per
frame, bitshuffle-LZ4 = HDF5 filter 32008 by default), as the DECTRIS
filewriter lays them out (checked against dxtbx's Eiger readers and FFS's
h5read). Data files grow a frame at a time and are flushed after each.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Optional, Union

import numpy as np
from numpy.typing import DTypeLike, NDArray

from .resolution import Geometry, d_star_sq, ice_rings_d_star_sq

#: An Eiger2 X module, (width, height) pixels; the gaps between modules.
MODULE_SIZE = (1028, 512)
MODULE_GAP = (12, 38)  # (across, down)
#: Modules (across, down) of each Eiger2 X size.
EIGER2_X_MODULES = {"1M": (1, 2), "4M": (2, 4), "9M": (3, 6), "16M": (4, 8)}
PIXEL_SIZE_MM = 0.075
SENSOR_THICKNESS_MM = 0.45

#: DECTRIS pixel_mask bits.
MASK_GAP = 1
MASK_DEAD = 2
MASK_HOT = 8

#: Width (one sigma, in d*^2) of the simulated ice rings: well inside DIALS's
#: ring width of 0.004, so the spots they make are ones its filter drops.
ICE_RING_SIGMA = 0.004 / 8.0

Shape = tuple[int, int]  # (height, width)


def eiger2x_shape(size: str) -> Shape:
    """(height, width) of an Eiger2 X frame, size "1M", "4M", "9M" or "16M"."""
    try:
        across, down = EIGER2_X_MODULES[size]
    except KeyError:
        raise ValueError(
            f"unknown Eiger2 X size {size!r}: one of {', '.join(EIGER2_X_MODULES)}"
        ) from None
    (mw, mh), (gx, gy) = MODULE_SIZE, MODULE_GAP
    return (down * mh + (down - 1) * gy, across * mw + (across - 1) * gx)


def module_gaps(
    shape: Shape, module: tuple[int, int] = MODULE_SIZE, gap: tuple[int, int] = MODULE_GAP
) -> NDArray[np.bool_]:
    """True in the gaps of a frame tiled from its top-left corner by modules
    (width, height) spaced by ``gap`` (across, down). A frame smaller than a
    module has none; small modules give small test frames gaps."""
    (height, width), (mw, mh), (gx, gy) = shape, module, gap
    columns = np.arange(width) % (mw + gx) >= mw
    rows = np.arange(height) % (mh + gy) >= mh
    result: NDArray[np.bool_] = rows[:, None] | columns[None, :]
    return result


def flag_values(dtype: DTypeLike) -> tuple[int, int]:
    """(invalid, overloaded): what the detector writes in gaps and dead
    pixels, and in pixels past its count-rate cutoff: the top two values of
    an unsigned type, -1 and -2 of a signed one."""
    info = np.iinfo(np.dtype(dtype))
    if info.min < 0:
        return -1, -2
    return info.max, info.max - 1


@dataclass(frozen=True, slots=True)
class Spot:
    """A Gaussian spot: centre (pixels, DIALS's frame: pixel centres on
    half-integers), expected total counts, and width (pixels)."""

    x: float
    y: float
    intensity: float
    sigma: float = 1.0


def default_geometry(shape: Shape) -> Geometry:
    """Beam at the frame's centre, 200 mm away, 75 µm pixels, 12.7 keV."""
    height, width = shape
    return Geometry(
        beam_centre_px=(width / 2.0, height / 2.0),
        distance_mm=200.0,
        pixel_size_mm=(PIXEL_SIZE_MM, PIXEL_SIZE_MM),
        wavelength_A=0.9763,
        image_size=(width, height),
    )


class Simulator:
    """Frames of one simulated detector: its defects are fixed at creation
    (from ``seed``), each frame's noise comes from ``(seed, index)``.

    ``background``: flat mean counts per pixel; ``radial_background``: extra
    mean counts at the beam centre, halving at a quarter of the frame's
    smaller side; ``ice_rings``: peak mean counts on the hexagonal-ice rings
    (narrow: 1/8 of DIALS's ring width, in d*^2)."""

    def __init__(
        self,
        shape: Union[Shape, str],
        *,
        seed: int = 0,
        dtype: DTypeLike = np.uint32,
        module: tuple[int, int] = MODULE_SIZE,
        gap: tuple[int, int] = MODULE_GAP,
        geometry: Optional[Geometry] = None,
        background: float = 1.0,
        radial_background: float = 0.0,
        ice_rings: float = 0.0,
        n_dead: int = 0,
        n_hot: int = 0,
        n_overloaded: int = 0,
        saturation_value: Optional[int] = None,
    ) -> None:
        self.shape: Shape = eiger2x_shape(shape) if isinstance(shape, str) else shape
        height, width = self.shape
        if height <= 0 or width <= 0:
            raise ValueError(f"frame shape {self.shape} must be positive")
        if background < 0 or radial_background < 0 or ice_rings < 0:
            raise ValueError("background, radial_background and ice_rings must be >= 0")
        self.dtype = np.dtype(dtype)
        self.seed = seed
        self.geometry = geometry if geometry is not None else default_geometry(self.shape)
        self.invalid_value, self.overloaded_value = flag_values(self.dtype)
        top = np.iinfo(self.dtype).max - 2
        self.saturation_value = min(top, 10**6) if saturation_value is None else saturation_value
        if not 0 < self.saturation_value <= top:
            raise ValueError(f"saturation_value must be in 1..{top}")

        rng = np.random.default_rng([seed, 2**32 - 1])
        self.pixel_mask = np.where(module_gaps(self.shape, module, gap), MASK_GAP, 0).astype(
            np.uint32
        )
        free = np.flatnonzero(self.pixel_mask == 0)
        n_defects = n_dead + n_hot + n_overloaded
        if n_defects > free.size:
            raise ValueError(f"{n_defects} defects do not fit in {free.size} pixels")
        chosen = rng.choice(free, size=n_defects, replace=False)
        self.dead = chosen[:n_dead]
        self.hot = chosen[n_dead : n_dead + n_hot]
        self.overloaded = chosen[n_dead + n_hot :]
        flat_mask = self.pixel_mask.reshape(-1)
        flat_mask[self.dead] |= MASK_DEAD
        flat_mask[self.hot] |= MASK_HOT

        self._background = self._background_mean(background, radial_background, ice_rings)

    def _background_mean(
        self, flat: float, radial: float, ice: float
    ) -> NDArray[np.float64]:
        height, width = self.shape
        ys = np.arange(height)[:, None] + 0.5
        xs = np.arange(width)[None, :] + 0.5
        mean = np.full(self.shape, flat, dtype=np.float64)
        if radial > 0:
            bx, by = self.geometry.beam_centre_px
            scale = min(height, width) / 4.0
            mean += radial / (1.0 + ((xs - bx) ** 2 + (ys - by) ** 2) / scale**2)
        if ice > 0:  # a Gaussian in d*^2 around the nearest ring
            ds2 = d_star_sq(xs, ys, self.geometry)
            rings = ice_rings_d_star_sq(float(1.0 / math.sqrt(max(ds2.max(), 1e-6))))
            if rings.size:
                above = np.searchsorted(rings, ds2)
                lower = rings[np.clip(above - 1, 0, rings.size - 1)]
                upper = rings[np.clip(above, 0, rings.size - 1)]
                nearest = np.minimum(np.abs(ds2 - lower), np.abs(ds2 - upper))
                mean += ice * np.exp(-0.5 * (nearest / ICE_RING_SIGMA) ** 2)
        return mean

    def mean(self, spots: Iterable[Spot] = ()) -> NDArray[np.float64]:
        """The expected counts of a frame with these spots (no defects)."""
        mean = self._background.copy()
        height, width = self.shape
        for spot in spots:
            if spot.sigma <= 0 or spot.intensity < 0:
                raise ValueError(f"{spot}: sigma must be > 0 and intensity >= 0")
            reach = int(math.ceil(5 * spot.sigma))
            x0, x1 = max(int(spot.x) - reach, 0), min(int(spot.x) + reach + 1, width)
            y0, y1 = max(int(spot.y) - reach, 0), min(int(spot.y) + reach + 1, height)
            if x0 >= x1 or y0 >= y1:
                continue
            ys, xs = np.mgrid[y0:y1, x0:x1] + 0.5
            r2 = (xs - spot.x) ** 2 + (ys - spot.y) ** 2
            peak = spot.intensity / (2 * math.pi * spot.sigma**2)
            mean[y0:y1, x0:x1] += peak * np.exp(-r2 / (2 * spot.sigma**2))
        return mean

    def frame(self, spots: Iterable[Spot] = (), index: int = 0) -> NDArray[Any]:
        """One frame: Poisson counts around :meth:`mean`, then the defects.
        Counts past ``saturation_value`` read as overloaded."""
        rng = np.random.default_rng([self.seed, index])
        counts = rng.poisson(self.mean(spots)).astype(np.int64)
        counts[counts > self.saturation_value] = self.overloaded_value
        flat = counts.reshape(-1)
        flat[self.hot] = rng.integers(
            self.saturation_value // 2, self.saturation_value, size=self.hot.size
        )
        flat[self.overloaded] = self.overloaded_value
        counts[self.pixel_mask & (MASK_GAP | MASK_DEAD) != 0] = self.invalid_value
        return counts.astype(self.dtype)

    def random_spots(
        self,
        n: int,
        index: int = 0,
        intensity: tuple[float, float] = (200.0, 2000.0),
        sigma: tuple[float, float] = (0.7, 1.5),
    ) -> list[Spot]:
        """``n`` spots at random places, log-uniform intensities (seeded by
        ``(seed, index)``, independent of the frame's noise)."""
        rng = np.random.default_rng([self.seed, index, 1])
        height, width = self.shape
        xs = rng.uniform(0, width, n)
        ys = rng.uniform(0, height, n)
        counts = np.exp(rng.uniform(math.log(intensity[0]), math.log(intensity[1]), n))
        widths = rng.uniform(sigma[0], sigma[1], n)
        return [Spot(float(a), float(b), float(c), float(s)) for a, b, c, s in zip(xs, ys, counts, widths)]


Compression = Optional[str]
_COMPRESSIONS = ("bslz4", "lz4", "gzip", None)


def _compression_args(compression: Compression) -> dict[str, Any]:
    import hdf5plugin

    if compression == "bslz4":
        return dict(hdf5plugin.Bitshuffle(cname="lz4"))
    if compression == "lz4":
        return dict(hdf5plugin.LZ4())
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": 1}
    if compression is None:
        return {}
    raise ValueError(f"unknown compression {compression!r}: one of {_COMPRESSIONS}")


def _nx_group(parent: Any, name: str, nx_class: str) -> Any:
    group = parent.require_group(name)
    group.attrs["NX_class"] = np.bytes_(nx_class)
    return group


def _field(group: Any, name: str, value: Any, units: Optional[str] = None) -> None:
    dataset = group.create_dataset(name, data=np.bytes_(value) if isinstance(value, str) else value)
    if units is not None:
        dataset.attrs["units"] = np.bytes_(units)


class EigerWriter:
    """Writes frames as the Eiger's filewriter does: the master file at
    creation, then data files of ``frames_per_file`` frames, each linked from
    the master as ``/entry/data/data_00000N`` when it is started.

    ``compression``: "bslz4" (bitshuffle-LZ4, filter 32008, as the Eiger),
    "lz4", "gzip" or None."""

    def __init__(
        self,
        directory: Union[str, Path],
        name: str,
        shape: Shape,
        dtype: DTypeLike = np.uint32,
        *,
        geometry: Optional[Geometry] = None,
        pixel_mask: Optional[NDArray[Any]] = None,
        saturation_value: Optional[int] = None,
        frames_per_file: int = 1000,
        compression: Compression = "bslz4",
        description: str = "Dectris EIGER2 Si (simulated)",
    ) -> None:
        import h5py  # type: ignore[import-untyped]

        if frames_per_file <= 0:
            raise ValueError(f"frames_per_file must be positive, not {frames_per_file}")
        if pixel_mask is not None and pixel_mask.shape != tuple(shape):
            raise ValueError(f"pixel_mask shape {pixel_mask.shape} is not the frame shape {shape}")
        self._h5py = h5py
        self.directory = Path(directory)
        self.name = name
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = np.dtype(dtype)
        self.frames_per_file = frames_per_file
        self._compression = _compression_args(compression)
        self.master_path = self.directory / f"{name}_master.h5"
        self.n_frames = 0
        self._data_file: Any = None
        self._dataset: Any = None

        geometry = geometry if geometry is not None else default_geometry(self.shape)
        self._master = h5py.File(self.master_path, "w")
        entry = _nx_group(self._master, "entry", "NXentry")
        _nx_group(entry, "data", "NXdata")
        instrument = _nx_group(entry, "instrument", "NXinstrument")
        beam = _nx_group(instrument, "beam", "NXbeam")
        _field(beam, "incident_wavelength", geometry.wavelength_A, "angstrom")
        detector = _nx_group(instrument, "detector", "NXdetector")
        _field(detector, "description", description)
        _field(detector, "beam_center_x", geometry.beam_centre_px[0], "pixel")
        _field(detector, "beam_center_y", geometry.beam_centre_px[1], "pixel")
        _field(detector, "detector_distance", geometry.distance_mm / 1000.0, "m")
        _field(detector, "distance", geometry.distance_mm / 1000.0, "m")
        _field(detector, "x_pixel_size", geometry.pixel_size_mm[0] / 1000.0, "m")
        _field(detector, "y_pixel_size", geometry.pixel_size_mm[1] / 1000.0, "m")
        _field(detector, "sensor_material", "Si")
        _field(detector, "sensor_thickness", SENSOR_THICKNESS_MM / 1000.0, "m")
        _field(detector, "bit_depth_image", np.uint32(8 * self.dtype.itemsize))
        specific = _nx_group(detector, "detectorSpecific", "NXcollection")
        _field(specific, "x_pixels_in_detector", np.uint32(self.shape[1]))
        _field(specific, "y_pixels_in_detector", np.uint32(self.shape[0]))
        self._nimages = specific.create_dataset("nimages", data=np.uint64(0))
        _field(specific, "ntrigger", np.uint64(1))
        if saturation_value is not None:
            _field(detector, "saturation_value", np.uint32(saturation_value))
            _field(specific, "countrate_correction_count_cutoff", np.uint32(saturation_value))
        if pixel_mask is not None:
            mask = detector.create_dataset(
                "pixel_mask", data=pixel_mask.astype(np.uint32), **dict(
                    _compression_args("gzip"), chunks=True)
            )
            specific["pixel_mask"] = mask  # a hard link, as the DECTRIS files have
        self._master.flush()

    def data_file_path(self, number: int) -> Path:
        """The data file ``number`` (1-based)."""
        return self.directory / f"{self.name}_data_{number:06d}.h5"

    def write(self, frame: NDArray[Any]) -> None:
        """Append one frame (flushed, so a reader sees it once the call returns)."""
        if frame.shape != self.shape:
            raise ValueError(f"frame shape {frame.shape} is not {self.shape}")
        self._append(lambda dataset, n: dataset.__setitem__(n, frame.astype(self.dtype, copy=False)))

    def write_chunk(self, chunk: bytes) -> None:
        """Append one frame given as its compressed chunk, as the data file's
        filter writes it (``encode``): what Odin does with the chunks an
        Eiger compressed itself. Flushed as ``write`` is."""
        self._append(lambda dataset, n: dataset.id.write_direct_chunk((n, 0, 0), chunk))

    def encode(self, frames: Iterable[NDArray[Any]]) -> list[bytes]:
        """Each frame's chunk as this writer's compression gives it (through
        a scratch file beside the data, removed), for ``write_chunk``."""
        scratch = self.directory / f".{self.name}_encoding.h5"
        chunks = []
        try:
            with self._h5py.File(scratch, "w") as f:
                dataset = f.create_dataset("data", shape=(1, *self.shape), chunks=(1, *self.shape),
                                           dtype=self.dtype, **self._compression)
                for frame in frames:
                    dataset[0] = frame.astype(self.dtype, copy=False)
                    chunks.append(bytes(dataset.id.read_direct_chunk((0, 0, 0))[1]))
        finally:
            scratch.unlink(missing_ok=True)
        return chunks

    def _append(self, put: Callable[[Any, int], Any]) -> None:
        if self._dataset is None or self._dataset.shape[0] == self.frames_per_file:
            self._start_data_file()
        dataset = self._dataset
        n = dataset.shape[0]
        dataset.resize(n + 1, axis=0)
        put(dataset, n)
        dataset.attrs["image_nr_high"] = np.uint64(self.n_frames + 1)
        self.n_frames += 1
        self._data_file.flush()
        self._nimages[()] = np.uint64(self.n_frames)
        self._master.flush()

    def write_all(self, frames: Iterable[NDArray[Any]]) -> Path:
        """Append every frame; the master file's path."""
        for frame in frames:
            self.write(frame)
        return self.master_path

    def _start_data_file(self) -> None:
        if self._data_file is not None:
            self._data_file.close()
        number = self.n_frames // self.frames_per_file + 1
        path = self.data_file_path(number)
        self._data_file = self._h5py.File(path, "w")
        entry = _nx_group(self._data_file, "entry", "NXentry")
        data = _nx_group(entry, "data", "NXdata")
        height, width = self.shape
        self._dataset = data.create_dataset(
            "data",
            shape=(0, height, width),
            maxshape=(self.frames_per_file, height, width),
            chunks=(1, height, width),
            dtype=self.dtype,
            **self._compression,
        )
        self._dataset.attrs["image_nr_low"] = np.uint64(self.n_frames + 1)
        self._data_file.flush()
        self._master["entry/data"][f"data_{number:06d}"] = self._h5py.ExternalLink(
            path.name, "/entry/data/data"
        )
        self._master.flush()

    def close(self) -> None:
        if self._data_file is not None:
            self._data_file.close()
            self._data_file = None
        self._master.close()

    def __enter__(self) -> EigerWriter:
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()


def write_eiger(
    directory: Union[str, Path],
    name: str,
    frames: Union[NDArray[Any], Sequence[NDArray[Any]]],
    *,
    simulator: Optional[Simulator] = None,
    **options: Any,
) -> Path:
    """Write ``frames`` (a 3D array or a sequence of 2D ones) as an Eiger
    master file and its data files; with a ``simulator``, its geometry,
    pixel mask and saturation value go in the master. Returns the master's path.
    ``options``: as :class:`EigerWriter`."""
    first = frames[0]
    if simulator is not None:
        options.setdefault("geometry", simulator.geometry)
        options.setdefault("pixel_mask", simulator.pixel_mask)
        options.setdefault("saturation_value", simulator.saturation_value)
    with EigerWriter(directory, name, first.shape, first.dtype, **options) as writer:
        return writer.write_all(frames)
