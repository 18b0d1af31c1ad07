"""Hostile inputs: memory and time bounded by the input as the README says,
Ctrl-C stops a long call, errors name the argument and quote it briefly,
duplicate JSON keys are refused. Measured in subprocesses, where a blow-up
cannot take the test session with it."""

import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import zocalo_xrc as zx
from test_inputs import GI


def python(code, *, timeout=120, limit_mb=None):
    """Run ``code`` in a fresh interpreter (optionally with an address-space
    limit); its result, and its peak memory in MB as the last line."""
    prelude = "import resource\n"
    if limit_mb:
        prelude += f"resource.setrlimit(resource.RLIMIT_AS, ({limit_mb << 20}, {limit_mb << 20}))\n"
    epilogue = "\nprint(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code) + epilogue], capture_output=True,
                          text=True, timeout=timeout)


ADVERSARIAL = """
import numpy as np, zocalo_xrc as zx
n = {n}
xy = np.ones((1, n), np.int64)
xz = np.tile(np.array([1, 0], np.int64), n // 2).reshape(1, n)  # a run at every other z, in every row
"""


def test_a_volume_of_many_runs_is_refused_with_bounded_memory():
    """256 KB of input whose volume splits into 134 million runs: a clear
    ValueError naming max_runs, with memory bounded by the limit (not 2.6 GB)."""
    out = python(ADVERSARIAL.format(n=16384) + """
try:
    zx.centre_3d(xy, xz)
except ValueError as e:
    print("ValueError:", e)
""")
    assert out.returncode == 0, out.stderr
    said, peak_mb = out.stdout.splitlines()
    assert said.startswith("ValueError:") and "max_runs" in said and str(zx.MAX_RUNS) in said
    assert int(peak_mb) < 700


def test_running_out_of_memory_is_a_memory_error_not_an_abort():
    out = python(ADVERSARIAL.format(n=16384) + """
try:
    zx.centre_3d(xy, xz, max_runs=2**32 - 1)
except MemoryError as e:
    print("MemoryError:", e)
""", limit_mb=900)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("MemoryError: no memory for more than")


def test_time_and_memory_follow_the_runs_not_the_volume():
    """4 billion voxels, half of them kept, in a million runs: a fraction of a
    second (reading every voxel, 64 at a time, took 3 s) and memory little
    beyond the grids and the runs."""
    out = python("""
import time
import numpy as np, zocalo_xrc as zx
xy = np.ones((1000, 1000), np.int64)
xz = np.zeros((1000, 4000), np.int64)
xz[:, 1000:3000] = 5
xz[:, 2000] = 6
t0 = time.monotonic()
(r,) = zx.centre_3d(xy, xz, threshold=0.5)
print(r.n_voxels, time.monotonic() - t0)
""")
    assert out.returncode == 0, out.stderr
    n_voxels, seconds, peak_mb = out.stdout.split()
    assert int(n_voxels) == 1000 * 1000 * 2000, out.stdout
    assert float(seconds) < 1.0 and int(peak_mb) < 300, out.stdout


def test_a_cut_off_of_its_own_in_every_row_is_bounded_too():
    """1.5 million rows, each with a cut-off of its own and one run: the most
    memory per run the core needs (~100 bytes)."""
    out = python("""
import numpy as np, zocalo_xrc as zx
ny, nz = 2**20, 2**19
xy = np.tile(np.arange(1, ny + 1, dtype=np.int64), 2).reshape(2, ny)
xz = np.tile(np.arange(1, nz + 1, dtype=np.int64), 2).reshape(2, nz)
(r,) = zx.centre_3d(xy, xz)
print(r.n_voxels)
""")
    assert out.returncode == 0, out.stderr
    n_voxels, peak_mb = out.stdout.split()
    assert int(n_voxels) == 443573206838 and int(peak_mb) < 400


LONG_CALLS = {
    # 50 million runs, a run at every other z of 12,288 rows (~700 MB)
    "many runs": """
xy = np.ones((1, 12288), np.int64)
xz = np.tile(np.array([1, 0], np.int64), 4096).reshape(1, 8192)
call = lambda: zx.centre_3d(xy, xz, max_runs=2**32 - 1)
""",
    # a multi-sample pin scans its regions' rows: 1.6e9 voxels, every one
    # kept (~4 s)
    "multi-sample scan": """
n = 40_000
call = lambda: zx.centre_3d(np.ones((1, n), np.int64), np.ones((1, n), np.int64), well_limits=[(0, 1)],
                            multipin_sample_ids={1: 5})
""",
}


@pytest.mark.parametrize("call, after_s", [
    # making runs, labelling them, summing them: ~0.5 s on a quiet machine, 2 s on a busy one
    ("many runs", 0.05), ("many runs", 0.15), ("many runs", 0.3),
    ("multi-sample scan", 0.2), ("multi-sample scan", 0.8), ("multi-sample scan", 1.4),
])
def test_ctrl_c_stops_a_long_call_whatever_it_is_doing(call, after_s):
    """Scanning, making runs, labelling or summing: a signal stops the call
    within moments. (Time follows the input and the runs, so a long call
    needs many runs, or a multi-sample pin's scan.)"""
    out = python(f"""
import os, signal, threading, time
import numpy as np, zocalo_xrc as zx
{LONG_CALLS[call]}
threading.Timer({after_s}, os.kill, (os.getpid(), signal.SIGINT)).start()
t0 = time.monotonic()
try:
    call()
    print("finished after", time.monotonic() - t0)
except KeyboardInterrupt:
    print("interrupted after", time.monotonic() - t0)
""", timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("interrupted after"), out.stdout
    assert float(out.stdout.split()[2]) < after_s + 0.4


def test_a_kept_message_keeps_only_what_it_needs():
    """2,000 parsed messages, each followed by 1 MB of JSON the parser skips:
    what they keep is their results, not a share of the bytes."""
    out = python("""
import json, zocalo_xrc as zx
row = {"centre_of_mass": [1.5, 2.5, 3.5], "max_voxel": [1, 2, 3], "max_count": 9.0, "n_voxels": 2,
       "total_count": 12.0, "sample_id": 7, "bounding_box": [[1, 2, 3], [2, 3, 4]]}
body = json.dumps({"results": [row], "status": "success", "type": "3d", "padding": "x" * (1 << 20)}).encode()
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
before = rss_mb()
kept = [zx.parse_result_message(body) for _ in range(2000)]
print(rss_mb() - before)
""")
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.splitlines()[0]) < 100  # it was ~1,250 MB


@pytest.mark.parametrize("change, words", [
    ({"steps_x": 1e20}, "gridinfo: steps_x must be at most 2147483647, got 1e+20"),
    ({"steps_x": 2**64}, "gridinfo: steps_x must be at most 2147483647, got 18446744073709551616"),
    ({"steps_y": 10**5000}, "gridinfo: steps_y must be at most 2147483647, got an integer of 16610 bits"),
    ({"steps_x": -1}, "gridinfo: steps_x must be positive, got -1"),
    ({"dx_mm": 10**400}, "gridinfo: dx_mm must be finite, got 10000000000000000000000000000000... (401 characters)"),
    ({"snapshot_offsetYPixel": 10**400}, "gridinfo: snapshot_offsetYPixel must be finite, got 1000"),
])
def test_huge_and_negative_numbers_are_value_errors_that_name_them(change, words):
    with pytest.raises(ValueError) as e:
        zx.GridInfo.from_ispyb({**GI, **change})
    assert str(e.value).startswith(words)


@pytest.mark.parametrize("kwargs, words", [
    ({"sample_id": 2**70}, "sample_id must fit in 64 bits"),
    ({"sample_id": -(2**70)}, "sample_id must fit in 64 bits"),
    ({"multipin_sample_ids": {1: 2**70}}, "multipin_sample_ids[1] must fit in 64 bits"),
    ({"max_runs": 0}, "max_runs must be an integer from 1"),
    ({"threshold": 10**400}, "threshold must be a finite number"),
    ({"well_limits": [(0, 10**400)]}, "well_limits[0][1] must be a finite number"),
    ({"multipin_sample_ids": {2**70: 1}}, "multipin_sample_ids: well number 1180591620717411303424 is out of range"),
    ({"max_runs": 2**40}, "max_runs must be an integer from 1"),
])
def test_out_of_range_ids_are_value_errors_that_name_them(kwargs, words):
    with pytest.raises(ValueError, match=r"^" + words.replace("[", r"\[").replace("]", r"\]")):
        zx.centre_3d(np.ones((2, 2), np.int64), np.ones((2, 2), np.int64), **kwargs)
    if "sample_id" in kwargs:
        with pytest.raises(ValueError, match="must fit in 64 bits"):
            zx.centre_2d(np.ones(126, np.int64), zx.GridInfo.from_ispyb(GI), **kwargs)


BIG = "9" * 10_000_000


@pytest.mark.parametrize("body", [
    '{"results": [{"centre_of_mass": [' + BIG + ', 1, 1]}]}',
    '{"results": [{"centre_of_mass": [1, 1, 1], "max_voxel": [' + BIG + ', 1, 1]}]}',
    '{"results": [{"centre_of_mass": [1, 1, 1], "max_voxel": [1.' + BIG + ', 1, 1]}]}',
    '{"results": [], "type": "' + "x" * 10_000_000 + '"}',
    '{"payload": {"results": []}, "recipe-pointer": 1, "recipe": {"1": {"parameters": {"dcid": "' + BIG + 'a"}}}}',
    '{"payload": {"results": []}, "recipe-pointer": 1, "recipe": {"1": {"parameters": {"dcid": ' + BIG + '}}}}',
])
def test_errors_quote_bad_input_briefly(body):
    with pytest.raises(zx.ResultPayloadError) as e:
        zx.parse_result_message(body)
    assert len(str(e.value)) < 200 and re.search(r"\(1000000\d characters\)", str(e.value)), str(e.value)[:200]


def test_python_side_errors_quote_bad_input_briefly():
    for change in ({"orientation": "x" * 10**6}, {"steps_x": "9" * 10**6}):
        with pytest.raises(ValueError) as e:
            zx.GridInfo.from_ispyb({**GI, **change})
        assert len(str(e.value)) < 200 and "characters)" in str(e.value)


@pytest.mark.parametrize("body, key", [
    ('{"results": [], "status": "success", "type": "2d", "type": "3d"}', "type"),
    ('{"results": [], "results": [], "type": "3d"}', "results"),
    ('{"payload": {"results": []}, "payload": {"results": []}, "recipe": {}, "recipe-pointer": 1}', "payload"),
    ('{"payload": {"results": []}, "recipe-pointer": 1, "recipe": {"1": {"parameters": {"dcid": 1, "dcid": 2}}}}', "dcid"),
    ('{"payload": {"results": []}, "recipe-pointer": 1, "recipe": {"1": {}, "1": {}}}', "1"),
    ('{"payload": {"results": []}, "recipe-pointer": 1, "recipe-pointer": 2, "recipe": {"1": {}, "2": {}}}', "recipe-pointer"),
    ('{"payload": {"results": []}, "environment": {"ID": "a", "ID": "b"}, "recipe": {"1": {}}, "recipe-pointer": 1}', "ID"),
    ('[{"centre_of_mass": [1, 1, 1], "max_voxel": [1, 1, 1], "max_count": 1, "n_voxels": 1, "total_count": 1, '
     '"bounding_box": [[1, 1, 1], [2, 2, 2]], "n_voxels": 2}]', "n_voxels"),
])
def test_duplicate_keys_are_refused(body, key):
    """Python's json (and so workflows) takes the last of two keys, other
    readers the first: neither is safe to take."""
    assert json.loads(body)  # valid JSON all the same
    with pytest.raises(zx.ResultPayloadError, match=f"duplicate key '{key}'|duplicate key \"{key}\""):
        zx.parse_result_message(body)


def test_unknown_keys_may_repeat():
    m = zx.parse_result_message('{"results": [], "type": "3d", "note": 1, "note": 2}')
    assert m.type == "3d" and len(m.results) == 0


def test_running_out_of_memory_for_the_results_is_a_memory_error_too():
    """Every run a region of its own, at the limit, in too little memory:
    statistics, order and results all ask before they allocate."""
    out = python("""
import numpy as np, zocalo_xrc as zx
n = 2 * 1448
xy = np.tile(np.array([1, 0], np.int64), n // 2).reshape(1, n)
xz = np.tile(np.array([1, 0], np.int64), n // 2).reshape(1, n)
try:
    zx.centre_3d(xy, xz, threshold=0.0)
    print("done")
except MemoryError as e:
    print("MemoryError:", e)
""", limit_mb=400)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith(("MemoryError:", "done"))


def test_every_run_its_own_region_within_the_limit_is_bounded_too():
    """Single voxels that never touch: a region per run, at the default limit."""
    out = python("""
import numpy as np, zocalo_xrc as zx
n = 2 * 1448
xy = np.tile(np.array([1, 0], np.int64), n // 2).reshape(1, n)
xz = np.tile(np.array([1, 0], np.int64), n // 2).reshape(1, n)   # 1448 x 1448 isolated voxels, just under 2^21 runs
print(len(zx.centre_3d(xy, xz, threshold=0.0)))
""", timeout=300)
    assert out.returncode == 0, out.stderr
    regions, peak_mb = out.stdout.split()
    assert int(regions) == 1448 * 1448 <= zx.MAX_RUNS and int(peak_mb) < 800
