"""A worker's Prometheus metrics, served on ``--metrics-port``: its engine's load
and token counts (read from ``EngineLoop.stats`` when scraped, so nothing runs per
step for them) and what the engine thread did (steps, their wall time, tokens
computed). And vLLM's periodic log line of the same (``log_stats``), unless
``--disable-log-stats``.

The gateway's /metrics has the request view (TTFT, ITL, queue, KV transfer
totals); this is the per-worker view an operator scales and places by.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from baton.engine.engine_api import EngineStats

log = logging.getLogger(__name__)

# Seconds between the log lines; vLLM's 10 s, and its VLLM_LOG_STATS_INTERVAL as BATON_LOG_STATS_INTERVAL.
LOG_STATS_INTERVAL_S = float(os.environ.get("BATON_LOG_STATS_INTERVAL", "10"))
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
        self.command_wait_seconds = Histogram(
            "baton_worker_engine_command_wait_seconds", "From an RPC's command (add, reserve, activate, abort, ...) "
            "queued to the engine thread running it, between steps.", buckets=_STEP_BUCKETS, registry=registry,
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
        counts = [
            CounterMetricFamily(name, doc, value=value) for name, doc, value in (
                ("baton_worker_prompt_tokens", "Prompt tokens computed (an embedding's included).", s.prompt_tokens),
                ("baton_worker_generation_tokens", "Tokens generated.", s.generated_tokens),
                ("baton_worker_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_queried_tokens),
                ("baton_worker_prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_hit_tokens),
                ("baton_worker_preemptions", "Sequences preempted for want of KV blocks (recomputed later).",
                 s.preemptions),
            )
        ]
        yield from (requests, blocks, usage, spec, *counts)


def stats_line(before: EngineStats, now: EngineStats, seconds: float) -> str | None:
    """vLLM's periodic line over the ``seconds`` between two reads of the engine's stats: prompt
    and generation throughput, requests, KV cache use, prefix cache hit rate; None where the
    engine computed nothing and holds no request."""
    prompt, generated = now.prompt_tokens - before.prompt_tokens, now.generated_tokens - before.generated_tokens
    if not (prompt or generated or now.running or now.waiting):
        return None
    queried = now.prefix_queried_tokens - before.prefix_queried_tokens
    hit_rate = f"{(now.prefix_hit_tokens - before.prefix_hit_tokens) / queried:.1%}" if queried else "no lookups"
    usage = now.used_blocks / now.total_blocks if now.total_blocks else 0.0
    return (f"prompt throughput {prompt / seconds:.1f} tokens/s, generation throughput {generated / seconds:.1f} "
            f"tokens/s, running {now.running}, waiting {now.waiting}, KV cache usage {usage:.1%}, "
            f"prefix cache hit rate {hit_rate}")


async def log_stats(stats: Callable[[], EngineStats], label: str, every_s: float = LOG_STATS_INTERVAL_S) -> None:
    """Log ``stats_line`` every ``every_s`` seconds, prefixed by ``label``, until cancelled."""
    before, since = stats(), time.monotonic()
    while True:
        await asyncio.sleep(every_s)
        now, at = stats(), time.monotonic()
        line = stats_line(before, now, at - since)
        if line is not None:
            log.info("%s: %s", label, line)
        before, since = now, at


def serve_metrics(port: int, host: str, stats, registry: CollectorRegistry) -> None:
    """Serve ``registry`` plus the load that ``stats()`` reads on ``host:port`` (a daemon thread)."""
    registry.register(LoadCollector(stats))
    start_http_server(port, addr=host, registry=registry)
