"""A worker's Prometheus metrics, served on ``--metrics-port``: its engine's load
(read from ``EngineLoop.stats`` when scraped, so nothing runs per step for it)
and what the engine thread did (steps, their wall time, tokens computed).

The gateway's /metrics has the request view (TTFT, ITL, queue, KV transfer
totals); this is the per-worker view an operator scales and places by.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from baton.engine.engine_core import EngineStats

_STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class EngineMetrics:
    """The engine thread's counters, in ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.steps = Counter("baton_worker_engine_steps_total", "Engine steps run.", registry=registry)
        self.step_seconds = Histogram(
            "baton_worker_engine_step_seconds", "Wall time of one engine step on the engine thread.",
            buckets=_STEP_BUCKETS, registry=registry,
        )
        self.tokens = Counter(
            "baton_worker_tokens_total", "Tokens the engine computed (prompt and generated).", registry=registry
        )

    def record_step(self, seconds: float, tokens: int) -> None:
        self.steps.inc()
        self.step_seconds.observe(seconds)
        self.tokens.inc(tokens)


class LoadCollector(Collector):
    """Gauges of the engine's load: requests and KV cache blocks, as ``stats()`` reads them."""

    def __init__(self, stats) -> None:
        self._stats = stats

    def collect(self):
        s: EngineStats = self._stats()
        requests = GaugeMetricFamily("baton_worker_requests", "Requests in the engine.", labels=["state"])
        requests.add_metric(["running"], s.running)
        requests.add_metric(["waiting"], s.waiting)
        blocks = GaugeMetricFamily(
            "baton_worker_kv_blocks", "KV cache blocks: used by requests, cached for reuse, free.", labels=["state"]
        )
        blocks.add_metric(["used"], s.used_blocks)
        blocks.add_metric(["cached"], s.cached_blocks)
        blocks.add_metric(["free"], s.free_blocks)
        usage = GaugeMetricFamily("baton_worker_kv_usage_ratio", "Used KV cache blocks / all blocks.")
        usage.add_metric([], s.used_blocks / s.total_blocks if s.total_blocks else 0.0)
        spec = CounterMetricFamily("baton_worker_spec_decode_tokens", "Speculative draft tokens verified, and accepted.",
                                   labels=["kind"])
        spec.add_metric(["proposed"], s.spec_proposed_tokens)
        spec.add_metric(["accepted"], s.spec_accepted_tokens)
        yield from (requests, blocks, usage, spec)


def serve_metrics(port: int, host: str, stats, registry: CollectorRegistry) -> None:
    """Serve ``registry`` plus the load that ``stats()`` reads on ``host:port`` (a daemon thread)."""
    registry.register(LoadCollector(stats))
    start_http_server(port, addr=host, registry=registry)
