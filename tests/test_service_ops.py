"""Running the service: Prometheus metrics, Graylog where the zocalo
configuration names it, log lines that carry the DCID, DCG and recipe ID."""

import json
import logging
import os
import socket
import subprocess
import sys
import urllib.request
import zlib

import pytest
from prometheus_client import CollectorRegistry

import zocalo_xrc as zx
from rabbitmq import free_port, zocalo_config
from test_service import bodies, publish
from test_service_assembly import CASE_2D
from test_transport import eventually
from zocalo_xrc.messaging.inprocess import InProcessBroker
from zocalo_xrc.messaging.rabbitmq import AmqpTransport
from zocalo_xrc.service.metrics import ServiceMetrics
from zocalo_xrc.service.runner import XrcService

GRID_2D = {"dcid": 555, "counts": CASE_2D["counts"], "gridinfo": CASE_2D["gridinfo"]}


def sample(registry, name, **labels):
    return registry.get_sample_value(name, labels) or 0.0


def test_metrics_count_results_rejections_and_latency(caplog):
    broker = InProcessBroker()
    transport = zx.InProcessTransport(broker)
    transport.declare_work_queue("q")
    transport.declare_results_queue("xrc.ops")
    transport.declare_queue("abort.ops")
    registry = CollectorRegistry()
    service = XrcService(transport, "q", metrics=ServiceMetrics(registry)).start()
    try:
        with caplog.at_level(logging.INFO, logger="zocalo_xrc.service"):
            messages = bodies(GRID_2D, [], "ops")
            publish(transport, "q", messages[:10])
            assert eventually(lambda: sample(registry, "zocalo_xrc_open_scans") == 1)
            publish(transport, "q", messages[10:] + [b"{not json"])
            assert eventually(lambda: sample(registry, "zocalo_xrc_centrings_total", kind="2d", outcome="result") == 1)
        assert sample(registry, "zocalo_xrc_rejected_messages_total") == 1
        assert sample(registry, "zocalo_xrc_latency_seconds_count", kind="2d") == 1
        assert sample(registry, "zocalo_xrc_open_scans") == 0
        line = next(r.getMessage() for r in caplog.records if "2d result" in r.getMessage())
        assert line.startswith("2D grid DCID 555 (DCG 77, recipe ID env-555): 2d result, 1 found, "), line
    finally:
        service.stop()
        transport.close()
        broker.close()


@pytest.fixture
def graylog():
    """A UDP socket on 127.0.0.1 standing in for Graylog's GELF input."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(0.2)
        yield s


def gelf_messages(s):
    out = []
    while True:
        try:
            data = s.recv(65536)
        except TimeoutError:
            return out
        out.append(json.loads(zlib.decompress(data)))


def test_the_cli_service_serves_metrics_and_logs_to_graylog(rabbit, unique, tmp_path, graylog):
    if rabbit.close_all_connections is None:
        pytest.skip("external broker")
    config = zocalo_config(tmp_path / "zocalo.yml", rabbit.url,
                           graylog=f"{{plugin: graylog, protocol: UDP, host: 127.0.0.1, port: {graylog.getsockname()[1]}}}")
    q, port = f"reduce.xray_centering.{unique}", free_port()
    t = AmqpTransport(zx.ConnectionSettings.from_url(rabbit.url))
    t.declare_results_queue(f"xrc.{unique}")
    service = subprocess.Popen([sys.executable, "-m", "zocalo_xrc", "service", "-e", "xrc-test", "--queue", q,
                                "--declare", "--metrics-port", str(port)],
                               env={**os.environ, "ZOCALO_CONFIG": str(config)}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert service.stdout.readline().startswith("X-ray centring service consuming"), service.stderr.read()
        results = zx.ZocaloResults2D(t, beamline=unique, timeout_s=30, source=zx.Source.GPU)
        results.subscribe()
        publish(t, q, bodies(GRID_2D, [], unique))
        assert [r.ok for r in results.trigger(dcids=555)] == [True]
        results.close()
        scrape = lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()  # noqa: E731
        assert eventually(lambda: 'zocalo_xrc_centrings_total{kind="2d",outcome="result"} 1.0' in scrape())
        assert "zocalo_xrc_latency_seconds_count{kind=\"2d\"} 1.0" in scrape()
        logged = []
        assert eventually(lambda: logged.extend(gelf_messages(graylog)) or any(
            "2D grid DCID 555 (DCG 77, recipe ID env-555): 2d result" in m["short_message"] for m in logged))
    finally:
        service.terminate()
        service.communicate(timeout=30)
        for name in (q, f"dlq.{q}", f"xrc.{unique}", f"dlq.xrc.{unique}"):
            t.delete_queue(name)
        t.close()


@pytest.mark.parametrize("port", ["70000", "123456789012345678901", "-1", "²"])
def test_a_metrics_port_out_of_range_is_a_usage_error(port):
    done = subprocess.run([sys.executable, "-m", "zocalo_xrc", "service", "--broker", "in-process",
                           "--metrics-port", port], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "--metrics-port" in done.stderr and "expected a port, 0 to 65535" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_metrics_port_0_serves_on_a_free_port_and_says_which(rabbit, unique):
    if rabbit.close_all_connections is None:
        pytest.skip("external broker")
    q = f"reduce.xray_centering.{unique}"
    service = subprocess.Popen([sys.executable, "-m", "zocalo_xrc", "service", "--broker", rabbit.url, "--queue", q,
                                "--declare", "--metrics-port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        line = service.stdout.readline()
        port = int(line.rsplit("http://127.0.0.1:", 1)[1].split("/")[0])
        assert port != 0, line
        assert "zocalo_xrc_open_scans" in urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                                                 timeout=5).read().decode()
    finally:
        service.terminate()
        service.communicate(timeout=30)
        t = AmqpTransport(zx.ConnectionSettings.from_url(rabbit.url))
        for name in (q, f"dlq.{q}"):
            t.delete_queue(name)
        t.close()
