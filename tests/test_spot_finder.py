"""The Rust spot finder against the numpy/scipy reference of DIALS's rule
(tests/dispersion_reference.py), pixel for pixel and spot for spot, on frames
the tests make: simulated Eiger frames with spots on edges, corners and module
gaps, saturated and masked pixels, int32 gaps, uint16, huge counts, and
hypothesis's frames of any size and content."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import zocalo_xrc as zx
import zocalo_xrc.pia.simulate
from dispersion_reference import find_spots, strong_pixels, strong_pixels_extended
from zocalo_xrc.pia.simulate import Simulator, Spot

RULES = {"dispersion": strong_pixels, "dispersion_extended": strong_pixels_extended}


def same(image, mask=None, *, trusted_max=None, algorithm="dispersion", min_spot_size=3, max_spot_size=1000,
         max_separation=None, **rule):
    """Ours equals the reference: strong pixels, then every spot column."""
    finder = zx.SpotFinder(
        mask, trusted_max=trusted_max, algorithm=algorithm, min_spot_size=min_spot_size, max_spot_size=max_spot_size,
        max_separation=max_separation, **rule
    )
    kernel = rule.pop("kernel_size", 3)
    expected = RULES[algorithm](image, mask, trusted_max=trusted_max, kernel=kernel, **rule)
    strong = finder.strong_pixels(image)
    assert strong.shape == image.shape and strong.dtype == np.bool_
    np.testing.assert_array_equal(strong, expected)
    spots = finder.find(image)
    ref = find_spots(image, expected, min_spot_size=min_spot_size, max_spot_size=max_spot_size,
                     max_separation=max_separation)
    assert spots.n_strong_pixels == int(expected.sum())
    assert len(spots) == len(ref)
    np.testing.assert_array_equal(spots.size, ref.size)
    np.testing.assert_array_equal(spots.bounding_box, ref.bounding_box)
    np.testing.assert_allclose(spots.intensity, ref.intensity, rtol=1e-12)
    np.testing.assert_allclose(spots.centroid, ref.centroid, rtol=1e-12)
    return spots


@pytest.fixture(scope="module")
def detector():
    """A small Eiger-like detector: 2 x 2 modules of 100 x 60 with gaps."""
    return Simulator((2 * 60 + 6, 2 * 100 + 4), module=(100, 60), gap=(4, 6), seed=3, n_dead=20, n_hot=5, n_overloaded=5)


def spots_everywhere(d):
    h, w = d.shape
    at = [(0, 0), (w - 1, 0), (0, h - 1), (w - 1, h - 1), (w // 2, 0), (0, h // 2), (100, 30), (102, 63), (50, 61)]
    return [Spot(x + 0.5, y + 0.5, 800.0, 1.0) for x, y in at] + d.random_spots(25, intensity=(50, 3000))


@pytest.mark.parametrize("algorithm", ["dispersion", "dispersion_extended"])
def test_a_simulated_eiger_frame_pixel_for_pixel(detector, algorithm):
    frame = detector.frame(spots_everywhere(detector))
    mask = detector.pixel_mask == 0
    spots = same(frame, mask, trusted_max=detector.saturation_value, algorithm=algorithm)
    assert len(spots) >= 15
    # without the mask, the gaps (2^32-1) are not valid either, above the trusted maximum
    same(frame, None, trusted_max=detector.saturation_value, algorithm=algorithm)
    # and with no trusted maximum, a gap is a valid pixel left out of the box sums (above 2^24)
    same(frame, None, algorithm=algorithm)


def test_int32_gaps_uint16_and_floats(detector):
    frame = detector.frame(spots_everywhere(detector), index=1)
    mask = detector.pixel_mask == 0
    as_int32 = frame.view(np.int32)  # the gaps read -1 and -2
    assert (as_int32 < 0).any()
    same(as_int32, None)
    same(np.minimum(frame, 65535).astype(np.uint16), mask)
    same(frame.astype(np.float64), mask, trusted_max=detector.saturation_value)
    same(frame.astype(np.float32), mask, trusted_max=detector.saturation_value)
    # strided: a transposed view, every other column
    same(np.ascontiguousarray(frame.T).T, mask)
    same(frame[:, ::2], mask[:, ::2])


def test_huge_counts_past_2_to_the_32_in_the_sums():
    rng = np.random.default_rng(7)
    frame = rng.integers(0, 3, size=(40, 50), dtype=np.uint32)
    frame[10:14, 10:14] = rng.integers(2**23, 2**24, size=(4, 4), dtype=np.uint32)  # y past 2^53 in a box
    frame[30, 30] = 2**24  # valid, not in the box sums
    frame[31, 31] = 2**24 - 1
    frame[5:8, 40:43] = 4096  # just past the fast path's small values
    same(frame)
    same(frame.astype(np.int32))
    same(frame, gain=1.0)
    same(frame, gain=2.5, sigma_strong=2.0)


def test_all_masked_neighbourhoods_and_edges():
    frame = np.zeros((20, 20), np.uint16)
    frame[0, 0] = frame[0, 1] = frame[1, 0] = 50
    frame[19, 17:20] = 40
    mask = np.ones(frame.shape, bool)
    mask[8:13, 8:13] = False
    frame[10, 10] = 500  # masked, inside a masked box
    mask[14, 14] = True
    spots = same(frame, mask, min_spot_size=1)
    assert len(spots) == 2
    everything_masked = np.zeros(frame.shape, bool)
    assert len(same(frame, everything_masked, min_spot_size=1)) == 0


def test_parameters_fast_feedback_service_uses_and_others(detector):
    frame = detector.frame(spots_everywhere(detector), index=2)
    mask = detector.pixel_mask == 0
    same(frame, mask, min_local=3, max_spot_size=None)
    same(frame, mask, sigma_background=3, sigma_strong=2, global_threshold=5)
    same(frame, mask, kernel_size=5)
    same(frame, mask, kernel_size=8, algorithm="dispersion")  # a box of 289: the general path
    same(frame, mask, min_spot_size=1, max_spot_size=4)
    every = same(frame, mask, min_spot_size=1)
    near = same(frame, mask, min_spot_size=1, max_separation=0.6)  # DIALS's default is 2
    assert 0 < len(near) < len(every)


frames = hnp.arrays(
    dtype=np.uint32,
    shape=st.tuples(st.integers(1, 24), st.integers(1, 24)),
    elements=st.one_of(st.integers(0, 6), st.integers(0, 5000), st.sampled_from([0, 1, 2**24 - 1, 2**24, 4095, 4096])),
)


@settings(max_examples=int(__import__("os").environ.get("ZOCALO_XRC_EXAMPLES", "150")), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames, st.sampled_from([np.uint16, np.uint32, np.int32]), st.data())
def test_any_frame(image, dtype, data):
    image = np.minimum(image, np.iinfo(dtype).max).astype(dtype)
    mask = data.draw(hnp.arrays(np.bool_, image.shape)) if data.draw(st.booleans()) else None
    if image.dtype == np.int32 and data.draw(st.booleans()):
        image = image.copy()
        image[data.draw(hnp.arrays(np.bool_, image.shape))] = -1
    rule = data.draw(
        st.fixed_dictionaries(
            {},
            optional={
                "sigma_background": st.sampled_from([0.0, 1.5, 6.0]),
                "sigma_strong": st.sampled_from([0.0, 1.0, 3.0]),
                "global_threshold": st.sampled_from([0.0, 2.0, 10.5]),
                "min_local": st.integers(2, 49),
                "gain": st.sampled_from([0.5, 1.0, 3.0]),
                "trusted_max": st.sampled_from([10.0, 4096.0, 2.0**24]),
            },
        )
    )
    algorithm = data.draw(st.sampled_from(["dispersion", "dispersion_extended"]))
    same(image, mask, algorithm=algorithm, min_spot_size=1, max_spot_size=None, **rule)


def test_many_frames_in_parallel_in_order(detector):
    frames = [detector.frame(detector.random_spots(10, index=i), index=i) for i in range(6)]
    finder = zx.SpotFinder(detector.pixel_mask == 0, trusted_max=detector.saturation_value)
    one = [finder.find(f) for f in frames]
    for threads in (1, 2, 0):
        assert list(finder.find_many(frames, threads=threads)) == one
    assert list(finder.find_many(np.stack(frames), threads=2)) == one


def test_bad_input_is_named(detector):
    finder = zx.SpotFinder(detector.pixel_mask == 0)
    with pytest.raises(ValueError, match=r"the image is 10 x 10 pixels, the mask 126 x 204"):
        finder.find(np.zeros((10, 10), np.uint32))
    with pytest.raises(ValueError, match="2D array, not 3D"):
        zx.SpotFinder().find(np.zeros((2, 3, 4), np.uint16))
    with pytest.raises(TypeError, match="complex128"):
        zx.SpotFinder().find(np.zeros((3, 4), complex))
    with pytest.raises(ValueError, match="NaN at row 1, column 2"):
        image = np.zeros((3, 4), np.float32)
        image[1, 2] = np.nan
        zx.SpotFinder().find(image)
    with pytest.raises(ValueError, match="empty image"):
        zx.SpotFinder().find(np.zeros((0, 4), np.uint16))
    with pytest.raises(ValueError, match="min_local must be 2..49"):
        zx.SpotFinder(min_local=1)
    with pytest.raises(ValueError, match="sigma_strong must be a finite number >= 0"):
        zx.SpotFinder(sigma_strong=-1)
    with pytest.raises(ValueError, match="max_spot_size 2 is below min_spot_size 3"):
        zx.SpotFinder(max_spot_size=2)
    with pytest.raises(ValueError, match='algorithm must be "dispersion" or "dispersion_extended"'):
        zx.SpotFinder(algorithm="radial_profile")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="bool array"):
        zx.SpotFinder(np.zeros((3, 3), np.uint8))
    with pytest.raises(ValueError, match="image 1: image 1 is not a 2D uint16 array like image 0"):
        list(zx.SpotFinder().find_many([np.zeros((3, 3), np.uint16), np.zeros((3, 3), np.uint32)]))
    with pytest.raises(ValueError, match="threads must be a whole number"):
        list(zx.SpotFinder().find_many([], threads=-1))


@pytest.mark.parametrize("dtype", [np.uint32, np.uint16, np.int32])
def test_frames_of_a_file_decoded_in_rust(tmp_path, dtype):
    d = Simulator((60, 90), module=(40, 25), gap=(5, 10), seed=5, dtype=np.uint32)
    frames = [d.frame(d.random_spots(6, index=i), index=i) for i in range(7)]
    if dtype is np.uint16:
        frames = [np.minimum(f, 65535).astype(np.uint16) for f in frames]
    elif dtype is np.int32:
        frames = [f.view(np.int32) for f in frames]
    master = zx.pia.simulate.write_eiger(tmp_path, "scan", frames, simulator=d, frames_per_file=3)
    with zx.open_images(master) as data:
        assert data.bslz4_chunk(0) is not None  # the Eiger's own filter: decoded by the core
        for i, f in enumerate(frames):
            np.testing.assert_array_equal(data[i], f)
        finder = data.spot_finder()
        assert finder.trusted_max == d.saturation_value
        np.testing.assert_array_equal(finder.mask, d.pixel_mask == 0)
        expected = [finder.find(f) for f in frames]
        for threads in (1, 2):
            assert list(finder.find_many(data, threads=threads)) == expected
    other = zx.pia.simulate.write_eiger(tmp_path, "gzip", frames, simulator=d, compression="gzip")
    with zx.open_images(other) as data:
        assert data.bslz4_chunk(0) is None  # decoded through h5py and its plugins
        assert list(data.spot_finder().find_many(data)) == expected


def test_a_corrupt_chunk_names_the_frame_and_the_file(tmp_path):
    import h5py

    d = Simulator((30, 40), module=(40, 30), gap=(0, 0), seed=1)
    frames = [d.frame(index=i) for i in range(4)]
    master = zx.pia.simulate.write_eiger(tmp_path, "bad", frames, simulator=d)
    data_file = tmp_path / "bad_data_000001.h5"
    with h5py.File(data_file, "r+") as f:
        dataset = f["/entry/data/data"]
        _, chunk = dataset.id.read_direct_chunk((2, 0, 0))
        broken = bytearray(chunk)
        broken[20:40] = b"\xff" * 20
        dataset.id.write_direct_chunk((2, 0, 0), bytes(broken[:-7]))
    with zx.open_images(master) as data:
        with pytest.raises(zx.ImagesError, match=r"bad_data_000001.h5: frame 2 \(/entry/data/data\[2\]\) cannot be decoded"):
            data[2]
        with pytest.raises(zx.ImagesError, match=r"frame 2 .* cannot be decoded"):
            list(data.spot_finder().find_many(data))
