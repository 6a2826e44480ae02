"""The gateway's Prometheus metrics, in a registry of their own (served at /metrics).

Other gateway modules import these names and update them; ``record_prompt`` counts a
prefill's prompt and cached tokens, ``RequestMetrics`` follows one request
(waiting -> running -> finished), ``record_sequences`` counts its finished sequences (their
lengths and phases) and ``render()`` gives the text exposition format:
Baton's metrics, then those vLLM has too under vLLM's names (``VLLM_NAMES``), labelled with
the served model's name as vLLM labels them, so that dashboards and autoscalers made for
vLLM read Baton unchanged.

With several API server processes (``--api-server-count``), each keeps its metrics in files of
``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess mode, which the supervisor turns on
for them) and ``render()`` sums every process's: whichever process a scrape reaches answers for
all. Figures that are not sums (the prefix-cache hit ratio, the workers' KV cache usage) are
worked out when scraped.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
_TRANSFER_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_TOKEN_BUCKETS = tuple(m * 10**e for e in range(7) for m in (1, 2, 5))   # vLLM's 1-2-5 series, to 5M tokens
_N_BUCKETS = (1, 2, 5, 10, 20)
_PHASE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
                  160.0, 320.0, 640.0)

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
# With several API server processes, the sum of theirs (multiprocess mode; they start and stop together).
REQUESTS_RUNNING = Gauge("baton_requests_running", "Requests producing tokens.", multiprocess_mode="livesum",
                         registry=REGISTRY)
REQUESTS_WAITING = Gauge("baton_requests_waiting", "Admitted requests still waiting for their first token.",
                         multiprocess_mode="livesum", registry=REGISTRY)
REQUESTS_TOTAL = Counter("baton_requests_total", "Finished requests by outcome.", labelnames=["status"], registry=REGISTRY)
PROMPT_TOKENS = Counter("baton_prompt_tokens_total", "Prompt tokens sent to prefill.", registry=REGISTRY)
CACHED_PROMPT_TOKENS = Counter(
    "baton_cached_prompt_tokens_total", "Prompt tokens served from a prefix cache.", registry=REGISTRY
)
GENERATION_TOKENS = Counter("baton_generation_tokens_total", "Output tokens generated.", registry=REGISTRY)
KV_TRANSFER_BYTES = Counter("baton_kv_transfer_bytes_total", "KV cache bytes moved prefill -> decode.", registry=REGISTRY)
KV_TRANSFER_SECONDS = Histogram(
    "baton_kv_transfer_seconds", "Duration of one request's KV transfer.",
    buckets=_TRANSFER_BUCKETS, registry=REGISTRY,
)
# The first token's way through the workers, to set beside TTFT (from the HTTP request's arrival):
# what the time before it went to.
RESERVE_SECONDS = Histogram(
    "baton_reserve_seconds", "A decode worker's Reserve round trip (its engine thread takes it between steps).",
    buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)
PREFILL_RPC_FIRST_TOKEN = Histogram(
    "baton_prefill_rpc_first_token_seconds", "From a prompt's RPC (remote: Prefill on a prefill worker; local: "
    "PrefillAndGenerate on a decode worker) to its first token: the worker's queue and prefill and the RPC around them.",
    labelnames=["where"], buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)
REDIS_ERRORS = Counter("baton_redis_errors_total", "Failed Redis prefix-index operations.", registry=REGISTRY)
WORKER_ERRORS = Counter("baton_worker_errors_total", "Failed worker RPCs by role.", labelnames=["role"], registry=REGISTRY)
PREFILLS = Counter(
    "baton_prefills_total", "Prompts computed, by where: remote (a prefill worker, its KV moved to the decode "
    "worker) or local (on the decode worker: --max-local-prefill-length, --max-prefill-queue-size).", labelnames=["where"], registry=REGISTRY,
)
REQUEST_SUCCESS = Counter(
    "baton_request_success_total", "Finished sequences (each choice of a request) by finish reason: stop, length, or "
    "abort (the client went away) and error (the request failed) before either.", labelnames=["finished_reason"],
    registry=REGISTRY,
)
REQUEST_PROMPT_TOKENS = Histogram(
    "baton_request_prompt_tokens", "Prompt tokens of each finished sequence.", buckets=_TOKEN_BUCKETS, registry=REGISTRY,
)
REQUEST_GENERATION_TOKENS = Histogram(
    "baton_request_generation_tokens", "Tokens generated by each finished sequence.", buckets=_TOKEN_BUCKETS,
    registry=REGISTRY,
)
REQUEST_MAX_GENERATION_TOKENS = Histogram(
    "baton_request_max_num_generation_tokens", "The most tokens one of a request's sequences generated.",
    buckets=_TOKEN_BUCKETS, registry=REGISTRY,
)
REQUEST_PARAMS_N = Histogram("baton_request_params_n", "Each request's n (its samples, or beams, a prompt).",
                             buckets=_N_BUCKETS, registry=REGISTRY)
REQUEST_PARAMS_MAX_TOKENS = Histogram("baton_request_params_max_tokens", "Each request's output limit.",
                                      buckets=_TOKEN_BUCKETS, registry=REGISTRY)
# vLLM's phases of a finished sequence (stop or length). In Baton the queue is the worker's that
# computes the prompt (a prefill worker, or a decode worker prefilling locally), and so is the
# prefill, from its first step to its first token; the decode is from the first token to the last
# as the gateway gets them (the KV handoff included).
QUEUE_TIME = Histogram("baton_request_queue_time_seconds", "Each finished sequence's wait in its worker's queue.",
                       buckets=_PHASE_BUCKETS, registry=REGISTRY)
PREFILL_TIME = Histogram("baton_request_prefill_time_seconds", "Each finished sequence's prefill: from its first "
                         "step to its first token.", buckets=_PHASE_BUCKETS, registry=REGISTRY)
DECODE_TIME = Histogram("baton_request_decode_time_seconds", "Each finished sequence's decode: from its first "
                        "token to its last.", buckets=_PHASE_BUCKETS, registry=REGISTRY)
INFERENCE_TIME = Histogram("baton_request_inference_time_seconds", "Each finished sequence's prefill and decode.",
                           buckets=_PHASE_BUCKETS, registry=REGISTRY)
TIME_PER_OUTPUT_TOKEN = Histogram(
    "baton_request_time_per_output_token_seconds", "Each finished sequence's decode over its tokens after the first.",
    buckets=_ITL_BUCKETS, registry=REGISTRY,
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
    "baton_request_success": ("vllm:request_success",),
    "baton_request_prompt_tokens": ("vllm:request_prompt_tokens",),
    "baton_request_generation_tokens": ("vllm:request_generation_tokens",),
    "baton_request_max_num_generation_tokens": ("vllm:request_max_num_generation_tokens",),
    "baton_request_params_n": ("vllm:request_params_n",),
    "baton_request_params_max_tokens": ("vllm:request_params_max_tokens",),
    "baton_request_queue_time_seconds": ("vllm:request_queue_time_seconds",),
    "baton_request_prefill_time_seconds": ("vllm:request_prefill_time_seconds",),
    "baton_request_decode_time_seconds": ("vllm:request_decode_time_seconds",),
    "baton_request_inference_time_seconds": ("vllm:request_inference_time_seconds",),
    "baton_request_time_per_output_token_seconds": ("vllm:request_time_per_output_token_seconds",),
}

def record_prompt(prompt_tokens: int, cached_tokens: int) -> None:
    """Count one prefill's prompt and cached tokens."""
    PROMPT_TOKENS.inc(prompt_tokens)
    CACHED_PROMPT_TOKENS.inc(cached_tokens)


@dataclass
class FinishedSequence:
    """One sequence of a finished request, as vLLM's per-request metrics count it. Its phases
    are None where unknown: its backend did not say (``queued``, ``prefill``), or it had no token."""

    prompt_tokens: int
    generated_tokens: int
    finish_reason: str            # stop, length, or abort and error before either
    queued: float | None = None
    prefill: float | None = None
    decode: float | None = None   # from its first token to its last


def record_sequences(n: int, max_tokens: int, sequences: list[FinishedSequence]) -> None:
    """vLLM's per-request metrics of a finished generation request: ``n`` and ``max_tokens`` as it
    asked, and each of its sequences' lengths, finish reason and, for one that ended by stop or
    length, its phases."""
    REQUEST_PARAMS_N.observe(n)
    REQUEST_PARAMS_MAX_TOKENS.observe(max_tokens)
    REQUEST_MAX_GENERATION_TOKENS.observe(max((s.generated_tokens for s in sequences), default=0))
    for seq in sequences:
        REQUEST_SUCCESS.labels(finished_reason=seq.finish_reason).inc()
        REQUEST_PROMPT_TOKENS.observe(seq.prompt_tokens)
        REQUEST_GENERATION_TOKENS.observe(seq.generated_tokens)
        if seq.finish_reason not in ("stop", "length") or seq.queued is None or seq.prefill is None or seq.decode is None:
            continue
        QUEUE_TIME.observe(seq.queued)
        PREFILL_TIME.observe(seq.prefill)
        DECODE_TIME.observe(seq.decode)
        INFERENCE_TIME.observe(seq.prefill + seq.decode)
        if seq.generated_tokens > 1:
            TIME_PER_OUTPUT_TOKEN.observe(seq.decode / (seq.generated_tokens - 1))


class RequestMetrics:
    """Latency and outcome metrics of one HTTP request (all its choices), from
    ``arrival`` (a ``time.perf_counter()`` reading) to ``finish(status)``."""

    def __init__(self, arrival: float) -> None:
        self.arrival = arrival
        self.first_token: float | None = None
        self.first: dict[int, float] = {}                 # each choice's first token
        self.last: dict[int, float] = {}                  # each choice's latest token
        self.phases: dict[int, tuple[float, float]] = {}  # each choice's queue and prefill times
        REQUESTS_WAITING.inc()

    def on_phases(self, index: int, queued: float, prefill: float) -> None:
        """A choice's queue and prefill times, as its worker measured them: its first attempt's."""
        self.phases.setdefault(index, (queued, prefill))

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
        self.first.setdefault(index, now)
        self.last[index] = now
        GENERATION_TOKENS.inc(count)

    def sequence(self, index: int, prompt_tokens: int, generated_tokens: int, finish_reason: str) -> FinishedSequence:
        """Choice ``index``, finished, with the phases this request saw it go through."""
        queued, prefill = self.phases.get(index, (None, None))
        decode = self.last[index] - self.first[index] if index in self.first else None
        return FinishedSequence(prompt_tokens, generated_tokens, finish_reason, queued, prefill, decode)

    def finish(self, status: str) -> None:
        (REQUESTS_WAITING if self.first_token is None else REQUESTS_RUNNING).dec()
        if status == "success":
            E2E.observe(time.perf_counter() - self.arrival)
        REQUESTS_TOTAL.labels(status=status).inc()


def _recorded() -> CollectorRegistry:
    """The metrics recorded so far: every API server process's, summed, in multiprocess mode;
    else this process's."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path)
    return registry


class _Scrape:
    """What a scrape answers: the recorded metrics (read once), then what it adds to them: the
    cumulative prefix-cache hit ratio, each role's KV cache usage as the backend reads it now (a
    role left out has no sample), and the families of ``VLLM_NAMES`` under vLLM's names, each
    sample labelled ``model_name``, with vLLM's ``kv_cache_usage_perc`` (a share, as vLLM's): the
    decode workers', whose KV cache bounds how many sequences run."""

    def __init__(self, recorded: CollectorRegistry, model_name: str, kv_cache_usage: dict[str, float]) -> None:
        self.recorded = recorded
        self.model_name = model_name
        self.kv_cache_usage = kv_cache_usage

    def collect(self) -> Iterator[Metric]:
        families = list(self.recorded.collect())
        yield from families
        totals = {s.name: s.value for f in families for s in f.samples}
        prompt = totals.get("baton_prompt_tokens_total", 0.0)
        cached = totals.get("baton_cached_prompt_tokens_total", 0.0)
        yield GaugeMetricFamily("baton_prefix_cache_hit_ratio", "Cumulative cached prompt tokens / prompt tokens.",
                                value=cached / prompt if prompt else 0.0)
        usage = GaugeMetricFamily("baton_kv_cache_usage_ratio", "KV cache blocks requests hold / all blocks, over the "
                                  "answering workers of a role (read when scraped).", labels=["role"])
        for role, ratio in self.kv_cache_usage.items():
            usage.add_metric([role], ratio)
        yield usage
        for family in families:
            for name in VLLM_NAMES.get(family.name, ()):
                out = Metric(name, family.documentation, family.type)
                for sample in family.samples:
                    out.add_sample(name + sample.name[len(family.name):], {**sample.labels, "model_name": self.model_name},
                                   sample.value, sample.timestamp)
                yield out
        if "decode" in self.kv_cache_usage:
            vllm_usage = GaugeMetricFamily("vllm:kv_cache_usage_perc", "The decode workers' KV cache usage (1: full).",
                                           labels=["model_name"])
            vllm_usage.add_metric([self.model_name], self.kv_cache_usage["decode"])
            yield vllm_usage


def render(model_name: str, kv_cache_usage: dict[str, float]) -> tuple[bytes, str]:
    """The exposition text (Baton's metrics, then vLLM's names labelled with ``model_name``) and its
    content type; ``kv_cache_usage``: each role's, as the backend reads it now."""
    return generate_latest(_Scrape(_recorded(), model_name, kv_cache_usage)), CONTENT_TYPE_LATEST
