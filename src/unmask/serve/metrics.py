"""The server's Prometheus metrics (``GET /metrics``, the text exposition format), kept by ``prometheus_client``
(the Prometheus project's own client: the format, escaping and histogram semantics are its, not hand-written).

Each :class:`~unmask.serve.service.ModelService` has a registry of its own, so several servers in one process
(tests) never share counts:

* ``unmask_requests_total{outcome}``: requests answered, by outcome (done, cancelled, error, unavailable, timeout);
* ``unmask_requests_pending``: requests queued or running; ``unmask_requests_running``: those being decoded;
* ``unmask_batch_rows``: rows per decoding batch (histogram);
* ``unmask_generated_tokens_total``: positions generated (the masked positions of the answered requests);
* ``unmask_generated_tokens_per_second``: of the last batch;
* ``unmask_request_seconds``: from the request's admission to its answer (histogram);
* ``unmask_time_to_first_step_seconds``: of streamed requests, from admission to their first step event.

The request-level server keeps no cache between requests, so there is no cache-bytes gauge yet.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServeMetrics:
    """A server's metrics (module docstring); ``pending`` and ``running`` are read when scraped."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, pending: Callable[[], int], running: Callable[[], int]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("unmask_requests", "requests answered, by outcome", ["outcome"], registry=r)
        Gauge("unmask_requests_pending", "requests queued or running", registry=r).set_function(pending)
        Gauge("unmask_requests_running", "requests in the batch being decoded", registry=r).set_function(running)
        self.batch_rows = Histogram("unmask_batch_rows", "rows per decoding batch", buckets=ROWS, registry=r)
        self.tokens = Counter("unmask_generated_tokens", "positions generated", registry=r)
        self.tokens_per_second = Gauge("unmask_generated_tokens_per_second", "generated tokens per second of the "
                                       "last batch", registry=r)
        self.latency = Histogram("unmask_request_seconds", "from admission to answer", buckets=SECONDS, registry=r)
        self.first_step = Histogram("unmask_time_to_first_step_seconds", "streamed requests: from admission to "
                                    "their first step event", buckets=SECONDS, registry=r)

    def batch(self, rows: int, generated: int, seconds: float) -> None:
        """A decoding batch of ``rows`` rows that generated ``generated`` positions in ``seconds``."""
        self.batch_rows.observe(rows)
        self.tokens.inc(generated)
        if seconds > 0:
            self.tokens_per_second.set(generated / seconds)

    def answered(self, outcome: str, seconds: float) -> None:
        """A request answered with ``outcome`` after ``seconds`` since its admission."""
        self.requests.labels(outcome).inc()
        self.latency.observe(seconds)

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)
