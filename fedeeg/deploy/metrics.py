"""Prometheus metrics of the coordinator (optional: needs ``prometheus-client``)."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


class ServerMetrics:
    """Round, sites connected, round latency, bytes and rejects; a no-op without prometheus-client or port 0.

    Parameters
    ----------
    port : int
        Port of the ``/metrics`` endpoint (0: no endpoint).
    addr : str
        Address to bind.
    """

    def __init__(self, port: int = 0, addr: str = "0.0.0.0") -> None:
        self.enabled = False
        self.port = port
        self._server = None
        if not port:
            return
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
        except ImportError:
            logger.warning("metrics_port = %d but prometheus-client is not installed (pip install prometheus-client); "
                           "no metrics endpoint.", port)
            return
        reg = CollectorRegistry()
        self.round = Gauge("fedeeg_round", "Last round completed", registry=reg)
        self.sites_connected = Gauge("fedeeg_sites_connected", "Sites connected to the coordinator", registry=reg)
        self.round_seconds = Gauge("fedeeg_round_seconds", "Wall time of the last round", registry=reg)
        self.bytes_up = Counter("fedeeg_bytes_up", "Bytes of updates received from sites", registry=reg)
        self.bytes_down = Counter("fedeeg_bytes_down", "Bytes of global model sent to sites", registry=reg)
        self.rejected = Counter("fedeeg_rejected_updates", "Updates rejected or failed", registry=reg)
        self.stragglers = Counter("fedeeg_stragglers", "Answers that missed the round deadline", registry=reg)
        self._server = start_http_server(port, addr=addr, registry=reg)
        self.enabled = True
        logger.info("Prometheus metrics on http://%s:%d/metrics", addr, port)

    def set(self, name: str, value: float) -> None:
        if self.enabled:
            getattr(self, name).set(value)

    def inc(self, name: str, value: float = 1.0) -> None:
        if self.enabled and value:
            getattr(self, name).inc(value)

    def close(self) -> None:
        if self._server is not None:
            server, thread = self._server
            server.shutdown()
            server.server_close()
            self._server = None


__all__ = ["ServerMetrics"]
