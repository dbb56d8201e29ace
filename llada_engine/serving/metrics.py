"""The server's Prometheus metrics (GET /metrics, the Prometheus text format), on a registry of its own:

    llada_requests_running, llada_requests_waiting          the engine's batch and queue
    llada_kv_pages_used, llada_kv_pages_free                the paged KV cache
    llada_generated_tokens_total, llada_denoise_steps_total the engine's output tokens and denoising steps
    llada_tokens_per_second                                 output tokens/s over the last 10 s (or since last scrape)
    llada_tokens_per_forward                                TPF: output tokens per denoising step, since the start
    llada_prompt_tokens_total                               prompt tokens of the requests submitted
    llada_requests_total{endpoint, finish_reason}           requests that ended: stop, length, cancelled, error
    llada_request_errors_total{status}                      requests refused with a 4xx/5xx before they ran
    llada_request_latency_seconds                           end-to-end latency of the requests that finished
    llada_time_to_first_block_seconds                       from arrival to the first committed tokens
"""
import collections
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
FIRST_BLOCK_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RATE_WINDOW_S = 10.0


class _Rate:
    """Units per second of a growing total, over at least the last `window` seconds of samples."""

    def __init__(self, window: float, total: int = 0):
        self.window = window
        self._samples = collections.deque([(time.monotonic(), total)])

    def __call__(self, total: int) -> float:
        now = time.monotonic()
        self._samples.append((now, total))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
            self._samples.popleft()
        start, first = self._samples[0]
        return (total - first) / (now - start) if now > start else 0.0


class _EngineCollector:
    """Reads the engine's state at each scrape."""

    def __init__(self, engine):
        self._engine = engine
        self._rate = _Rate(RATE_WINDOW_S, engine.stats.tokens)

    def collect(self):
        engine, stats = self._engine, self._engine.stats
        for name, doc, value in (
                ("llada_requests_running", "Requests in the running batch", engine.running),
                ("llada_requests_waiting", "Requests waiting for a slot or cache pages", engine.waiting),
                ("llada_kv_pages_used", "KV cache pages held by requests", engine.cache.used_pages),
                ("llada_kv_pages_free", "KV cache pages free", engine.cache.free_pages),
                ("llada_tokens_per_second", f"Output tokens per second over the last {RATE_WINDOW_S:g} s",
                 self._rate(stats.tokens)),
                ("llada_tokens_per_forward", "Output tokens per denoising step (TPF)", stats.tokens_per_forward)):
            yield GaugeMetricFamily(name, doc, value=value)
        yield CounterMetricFamily("llada_generated_tokens", "Output tokens committed", value=stats.tokens)
        yield CounterMetricFamily("llada_denoise_steps", "Denoising steps, summed over requests",
                                  value=stats.denoise_steps)


class ServerMetrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry()
        self.requests = Counter("llada_requests", "Requests that ended, by endpoint and finish reason",
                                ["endpoint", "finish_reason"], registry=self.registry)
        self.errors = Counter("llada_request_errors", "Requests refused with an error, by HTTP status", ["status"],
                              registry=self.registry)
        self.prompt_tokens = Counter("llada_prompt_tokens", "Prompt tokens of the requests submitted",
                                     registry=self.registry)
        self.latency = Histogram("llada_request_latency_seconds", "End-to-end latency of the requests that finished",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.first_block = Histogram("llada_time_to_first_block_seconds",
                                     "Time from a request's arrival to its first committed tokens",
                                     buckets=FIRST_BLOCK_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(engine))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
