"""Synthetic grid scans shaped like real ones: Gaussian crystals over Poisson noise."""

import numpy as np


def _blob(shape, centre, width, peak):
    idx = np.indices(shape, dtype=float)
    d2 = sum(((i - c) / w) ** 2 for i, c, w in zip(idx, centre, width))
    return peak * np.exp(-0.5 * d2)


def _scan(nx, ny, nz, crystals, noise, seed):
    rng = np.random.default_rng(seed)
    xy = sum((_blob((nx, ny), (cx, cy), (wx, wy), p) for cx, cy, _, wx, wy, _, p in crystals), np.zeros((nx, ny)))
    xz = sum((_blob((nx, nz), (cx, cz), (wx, wz), p) for cx, _, cz, wx, _, wz, p in crystals), np.zeros((nx, nz)))
    if noise:
        xy = xy + rng.poisson(noise, xy.shape)
        xz = xz + rng.poisson(noise, xz.shape)
    return np.round(xy).astype(np.int64), np.round(xz).astype(np.int64)


def typical():
    """60 x 30 x 30, two crystals."""
    return _scan(60, 30, 30, [(20, 12, 15, 4, 3, 3, 250), (42, 18, 10, 3, 2, 2, 160)], 0, 1)


def large():
    """200 x 100 x 100, three crystals, light noise."""
    crystals = [(50, 40, 50, 8, 6, 6, 300), (120, 60, 30, 5, 4, 4, 250), (170, 20, 70, 4, 3, 3, 200)]
    return _scan(200, 100, 100, crystals, 0.5, 2)


def noisy():
    """100 x 60 x 60, Poisson noise of mean 2, no crystal."""
    rng = np.random.default_rng(3)
    return rng.poisson(2, (100, 60)).astype(np.int64), rng.poisson(2, (100, 60)).astype(np.int64)


def huge():
    """1000 x 500 x 500, three crystals along the pin, light noise: 250 million
    voxels, which the dense peers would have to allocate several times over."""
    crystals = [(150, 120, 300, 10, 7, 7, 320), (520, 330, 140, 6, 5, 5, 260), (830, 210, 420, 5, 4, 4, 220)]
    return _scan(1000, 500, 500, crystals, 0.5, 4)


def tiny():
    """1 x 1 x 1: what a call costs when there is nothing to compute."""
    return np.ones((1, 1), np.int64), np.ones((1, 1), np.int64)


WORKLOADS = {
    "typical 60x30x30": typical,
    "large 200x100x100": large,
    "noisy 100x60x60": noisy,
    "huge 1000x500x500": huge,
    "tiny 1x1x1": tiny,
}

# Workloads whose dense volume the peers cannot allocate (int64 volume, a float
# copy, a mask and labels: ~6 GB for 250 million voxels): only ours runs there.
DENSE_TOO_LARGE = {
    "huge 1000x500x500": "dense peers skipped: 250 million voxels, ~2 GB per int64 copy of the volume and they make several",
}
