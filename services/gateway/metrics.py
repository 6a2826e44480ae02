"""The gateway's Prometheus metrics, in a registry of their own (served at /metrics).

Other gateway modules import these names and update them; ``record_prompt`` keeps
the cumulative prefix-cache hit ratio, ``RequestMetrics`` follows one request
(waiting -> running -> finished) and ``render()`` gives the text exposition format:
Baton's metrics, then those vLLM has too under vLLM's names (``VLLM_NAMES``), labelled with
the served model's name as vLLM labels them, so that dashboards and autoscalers made for
vLLM read Baton unchanged.
"""

from __future__ import annotations

import time

from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
_TRANSFER_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

TTFT = Histogram(
    "baton_time_to_first_token_seconds", "Time from request arrival to its first token.",
    buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)
ITL = Histogram(
    "baton_inter_token_latency_seconds", "Time between consecutive output tokens.",
    buckets=_ITL_BUCKETS, registry=REGISTRY,
)
E2E = Histogram(
    "baton_e2e_request_latency_seconds", "Time from request arrival to its last token.",
    buckets=_E2E_BUCKETS, registry=REGISTRY,
)
REQUESTS_RUNNING = Gauge("baton_requests_running", "Requests producing tokens.", registry=REGISTRY)
REQUESTS_WAITING = Gauge("baton_requests_waiting", "Admitted requests still waiting for their first token.", registry=REGISTRY)
REQUESTS_TOTAL = Counter("baton_requests_total", "Finished requests by outcome.", labelnames=["status"], registry=REGISTRY)
PROMPT_TOKENS = Counter("baton_prompt_tokens_total", "Prompt tokens sent to prefill.", registry=REGISTRY)
CACHED_PROMPT_TOKENS = Counter(
    "baton_cached_prompt_tokens_total", "Prompt tokens served from a prefix cache.", registry=REGISTRY
)
PREFIX_CACHE_HIT_RATIO = Gauge(
    "baton_prefix_cache_hit_ratio", "Cumulative cached prompt tokens / prompt tokens.", registry=REGISTRY
)
GENERATION_TOKENS = Counter("baton_generation_tokens_total", "Output tokens generated.", registry=REGISTRY)
KV_TRANSFER_BYTES = Counter("baton_kv_transfer_bytes_total", "KV cache bytes moved prefill -> decode.", registry=REGISTRY)
KV_TRANSFER_SECONDS = Histogram(
    "baton_kv_transfer_seconds", "Duration of one request's KV transfer.",
    buckets=_TRANSFER_BUCKETS, registry=REGISTRY,
)
REDIS_ERRORS = Counter("baton_redis_errors_total", "Failed Redis prefix-index operations.", registry=REGISTRY)
WORKER_ERRORS = Counter("baton_worker_errors_total", "Failed worker RPCs by role.", labelnames=["role"], registry=REGISTRY)
PREFILLS = Counter(
    "baton_prefills_total", "Prompts computed, by where: remote (a prefill worker, its KV moved to the decode "
    "worker) or local (on the decode worker: --max-local-prefill-length, --max-prefill-queue-size).", labelnames=["where"], registry=REGISTRY,
)
RETRIES = Counter(
    "baton_request_retries_total", "Requests retried on other workers after a worker failed; resumed: tokens had been streamed.",
    labelnames=["resumed"], registry=REGISTRY,
)

# Families (without a counter's ``_total``) that vLLM's server has too: Baton's name -> vLLM's
# names for it (vLLM counts every prompt token as a prefix-cache query).
VLLM_NAMES = {
    "baton_time_to_first_token_seconds": ("vllm:time_to_first_token_seconds",),
    "baton_inter_token_latency_seconds": ("vllm:inter_token_latency_seconds",),
    "baton_e2e_request_latency_seconds": ("vllm:e2e_request_latency_seconds",),
    "baton_requests_running": ("vllm:num_requests_running",),
    "baton_requests_waiting": ("vllm:num_requests_waiting",),
    "baton_prompt_tokens": ("vllm:prompt_tokens", "vllm:prefix_cache_queries"),
    "baton_generation_tokens": ("vllm:generation_tokens",),
    "baton_cached_prompt_tokens": ("vllm:prefix_cache_hits",),
}

_prompt_totals = [0, 0]  # prompt tokens, cached tokens since start (for the hit ratio)


def record_prompt(prompt_tokens: int, cached_tokens: int) -> None:
    """Count one prefill's prompt and cached tokens and update the cumulative hit ratio."""
    PROMPT_TOKENS.inc(prompt_tokens)
    CACHED_PROMPT_TOKENS.inc(cached_tokens)
    _prompt_totals[0] += prompt_tokens
    _prompt_totals[1] += cached_tokens
    if _prompt_totals[0]:
        PREFIX_CACHE_HIT_RATIO.set(_prompt_totals[1] / _prompt_totals[0])


class RequestMetrics:
    """Latency and outcome metrics of one HTTP request (all its choices), from
    ``arrival`` (a ``time.perf_counter()`` reading) to ``finish(status)``."""

    def __init__(self, arrival: float) -> None:
        self.arrival = arrival
        self.first_token: float | None = None
        self.last: dict[int, float] = {}
        REQUESTS_WAITING.inc()

    def on_tokens(self, index: int, count: int) -> None:
        if count == 0:
            return
        now = time.perf_counter()
        if self.first_token is None:
            self.first_token = now
            TTFT.observe(now - self.arrival)
            REQUESTS_WAITING.dec()
            REQUESTS_RUNNING.inc()
        # The tokens of one chunk share the gap since the choice's previous chunk.
        gaps = count if index in self.last else count - 1
        for _ in range(gaps):
            ITL.observe((now - self.last.get(index, now)) / count)
        self.last[index] = now
        GENERATION_TOKENS.inc(count)

    def finish(self, status: str) -> None:
        (REQUESTS_WAITING if self.first_token is None else REQUESTS_RUNNING).dec()
        if status == "success":
            E2E.observe(time.perf_counter() - self.arrival)
        REQUESTS_TOTAL.labels(status=status).inc()


class _VllmView:
    """The families of ``VLLM_NAMES`` under vLLM's names, each sample labelled ``model_name``."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        for family in REGISTRY.collect():
            for name in VLLM_NAMES.get(family.name, ()):
                out = Metric(name, family.documentation, family.type)
                for sample in family.samples:
                    out.add_sample(name + sample.name[len(family.name):], {**sample.labels, "model_name": self.model_name},
                                   sample.value, sample.timestamp)
                yield out


def render(model_name: str) -> tuple[bytes, str]:
    """The exposition text (vLLM's names labelled with ``model_name`` after Baton's) and its content type."""
    return generate_latest(REGISTRY) + generate_latest(_VllmView(model_name)), CONTENT_TYPE_LATEST
