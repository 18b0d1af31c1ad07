"""The spot finder: DIALS's dispersion rule, pixel for pixel, in the Rust core.

``SpotFinder(mask)`` holds the rule's parameters (DIALS's defaults), the
detector's mask (True = good) and its trusted maximum. ``find(image)`` gives
the image's ``Spots`` (4-connected groups of strong pixels, as DIALS labels
them), ``strong_pixels(image)`` the strong pixels themselves, and
``find_many(images)`` the spots of many frames, in order, searched in
parallel with the GIL released. Frames of an Eiger/Odin file
(:func:`~zocalo_xrc.pia.images.open_images`) stored bitshuffle-LZ4 are
decoded by the Rust core straight from their raw chunks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .. import _native
from .._native import Spots

if TYPE_CHECKING:
    from .images import Images

__all__ = ["Algorithm", "SpotFinder", "Spots"]

Algorithm = Literal["dispersion", "dispersion_extended"]

#: Frames handed to the core at a time by ``find_many``, per thread.
BATCH_PER_THREAD = 4


def _threads(threads: int) -> int:
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ValueError(f"threads must be a whole number >= 0 (0: every core), not {threads!r}")
    return threads


class SpotFinder:
    """DIALS's dispersion spot finder: strong pixels, then 4-connected spots.

    ``mask``: a 2D bool array, True = good pixel (None: every pixel good);
    frames must then have its shape. ``trusted_max``: values above it are
    not valid (the detector's saturation; negative values never are).
    ``algorithm``: ``"dispersion"`` (what Diamond's per-image analysis runs)
    or ``"dispersion_extended"`` (DIALS's default in ``dials.find_spots``).
    ``kernel_size``: half the box, an int or ``(x, y)`` (3: a 7x7 box).
    ``gain``: None uses DIALS's formulas without gain (a gain given, even 1,
    uses its others). ``max_spot_size`` None keeps spots of any size (as
    fast-feedback-service does, with ``min_local=3``).
    """

    def __init__(
        self,
        mask: Optional[ArrayLike] = None,
        *,
        trusted_max: Optional[float] = None,
        algorithm: Algorithm = "dispersion",
        kernel_size: Union[int, tuple[int, int]] = 3,
        sigma_background: float = 6.0,
        sigma_strong: float = 3.0,
        global_threshold: float = 0.0,
        min_local: int = 2,
        gain: Optional[float] = None,
        min_spot_size: int = 3,
        max_spot_size: Optional[int] = 1000,
        max_separation: Optional[float] = None,
    ) -> None:
        good = None if mask is None else _mask(mask)
        kx, ky = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        for name, n in (("kernel_size", kx), ("kernel_size", ky), ("min_local", min_local), ("min_spot_size", min_spot_size)):
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
                raise ValueError(f"{name} must be a whole number, not {n!r}")
        if max_spot_size is not None and (not isinstance(max_spot_size, (int, np.integer)) or max_spot_size < 0):
            raise ValueError(f"max_spot_size must be a whole number or None, not {max_spot_size!r}")
        self.mask = good
        self.trusted_max = None if trusted_max is None else float(trusted_max)
        self.algorithm = algorithm
        self.kernel_size = (int(kx), int(ky))
        self.sigma_background = float(sigma_background)
        self.sigma_strong = float(sigma_strong)
        self.global_threshold = float(global_threshold)
        self.min_local = int(min_local)
        self.gain = None if gain is None else float(gain)
        self.min_spot_size = int(min_spot_size)
        self.max_spot_size = None if max_spot_size is None else int(max_spot_size)
        self.max_separation = None if max_separation is None else float(max_separation)
        self._core = _native.Finder(
            good,
            self.trusted_max,
            algorithm,
            self.kernel_size,
            self.sigma_background,
            self.sigma_strong,
            self.global_threshold,
            self.min_local,
            self.gain,
            self.min_spot_size,
            self.max_spot_size,
            self.max_separation,
        )

    def __repr__(self) -> str:
        shape = "no mask" if self.mask is None else f"mask {self.mask.shape[0]}x{self.mask.shape[1]}"
        return (
            f"SpotFinder({self.algorithm}, {shape}, trusted_max={self.trusted_max}, kernel_size={self.kernel_size},"
            f" sigma_background={self.sigma_background}, sigma_strong={self.sigma_strong},"
            f" global_threshold={self.global_threshold}, min_local={self.min_local}, gain={self.gain},"
            f" spot size {self.min_spot_size}..{self.max_spot_size}, max_separation={self.max_separation})"
        )

    def find(self, image: ArrayLike) -> Spots:
        """The spots of one 2D image (uint8/16/32, int16/32, float32/64; any strides)."""
        return self._core.find(_image(image))

    def strong_pixels(self, image: ArrayLike) -> NDArray[np.bool_]:
        """A bool array of the image's shape, True where a pixel is strong."""
        return self._core.strong_pixels(_image(image))

    def find_many(
        self, images: Union[Images, Iterable[ArrayLike]], threads: int = 0, *, frames: Optional[range] = None
    ) -> Iterator[Spots]:
        """The spots of every frame, in order, ``threads`` frames at a time
        (0: one per core). ``images``: an ``Images`` (from ``open_images``;
        ``frames``: which of its frames, from 0), a 3D array, or any
        iterable of 2D arrays."""
        threads = _threads(threads)
        batch = BATCH_PER_THREAD * (threads or _native_cores())
        from .images import Images  # no h5py needed unless a file is open

        if isinstance(images, Images):
            which = range(len(images)) if frames is None else frames
            if which.step != 1 or (len(which) and not (0 <= which.start and which.stop <= len(images))):
                raise ValueError(f"frames {which} are not consecutive frames of the {len(images)}")
            yield from self._find_in(images, which, threads, batch)
            return
        if frames is not None:
            raise ValueError("frames= picks frames of an Images; slice other sequences yourself")
        pending: list[Any] = []
        start = 0
        for image in images:
            pending.append(_image(image))
            if len(pending) == batch:
                yield from self._many(pending, threads, start)
                start += len(pending)
                pending = []
        if pending:
            yield from self._many(pending, threads, start)

    def _many(self, frames: list[Any], threads: int, start: int) -> list[Spots]:
        try:
            return self._core.find_many(frames, threads)
        except ValueError as error:
            i = getattr(error, "index", None)
            if i is None:
                raise
            raise ValueError(f"image {start + i}: {error}") from None

    def _find_in(self, images: Images, frames: range, threads: int, batch: int) -> Iterator[Spots]:
        from .images import ImagesError

        dtype = np.dtype(images.dtype).name
        for start in range(frames.start, frames.stop, batch):
            stop = min(start + batch, frames.stop)
            found: Optional[list[Spots]] = None
            try:
                if dtype in _native_dtypes and (at := images.bslz4_extents(range(start, stop))) is not None:
                    path, extents = at  # read in the core's threads, from the file
                    try:
                        found = self._core.find_chunks_at(path, extents, dtype, images.shape, threads)
                    except OSError as error:
                        raise ImagesError(str(error)) from None
                else:
                    read = [images.bslz4_chunk(i) for i in range(start, stop)]
                    chunks = [c for c in read if c is not None]
                    if len(chunks) == len(read) and dtype in _native_dtypes:
                        found = self._core.find_chunks(chunks, dtype, images.shape, threads)
            except ValueError as error:
                i = getattr(error, "index", None)
                if i is None:
                    raise
                raise images.corrupt(start + i, str(error)) from None
            if found is None:
                found = self._many([images[i] for i in range(start, stop)], threads, start)
            yield from found


_native_dtypes = {"uint8", "uint16", "uint32", "int16", "int32", "float32", "float64"}


def _native_cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _image(image: ArrayLike) -> Any:
    """A 2D numpy array of a pixel type the core reads, in native byte order;
    anything else is refused with what it is."""
    a = np.asarray(image)
    if a.ndim != 2:
        raise ValueError(f"an image is a 2D array, not {a.ndim}D (shape {a.shape})")
    if a.dtype == np.bool_ or a.dtype.kind not in "uif":
        raise TypeError(f"an image holds numbers, not {a.dtype}")
    if a.dtype.name not in _native_dtypes:
        raise TypeError(f"an image of {a.dtype}: uint8, uint16, uint32, int16, int32, float32 or float64 are read")
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    return a


def _mask(mask: ArrayLike) -> NDArray[np.bool_]:
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"a mask is a 2D array, not {m.ndim}D (shape {m.shape})")
    if m.dtype != np.bool_:
        raise TypeError(f"a mask is a bool array (True = good pixel), not {m.dtype}")
    if m.size == 0:
        raise ValueError(f"an empty mask (shape {m.shape})")
    return np.ascontiguousarray(m)
