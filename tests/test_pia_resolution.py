"""Resolution of spot centroids and Diamond's per-image counts, by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from zocalo_xrc.pia.resolution import (
    Geometry,
    d_spacing,
    d_star_sq,
    ice_rings_d_star_sq,
    image_stats,
    on_ice_ring,
)

GEOMETRY = Geometry(
    beam_centre_px=(100.0, 50.0),
    distance_mm=100.0,
    pixel_size_mm=(0.1, 0.1),
    wavelength_A=1.0,
    image_size=(2000, 2000),
)


def x_at(d: float, geometry: Geometry = GEOMETRY) -> float:
    """The x (pixels) on the beam centre's row where the resolution is ``d``."""
    two_theta = 2 * math.asin(geometry.wavelength_A / (2 * d))
    return geometry.beam_centre_px[0] + geometry.distance_mm * math.tan(two_theta) / 0.1


def test_d_at_known_radius() -> None:
    """1000 px of 0.1 mm at 100 mm: 2θ = 45°, d = λ / (2 sin 22.5°) = 1.30656 Å."""
    expected = 1.0 / (2 * math.sin(math.radians(22.5)))
    assert d_spacing(1100.0, 50.0, GEOMETRY) == pytest.approx(expected, rel=1e-12)
    assert d_spacing(100.0, 1050.0, GEOMETRY) == pytest.approx(expected, rel=1e-12)
    # diagonal: r = 100 mm again
    off = 1000 / math.sqrt(2)
    assert d_spacing(100 - off, 50 + off, GEOMETRY) == pytest.approx(expected, rel=1e-12)
    assert d_star_sq(1100.0, 50.0, GEOMETRY) == pytest.approx(1 / expected**2, rel=1e-12)
    assert d_spacing(100.0, 50.0, GEOMETRY) == math.inf
    assert d_spacing(x_at(3.0), 50.0, GEOMETRY) == pytest.approx(3.0, rel=1e-12)


def test_ice_rings_are_the_allowed_reflections_of_p63mmc() -> None:
    """Down to 1.85 Å: 100, 002, 101, 102, 110, 103, 200, 112, 201; 001,
    003 and 111 are absent (l odd on hh-2hl), 004 is at 1.8345 Å."""
    a, c = 4.498, 7.338
    allowed = [(1, 0, 0), (0, 0, 2), (1, 0, 1), (1, 0, 2), (1, 1, 0), (1, 0, 3), (2, 0, 0), (1, 1, 2), (2, 0, 1)]
    expected = sorted(4 / 3 * (h * h + h * k + k * k) / a**2 + l * l / c**2 for h, k, l in allowed)
    rings = ice_rings_d_star_sq(1.85)
    assert rings == pytest.approx(expected, rel=1e-12)
    assert 1 / math.sqrt(rings[0]) == pytest.approx(a * math.sqrt(3) / 2)


def test_dials_powder_ring_filter_case() -> None:
    """DIALS's tests/algorithms/integration/test_filtering.py: this d is on a ring."""
    d = 1.9220704466392748
    assert on_ice_ring(np.array([1 / d**2])).tolist() == [True]


def test_ring_half_width_is_half_of_0_004() -> None:
    ring = ice_rings_d_star_sq(3.0)[0]  # 100, 3.895 Å
    values = np.array([ring, ring + 0.0019, ring - 0.0019, ring + 0.0021, ring - 0.0021])
    assert on_ice_ring(values).tolist() == [True, True, True, False, False]
    assert on_ice_ring(values, width=0.008).tolist() == [True] * 5


def test_image_stats_by_hand() -> None:
    ring_d = 1 / math.sqrt(ice_rings_d_star_sq(3.0)[0])
    # d:     50 Å (beyond d_max), 10, 5, on the 3.895 Å ring, 3, 2.5, at the beam
    ds = [50.0, 10.0, 5.0, ring_d, 3.0, 2.5]
    x = [x_at(d) for d in ds] + [100.0]
    y = [50.0] * len(x)
    intensity = [1, 10, 100, 1000, 10000, 100000, 7]
    stats = image_stats(x, y, intensity, GEOMETRY)
    assert stats.n_spots_total == 5  # 50 Å and the beam centre are dropped
    assert stats.n_spots_no_ice == 4
    assert stats.n_spots_4A == 2  # 10 and 5 Å; the 3.9 Å ring spot is not > 4
    assert stats.total_intensity == 10 + 100 + 10000 + 100000
    limited = image_stats(x, y, intensity, GEOMETRY, d_min=2.8, d_max=None)
    assert (limited.n_spots_total, limited.n_spots_no_ice, limited.n_spots_4A) == (5, 4, 3)
    assert limited.total_intensity == 1 + 10 + 100 + 10000
    no_filter = image_stats(x, y, intensity, GEOMETRY, filter_ice=False)
    assert no_filter.n_spots_no_ice == 5 and no_filter.total_intensity == 111110


def test_image_stats_of_no_spots_and_bad_input() -> None:
    stats = image_stats([], [], [], GEOMETRY)
    assert (stats.n_spots_total, stats.n_spots_no_ice, stats.n_spots_4A, stats.total_intensity) == (0, 0, 0, 0.0)
    with pytest.raises(ValueError, match="differ in length"):
        image_stats([1.0], [1.0, 2.0], [1.0], GEOMETRY)
    with pytest.raises(ValueError, match="d_min 5 Å is above d_max 4 Å"):
        image_stats([1.0], [1.0], [1.0], GEOMETRY, d_min=5, d_max=4)
    with pytest.raises(ValueError, match="must be positive"):
        Geometry((0.0, 0.0), 0.0, (0.075, 0.075), 1.0, (10, 10))
