"""The per-image analysis services from pixels, in the local Zocalo on
RabbitMQ: zocalo's Dispatcher and recipes, ISPyB holding where a simulated
Eiger2 X writes, the PIA services finding spots in its frames as they are
written, the centring service. Every count a service sends is checked
against the spot finder run here over the same frames, and the result
against ``centre_3d_scans`` over those counts."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from zocalo_xrc import ZocaloResults, ZocaloTrigger
from zocalo_xrc.centring import GridScan, centre_3d_scans
from zocalo_xrc.client import NoResultsFromZocaloError, Source
from zocalo_xrc.local.detector import SimulatedDetector
from zocalo_xrc.local.scan import Scan
from zocalo_xrc.local.settings import Settings
from zocalo_xrc.local.zocalo import default_scan
from zocalo_xrc.pia.images import open_images
from zocalo_xrc.pia.resolution import image_stats

from local_zocalo import running

#: a small detector keeps the frames quick to write and to search
SHAPE = (160, 192)
RATE = 60.0  # frames/s the detector writes: slow enough to be followed
FAST = Settings(frame_rate=RATE, idle_s=3.0, frame_timeout_s=1.0)
GPU_KEYS = {"file", "file-number", "n_spots_total", "num_strong_pixels", "file-seen-at"}
CPU_KEYS = {"file", "file-number", "file-seen-at", "n_spots_total", "n_spots_no_ice", "n_spots_4A", "total_intensity"}
GPU_SERVICE, CPU_SERVICE = "Per-image analysis, GPU (zocalo-xrc)", "Per-image analysis (zocalo-xrc)"
XRC_SERVICE = "X-ray centring (zocalo-xrc)"


@pytest.fixture(scope="module")
def local(request):
    with running(request, "rabbitmq", FAST) as z:
        yield z


def small_scan(**changes) -> Scan:
    """The demo's two crystals on a 6 x 4 + 6 x 3 grid (boxes scaled to fit), few spots a frame."""
    data = json.loads(default_scan().read_text())
    for g, steps_y in zip(data["grids"], (4, 3)):
        g["gridinfo"].update(steps_x=6, steps_y=steps_y, dx_mm=0.2, dy_mm=0.12)
    for c in data["crystals"]:
        c["spots"] = c["spots"] / 10
    data.update(changes)
    return Scan.from_dict(data)


def sent(local, service: str, dcids, to: str = "reduce.xray_centering", direction: str = "out") -> dict[int, list[dict]]:
    """What ``service`` sent on to ``to`` (or ``to``.gpu) for each DCID (or,
    ``direction`` "in", received from it), from the logbook."""
    out: dict[int, list[dict]] = {d: [] for d in dcids}
    for e in local.logbook.entries():
        if (e["service"] == service and e["dir"] == direction and e["queue"] in (to, f"{to}.gpu")
                and int(e.get("dcid") or 0) in out):
            out[int(e["dcid"])].append(e["payload"])
    return out


def eventually(check, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not (ok := check()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return ok


def run(local, scan: Scan, name: str, sources=(Source.GPU, Source.CPU), timeout_s: float = 60.0):
    """Arm a detector, trigger the scan as a beamline does (start, frames
    written, end), and wait for each source's result (or its failure)."""
    registered, detector = local.add_detector_scan(scan, name=name, size=SHAPE)
    receivers = [ZocaloResults(local.transport(), beamline=scan.beamline, private_queue=True, source=s,
                               timeout_s=timeout_s) for s in sources]
    for r in receivers:
        r.subscribe()
    try:
        trigger = ZocaloTrigger(local.transport(), timeout_s=10)
        trigger.run_start(*scan.start_infos(registered.dcids, name))
        detector.write()
        trigger.run_end(*registered.dcids)
        results = []
        for r in receivers:
            try:
                results.append(r.trigger(dcids=registered.dcids, dcgid=registered.dcgid))
            except NoResultsFromZocaloError as e:
                results.append(e)
    finally:
        for r in receivers:
            r.close()
    return registered, detector, results


def found(detector: SimulatedDetector, **finder_options):
    """The spots of every frame the detector wrote, found here."""
    with open_images(detector.master) as images:
        finder = images.spot_finder(**finder_options)
        return images.geometry, [finder.find(images[i]) for i in range(len(images))]


def by_number(messages: list[dict]) -> dict[int, dict]:
    numbers = [m["file-number"] for m in messages]
    assert len(numbers) == len(set(numbers)), "an image sent twice"
    return {m["file-number"]: m for m in messages}


def test_both_services_send_what_the_spot_finder_finds_and_the_scan_is_centred_from_them(local):
    scan = small_scan()
    registered, detector, (gpu, cpu) = run(local, scan, "pixels")
    geometry, spots = found(detector)
    _, ffs_spots = found(detector, min_local=3, max_spot_size=None)
    firsts = np.cumsum([0] + [g.image_count for g in scan.grids])
    gpu_sent, cpu_sent = sent(local, GPU_SERVICE, registered.dcids), sent(local, CPU_SERVICE, registered.dcids)
    counts = []
    for k, (dcid, grid) in enumerate(zip(registered.dcids, scan.grids)):
        frames = range(firsts[k], firsts[k] + grid.image_count)
        g, c = by_number(gpu_sent[dcid]), by_number(cpu_sent[dcid])
        assert sorted(g) == sorted(c) == list(range(1, grid.image_count + 1))
        for number, i in enumerate(frames, 1):
            assert set(g[number]) == GPU_KEYS and set(c[number]) == CPU_KEYS
            assert g[number]["file"] == c[number]["file"] == str(detector.master)
            assert g[number]["n_spots_total"] == len(ffs_spots[i])
            assert g[number]["num_strong_pixels"] == ffs_spots[i].n_strong_pixels
            stats = image_stats(spots[i].centroid[:, 0], spots[i].centroid[:, 1], spots[i].intensity, geometry)
            assert (c[number]["n_spots_total"], c[number]["n_spots_no_ice"], c[number]["n_spots_4A"]) == (
                stats.n_spots_total, stats.n_spots_no_ice, stats.n_spots_4A)
            assert c[number]["total_intensity"] == pytest.approx(stats.total_intensity, rel=1e-12)
        counts.append(([len(ffs_spots[i]) for i in frames], [c[n]["n_spots_total"] for n in range(1, len(frames) + 1)]))
    # CPU as Diamond's: a file watcher handed each image written to the workers
    watched = sent(local, CPU_SERVICE, registered.dcids, to="per_image_analysis")
    for k, dcid in enumerate(registered.dcids):
        assert sorted((m["file-number"], m["hdf5-index"]) for m in watched[dcid]) == [
            (n, firsts[k] + n - 1) for n in range(1, scan.grids[k].image_count + 1)]
        assert all(set(m) == {"hdf5", "hdf5-index", "file", "file-number", "file-seen-at"} for m in watched[dcid])
    # GPU followed the file as it was written: its first frames were seen before the detector was done
    assert min(m["file-seen-at"] for m in gpu_sent[registered.dcids[0]]) < detector.last_written_at - 0.1
    # the spots are the model's: the finder finds about as many as the detector drew
    drawn = detector.spots.sum()
    assert 0.8 * drawn <= sum(len(s) for s in ffs_spots) <= 1.2 * drawn + 10
    for got, source in ((gpu, 0), (cpu, 1)):
        expected = centre_3d_scans(*(GridScan(k + 1, np.array(counts[k][source]), g)
                                     for k, g in enumerate(scan.grids)), sample_id=scan.sample_id)
        assert got.to_dicts() == expected.to_dicts()
        assert len(got) >= 1


def test_frames_that_never_come_are_named_and_the_step_ends(local, caplog):
    scan = small_scan(lost_frames=3)
    dlq = local.transport().message_count("dlq.per_image_analysis.gpu")
    with caplog.at_level(logging.INFO):
        registered, detector, (gpu,) = run(local, scan, "stopped", sources=(Source.GPU,), timeout_s=3.0)
        assert isinstance(gpu, NoResultsFromZocaloError)
        xz = registered.dcids[1]
        n = scan.grids[1].image_count
        assert eventually(lambda: any("never came" in m.getMessage() and str(xz) in m.getMessage()
                                      for m in caplog.records if m.name == "zocalo_xrc.local.pia"))
    (line,) = [m.getMessage() for m in caplog.records if "never came" in m.getMessage() and str(xz) in m.getMessage()
               and m.getMessage().startswith("GPU")]
    assert f"images {n - 2}, {n - 1}, {n} of {detector.master}" in line and "after 1 s" in line
    # the step ended (acked), not dead-lettered; every frame written was sent once
    assert local.transport().message_count("dlq.per_image_analysis.gpu") == dlq
    assert sorted(by_number(sent(local, GPU_SERVICE, [xz])[xz])) == list(range(1, n - 2))


@pytest.mark.parametrize("fault", ["missing", "not HDF5", "truncated"])
def test_data_that_cannot_be_read_dead_letters_the_step_with_the_reason(local, caplog, tmp_path, fault):
    scan = small_scan()
    registered, detector = local.add_detector_scan(scan, name=fault.replace(" ", "-"), size=SHAPE)
    detector.write()
    data = detector.writer.data_file_path(1)
    reason = {"missing": "no such file", "not HDF5": "not an HDF5 file", "truncated": "not an HDF5 file"}[fault]
    if fault == "missing":
        data.unlink()
        detector.master.unlink()
    elif fault == "not HDF5":
        detector.master.write_text("not a master file\n")
    else:
        with open(data, "r+b") as f:
            f.truncate(data.stat().st_size // 2)
    t = local.transport()
    queues = ("dlq.per_image_analysis.gpu", "dlq.filewatcher")  # GPU's step, and CPU's file watcher
    before = [t.message_count(q) for q in queues]
    with caplog.at_level(logging.ERROR):
        trigger = ZocaloTrigger(t, timeout_s=10)
        trigger.run_start(*scan.start_infos(registered.dcids, "x"))
        trigger.run_end(*registered.dcids)
        assert eventually(lambda: [t.message_count(q) for q in queues] == [b + 2 for b in before])
    lines = [m.getMessage() for m in caplog.records if m.name == "zocalo_xrc.local.pia"]
    assert len(lines) == 4, lines  # one line per step: two grids, GPU and CPU
    for dcid in registered.dcids:
        mine = [line for line in lines if f"DCID {dcid}:" in line]
        assert len(mine) == 2 and all(reason in line and "dead-lettering the step" in line for line in mine), mine
        assert sorted(line.split()[0] for line in mine) == ["CPU", "GPU"]
    assert not [m for m in caplog.records if m.exc_info]  # a clear line, no traceback


def test_local_up_follows_a_detector_written_by_add_scan_in_another_process(rabbit, tmp_path):
    """``zocalo-xrc local up`` (each service a zocalo.service process) and
    ``local add-scan --detector eiger2x-1m``, which prints the registration
    and then writes the frames at the frame rate: the GPU service in its own
    process follows the files as they grow, and the result is the one the
    finder's counts over the same frames give."""

    from zocalo_xrc import ZocaloStartInfo

    if not hasattr(rabbit, "vhost"):
        pytest.skip("an external broker: no vhost of our own")
    url = rabbit.vhost(f"pixels-{os.getpid()}-{time.monotonic_ns()}")
    state = tmp_path / "state"
    scan_file = tmp_path / "small.json"
    scan_file.write_text(json.dumps(small_scan().to_dict()))
    up = subprocess.Popen([sys.executable, "-m", "zocalo_xrc", "local", "up", "--broker", url, "--state", str(state),
                           "--pia", "gpu", "--idle-timeout", "5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
    try:
        assert "local Zocalo up" in up.stdout.readline()
        add = subprocess.Popen([sys.executable, "-m", "zocalo_xrc", "local", "add-scan", str(scan_file), "--json",
                                "--state", str(state), "--detector", "eiger2x-1m", "--frame-rate", "50"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        registered = json.loads(add.stdout.readline())  # printed once armed, before the frames are written
        with ZocaloResults(url, private_queue=True, source=Source.GPU, timeout_s=60) as r:
            r.subscribe()
            t = ZocaloTrigger(url, timeout_s=10)
            t.run_start(*(ZocaloStartInfo(s["parameters"]["ispyb_dcid"], registered["filename"],
                                          s["parameters"]["start_frame_index"], s["parameters"]["number_of_frames"],
                                          s["parameters"]["message_index"]) for s in registered["starts"]))
            assert add.wait(60) == 0, add.stderr.read()
            t.run_end(*registered["dcids"])
            got = r.trigger(dcids=registered["dcids"], dcgid=registered["dcgid"])
        r.transport.close()
        t.transport.close()
    finally:
        up.send_signal(signal.SIGTERM)
        out, err = up.communicate(timeout=60)
    assert up.returncode == 0 and "Traceback" not in err, err[-3000:]
    (master,) = (state / "data").glob("small_*_master.h5")
    with open_images(master) as images:
        finder = images.spot_finder(min_local=3, max_spot_size=None)
        counts = np.array([len(finder.find(images[i])) for i in range(len(images))])
    scan = small_scan()
    first = scan.grids[0].image_count
    expected = centre_3d_scans(GridScan(1, counts[:first], scan.grids[0]), GridScan(2, counts[first:], scan.grids[1]),
                               sample_id=scan.sample_id)
    assert got.to_dicts() == expected.to_dicts() and len(got) >= 1


def test_waiting_for_frames_opens_the_file_again_only_when_it_changes(tmp_path):
    """A GPU step waits up to 30 s for a frame: opening the files every few
    ms meanwhile took most of a core from the spot finding of other steps."""
    from zocalo_xrc.pia.follow import FileFollower

    detector = SimulatedDetector(small_scan(), tmp_path, "idle", size=SHAPE)
    for i in range(5):
        detector.writer.write(detector.frame(i))
    follower = FileFollower(detector.master, range(10), finder=lambda images: images.spot_finder(), timeout_s=2.0)
    found = 0
    for _ in follower:
        found += 1
        if found == 5:
            cpu, wall = time.thread_time(), time.monotonic()
    waited_cpu, waited = time.thread_time() - cpu, time.monotonic() - wall
    detector.writer.close()
    assert follower.missing == [5, 6, 7, 8, 9] and waited >= 2.0
    assert waited_cpu < 0.25 * waited, f"{waited_cpu:.2f} s of CPU in {waited:.2f} s of waiting"


@contextlib.contextmanager
def worker_processes(local, tmp_path, n: int = 2):
    """``n`` more PIA workers (``zocalo.service -s PerImageAnalysis``, each
    also a file watcher) beside the local Zocalo's: their process groups,
    once all consume ``per_image_analysis`` and ``filewatcher``. Stopped at the end."""
    command = Path(sys.executable).with_name("zocalo.service")
    env = dict(os.environ, ZOCALO_CONFIG=str(local.state.zocalo_config), HDF5_USE_FILE_LOCKING="FALSE")
    logs = [tmp_path / f"worker{k}.log" for k in range(n)]
    workers = [subprocess.Popen([str(command), "-s", "PerImageAnalysis", "-e", "local"], env=env,
                                start_new_session=True, stdout=subprocess.DEVNULL, stderr=log.open("w"))
               for log in logs]
    try:
        t = local.transport()
        assert eventually(lambda: t.consumer_count("per_image_analysis") == t.consumer_count("filewatcher") == n + 1,
                          timeout=30), (t.consumer_count("per_image_analysis"), [w.poll() for w in workers],
                                        [log.read_text()[-2000:] for log in logs])
        yield [w.pid for w in workers]
    finally:
        for w in workers:
            try:
                os.killpg(w.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for w in workers:
            w.wait(30)


def in_group(pid: int, groups: list[int]) -> bool:
    """The process ``pid`` runs, in one of the process groups ``groups`` (a
    ``zocalo.service`` runs its service in a child process)."""
    try:
        return os.getpgid(pid) in groups
    except ProcessLookupError:
        return False


def journals(local) -> dict[int, Path]:
    """The CPU PIA services' journals, by process (this one's: the local Zocalo's thread)."""
    return {int(p.name.split("-")[-2]): p for p in (local.state.logbook / "journal").glob(
        "Per-image-analysis-zocalo-xrc-*.jsonl")}


def journal(path: Path, queue: str, direction: str = "out") -> list[dict]:
    """What one journal says went ``direction`` on ``queue``."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return [e for e in lines if e["dir"] == direction and e["queue"] == queue]


def assert_answered_once_as_the_finder_finds(local, registered, scan: Scan, detector: SimulatedDetector, got):
    """Each image answered once, with the finder's counts, and the result the
    one those counts give. What was answered is what the centring service
    (not killed) received: a process killed just after a commit may not have
    journaled what it sent, so the watchers' and workers' journals (the
    thread's and the processes') are held only to sending no image twice."""
    watched = sent(local, CPU_SERVICE, registered.dcids, to="per_image_analysis")
    answered = sent(local, CPU_SERVICE, registered.dcids)
    received = sent(local, XRC_SERVICE, registered.dcids, direction="in")
    geometry, spots = found(detector)
    firsts = np.cumsum([0] + [g.image_count for g in scan.grids])
    counts = []
    for k, dcid in enumerate(registered.dcids):
        numbers = list(range(1, scan.grids[k].image_count + 1))
        assert set(by_number(watched[dcid])) <= set(numbers)  # no watcher sent an image twice
        assert set(by_number(answered[dcid])) <= set(numbers)  # no worker answered an image twice
        c = by_number(received[dcid])  # each image answered once
        assert sorted(c) == numbers
        for n, m in c.items():
            s_ = spots[firsts[k] + n - 1]
            assert m["n_spots_total"] == image_stats(s_.centroid[:, 0], s_.centroid[:, 1], s_.intensity,
                                                     geometry).n_spots_total
        counts.append([c[n]["n_spots_total"] for n in numbers])
    expected = centre_3d_scans(*(GridScan(k + 1, np.array(counts[k]), g) for k, g in enumerate(scan.grids)),
                               sample_id=scan.sample_id)
    assert got.to_dicts() == expected.to_dicts()


def test_workers_sharing_the_queue_answer_every_image_once_when_one_is_killed_mid_scan(local, tmp_path):
    """Diamond's CPU path: a file watcher, and per-image analysis workers on
    any number of machines sharing one queue, each answering an image in one
    transaction with its ack. Two more workers (``zocalo.service -s
    PerImageAnalysis``) join the local Zocalo's; one is killed (SIGKILL)
    after its first answers (it may be holding a file watcher's message too).
    Every image is sent and answered exactly once, and the result is the one
    the finder's counts give."""
    with worker_processes(local, tmp_path) as pids:
        t = local.transport()
        scan = small_scan(grids=[{"gridinfo": {**g.to_ispyb(), "steps_x": 12, "steps_y": 8}} for g in small_scan().grids])
        registered, detector = local.add_detector_scan(scan, name="workers", size=SHAPE)
        detector.write()
        with ZocaloResults(t, beamline=scan.beamline, private_queue=True, source=Source.CPU, timeout_s=60) as r:
            r.subscribe()
            trigger = ZocaloTrigger(t, timeout_s=10)
            trigger.run_start(*scan.start_infos(registered.dcids, "workers"))
            trigger.run_end(*registered.dcids)

            def first_answers():
                return next(((pid, path) for pid, path in journals(local).items()
                             if in_group(pid, pids) and len(journal(path, "reduce.xray_centering")) >= 3), None)

            victim = eventually(first_answers, timeout=30)
            assert victim, "no worker process answered"
            pid, path = victim
            os.killpg(os.getpgid(pid), signal.SIGKILL)
            got = r.trigger(dcids=registered.dcids, dcgid=registered.dcgid)
        answered_by_victim = len(journal(path, "reduce.xray_centering"))
    assert 3 <= answered_by_victim < sum(g.image_count for g in scan.grids)  # the others answered the rest
    assert_answered_once_as_the_finder_finds(local, registered, scan, detector, got)


def test_a_file_watcher_killed_mid_scan_goes_on_from_its_last_checkpoint(local, tmp_path):
    """The file watcher follows a file still being written (20 frames/s): a
    message handles the frames written by then and, in one transaction,
    sends them, acks itself and checkpoints how far it got to its own queue,
    where any watcher takes it up. The process holding a checkpoint of it
    (a ``zocalo.service -s PerImageAnalysis``) is killed (SIGKILL) mid-scan:
    the next watcher goes on from that checkpoint, so no image is sent
    twice or left out, each is answered once, and the result is the finder's."""
    rate = 20.0
    with worker_processes(local, tmp_path) as pids:
        t = local.transport()
        scan = small_scan(grids=[{"gridinfo": {**g.to_ispyb(), "steps_x": 12, "steps_y": 8}} for g in small_scan().grids])
        registered, detector = local.add_detector_scan(scan, name="watched", size=SHAPE, frame_rate=rate)
        with ZocaloResults(t, beamline=scan.beamline, private_queue=True, source=Source.CPU, timeout_s=60) as r:
            r.subscribe()
            trigger = ZocaloTrigger(t, timeout_s=10)
            trigger.run_start(*scan.start_infos(registered.dcids, "watched"))
            writing = detector.start()
            # the end (the CPU recipe's start) comes with the first grid nearly written, so that
            # the second grid's watcher is not first kept waiting longer than its frame timeout
            time.sleep(scan.grids[0].image_count / rate - 0.4)
            trigger.run_end(*registered.dcids)

            def holding_a_checkpoint():
                """A worker process whose last file watcher message of the second grid (its frames
                being written) is a checkpoint it has not passed on."""
                for pid, path in journals(local).items():
                    ins, outs = journal(path, "filewatcher", "in"), journal(path, "filewatcher")
                    xz = [e for e in ins + outs if int(e["dcid"]) == registered.dcids[1]]
                    last = max(xz, key=lambda e: e["t"], default=None)
                    if in_group(pid, pids) and last in ins and "filewatcher-status" in (last["payload"] or {}):
                        return pid, path
                return None

            victim = eventually(holding_a_checkpoint, timeout=30)
            assert victim, "no worker process held a checkpoint of the file watcher"
            assert writing.is_alive(), "the detector was done before the watcher was killed"
            pid, path = victim
            os.killpg(os.getpgid(pid), signal.SIGKILL)
            killed_at = time.time()
            got = r.trigger(dcids=registered.dcids, dcgid=registered.dcgid)
        writing.join()
        victims_checkpoints = [e for e in journal(path, "filewatcher", "in") if int(e["dcid"]) == registered.dcids[1]]
    # the step went on from the checkpoint the killed watcher held (or a later one): it did not start over
    held = victims_checkpoints[-1]
    after = [e["payload"] for p, j in journals(local).items() if p != pid for e in journal(j, "filewatcher", "in")
             if e["t"] > killed_at and e["dcid"] == held["dcid"]]
    assert after and all(isinstance(m, dict) and m["filewatcher-status"]["sent"] >= held["payload"][
        "filewatcher-status"]["sent"] for m in after), (held, after)
    watched = sent(local, CPU_SERVICE, registered.dcids, to="per_image_analysis")
    first_seen = min(m["file-seen-at"] for m in watched[registered.dcids[0]])
    assert first_seen < detector.last_written_at - 1.0  # followed as written, not read once at the end
    assert_answered_once_as_the_finder_finds(local, registered, scan, detector, got)


def test_a_detector_writes_the_chunks_it_encoded_beforehand(tmp_path):
    """``encode`` then ``write(chunks=...)``, as the benches write at 200
    frames/s: the same frames as drawing and compressing each as it goes."""
    scan = small_scan()
    for d in ("drawn", "direct"):
        (tmp_path / d).mkdir()
    drawn = SimulatedDetector(scan, tmp_path / "drawn", "scan", size=SHAPE)
    drawn.write()
    direct = SimulatedDetector(scan, tmp_path / "direct", "scan", size=SHAPE, frame_rate=1e6)
    chunks = direct.encode()
    with pytest.raises(ValueError, match=f"3 chunks for {direct.frames} frames"):
        direct.write(chunks=chunks[:3])
    assert direct.write(chunks=chunks) == direct.frames
    with open_images(drawn.master) as a, open_images(direct.master) as b:
        assert len(a) == len(b) == direct.frames
        for k in range(len(a)):
            np.testing.assert_array_equal(a[k], b[k])
