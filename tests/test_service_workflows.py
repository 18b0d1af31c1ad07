"""The service under a Zocalo frontend, unchanged: ``zocalo.service -s
XRayCentering -e ENV`` reads zocalo YAML, centres what a workflows
RecipeWrapper sends, reports its status on ``transient.status`` and stops on
``zocalo.shutdown``; all checked with workflows' and zocalo's own tools."""

import json
import os
import queue
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pika
import pytest
import workflows.recipe
import zocalo.configuration
from workflows.transport.pika_transport import PikaTransport

import zocalo_xrc as zx
from rabbitmq import zocalo_config
from test_service import recipe
from test_service_assembly import CASE_3D, direct_3d
from test_transport import eventually
from zocalo_xrc.messaging.rabbitmq import AmqpTransport

QUEUE = "reduce.xray_centering"


@pytest.fixture
def zocalo_env(rabbit, tmp_path, unique):
    """A zocalo configuration for the test broker, and our transport to it."""
    if rabbit.close_all_connections is None:
        pytest.skip("external broker")
    config = zocalo_config(tmp_path / "zocalo.yml", rabbit.url)
    t = AmqpTransport(zx.ConnectionSettings.from_url(rabbit.url), connection_name="test, beamline")
    t.declare_work_queue(QUEUE)
    with pika.BlockingConnection(pika.URLParameters(rabbit.url)) as c:  # as zocalo.configure_rabbitmq makes them
        for exchange in ("command", "transient.status"):
            c.channel().exchange_declare(exchange, exchange_type="fanout", durable=True)
    env = {**os.environ, "ZOCALO_CONFIG": str(config)}
    yield t, env, config
    for name in (QUEUE, f"dlq.{QUEUE}", f"xrc.{unique}", f"dlq.xrc.{unique}", f"wf.{unique}", f"dlq.wf.{unique}",
                 f"abort.{unique}"):
        t.delete_queue(name)
    t.close()


def workflows_transport(config):
    zc = zocalo.configuration.from_file(str(config))
    zc.activate_environment("xrc-test")
    t = PikaTransport()
    t.connect()
    return t


def send_as_recipe_wrapper(t, grid, others, beamline):
    """Every image of a grid as GPU PIA's recipe step sends them: a real
    RecipeWrapper at step 1, sending each payload to its output (step 2)."""
    parameters = {"dcid": str(grid["dcid"]), "dcg_dcids": others, "experiment_type": "Mesh3D", "beamline": "i03",
                  "sample_id": CASE_3D["sample_id"]}
    r = recipe(parameters, grid["gridinfo"], beamline)
    r["2"]["queue"] = QUEUE
    message = {"environment": {"ID": f"env-{grid['dcid']}"}, "recipe": r, "recipe-path": [], "recipe-pointer": 1,
               "payload": None}
    wrapper = workflows.recipe.RecipeWrapper(message=message, transport=t)
    for k, n in enumerate(grid["counts"], 1):
        wrapper.send({"file-number": k, "n_spots_total": n, "file-seen-at": time.time()})


def test_zocalo_service_runs_it_with_status_and_shutdown(zocalo_env, unique):
    t, env, config = zocalo_env
    t.declare_results_queue(f"xrc.{unique}")
    t.declare_results_queue(f"wf.{unique}", routing_key=f"xrc.{unique}")  # a second reader's copy
    t.declare_queue(f"abort.{unique}")
    zocalo_service = shutil.which("zocalo.service") or str(Path(sys.executable).parent / "zocalo.service")
    service = subprocess.Popen([zocalo_service, "-s", "XRayCentering", "-e", "xrc-test"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert eventually(lambda: t.consumer_count(QUEUE) == 1, timeout=60), "the service never consumed its queue"
        wt = workflows_transport(config)
        statuses = queue.Queue()
        wt.subscribe_broadcast("transient.status", lambda header, message: statuses.put(message))
        results = zx.ZocaloResults(t, beamline=unique, timeout_s=30, source=zx.Source.GPU)
        results.subscribe()
        a, b = CASE_3D["grids"]
        send_as_recipe_wrapper(wt, a, [b["dcid"]], unique)
        send_as_recipe_wrapper(wt, b, [a["dcid"]], unique)
        assert results.trigger(dcids=a["dcid"]) == direct_3d().sorted(by="max_count")
        results.close()
        read = queue.Queue()  # the same result, as a workflows service downstream reads it

        def downstream(rw, header, message):
            read.put((rw.recipe_step, message))
            wt.ack(header)

        workflows.recipe.wrap_subscribe(wt, f"wf.{unique}", downstream, acknowledgement=True)
        step, message = read.get(timeout=30)
        assert step["queue"] == f"xrc.{unique}" and step["parameters"]["dcid"] == str(a["dcid"])
        assert (message["status"], message["type"]) == ("success", "3d")
        assert message["results"] == direct_3d().to_dicts()

        deadline = time.monotonic() + 30
        mine = None
        while mine is None and time.monotonic() < deadline:
            status = statuses.get(timeout=30)
            status = json.loads(status) if isinstance(status, (str, bytes)) else status
            if status.get("serviceclass") == "XRayCentering":
                mine = status
        assert mine is not None and mine["service"] == "X-ray centring (zocalo-xrc)", mine
        wt.disconnect()

        subprocess.run([shutil.which("zocalo.shutdown") or str(Path(sys.executable).parent / "zocalo.shutdown"),
                        "-s", "XRayCentering", "-e", "xrc-test"], env=env, check=True, capture_output=True, timeout=60)
        out, _ = service.communicate(timeout=60)
        assert service.returncode == 0, out
        assert "3D group DCID 16085800, 16085801 (DCG 77, recipe ID env-16085800): 3d result, 2 found" in out, out
    finally:
        if service.poll() is None:
            service.kill()
            service.wait()


def test_a_frontend_killed_with_sigterm_takes_its_service_along(zocalo_env):
    """workflows' frontend dies on SIGTERM and leaves its service process
    behind; ours notices and stops, handing back the queue."""
    t, env, config = zocalo_env
    zocalo_service = shutil.which("zocalo.service") or str(Path(sys.executable).parent / "zocalo.service")
    frontend = subprocess.Popen([zocalo_service, "-s", "XRayCentering", "-e", "xrc-test"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert eventually(lambda: t.consumer_count(QUEUE) == 1, timeout=60)
        children = subprocess.run(["pgrep", "-P", str(frontend.pid)], capture_output=True, text=True).stdout.split()
        assert children, "the frontend runs the service in a child process"
        frontend.terminate()
        frontend.wait(30)

        def gone(pid):
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                return True
            return False

        assert eventually(lambda: all(gone(pid) for pid in children), timeout=15)
        assert eventually(lambda: t.consumer_count(QUEUE) == 0, timeout=15)
    finally:
        if frontend.poll() is None:
            frontend.kill()
