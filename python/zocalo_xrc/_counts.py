"""Turning what users pass as spot counts into the int64 arrays the core takes."""

from __future__ import annotations

from typing import Any

import numpy as np

_INT64_MAX = np.iinfo(np.int64).max


def counts_array(values: Any, ndim: int, name: str) -> np.ndarray:
    """``values`` as a C-contiguous int64 array of ``ndim`` dimensions, or a
    ``ValueError`` naming ``name`` and what is wrong. Never modifies ``values``.
    (Negative counts are the core's to reject, with their position.)"""
    try:
        a = np.asarray(values)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{name}: not an array of counts ({e})") from None
    if a.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name}: empty grid (shape {a.shape})")
    kind = a.dtype.kind
    if kind == "i":
        pass
    elif kind == "u":
        if a.dtype.itemsize >= 8 and a.max() > _INT64_MAX:
            raise ValueError(f"{name}: count {int(a.max())} does not fit a 64-bit integer")
    elif kind == "f":
        bad = ~np.isfinite(a)
        if bad.any():
            raise ValueError(f"{name}: {a[bad].flat[0]} at {_where(bad)} is not a count (NaN or infinity)")
        frac = a != np.floor(a)
        if frac.any():
            raise ValueError(f"{name}: non-integer count {a[frac].flat[0]} at {_where(frac)}")
        big = np.abs(a) >= 2.0**63
        if big.any():
            raise ValueError(f"{name}: count {a[big].flat[0]} does not fit a 64-bit integer")
    else:
        raise ValueError(f"{name}: expected integer counts, got dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.int64)


def _where(mask: np.ndarray) -> list[int]:
    return [int(i) for i in np.argwhere(mask)[0]]
