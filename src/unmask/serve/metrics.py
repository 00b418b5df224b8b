"""The server's Prometheus metrics (``GET /metrics``, the text exposition format), kept by ``prometheus_client``
(the Prometheus project's own client: the format, escaping and histogram semantics are its, not hand-written).

Each :class:`~unmask.serve.service.ModelService` has a registry of its own, so several servers in one process
(tests) never share counts:

* ``unmask_requests_total{outcome}``: requests answered, by outcome (done, cancelled, error, unavailable, timeout);
* ``unmask_requests_pending``: requests queued or running; ``unmask_requests_running``: those being decoded;
* ``unmask_batch_rows``: rows per forward batch (histogram): per step with step scheduling, per request batch
  otherwise;
* ``unmask_generated_tokens_total``: positions generated (the masked positions of the answered requests);
* ``unmask_generated_tokens_per_second``: over the last 10 seconds;
* ``unmask_cache_bytes``: bytes the running requests' caches hold (measured after each step);
  ``unmask_cache_reserved_bytes``: the budget the queued and running requests reserve;
* ``unmask_prefix_tokens_reused`` / ``unmask_prefix_tokens_computed``: prompt tokens (causal and block
  diffusion) whose keys and values the prefix cache gave / that were computed; ``unmask_prefix_cache_bytes``;
* ``unmask_request_seconds``: from the request's admission to its answer (histogram);
* ``unmask_time_to_first_step_seconds``: of streamed requests, from admission to their first step event.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServeMetrics:
    """A server's metrics (module docstring); ``pending`` and ``running`` are read when scraped."""

    content_type = CONTENT_TYPE_LATEST

    WINDOW_S = 10.0  # of the tokens/s gauge

    def __init__(self, pending: Callable[[], int], running: Callable[[], int], reserved: Callable[[], int],
                 prefixes=None):
        self.registry = CollectorRegistry()
        self.lock = threading.Lock()
        self.recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens) in the window
        self.mean_latency = 0.0
        r = self.registry
        self.requests = Counter("unmask_requests", "requests answered, by outcome", ["outcome"], registry=r)
        Gauge("unmask_requests_pending", "requests queued or running", registry=r).set_function(pending)
        Gauge("unmask_requests_running", "requests in the batch being decoded", registry=r).set_function(running)
        self.batch_rows = Histogram("unmask_batch_rows", "rows per forward batch", buckets=ROWS, registry=r)
        self.tokens = Counter("unmask_generated_tokens", "positions generated", registry=r)
        Gauge("unmask_generated_tokens_per_second", "generated tokens per second over the last 10 seconds",
              registry=r).set_function(self.tokens_per_second)
        self.cache_bytes = Gauge("unmask_cache_bytes", "bytes held by the running requests' caches", registry=r)
        Gauge("unmask_cache_reserved_bytes", "cache budget reserved by queued and running requests",
              registry=r).set_function(reserved)
        if prefixes is not None:
            Gauge("unmask_prefix_tokens_reused", "prompt tokens whose keys and values came from the prefix cache",
                  registry=r).set_function(lambda: prefixes.reused)
            Gauge("unmask_prefix_tokens_computed", "prompt tokens fed through the prefix cache and computed",
                  registry=r).set_function(lambda: prefixes.computed)
            Gauge("unmask_prefix_cache_bytes", "bytes the prefix cache holds", registry=r).set_function(
                lambda: prefixes.bytes)
        self.latency = Histogram("unmask_request_seconds", "from admission to answer", buckets=SECONDS, registry=r)
        self.first_step = Histogram("unmask_time_to_first_step_seconds", "streamed requests: from admission to "
                                    "their first step event", buckets=SECONDS, registry=r)

    def batch(self, rows: int) -> None:
        """A forward batch (a step, or a request batch) of ``rows`` rows."""
        self.batch_rows.observe(rows)

    def step(self, rows: int, cache_bytes: int) -> None:
        """A step of ``rows`` rows after which the caches hold ``cache_bytes``."""
        self.batch_rows.observe(rows)
        self.cache_bytes.set(cache_bytes)

    def generated(self, tokens: int) -> None:
        """A request generated ``tokens`` positions."""
        self.tokens.inc(tokens)
        with self.lock:
            self.recent.append((time.monotonic(), tokens))

    def tokens_per_second(self) -> float:
        """Positions generated per second over the last ``WINDOW_S`` seconds."""
        now = time.monotonic()
        with self.lock:
            while self.recent and self.recent[0][0] < now - self.WINDOW_S:
                self.recent.popleft()
            return sum(n for _, n in self.recent) / self.WINDOW_S

    def answered(self, outcome: str, seconds: float) -> None:
        """A request answered with ``outcome`` after ``seconds`` since its admission."""
        self.requests.labels(outcome).inc()
        self.latency.observe(seconds)
        if outcome == "done":
            self.mean_latency = seconds if not self.mean_latency else 0.8 * self.mean_latency + 0.2 * seconds

    def recent_latency(self) -> float:
        """A moving average of the latency of the requests answered lately (0 before the first)."""
        return self.mean_latency

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)
