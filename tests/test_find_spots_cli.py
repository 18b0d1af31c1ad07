"""``zocalo-xrc find-spots``: per image, what Diamond's CPU per-image analysis
reports, from an Eiger master file; errors are one line with an exit code."""

import json

import numpy as np
import pytest

import zocalo_xrc as zx
from test_cli import run
from zocalo_xrc import cli
from zocalo_xrc.pia.resolution import image_stats
from zocalo_xrc.pia.simulate import Simulator, write_eiger


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    d = Simulator((200, 300), module=(140, 90), gap=(8, 12), seed=4, n_hot=3)
    frames = [d.frame(d.random_spots(15, index=i), index=i) for i in range(9)]
    return write_eiger(tmp_path_factory.mktemp("scan"), "grid", frames, simulator=d, frames_per_file=4), d, frames


def test_json_per_image_is_the_library_s_answer(scan):
    master, d, frames = scan
    out = run("find-spots", master, "--json", "--images", "3:7", "--threads", "2")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["file-number"] for r in rows] == [3, 4, 5, 6, 7]
    finder = zx.SpotFinder(d.pixel_mask == 0, trusted_max=d.saturation_value, max_separation=2)
    for row in rows:
        spots = finder.find(frames[row["file-number"] - 1])
        stats = image_stats(spots.centroid[:, 0], spots.centroid[:, 1], spots.intensity, d.geometry)
        assert row == {"file-number": row["file-number"], "n_spots_total": stats.n_spots_total,
                       "n_spots_no_ice": stats.n_spots_no_ice, "n_spots_4A": stats.n_spots_4A,
                       "total_intensity": stats.total_intensity, "num_strong_pixels": spots.n_strong_pixels}
    assert 10 <= rows[0]["n_spots_total"] <= 15


def test_a_table_and_a_picture(scan, tmp_path):
    master, _, _ = scan
    out = run("find-spots", master, "--plot", tmp_path / "image.png", "--image", 2)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["image", "n_spots_total", "n_spots_no_ice", "n_spots_4A", "total_intensity",
                                "strong_pixels"]
    assert [int(line.split()[0]) for line in lines[1:]] == list(range(1, 10))
    assert (tmp_path / "image.png").stat().st_size > 10_000
    assert "plot of image 2 written" in out.stderr


def test_a_npy_array_has_no_geometry(tmp_path, scan):
    _, _, frames = scan
    np.save(tmp_path / "frames.npy", np.stack(frames[:2]))
    out = run("find-spots", tmp_path / "frames.npy", "--json")
    assert out.returncode == 0, out.stderr
    assert "no detector geometry" in out.stderr
    assert [json.loads(line)["n_spots_no_ice"] for line in out.stdout.splitlines()] == [None, None]


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["missing_master.h5"], cli.EXIT_FILE, "missing_master.h5: no such file"),
        (["{master}", "--images", "5:40"], cli.EXIT_FILE, "--images 5:40, but it has 9 images"),
        (["{master}", "--images", "0:2"], cli.EXIT_USAGE, "images are numbered from 1"),
        (["{master}", "--d-min", "50"], cli.EXIT_USAGE, "--d-min 50.0 is above --d-max 40.0"),
        (["{master}", "--images", "2:3", "--plot", "x.png", "--image", "9"], cli.EXIT_USAGE, "--image 9 is not among"),
        (["{text}"], cli.EXIT_FILE, "not an HDF5 file"),
        (["{master}", "--max-separation", "-1"], cli.EXIT_USAGE, "a distance in pixels is a number >= 0"),
    ],
)
def test_errors_are_one_line(scan, tmp_path, args, code, message):
    master, _, _ = scan
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    out = run("find-spots", *[a.format(master=master, text=text) for a in args], timeout=60)
    assert out.returncode == code, out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr
