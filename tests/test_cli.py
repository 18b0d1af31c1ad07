"""The zocalo-xrc command line on the shipped examples."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import zocalo_xrc as zx
from zocalo_xrc import cli

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(*args):
    return subprocess.run([sys.executable, "-m", "zocalo_xrc.cli", *map(str, args)], capture_output=True, text=True)


def test_3d_example_table_and_json():
    out = run("centre", EXAMPLES / "scan3d.json")
    assert out.returncode == 0, out.stderr
    assert "3D X-ray centring: 20 x 12 x 10 boxes, 2 result(s)" in out.stdout
    case = json.loads((EXAMPLES / "scan3d.json").read_text())
    scans = [zx.GridScan(g["dcid"], g["counts"], zx.GridInfo.from_ispyb(g["gridinfo"])) for g in case["grids"]]
    want = zx.centre_3d_scans(*scans, sample_id=case["sample_id"])
    out = run("centre", EXAMPLES / "scan3d.json", "--json")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == want.to_json()


def test_2d_example(tmp_path):
    out = run("centre", EXAMPLES / "scan2d.json", "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    case = json.loads((EXAMPLES / "scan2d.json").read_text())
    assert got == zx.centre_2d(case["counts"], zx.GridInfo.from_ispyb(case["gridinfo"]), sample_id=case["sample_id"]).to_dict()
    assert got["status"] == "ok"
    out = run("centre", EXAMPLES / "scan2d.json")
    assert "status ok" in out.stdout and "best image:" in out.stdout


@pytest.mark.parametrize("name", ["scan2d.json", "scan3d.json"])
def test_plot_writes_a_png(tmp_path, name):
    png = tmp_path / "out.png"
    assert cli.main(["centre", str(EXAMPLES / name), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_files_give_a_message_not_a_traceback(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    out = run("centre", bad)
    assert out.returncode == 1 and "not valid JSON" in out.stderr and "Traceback" not in out.stderr
    bad.write_text(json.dumps({"counts": [1, 2, 3], "gridinfo": {"steps_x": 2}}))
    out = run("centre", bad)
    assert out.returncode == 1 and "missing key 'steps_y'" in out.stderr
    bad.write_text(json.dumps({"grids": [1]}))
    out = run("centre", bad)
    assert out.returncode == 1 and "exactly two grids" in out.stderr
    out = run("centre", tmp_path / "missing.json")
    assert out.returncode == 2 and "No such file" in out.stderr


def table_lines(stdout):
    return [line for line in stdout.splitlines() if line.startswith("  ")]


def test_demo_runs_the_whole_loop_in_process():
    out = run("demo", EXAMPLES / "scan3d.json")
    assert out.returncode == 0, out.stderr
    assert "through an in-process broker" in out.stdout
    assert table_lines(out.stdout) == table_lines(run("centre", EXAMPLES / "scan3d.json").stdout)
    assert "best crystal, relative to the first box (mm)" in out.stdout


def test_demo_on_rabbitmq(rabbit):
    out = run("demo", EXAMPLES / "scan3d.json", "--broker", rabbit.url, "--beamline", "demo")
    assert out.returncode == 0, out.stderr
    assert table_lines(out.stdout) == table_lines(run("centre", EXAMPLES / "scan3d.json").stdout)


def test_demo_with_a_bad_broker_says_so_without_the_password(rabbit):
    if rabbit.close_all_connections is None:
        pytest.skip("external broker")
    out = run("demo", EXAMPLES / "scan3d.json", "--broker", rabbit.url.replace("guest:guest", "guest:hunter2"))
    assert out.returncode == 1 and "cannot connect" in out.stderr and "hunter2" not in out.stderr + out.stdout
