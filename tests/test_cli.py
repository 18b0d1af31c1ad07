"""The zocalo-xrc command line on the shipped examples: output, plots, errors
(one line, an exit code per kind), the demo on both brokers."""

import importlib.metadata
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import zocalo_xrc as zx
from zocalo_xrc import cli

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SECRET = "hunter2"


@pytest.fixture(autouse=True)
def cli_logging_stays_here():
    """cli.main() run in this process sets log levels, as a command does for
    its process: put them back for the tests that follow."""
    import logging

    names = ("", "pika", "zocalo_xrc.messaging.rabbitmq")
    levels = {n: logging.getLogger(n).level for n in names}
    yield
    for n, level in levels.items():
        logging.getLogger(n).setLevel(level)


def run(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "zocalo_xrc", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def one_line_error(out, code, *words):
    """The command failed with ``code`` and said why in one line, no traceback."""
    assert out.returncode == code, (out.returncode, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "Traceback" not in out.stderr + out.stdout and SECRET not in out.stderr + out.stdout
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def case_3d(path=EXAMPLES / "scan3d.json"):
    case = json.loads(path.read_text())
    scans = [zx.GridScan(g["dcid"], g["counts"], zx.GridInfo.from_ispyb(g["gridinfo"])) for g in case["grids"]]
    return case, scans


def test_version_and_python_m():
    assert zx.__version__ == importlib.metadata.version("zocalo-xrc")
    out = run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"zocalo-xrc {zx.__version__}"
    assert subprocess.run(["zocalo-xrc", "--version"], capture_output=True, text=True).stdout == out.stdout


def test_help_names_defaults_what_broker_accepts_and_exit_codes():
    top = run("--help").stdout
    assert "exit codes:" in top and "130" in top
    assert "  3 " not in run("centre", "--help").stdout  # centre never talks to a broker
    demo = run("demo", "--help").stdout
    for words in ("in-process broker", "amqp://", "mysql+pymysql://", "(default: 60.0)", "(default: gpu,cpu)",
                  "(default: demo.png", "20 x 10 + 20 x 10", "default: eiger2x-1m for the default scan"):
        assert words in " ".join(demo.split()), words
    centre = " ".join(run("centre", "--help").stdout.split())
    assert '"type": "2d"|"3d"' in centre and "mm" in centre


def test_help_of_every_command_states_its_own_defaults_and_exit_codes(tmp_path):
    def help(*command):
        return " ".join(run(*command, "--help").stdout.split())

    up, add, book = help("local", "up"), help("local", "add-scan"), help("local", "logbook")
    for text in (up, add, book):
        assert "exit codes: 0 " in text and "130 interrupted" in text, text
        assert "--state DIR" in text and "temporary" not in text.split("--state DIR")[1].split("--")[0], text
    assert "(default: the scan file's name without its suffix: scan3d for scan3d.json)" in add
    assert "(default: a temporary directory, removed when the demo ends)" in help("demo")
    for command in (("centre",), ("demo",), ("find-spots",), ("local", "add-scan"), ("local", "logbook")):
        assert "SIGTERM" not in help(*command).split("exit codes:")[1], command
    for text in (help("service"), up):
        assert "exit codes: 0 stopped by SIGTERM (it runs until stopped) 2 " in text.replace(" 1 a file", " 2 ")
    one_line_error(run("local", "add-scan", tmp_path / "missing.json", "--state", tmp_path), cli.EXIT_FILE,
                   "zocalo-xrc local add-scan: ")


def test_local_logbook_before_any_local_zocalo_says_so(tmp_path):
    one_line_error(run("local", "logbook", "--state", tmp_path / "fresh"), cli.EXIT_FILE,
                   "no local Zocalo has run with this state directory ('zocalo-xrc local up' starts one")


def test_add_scan_says_how_fast_its_detector_wrote(tmp_path):
    """The frames are drawn and compressed as they are written: asked for a
    rate this machine cannot draw at, add-scan says the rate it wrote at."""
    import json

    from test_pia_services import small_scan

    scan = tmp_path / "small.json"
    scan.write_text(json.dumps(small_scan().to_dict()))
    out = run("local", "add-scan", scan, "--state", tmp_path / "state", "--detector", "eiger2x-1m",
              "--frame-rate", "1000000", timeout=120)
    assert out.returncode == 0, out.stderr
    (line,) = [x for x in out.stdout.splitlines() if "frame(s) written in" in x]
    assert "frames/s; slower than 1e+06 frames/s: drawing and compressing a frame here takes longer)" in line, line


def test_3d_json_is_the_payload_and_parses_back():
    case, scans = case_3d()
    want = zx.centre_3d_scans(*scans, sample_id=case["sample_id"])
    out = run("centre", EXAMPLES / "scan3d.json", "--json")
    assert out.returncode == 0, out.stderr
    message = zx.parse_result_message(out.stdout)
    assert (message.type, message.status) == ("3d", "success")
    assert list(message.results) == list(want)
    assert json.loads(out.stdout)["results"] == json.loads(want.to_json())


def test_2d_json_is_the_payload_and_parses_back():
    out = run("centre", EXAMPLES / "scan2d.json", "--json")
    assert out.returncode == 0, out.stderr
    case = json.loads((EXAMPLES / "scan2d.json").read_text())
    want = zx.centre_2d(case["counts"], zx.GridInfo.from_ispyb(case["gridinfo"]), sample_id=case["sample_id"])
    message = zx.parse_result_message(out.stdout)
    assert (message.type, message.status, message.results) == ("2d", "success", (want,))
    assert want.status == "ok"


def test_tables():
    out = run("centre", EXAMPLES / "scan3d.json")
    assert out.returncode == 0 and "3D X-ray centring: 20 x 12 x 10 boxes, 2 result(s)" in out.stdout
    out = run("centre", EXAMPLES / "scan2d.json")
    assert "status ok" in out.stdout and "best image:" in out.stdout


def svg_text(path):
    return path.read_text()


@pytest.mark.parametrize("name", ["scan2d.json", "scan3d.json"])
def test_plot_in_mm_with_a_legend_and_the_best_centre(tmp_path, name, monkeypatch):
    import matplotlib

    monkeypatch.setitem(matplotlib.rcParams, "svg.fonttype", "none")  # text stays text
    png, svg = tmp_path / "out.png", tmp_path / "out.svg"
    assert cli.main(["centre", str(EXAMPLES / name), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["centre", str(EXAMPLES / name), "--plot", str(svg)]) == 0
    text = svg_text(svg)
    for words in ("x (mm from the first box)", "centre of mass", "bounding box", "#1: max count", "best (#1): centre x = "):
        assert words in text, words
    assert ("z (mm from the first box)" in text) == (name == "scan3d.json")
    # one colour scale, said so; the best region counted as the table counts it
    assert text.count("spots per image") == 1
    assert ("spots per image (one scale for both grids)" in text) == (name == "scan3d.json")
    assert re.search(r"best \(#1\): .*, 28 voxels, total count" if name == "scan3d.json" else
                     r"best \(#1\): .*, 7 boxes, total count", text)
    if name == "scan3d.json":  # the best centre, in mm, as geometry_of and to_motor give it
        case, scans = case_3d()
        best = zx.centre_3d_scans(*scans, sample_id=case["sample_id"])[0]
        x, y, z = cli.geometry_of([s.grid for s in scans]).to_motor(best).centre_mm
        assert f"x = {x:.4f}, y = {y:.4f}, z = {z:.4f} mm" in text
        assert "#2: max count" in text


def test_plot_in_boxes_where_the_geometry_is_unknown(tmp_path, monkeypatch):
    import matplotlib

    monkeypatch.setitem(matplotlib.rcParams, "svg.fonttype", "none")
    result, grids, _ = cli.run_case(json.loads((EXAMPLES / "scan3d.json").read_text()))
    cli.plot(result, grids, tmp_path / "boxes.svg", geometry=None)
    text = svg_text(tmp_path / "boxes.svg")
    assert "x (boxes)" in text and "z (boxes)" in text and "(mm" not in text


def test_bad_plot_paths_are_one_line_before_any_work(tmp_path):
    one_line_error(run("centre", EXAMPLES / "scan2d.json", "--plot", tmp_path / "out.xyz"), cli.EXIT_USAGE,
                   "unknown image format '.xyz'", ".png")
    one_line_error(run("centre", EXAMPLES / "scan2d.json", "--plot", tmp_path / "nowhere" / "out.png"), cli.EXIT_FILE,
                   "no such directory")
    (tmp_path / "dir.png").mkdir()
    one_line_error(run("centre", EXAMPLES / "scan2d.json", "--plot", tmp_path / "dir.png"), cli.EXIT_FILE, "--plot")


def test_bad_files_are_one_line_and_one_exit_code(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    one_line_error(run("centre", bad), cli.EXIT_FILE, "not valid JSON")
    bad.write_text(json.dumps({"counts": [1, 2, 3], "gridinfo": {"steps_x": 2}}))
    one_line_error(run("centre", bad), cli.EXIT_FILE, f"{bad}: gridinfo: missing key 'steps_y'")
    bad.write_text(json.dumps({"grids": [1]}))
    one_line_error(run("centre", bad), cli.EXIT_FILE, f"{bad}: grids[0]: expected an object with gridinfo")
    one_line_error(run("demo", bad), cli.EXIT_FILE, f"{bad}: grids[0]: expected an object with gridinfo")
    one_line_error(run("centre", tmp_path / "missing.json"), cli.EXIT_FILE, "missing.json: No such file")
    one_line_error(run("demo", tmp_path / "missing.json"), cli.EXIT_FILE, "missing.json: No such file")
    assert run("centre").returncode == cli.EXIT_USAGE


@pytest.mark.parametrize("example, fault, words", [
    ("scan2d.json", lambda d: d["counts"].__setitem__(2, -3), "counts[2]: expected a count (a whole number >= 0), got -3"),
    ("scan3d.json", lambda d: d["grids"][1]["counts"].__setitem__(2, -3),
     "grids[1].counts[2]: expected a count (a whole number >= 0), got -3"),
    ("scan2d.json", lambda d: d["gridinfo"].pop("steps_y"), "gridinfo: missing key 'steps_y'"),
    ("scan3d.json", lambda d: d["grids"][0]["counts"].pop(), "grids[0].counts: expected a list of 240 counts"),
])
def test_every_command_names_a_bad_scan_file_in_the_same_words_where_the_file_holds_it(tmp_path, example, fault,
                                                                                        words):
    """One reader of scan files: a 2D file (counts at the top) is never blamed on grids[0]."""
    case = json.loads((EXAMPLES / example).read_text())
    fault(case)
    bad = tmp_path / example
    bad.write_text(json.dumps(case))
    said = {command: one_line_error(run(*command.split(), bad, *extra), cli.EXIT_FILE, f"{bad}: {words}")
            .split(": ", 1)[1] for command, extra in (("centre", ()), ("demo", ()),
                                                      ("local add-scan", ("--state", tmp_path / "state")))}
    assert len(set(said.values())) == 1, said
    assert not (tmp_path / "state").exists()


def table_lines(stdout):
    return [line for line in stdout.splitlines() if line.startswith("  ")]


def test_demo_runs_the_whole_loop_in_process(tmp_path):
    plot = tmp_path / "demo.png"
    out = run("demo", EXAMPLES / "scan3d.json", "--plot", plot, "--frame-rate", "5000", "-v")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Local Zocalo: the in-process broker, ISPyB sqlite:///")
    assert "registered a 3D grid scan in ISPyB" in out.stdout
    # the GPU's result (from start) and the CPU's (from end) are the file's own
    tables = [line for line in table_lines(out.stdout) if "best crystal" not in line]
    assert tables == 2 * table_lines(run("centre", EXAMPLES / "scan3d.json").stdout)
    assert out.stdout.count("best crystal, from the centre of the first box (mm): x = ") == 2
    assert "ms after the last frame" in out.stdout and plot.stat().st_size > 10_000
    assert re.search(r"Mimas: DCID \d+ start: per-image-analysis-gridscan-gpu", out.stderr)  # -v: services' log


def test_progress_is_a_bar_on_a_terminal_and_a_line_now_and_then_in_a_log():
    import io

    from zocalo_xrc.demo import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    tty, log = Terminal(), io.StringIO()
    for stream in (tty, log):
        p = Progress(stream, every_s=5.0)
        for done, elapsed in ((0, 0.0), (900, 1.0), (1800, 5.5), (2700, 6.0), (3600, 7.0)):
            p.bar("GPU per-image analysis", done, 3600, elapsed, width=10, finished=done == 3600)
        p.done()
    assert "\rGPU per-image analysis [##........] 900/3600 (1.0 s)" in tty.getvalue().replace("\x1b[K", "")
    assert tty.getvalue().endswith("\r\x1b[K")  # the bar is gone when the work is done
    assert log.getvalue() == ("GPU per-image analysis [#####.....] 1800/3600 (5.5 s)\n"  # now and then,
                              "GPU per-image analysis [##########] 3600/3600 (7.0 s)\n")  # and the end
    quiet = io.StringIO()  # work shorter than a log line's interval: nothing at all
    Progress(quiet).bar("GPU per-image analysis", 3600, 3600, 0.5, finished=True)
    assert quiet.getvalue() == ""


def test_demo_of_a_2d_scan_with_gpu_analysis_only(tmp_path):
    out = run("demo", EXAMPLES / "scan2d.json", "--pia", "gpu", "--plot", "none", "--frame-rate", "5000")
    assert out.returncode == 0, out.stderr
    assert "GPU results" in out.stdout and "CPU results" not in out.stdout
    assert re.search(r"DCG \d+, DCID \d+ \(14 x 9\)\n", out.stdout) and "DCIDs" not in out.stdout
    assert "sent start for the grid to processing_recipe" in out.stdout and "sent end for the grid\n" in out.stdout
    centre = run("centre", EXAMPLES / "scan2d.json").stdout
    assert [line for line in centre.splitlines() if "centre (grid boxes)" in line][0] in out.stdout


def test_demo_on_rabbitmq_names_it_without_the_password(rabbit):
    if rabbit.close_all_connections is None:
        pytest.skip("external broker")
    user, password = "demo-user", "Distinctive-Pa55word"
    rabbit.add_user(user, password)
    vhost = f"demo-{time.monotonic_ns()}"
    url = rabbit.vhost(vhost, user, password)
    settings = zx.ConnectionSettings.from_url(url)
    out = run("demo", EXAMPLES / "scan3d.json", "--broker", url, "--plot", "none", "--frame-rate", "5000",
              "--log-level", "debug")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"Local Zocalo: amqp://{user}@{settings.host}:{settings.port}/{vhost}")
    assert password not in out.stdout + out.stderr
    assert table_lines(run("centre", EXAMPLES / "scan3d.json").stdout)[1] in out.stdout


def test_demo_with_a_bad_password_says_so_in_one_line(rabbit):
    if rabbit.close_all_connections is None:
        pytest.skip("external broker")
    out = run("demo", EXAMPLES / "scan3d.json", "--broker", rabbit.url.replace("guest:guest", f"guest:{SECRET}"))
    one_line_error(out, cli.EXIT_BROKER, "amqp://guest@127.0.0.1", "refused the user name or password")


BROKER_COMMANDS = [["demo", EXAMPLES / "scan2d.json", "--plot", "none"], ["service"], ["local", "up"]]


def test_the_service_names_the_option_given_for_its_broker():
    """``service -e ENV``, as ``zocalo.service`` takes it: an error names
    ``-e``, not ``--broker``, which the user never typed."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "ZOCALO_CONFIG"}
    one_line_error(run("service", "-e", "nosuchenv", env=env, timeout=60), cli.EXIT_BROKER,
                   "-e: no zocalo configuration for environment 'nosuchenv': set ZOCALO_CONFIG")
    one_line_error(run("service", "-e", "", timeout=60), cli.EXIT_USAGE, "-e: an empty string names no broker")


@pytest.mark.parametrize("command", BROKER_COMMANDS, ids=lambda c: " ".join(map(str, c[:2])))
def test_every_command_takes_an_environment_for_broker_and_suggests_only_what_it_can_use(command, tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if k != "ZOCALO_CONFIG"}
    line = one_line_error(run(*command, "--broker", "nosuchenv", env=env, timeout=60), cli.EXIT_BROKER,
                          "--broker: no zocalo configuration for environment 'nosuchenv': set ZOCALO_CONFIG")
    assert ("'in-process'" in line) == (command[0] == "demo"), line
    one_line_error(run(*command, "--broker", "", timeout=60), cli.EXIT_USAGE, "--broker: an empty string names no broker")
    config = tmp_path / "zocalo.yaml"
    config.write_text("version: 1\nr: {plugin: pika, host: 127.0.0.1, port: 5672, username: u, password: p, vhost: /}\n"
                      "environments: {lab: [r]}\n")
    one_line_error(run(*command, "--broker", "elsewhere", env={**env, "ZOCALO_CONFIG": str(config)}, timeout=60),
                   cli.EXIT_BROKER, f"{config}: no environment 'elsewhere' (known: lab)")


@pytest.mark.parametrize("command", BROKER_COMMANDS[1:], ids=lambda c: " ".join(c))
def test_in_process_is_refused_where_other_processes_must_reach_the_broker(command):
    one_line_error(run(*command, "--broker", "in-process", timeout=30), cli.EXIT_USAGE,
                   "--broker: ", "give an amqp:// URL or a zocalo environment ('zocalo-xrc demo' runs in one process)")


@pytest.mark.parametrize("command", BROKER_COMMANDS[1:], ids=lambda c: " ".join(c))
def test_service_and_local_up_keep_trying_for_the_connect_timeout_their_help_states(command, tmp_path):
    """One policy: one line that it is trying again, one when it gives up."""
    assert "--connect-timeout SECONDS how long to keep trying to reach the broker" in " ".join(
        run(*command, "--help").stdout.split())
    started = time.monotonic()
    out = run(*command, "--broker", f"amqp://g:{SECRET}@127.0.0.1:1/", "--connect-timeout", "2",
              "--state", tmp_path / "state", timeout=60) if command[0] == "local" else \
        run(*command, "--broker", f"amqp://g:{SECRET}@127.0.0.1:1/", "--connect-timeout", "2", timeout=60)
    took = time.monotonic() - started
    assert out.returncode == cli.EXIT_BROKER and SECRET not in out.stderr and "Traceback" not in out.stderr
    retrying, gave_up = out.stderr.strip().splitlines()
    assert retrying.endswith("WARNING zocalo_xrc.cli: cannot connect to amqp://g@127.0.0.1:1/%2F (connection refused "
                             "(is RabbitMQ running there?)); trying again for up to 2 s (--connect-timeout)"), retrying
    assert gave_up == (f"zocalo-xrc {' '.join(command)}: cannot connect to amqp://g@127.0.0.1:1/%2F: connection refused "
                       "(is RabbitMQ running there?) (gave up after 2 s, --connect-timeout)")
    assert 2 <= took < 20, took


@pytest.mark.parametrize("command", BROKER_COMMANDS, ids=lambda c: " ".join(map(str, c[:2])))
def test_every_command_reaches_the_broker_an_environment_names(command, rabbit, tmp_path):
    """A wrong password, from the environment: the broker was asked, and said so."""
    import os

    if rabbit.close_all_connections is None:
        pytest.skip("external broker")
    config = tmp_path / "zocalo.yaml"
    config.write_text(f"version: 1\nr: {{plugin: pika, host: 127.0.0.1, port: {rabbit.port}, username: guest, "
                      f"password: {SECRET}, vhost: /}}\nenvironments: {{lab: [r]}}\n")
    out = run(*command, "--broker", "lab", "--state", tmp_path / "state", env={**os.environ, "ZOCALO_CONFIG": str(config)},
              timeout=60) if command[0] == "local" else \
        run(*command, "--broker", "lab", env={**os.environ, "ZOCALO_CONFIG": str(config)}, timeout=60)
    one_line_error(out, cli.EXIT_BROKER, f"amqp://guest@127.0.0.1:{rabbit.port}", "refused the user name or password")


def test_a_demo_that_cannot_start_leaves_no_state_behind(tmp_path):
    """Its temporary state directory may hold the broker's password."""
    import os

    env = {**os.environ, "TMPDIR": str(tmp_path)}
    one_line_error(run("demo", "--broker", f"amqp://u:{SECRET}@127.0.0.1:1/", env=env), cli.EXIT_BROKER,
                   "connection refused")
    assert list(tmp_path.iterdir()) == []


def test_grids_that_disagree_are_refused_before_anything_starts(tmp_path):
    case = json.loads((EXAMPLES / "scan3d.json").read_text())
    xz = case["grids"][1]
    xz["gridinfo"]["steps_x"] -= 1
    xz["counts"] = xz["counts"][: int(xz["gridinfo"]["steps_x"] * xz["gridinfo"]["steps_y"])]
    bad = tmp_path / "disagree.json"
    bad.write_text(json.dumps(case))
    one_line_error(run("demo", bad, "--timeout", "600", timeout=60), cli.EXIT_FILE, "must share x")


def test_a_scan_that_never_completes_ends_at_the_deadline_with_one_line(tmp_path):
    scan = json.loads((EXAMPLES / "scan2d.json").read_text())
    scan["lost_frames"] = 2
    bad = tmp_path / "lost.json"
    bad.write_text(json.dumps(scan))
    out = run("demo", bad, "--timeout", "3", "--pia", "gpu", "--plot", "none", "--frame-rate", "5000", timeout=60)
    line = one_line_error(out, cli.EXIT_ZOCALO, "no X-ray centring results for DCID ")
    assert re.fullmatch(r"zocalo-xrc demo: no X-ray centring results for DCID \d+ / DCGID \d+ within 3.0 s", line)


@pytest.fixture
def silent_broker():
    """A TCP port that accepts connections and never says a word."""
    server = socket.create_server(("127.0.0.1", 0))
    held = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"amqp://guest:{SECRET}@127.0.0.1:{server.getsockname()[1]}/"
    stop.set()
    thread.join()
    for c in held:
        c.close()
    server.close()


def test_a_silent_broker_is_one_line(silent_broker):
    one_line_error(run("demo", EXAMPLES / "scan3d.json", "--broker", silent_broker, "--timeout", "3"),
                   cli.EXIT_BROKER, "amqp://guest@127.0.0.1", "no answer")


def test_ctrl_c_is_one_line(silent_broker):
    p = subprocess.Popen([sys.executable, "-m", "zocalo_xrc", "demo", str(EXAMPLES / "scan3d.json"), "--broker",
                          silent_broker], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None
    assert "Local Zocalo" in p.stdout.readline()  # it is waiting for the broker now
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=60)
    one_line_error(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr), cli.EXIT_INTERRUPTED, "interrupted")


def test_output_that_cannot_be_written_is_one_line():
    with open("/dev/full", "w") as full:
        out = subprocess.run([sys.executable, "-m", "zocalo_xrc", "centre", str(EXAMPLES / "scan3d.json")],
                             stdout=full, stderr=subprocess.PIPE, text=True, timeout=60)
    one_line_error(subprocess.CompletedProcess(out.args, out.returncode, "", out.stderr), cli.EXIT_FILE,
                   "cannot write the output: No space left on device")


def test_a_reader_that_goes_away_is_no_error_message():
    p = subprocess.Popen([sys.executable, "-m", "zocalo_xrc", "centre", str(EXAMPLES / "scan3d.json"), "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None
    p.stdout.close()  # before it writes
    assert p.wait(timeout=60) == -signal.SIGPIPE  # as yes | head: killed by SIGPIPE
    assert p.stderr.read() == b""


def demo_in(tmp_path, *args):
    """A demo whose temporary directories go to ``tmp_path``: there to be seen."""
    import os

    return [sys.executable, "-m", "zocalo_xrc", "demo", *map(str, args), "--plot", "none"], \
        {**os.environ, "TMPDIR": str(tmp_path)}


def test_a_piped_demo_whose_reader_goes_away_ends_quietly_as_unix_tools_do_and_leaves_nothing(tmp_path):
    import shlex

    command, env = demo_in(tmp_path, "--frame-rate", "5000")
    out = subprocess.run(["bash", "-c", f"{shlex.join(command)} | head -1; echo \"status ${{PIPESTATUS[0]}}\""],
                         capture_output=True, text=True, env=env, timeout=120)
    first, status = out.stdout.splitlines()
    assert first.startswith("Local Zocalo: ") and status == "status 141", out.stdout  # 128 + SIGPIPE, as yes | head
    assert out.stderr == ""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sig, code, said", [(signal.SIGINT, cli.EXIT_INTERRUPTED, "zocalo-xrc demo: interrupted\n"),
                                             (signal.SIGTERM, -signal.SIGTERM, "")])
def test_an_interrupted_demo_leaves_no_temporary_state(tmp_path, sig, code, said):
    command, env = demo_in(tmp_path, "--frame-rate", "100")  # 36 s of frames: stopped in the middle
    p = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert p.stdout is not None
    assert p.stdout.readline().startswith("Local Zocalo: ")
    assert p.stdout.readline().startswith("registered a 3D grid scan in ISPyB")
    assert [d.name.startswith("zocalo-xrc-local-") for d in tmp_path.iterdir()] == [True]
    p.send_signal(sig)
    _, stderr = p.communicate(timeout=60)
    assert p.returncode == code and stderr.replace("\r\x1b[K", "") == said, (p.returncode, stderr)
    assert list(tmp_path.iterdir()) == []


def test_a_kept_state_directory_holds_no_sqlite_journal_after_the_demo(tmp_path):
    state = tmp_path / "state"
    out = run("demo", EXAMPLES / "scan2d.json", "--plot", "none", "--frame-rate", "5000", "--state", state)
    assert out.returncode == 0, out.stderr
    assert (state / "ispyb.sqlite").is_file()
    assert sorted(p.name for p in state.glob("ispyb.sqlite-*")) == []  # -wal and -shm folded back at exit


def test_a_demo_with_a_bad_ispyb_url_leaves_no_temporary_state(tmp_path):
    command, env = demo_in(tmp_path, "--ispyb", f"mysql://gda:{SECRET}@h/db")
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    one_line_error(out, cli.EXIT_USAGE, "no database driver MySQLdb here")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, code, words", [
    (["--timeout", "nan"], cli.EXIT_USAGE, "expected a positive number of seconds"),
    (["--timeout", "-1"], cli.EXIT_USAGE, "expected a positive number of seconds"),
    (["--broker", ""], cli.EXIT_USAGE, "--broker: an empty string names no broker"),
    (["--broker", f"AMQP:/gda:{SECRET}@h"], cli.EXIT_USAGE, "not an amqp URL: ********@h"),
    (["--ispyb", f"mysql://gda:{SECRET}@h:x/db"], cli.EXIT_USAGE, "ISPyB: not an SQLAlchemy database URL"),
    (["--ispyb", f"mysql://gda:{SECRET}@h/db"], cli.EXIT_USAGE, "no database driver MySQLdb here; use mysql+pymysql://"),
    (["--pia", "tpu"], cli.EXIT_USAGE, "per-image analysis: expected gpu, cpu or both, got 'tpu'"),
    (["--frame-rate", "0"], cli.EXIT_USAGE, "frame rate: expected frames per second > 0"),
])
def test_bad_demo_options(args, code, words):
    out = run("demo", EXAMPLES / "scan3d.json", *args)
    assert out.returncode == code and words in out.stderr and "Traceback" not in out.stderr and SECRET not in out.stderr


def test_the_demo_does_not_compete_with_a_real_zocalo(rabbit):
    from zocalo_xrc.messaging.rabbitmq import AmqpTransport
    from zocalo_xrc.messaging import QueueSpec

    if not hasattr(rabbit, "vhost"):
        pytest.skip("external broker")
    url = rabbit.vhost(f"busy-{time.monotonic_ns()}")
    zocalo = AmqpTransport(zx.ConnectionSettings.from_url(url), connection_name="a real Zocalo")
    zocalo.declare_queue("processing_recipe")
    listening = zocalo.subscribe(QueueSpec("processing_recipe"), lambda d: d.reject(requeue=True))
    try:
        one_line_error(run("demo", EXAMPLES / "scan3d.json", "--broker", url), cli.EXIT_BROKER,
                       "already has a consumer: a Zocalo (a dispatcher) is running there")
    finally:
        listening.cancel()
        zocalo.close()


def test_a_port_that_is_not_rabbitmq_is_named_so():
    """It accepts, reads the AMQP greeting, and hangs up."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                c, _ = server.accept()
            except OSError:
                continue
            c.recv(100)
            c.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        out = run("demo", EXAMPLES / "scan3d.json", "--broker", f"amqp://g:{SECRET}@127.0.0.1:{server.getsockname()[1]}/",
                  "--timeout", "3")
        one_line_error(out, cli.EXIT_BROKER, "closed the connection during the AMQP handshake")
    finally:
        stop.set()
        thread.join()
        server.close()


@pytest.mark.parametrize("options, words", [
    (["--shards", "3", "--instance", "5"], "--instance: expected 0..2 with --shards 3, got 5"),
    (["--instance", "1"], "--instance needs --shards"),
    (["--shards", "0"], "--shards: expected at least 1"),
    (["--broker", "in-process", "-e", "dev_bluesky"], "give --broker or -e ENV, not both"),
])
def test_service_usage_errors_are_one_line(options, words):
    one_line_error(run("service", *options), cli.EXIT_USAGE, words)


def test_service_on_a_broker_without_its_queue_says_to_declare_it(rabbit, unique):
    if rabbit.close_all_connections is None:
        pytest.skip("external broker")
    out = run("service", "--queue", f"missing.{unique}", "--broker", rabbit.url)
    one_line_error(out, cli.EXIT_BROKER, f"there is no queue 'missing.{unique}' on RabbitMQ at amqp://guest@",
                   "--declare makes it")
