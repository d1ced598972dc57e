"""padrec's Prometheus metrics (beside Triton's own): requests by outcome, batch sizes, tau, rounds, time."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server


class ServeMetrics:
    """One registry per server, exported on its own port."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("padrec_requests", "Histories served, by outcome (ok, client_error, deadline, "
                                "server_error)", ["outcome"], registry=self.registry)
        self.batch_size = Histogram("padrec_batch_size", "Histories decoded together in one runtime call",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.tau = Histogram("padrec_tau", "Tokens committed per target pass, per decoded batch",
                             buckets=(1, 1.5, 2, 2.5, 3, 4, 5, 6, 8), registry=self.registry)
        self.rounds = Counter("padrec_rounds", "Target passes after prefill", registry=self.registry)
        self.decode_s = Histogram("padrec_decode_seconds", "Wall time of one decoded batch",
                                  registry=self.registry)

    def serve(self, port: int) -> None:
        start_http_server(port, registry=self.registry)
