"""dls-dodal 3.0.5's own ``ZocaloTrigger`` and ``ZocaloResults``, unchanged
and in a venv of their own, against ``zocalo-xrc local up`` on RabbitMQ with
a simulated detector: the results dodal's device reads are ``centre_3d_scans``
over the counts the spot finder here finds in the frames written.

Opt-in, as it installs dodal (and its bluesky, ophyd-async, zocalo) from PyPI::

    ZOCALO_XRC_DODAL=1 pytest tests/test_dodal.py
    ZOCALO_XRC_DODAL_VENV=/path/to/venv pytest tests/test_dodal.py   # a venv that has dls-dodal 3.0.5

The first run makes the venv in ``$XDG_CACHE_HOME/zocalo-xrc/dodal-3.0.5-venv``
(``~/.cache`` by default; about 1.5 minutes, 3 on a busy machine), later runs
reuse it; the test itself takes about 45 s (75 s on a busy machine). The plan it runs there is ``tests/dodal_plan.py``.
"""

from __future__ import annotations

import fcntl
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest

from zocalo_xrc.centring import GridScan, centre_3d_scans
from zocalo_xrc.local.scan import Scan
from zocalo_xrc.pia.images import open_images
from zocalo_xrc.pia.resolution import image_stats

DODAL = "3.0.5"
HERE = Path(__file__).resolve().parent
MODEL = HERE.parent / "examples" / "model3d.json"
RESULTS_TIMEOUT_S = 90.0

#: Ends what the test started should the test's own process die first (SIGKILL
#: too): reads the process groups the test started, one a line, until the test's
#: end of the pipe closes however it closed, then ends each still there, last
#: first (local up then stops its services), SIGKILL after 60 s.
WARDEN = """
import os, signal, sys, time
def there(group):
    try:
        os.killpg(group, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False
for group in reversed([int(line) for line in sys.stdin]):
    if there(group):
        os.killpg(group, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while there(group) and time.monotonic() < deadline:
            time.sleep(0.2)
        if there(group):
            os.killpg(group, signal.SIGKILL)
"""

pytestmark = pytest.mark.skipif(
    not (os.environ.get("ZOCALO_XRC_DODAL") == "1" or os.environ.get("ZOCALO_XRC_DODAL_VENV")),
    reason=f"installs dls-dodal {DODAL} from PyPI into a venv of its own: ZOCALO_XRC_DODAL=1 to run "
           "(or ZOCALO_XRC_DODAL_VENV=<venv with it>)")


def cached_venv() -> Path:
    """dodal's venv in the cache, made once (under a lock: one maker at a time)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "zocalo-xrc"
    venv, made = cache / f"dodal-{DODAL}-venv", cache / f"dodal-{DODAL}-venv" / "made"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"dodal-{DODAL}-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not made.exists():
            shutil.rmtree(venv, ignore_errors=True)  # half made by a run that was stopped
            for step in ([sys.executable, "-m", "venv", str(venv)],
                         [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", f"dls-dodal=={DODAL}"]):
                done = subprocess.run(step, capture_output=True, text=True)
                if done.returncode:
                    pytest.fail(f"making dodal's venv: {' '.join(step)} failed: {done.stderr[-2000:]}")
            made.touch()
    return venv


@pytest.fixture(scope="module")
def dodal_python() -> Path:
    given = os.environ.get("ZOCALO_XRC_DODAL_VENV")
    python = (Path(given) if given else cached_venv()) / "bin" / "python"
    if not python.exists():
        pytest.fail(f"ZOCALO_XRC_DODAL_VENV: {given} is not a venv (no bin/python)")
    version = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('dls-dodal'))"],
                             capture_output=True, text=True)
    found = version.stdout.strip()
    if found != DODAL:
        pytest.fail(f"{python}: dls-dodal {found + ' is installed' if found else 'is not installed'}, "
                    f"the test needs {DODAL}")
    return python


def line_from(process: subprocess.Popen[str], what: str, timeout: float) -> str:
    """The next line ``process`` prints, within ``timeout``: else what it said on stderr."""
    assert process.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(process.stdout, selectors.EVENT_READ)
        if sel.select(timeout):
            line = process.stdout.readline()
            if line:
                return line
    raise AssertionError(f"no {what} within {timeout:g} s (exit status {process.poll()})")


def until_printed(log: Path, text: str, process: subprocess.Popen[Any], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert process.poll() is None and time.monotonic() < deadline, (
            f"no {text!r} within {timeout:g} s (exit status {process.poll()}): {log.read_text()[-3000:]}")
        time.sleep(0.1)


def stop(process: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 60) -> None:
    """End ``process`` and its process group: ``sig``, then SIGKILL if it takes longer than ``timeout``."""
    if process.poll() is None:
        os.killpg(process.pid, sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def found_counts(master: Path) -> np.ndarray:
    """``n_spots_total`` of every frame as the CPU service finds it (dodal's
    device takes CPU results by default): DIALS's dispersion with its
    defaults, spots within 40 Å."""
    with open_images(master) as images:
        finder, geometry = images.spot_finder(), images.geometry
        assert geometry is not None
        counts = []
        for i in range(len(images)):
            s = finder.find(images[i])
            counts.append(image_stats(s.centroid[:, 0], s.centroid[:, 1], s.intensity, geometry).n_spots_total)
    return np.array(counts)


def as_dodal_reads(results: list[dict[str, Any]]) -> dict[str, Any]:
    """What dodal's device reads of these results, signal by signal: ranked
    by max_count (Python's stable sort, reversed, as dodal sorts), no sample
    as -1; and what its ``get_full_processing_results`` gives (centres of
    mass moved by -0.5 to box centres)."""
    ranked = sorted(results, key=lambda r: r["max_count"], reverse=True)
    reads: dict[str, Any] = {k: [r[k] for r in ranked] for k in
                             ("centre_of_mass", "max_voxel", "max_count", "n_voxels", "total_count", "bounding_box")}
    reads["sample_id"] = [r["sample_id"] or -1 for r in ranked]
    reads["full_processing_results"] = [{**r, "centre_of_mass": [c - 0.5 for c in r["centre_of_mass"]]}
                                        for r in ranked]
    return reads


def test_dodals_own_trigger_and_device_read_the_centre_of_the_spots_found_in_the_detectors_frames(
        rabbit: Any, dodal_python: Path, tmp_path: Path) -> None:
    """A RunEngine plan in dodal's venv: dodal's ``ZocaloResults`` staged;
    a collection run whose documents make dodal's ``ZocaloTrigger`` send a
    start per grid (the DCIDs ``local add-scan`` printed) while a simulated
    Eiger2 X 1M writes the model's 400 frames, and an end per grid when it
    closes; the device triggered and read. Both reach ``local up``'s broker
    through ``$ZOCALO_CONFIG`` and its environment ``local``."""
    if not hasattr(rabbit, "vhost"):
        pytest.skip("an external broker: no vhost of our own")
    url = rabbit.vhost(f"dodal-{uuid.uuid4().hex[:8]}")
    state = tmp_path / "state"
    started = time.monotonic()
    processes: list[subprocess.Popen[Any]] = []
    logs: list[IO[str]] = []
    warden = subprocess.Popen([sys.executable, "-c", WARDEN], stdin=subprocess.PIPE, text=True,
                              start_new_session=True)
    assert warden.stdin is not None
    to_warden = warden.stdin

    def start(command: list[str], log: str, **options: Any) -> subprocess.Popen[Any]:
        logs.append((tmp_path / log).open("w"))
        processes.append(subprocess.Popen(command, stderr=logs[-1], start_new_session=True, text=True, **options))
        to_warden.write(f"{processes[-1].pid}\n")
        to_warden.flush()
        return processes[-1]

    try:
        logs.append((tmp_path / "up.out").open("w"))
        up = start([sys.executable, "-m", "zocalo_xrc", "local", "up", "--broker", url, "--state", str(state),
                    "--idle-timeout", "30"], "up.log", stdout=logs[-1])
        until_printed(tmp_path / "up.out", "local Zocalo up", up, timeout=120)
        # dodal's side: its venv's python and nothing of ours; the broker from local up's zocalo configuration
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "DODAL_TEST_MODE")}
        dodal = start([str(dodal_python), str(HERE / "dodal_plan.py"), "local", str(RESULTS_TIMEOUT_S)], "dodal.log",
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=tmp_path,
                      env={**env, "ZOCALO_CONFIG": str(state / "zocalo.yaml")})
        assert line_from(dodal, "ready from dodal's plan", 120) == "ready\n", (tmp_path / "dodal.log").read_text()
        add = start([sys.executable, "-m", "zocalo_xrc", "local", "add-scan", str(MODEL), "--json", "--state",
                     str(state), "--detector", "eiger2x-1m", "--frame-rate", "200"], "add.log", stdout=subprocess.PIPE)
        registration = line_from(add, "registration from add-scan", 60)
        registered = json.loads(registration)
        assert dodal.stdin is not None
        dodal.stdin.write(registration)
        dodal.stdin.flush()
        assert line_from(dodal, "starts sent", 60) == "started\n", (tmp_path / "dodal.log").read_text()
        assert add.wait(120) == 0, (tmp_path / "add.log").read_text()
        dodal.stdin.write("written\n")
        dodal.stdin.flush()
        got = json.loads(line_from(dodal, "results from dodal's device", RESULTS_TIMEOUT_S + 30))
        assert dodal.wait(30) == 0, (tmp_path / "dodal.log").read_text()
        took = time.monotonic() - started
    finally:
        for p in reversed(processes):  # add-scan, dodal's plan, then local up, which stops its services
            stop(p)
            for pipe in (p.stdin, p.stdout):
                if pipe is not None:
                    pipe.close()
        for log in logs:
            log.close()
        to_warden.close()  # nothing left for it to end
        warden.wait(10)
    up_log = (tmp_path / "up.log").read_text()
    assert up.returncode == 0 and "Traceback" not in up_log, up_log[-3000:]

    scan = Scan.load(MODEL)
    (master,) = (state / "data").glob(f"{registered['filename']}*_master.h5")
    counts = found_counts(master)
    first = scan.grids[0].image_count
    assert len(counts) == first + scan.grids[1].image_count
    expected = centre_3d_scans(GridScan(registered["dcids"][0], counts[:first], scan.grids[0]),
                               GridScan(registered["dcids"][1], counts[first:], scan.grids[1]),
                               sample_id=scan.sample_id)
    assert len(expected) == 2  # the model's two crystals
    want = as_dodal_reads(json.loads(json.dumps(expected.to_dicts())))  # tuples as the wire's lists
    assert {k: got[k] for k in want} == want
    assert got["ispyb_dcgid"] == registered["dcgid"] and got["ispyb_dcid"] in registered["dcids"]
    print(f"dodal {DODAL} against local up: {took:.1f} s from local up started to dodal's plan done")
