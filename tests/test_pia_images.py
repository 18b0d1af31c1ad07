"""The detector simulator, the Eiger file writer and the image reader, round trip."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py  # type: ignore[import-untyped]
import hdf5plugin
import numpy as np
import pytest

from zocalo_xrc.pia.images import Images, ImagesError, open_images
from zocalo_xrc.pia.resolution import Geometry, d_spacing, d_star_sq, on_ice_ring
from zocalo_xrc.pia.simulate import (
    MASK_DEAD,
    MASK_GAP,
    MASK_HOT,
    EigerWriter,
    Simulator,
    Spot,
    eiger2x_shape,
    module_gaps,
    write_eiger,
)

SMALL = dict(module=(60, 40), gap=(4, 6))  # gaps in a 100 x 200 frame


def small_simulator(**options: Any) -> Simulator:
    kw: dict[str, Any] = dict(SMALL, n_dead=3, n_hot=2, n_overloaded=2)
    kw.update(options)
    return Simulator((100, 200), **kw)


def frames(sim: Simulator, n: int) -> list[Any]:
    return [sim.frame(sim.random_spots(4, i), i) for i in range(n)]


def test_eiger2x_sizes_and_gaps() -> None:
    assert eiger2x_shape("1M") == (1062, 1028)
    assert eiger2x_shape("4M") == (2162, 2068)
    assert eiger2x_shape("9M") == (3262, 3108)
    assert eiger2x_shape("16M") == (4362, 4148)
    with pytest.raises(ValueError, match="unknown Eiger2 X size '2M'"):
        eiger2x_shape("2M")
    gaps = module_gaps(eiger2x_shape("4M"))
    assert gaps.sum() == 2162 * 2068 - 8 * 1028 * 512
    assert gaps[:, 1028:1040].all() and not gaps[0, 1027] and not gaps[0, 1040]
    assert gaps[512:550].all() and not gaps[511, 0] and not gaps[550, 0]


def test_frames_are_deterministic_with_defects_flagged() -> None:
    sim = small_simulator(radial_background=5.0, ice_rings=3.0)
    spots = sim.random_spots(5)
    a, b = sim.frame(spots, 3), small_simulator(radial_background=5.0, ice_rings=3.0).frame(spots, 3)
    assert a.dtype == np.uint32 and (a == b).all()
    assert not (sim.frame(spots, 4) == a).all()
    gap = module_gaps((100, 200), **SMALL)
    assert ((sim.pixel_mask & MASK_GAP != 0) == gap).all()
    assert (a[gap] == 2**32 - 1).all() and (a.view(np.int32)[gap] == -1).all()
    assert (a.reshape(-1)[sim.dead] == 2**32 - 1).all()
    assert (sim.pixel_mask.reshape(-1)[sim.dead] & MASK_DEAD).all()
    assert (sim.pixel_mask.reshape(-1)[sim.hot] & MASK_HOT).all()
    assert (a.reshape(-1)[sim.overloaded] == 2**32 - 2).all()
    assert (sim.pixel_mask.reshape(-1)[sim.overloaded] == 0).all()  # unmasked, untrusted
    good = sim.pixel_mask == 0
    good.reshape(-1)[sim.overloaded] = False
    assert a[good].max() <= sim.saturation_value


def test_spots_and_backgrounds_are_where_asked() -> None:
    sim = Simulator((60, 80), background=0.0)
    mean = sim.mean([Spot(20.5, 30.5, 1000.0, 1.0)])
    assert tuple(int(i) for i in np.unravel_index(mean.argmax(), mean.shape)) == (30, 20)
    assert mean.sum() == pytest.approx(1000.0, rel=1e-3)
    radial = Simulator((60, 80), background=1.0, radial_background=10.0).mean()
    assert radial[30, 40] > radial[5, 5] > 1.0
    # ice: bright on the rings, dark off them
    near = Geometry((200.0, 200.0), 50.0, (0.075, 0.075), 0.9763, (400, 400))  # to 3.4 Å
    ice = Simulator((400, 400), background=0.0, ice_rings=5.0, geometry=near).mean()
    ys, xs = np.unravel_index(np.argsort(ice, axis=None)[-20:], ice.shape)
    d = d_spacing(xs + 0.5, ys + 0.5, near)
    assert on_ice_ring(1 / d**2).all()
    dark = ice < 1e-3
    ys, xs = np.nonzero(dark)
    assert dark.mean() > 0.5 and not on_ice_ring(d_star_sq(xs + 0.5, ys + 0.5, near)).any()


@pytest.mark.parametrize("compression", ["bslz4", "gzip", None])
def test_master_file_round_trip(tmp_path: Path, compression: Any) -> None:
    sim = small_simulator()
    written = frames(sim, 5)
    master = write_eiger(tmp_path, "scan", written, simulator=sim, frames_per_file=2, compression=compression)
    assert master == tmp_path / "scan_master.h5"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "scan_data_000001.h5", "scan_data_000002.h5", "scan_data_000003.h5", "scan_master.h5"
    ]
    with h5py.File(master) as f:
        links = {n: f["/entry/data"].get(n, getlink=True) for n in f["/entry/data"]}
        assert {n: (link.filename, link.path) for n, link in links.items()} == {
            f"data_00000{i}": (f"scan_data_00000{i}.h5", "/entry/data/data") for i in (1, 2, 3)
        }
        assert f["/entry"].attrs["NX_class"] == b"NXentry"
        assert f["/entry/instrument/detector"].attrs["NX_class"] == b"NXdetector"
        assert f["/entry/instrument/detector/detector_distance"].attrs["units"] == b"m"
    with h5py.File(tmp_path / "scan_data_000002.h5") as f:
        data = f["/entry/data/data"]
        assert data.shape == (2, 100, 200) and data.chunks == (1, 100, 200)
        if compression == "bslz4":
            assert data.id.get_create_plist().get_filter(0)[0] == 32008
        assert data.attrs["image_nr_low"] == 3 and data.attrs["image_nr_high"] == 4

    with open_images(master) as images:
        assert len(images) == 5 and images.shape == (100, 200) and images.dtype == np.uint32
        assert all((got == want).all() for got, want in zip(images, written))
        assert (images[-1] == written[4]).all()
        assert images.mask is not None and (images.mask == (sim.pixel_mask == 0)).all()
        assert images.trusted_max == sim.saturation_value
        assert images.geometry == sim.geometry
        with pytest.raises(IndexError, match="frame 5 out of range"):
            images[5]


def test_raw_chunks_decode_to_the_frames(tmp_path: Path) -> None:
    """The raw bitshuffle-LZ4 chunk, written back as a chunk of a fresh
    dataset with the same filter, reads as the frame."""
    sim = small_simulator()
    written = frames(sim, 3)
    master = write_eiger(tmp_path, "scan", written, simulator=sim)
    with open_images(master) as images, h5py.File(tmp_path / "copy.h5", "w") as copy:
        target = copy.create_dataset(
            "d", shape=(3, 100, 200), chunks=(1, 100, 200), dtype=images.dtype,
            **hdf5plugin.Bitshuffle(cname="lz4"),
        )
        for i in range(3):
            filters, chunk = images.raw_chunk(i)
            assert filters == (32008,)
            assert chunk[:8] == (100 * 200 * 4).to_bytes(8, "big")  # bitshuffle's header
            target.id.write_direct_chunk((i, 0, 0), chunk)
            assert (target[i] == written[i]).all()
    plain = write_eiger(tmp_path, "plain", written, compression=None)
    with open_images(plain) as images:
        filters, chunk = images.raw_chunk(1)
        assert filters == ()
        assert (np.frombuffer(chunk, images.dtype).reshape(images.shape) == written[1]).all()


def test_single_data_file_and_odin_virtual_dataset(tmp_path: Path) -> None:
    sim = small_simulator()
    written = frames(sim, 5)
    write_eiger(tmp_path, "scan", written, simulator=sim, frames_per_file=3)
    with open_images(tmp_path / "scan_data_000002.h5") as images:
        assert len(images) == 2 and (images[1] == written[4]).all()
        assert images.mask is None and images.trusted_max is None and images.geometry is None
    # Odin: /entry/data/data, a virtual dataset over the data files
    layout = h5py.VirtualLayout(shape=(5, 100, 200), dtype=np.uint32)
    for n, (start, count) in enumerate([(0, 3), (3, 2)], start=1):
        layout[start : start + count] = h5py.VirtualSource(
            f"scan_data_00000{n}.h5", "/entry/data/data", shape=(count, 100, 200)
        )
    odin = tmp_path / "odin.nxs"
    with h5py.File(odin, "w") as f:
        f.create_group("entry/data").create_virtual_dataset("data", layout)
    with open_images(odin) as images:
        assert len(images) == 5 and all((a == b).all() for a, b in zip(images, written))
        assert images.raw_chunk(4)[0] == (32008,)
    # two Odin writers taking alternate frames: 0, 2, 4 in one file, 1, 3 in the other
    for name, picked in (("even", written[0::2]), ("odd", written[1::2])):
        with h5py.File(tmp_path / f"{name}.h5", "w") as f:
            f.create_dataset("data", data=np.stack(picked), chunks=(1, 100, 200), **hdf5plugin.Bitshuffle())
    layout = h5py.VirtualLayout(shape=(5, 100, 200), dtype=np.uint32)
    layout[0:5:2] = h5py.VirtualSource("even.h5", "data", shape=(3, 100, 200))
    layout[1:5:2] = h5py.VirtualSource("odd.h5", "data", shape=(2, 100, 200))
    with h5py.File(tmp_path / "interleaved.nxs", "w") as f:
        f.create_group("entry/data").create_virtual_dataset("data", layout)
    with open_images(tmp_path / "interleaved.nxs") as images:
        assert len(images) == 5 and all((a == b).all() for a, b in zip(images, written))
        assert images.raw_chunk(3)[0] == (32008,)
    # a virtual dataset whose later frames have no source yet
    layout = h5py.VirtualLayout(shape=(7, 100, 200), dtype=np.uint32)
    layout[0:3] = h5py.VirtualSource("scan_data_000001.h5", "/entry/data/data", shape=(3, 100, 200))
    with h5py.File(tmp_path / "partial.nxs", "w") as f:
        f.create_group("entry/data").create_virtual_dataset("data", layout)
    with open_images(tmp_path / "partial.nxs") as images:
        assert len(images) == 7 and (images[2] == written[2]).all()
        with pytest.raises(ImagesError, match=r"partial\.nxs: frame 5 has no source \(not written yet\?\)"):
            images[5]
    (tmp_path / "scan_data_000002.h5").unlink()
    with pytest.raises(ImagesError, match=r"frames 3\.\.4 come from scan_data_000002\.h5.* does not exist"):
        open_images(odin)


def test_numpy_arrays(tmp_path: Path) -> None:
    sim = small_simulator()
    stack = np.stack(frames(sim, 3))
    np.save(tmp_path / "stack.npy", stack)
    np.save(tmp_path / "one.npy", stack[1])
    with open_images(tmp_path / "stack.npy") as images:
        assert len(images) == 3 and (images[2] == stack[2]).all()
        assert images.raw_chunk(0) == ((), stack[0].tobytes())
        assert images.mask is None and images.geometry is None
    with open_images(tmp_path / "one.npy") as images:
        assert len(images) == 1 and (images[0] == stack[1]).all()
    np.save(tmp_path / "flat.npy", stack.reshape(-1))
    with pytest.raises(ImagesError, match=r"flat\.npy: a 1D array"):
        open_images(tmp_path / "flat.npy")


def test_errors_name_the_file_and_the_fault(tmp_path: Path) -> None:
    with pytest.raises(ImagesError, match=r"nothing\.h5: no such file"):
        open_images(tmp_path / "nothing.h5")
    (tmp_path / "text.h5").write_text("not HDF5")
    with pytest.raises(ImagesError, match=r"text\.h5: not an HDF5 file"):
        open_images(tmp_path / "text.h5")
    with h5py.File(tmp_path / "empty.h5", "w") as f:
        f.create_group("entry")
    with pytest.raises(ImagesError, match=r"empty\.h5: no /entry/data group"):
        open_images(tmp_path / "empty.h5")
    with h5py.File(tmp_path / "flat.h5", "w") as f:
        f["entry/data/data"] = np.zeros((4, 5))
    with pytest.raises(ImagesError, match=r"flat\.h5: image data is 2D, not frames x height x width"):
        open_images(tmp_path / "flat.h5")
    for name, data, fault in [
        ("text", np.zeros((2, 3, 4), dtype="S1"), r"image data of type \|S1 is not numbers"),
        ("thin", np.zeros((2, 0, 4)), r"frames of shape \(0, 4\) are empty"),
        ("none", np.zeros((0, 3, 4)), r"no frames in /entry/data/data"),
    ]:
        with h5py.File(tmp_path / f"{name}.h5", "w") as f:
            f["entry/data/data"] = data
        with pytest.raises(ImagesError, match=rf"{name}\.h5: {fault}"):
            open_images(tmp_path / f"{name}.h5")

    sim = small_simulator()
    master = write_eiger(tmp_path, "scan", frames(sim, 4), simulator=sim, frames_per_file=2)
    (tmp_path / "scan_data_000002.h5").unlink()
    with pytest.raises(
        ImagesError,
        match=r"scan_master\.h5: /entry/data/data_000002 links to scan_data_000002\.h5:/entry/data/data,"
        r" but .*scan_data_000002\.h5 does not exist",
    ):
        open_images(master)


def test_corrupt_chunk_names_frame_and_file(tmp_path: Path) -> None:
    sim = small_simulator()
    master = write_eiger(tmp_path, "scan", frames(sim, 4), simulator=sim, frames_per_file=2)
    with h5py.File(tmp_path / "scan_data_000002.h5", "r+") as f:
        f["/entry/data/data"].id.write_direct_chunk((1, 0, 0), b"\x00" * 8 + b"garbage!" * 10)
    with open_images(master) as images:
        assert (images[2] == sim.frame(sim.random_spots(4, 2), 2)).all()
        with pytest.raises(ImagesError, match=r"scan_data_000002\.h5: frame 3 \(/entry/data/data\[1\]\) cannot be decoded"):
            images[3]


def test_writer_grows_frame_by_frame(tmp_path: Path) -> None:
    """Each frame is flushed once written: a reader opening the files between
    writes sees every frame so far (SWMR reading is for later)."""
    sim = small_simulator()
    written = frames(sim, 3)
    with EigerWriter(tmp_path, "grow", sim.shape, geometry=sim.geometry, frames_per_file=2) as writer:
        for n, frame in enumerate(written, start=1):
            writer.write(frame)
            with h5py.File(tmp_path / f"grow_data_00000{(n + 1) // 2}.h5", "r") as f:
                assert f["/entry/data/data"].shape[0] == (n - 1) % 2 + 1
        with pytest.raises(ValueError, match=r"frame shape \(3, 3\) is not \(100, 200\)"):
            writer.write(np.zeros((3, 3), np.uint32))
    with open_images(writer.master_path) as images:
        assert isinstance(images, Images) and len(images) == 3
        assert images.trusted_max is None and images.mask is None


def test_the_detector_is_read_once_when_a_growing_file_is_opened_again(tmp_path: Path) -> None:
    """A follower opens a growing file once per frame: with ``detector=``
    the mask, trusted maximum and geometry are those read before, not read
    again (a 4M mask took ~30 ms a time); the mask itself is read when first
    asked for, from the file, even once the images are closed."""
    sim = small_simulator()
    master = write_eiger(tmp_path, "scan", frames(sim, 2), simulator=sim)
    with open_images(master) as first:
        pass
    with h5py.File(master, "r+") as f:  # the master changes under it: what is read again shows it
        f["/entry/instrument/detector/beam_center_x"][()] = 1.0
        f["/entry/instrument/detector/saturation_value"][()] = 7
    with open_images(master, detector=first) as again, open_images(master) as fresh:
        assert again.geometry == first.geometry == sim.geometry and again.trusted_max == sim.saturation_value
        assert fresh.geometry.beam_centre_px[0] == 1.0 and fresh.trusted_max == 7
        assert again.mask is not None and (again.mask == (sim.pixel_mask == 0)).all()
    assert first.mask is not None and (first.mask == (sim.pixel_mask == 0)).all()  # read after close


def test_chunks_encoded_beforehand_are_written_as_they_are(tmp_path: Path) -> None:
    """A detector that compresses its own frames: ``encode`` gives each
    frame's chunk as the data file's filter would, ``write_chunk`` writes it
    untouched, and the file reads back the frames (through hdf5plugin and the
    core's decoder alike); no scratch file is left."""
    sim = small_simulator()
    written = frames(sim, 3)
    with EigerWriter(tmp_path, "direct", sim.shape, geometry=sim.geometry, frames_per_file=2) as writer:
        chunks = writer.encode(written)
        assert [len(c) for c in chunks] == [len(c) for c in writer.encode(written)]  # the same each time
        for chunk in chunks:
            writer.write_chunk(chunk)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "direct_data_000001.h5", "direct_data_000002.h5", "direct_master.h5"]
    with h5py.File(tmp_path / "direct_data_000001.h5", "r") as f:
        np.testing.assert_array_equal(f["/entry/data/data"][:], np.stack(written[:2]))  # hdf5plugin's decoding
        assert f["/entry/data/data"].id.read_direct_chunk((1, 0, 0))[1] == chunks[1]
    with open_images(writer.master_path) as images:
        assert len(images) == 3
        for k, frame in enumerate(written):
            np.testing.assert_array_equal(images[k], frame)  # the core's


@pytest.mark.parametrize("scale", ["log", "linear"])
def test_plot_circles_spots(tmp_path: Path, scale: Any) -> None:
    from matplotlib.image import imread

    from zocalo_xrc.pia.plot import plot_spots

    sim = small_simulator()
    spots = [Spot(50.5, 30.5, 3000.0), Spot(150.5, 70.5, 3000.0)]
    frame = sim.frame(spots)
    out = plot_spots(
        tmp_path / "frame.png", frame, [s.x for s in spots], [s.y for s in spots],
        bounding_boxes=[[48, 53, 28, 33], [148, 153, 68, 73]], geometry=sim.geometry,
        mask=sim.pixel_mask == 0, trusted_max=sim.saturation_value, scale=scale, title="frame 0",
    )
    pixels = imread(out)
    assert pixels.shape[2] in (3, 4) and pixels.shape[0] > 500
    red = (pixels[..., 0] > 0.9) & (pixels[..., 1] < 0.2) & (pixels[..., 2] < 0.2)
    assert red.sum() > 20  # the circles
    bare = plot_spots(tmp_path / "bare.png", frame.view(np.int32))  # no spots, no geometry
    assert imread(bare).shape == pixels.shape
    with pytest.raises(ValueError, match="2 bounding boxes for 1 spots"):
        plot_spots(tmp_path / "x.png", frame, [1.0], [1.0], bounding_boxes=[[0, 1, 0, 1]] * 2)
    with pytest.raises(ValueError, match=r"non-empty 2D array, not shape \(200,\)"):
        plot_spots(tmp_path / "x.png", frame[0])


def _dectris_master(directory: Path, mask_shape: tuple[int, int] = (100, 200), distance_units: bytes = b"m") -> Path:
    """A master file laid out as the DECTRIS SIMPLON filewriter writes one
    (fields as dxtbx's FormatHDF5EigerNearlyNexus and FFS's h5read read
    them): float32 fields with byte-string units, no saturation_value but
    the count-rate cutoff, the mask only under detectorSpecific, 16-bit data
    linked by a path without a leading slash."""
    rng = np.random.default_rng(3)
    data = rng.poisson(2.0, (3, 100, 200)).astype(np.uint16)
    with h5py.File(directory / "real_data_000001.h5", "w") as f:
        f.create_dataset("entry/data/data", data=data, chunks=(1, 100, 200), **hdf5plugin.Bitshuffle())
    master = directory / "real_master.h5"
    with h5py.File(master, "w") as f:
        entry = f.create_group("entry")
        entry.attrs["NX_class"] = np.bytes_("NXentry")
        entry.create_group("data").attrs["NX_class"] = np.bytes_("NXdata")
        f["entry/data/data_000001"] = h5py.ExternalLink("real_data_000001.h5", "entry/data/data")
        det = f.create_group("entry/instrument/detector")
        det.attrs["NX_class"] = np.bytes_("NXdetector")
        det["description"] = np.bytes_("Dectris EIGER2 Si 4M")
        for name, value, units in [
            ("beam_center_x", 101.25, b"pixel"), ("beam_center_y", 48.5, b"pixel"),
            ("detector_distance", 0.25 if distance_units == b"m" else 250.0, distance_units),
            ("x_pixel_size", 7.5e-5, b"m"), ("y_pixel_size", 7.5e-5, b"m"),
        ]:
            det.create_dataset(name, data=np.float32(value)).attrs["units"] = units
        det["detectorSpecific/countrate_correction_count_cutoff"] = np.uint32(126952)
        mask = np.zeros(mask_shape, np.uint32)
        mask[:, 60:64] = 1
        det["detectorSpecific/pixel_mask"] = mask
        beam = f.create_group("entry/instrument/beam")
        beam.create_dataset("incident_wavelength", data=np.float32(0.9762535)).attrs["units"] = b"angstrom"
    return master


def test_a_dectris_layout_reads(tmp_path: Path) -> None:
    with open_images(_dectris_master(tmp_path)) as images:
        assert len(images) == 3 and images.dtype == np.uint16
        assert images.trusted_max == 126952
        assert images.mask is not None and images.mask.sum() == 100 * 196 and not images.mask[:, 60:64].any()
        g = images.geometry
        assert g is not None
        assert g.beam_centre_px == (101.25, 48.5) and g.image_size == (200, 100)
        assert g.distance_mm == pytest.approx(250.0) and g.pixel_size_mm == pytest.approx((0.075, 0.075))
        assert g.wavelength_A == pytest.approx(0.9762535)
        assert images.raw_chunk(2)[0] == (32008,)
    (tmp_path / "mm").mkdir()
    with open_images(_dectris_master(tmp_path / "mm", distance_units=b"mm")) as images:
        assert images.geometry is not None and images.geometry.distance_mm == pytest.approx(250.0)
    (tmp_path / "bad").mkdir()
    with pytest.raises(ImagesError, match=r"real_master\.h5: .*detector_distance has units 'pixel', not a length"):
        open_images(_dectris_master(tmp_path / "bad", distance_units=b"pixel"))
    (tmp_path / "shape").mkdir()
    with pytest.raises(ImagesError, match=r"detectorSpecific/pixel_mask is \(100, 100\), but frames are \(100, 200\)"):
        open_images(_dectris_master(tmp_path / "shape", mask_shape=(100, 100)))
