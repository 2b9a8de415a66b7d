"""Prometheus metrics. The names are part of the service's contract; each app owns its own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("charrnn_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.streams_running = Gauge("charrnn_streams_running", "Generations in progress", ["model"], registry=r)
        self.streams_dropped = Counter("charrnn_streams_dropped", "Streams whose client went away", registry=r)
        self.rejected = Counter("charrnn_requests_rejected", "Requests refused (busy, overload, ...)", ["reason"],
                                registry=r)
        self.generated_chars = Counter("charrnn_generated_chars", "Characters delivered", ["model"], registry=r)
        self.time_to_first_char = Histogram("charrnn_time_to_first_char_seconds", "Request start to first character",
                                            buckets=LATENCY_BUCKETS, registry=r)
        self.inter_char = Histogram("charrnn_inter_char_seconds", "Gap between characters of one stream",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.decode_batch_size = Histogram("charrnn_decode_batch_size", "Streams stepped per model call",
                                           buckets=BATCH_BUCKETS, registry=r)
        self.prime_batch_size = Histogram("charrnn_prime_batch_size", "Primes read together in one slice",
                                          buckets=BATCH_BUCKETS, registry=r)
        self.sessions_active = Gauge("charrnn_sessions_active", "Sessions held", registry=r)
        self.sessions_evicted = Counter("charrnn_sessions_evicted", "Sessions dropped (LRU or TTL)", ["why"],
                                        registry=r)
        self.session_store_errors = Counter("charrnn_session_store_errors", "Session store (Redis) calls that failed",
                                            ["op"], registry=r)
        self.models_loaded = Gauge("charrnn_models_loaded", "Models in the registry", registry=r)
