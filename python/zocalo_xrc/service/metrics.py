"""Prometheus metrics of the X-ray centring service (``prometheus-client``,
optional: ``pip install 'zocalo-xrc[metrics]'``).

* ``zocalo_xrc_centrings_total{kind, outcome}``: scans finished, by kind
  (``2d``, ``3d``) and outcome (``result``, ``abort``);
* ``zocalo_xrc_latency_seconds{kind}``: from the newest image's
  ``file-seen-at`` to the result being sent;
* ``zocalo_xrc_rejected_messages_total``: messages dead-lettered;
* ``zocalo_xrc_open_scans``: scans waiting for images.
"""

from __future__ import annotations

from typing import Any

#: Latency buckets (seconds): from a paced scan's milliseconds to a burst's seconds.
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class ServiceMetrics:
    """The service's metrics in ``registry`` (default: prometheus-client's)."""

    def __init__(self, registry: Any = None) -> None:
        try:
            import prometheus_client as prom
        except ImportError:
            raise ImportError("metrics need prometheus-client: pip install 'zocalo-xrc[metrics]'") from None
        kw: dict[str, Any] = {} if registry is None else {"registry": registry}
        self.centrings = prom.Counter("zocalo_xrc_centrings", "Scans finished, by kind and outcome",
                                      ["kind", "outcome"], **kw)
        self.latency = prom.Histogram("zocalo_xrc_latency_seconds", "Newest image's file-seen-at to result sent",
                                      ["kind"], buckets=LATENCY_BUCKETS, **kw)
        self.rejected = prom.Counter("zocalo_xrc_rejected_messages", "Messages dead-lettered", **kw)
        self.open_scans = prom.Gauge("zocalo_xrc_open_scans", "Scans waiting for images", **kw)
        self.checkpoints = prom.Counter("zocalo_xrc_checkpoints", "Checkpoints of open scans published", **kw)
        self.journal_unwritten = prom.Gauge("zocalo_xrc_journal_unwritten",
                                            "Journal entries a full or failing disk kept from the logbook", **kw)

    def finished(self, kind: str, outcome: str, latency_s: float | None = None) -> None:
        self.centrings.labels(kind, outcome).inc()
        if latency_s is not None:
            self.latency.labels(kind).observe(max(latency_s, 0.0))


def serve(port: int, address: str = "127.0.0.1") -> int:
    """Serve the default registry's metrics on ``address:port`` (loopback by
    default; port 0: any free one), from a thread of their own; returns the
    port bound."""
    try:
        import prometheus_client as prom
    except ImportError:
        raise ImportError("metrics need prometheus-client: pip install 'zocalo-xrc[metrics]'") from None
    server, _ = prom.start_http_server(port, addr=address)
    bound: int = server.server_port
    return bound
