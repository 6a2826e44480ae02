"""Serving benchmark: concurrent streaming completions against a running gateway.

    .venv/bin/baton up &                                   # or any Baton / OpenAI-compatible URL
    python bench/bench_serving.py --url http://127.0.0.1:8000 --requests 64 --concurrency 16

Prints requests/s, output tokens/s (and how busy the client was: ``--clients P`` sends from P
processes where one is the bound), and TTFT / ITL / end-to-end percentiles, and those of the
gap before each request's second token (in a disaggregated server, what is left of the KV
handoff once the first token is out) and of each request's longest gap (a worker that fails
mid-stream shows there). With ``--n`` choices a request, TTFT is its first choice's, "TTFT n"
its last choice's first token, and the token gaps are per choice. ``--regex`` puts every output
under a grammar (structured output), e.g. ``--regex "[a-z ]{2000,}"``. Where the server serves
vLLM's phase metrics (Baton and vLLM do, at ``/metrics``), the timed run's mean queue, prefill
and decode times a sequence, as the server measured them, follow; from Baton, also the means of
a decode worker's ``Reserve`` and of a prompt RPC's time to its first token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

PHASES = {   # vLLM's phase histograms, each a sequence's; then Baton's steps to a first token, each an RPC's
    "queue": "vllm:request_queue_time_seconds", "prefill": "vllm:request_prefill_time_seconds",
    "decode": "vllm:request_decode_time_seconds", "inference": "vllm:request_inference_time_seconds",
    "time per output token": "vllm:request_time_per_output_token_seconds",
    "Reserve": "baton_reserve_seconds", "prompt RPC to first token": "baton_prefill_rpc_first_token_seconds",
}


@dataclass
class Result:
    ttft: float = 0.0           # the first choice's first token
    ttft_all: float = 0.0       # the last choice's first token
    itls: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)   # each choice's gap before its second token
    e2e: float = 0.0
    tokens: int = 0
    error: str | None = None


async def one_request(
    client: httpx.AsyncClient, url: str, model: str, prompt: str | list[int], max_tokens: int, n: int, temperature: float,
    regex: str | None,
) -> Result:
    body = {
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, "n": n, "seed": 0,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }
    if regex is not None:
        body["structured_outputs"] = {"regex": regex}
    result = Result()
    start = time.perf_counter()
    last: dict[int, float] = {}   # choice index -> its latest chunk's arrival
    seen: dict[int, int] = {}     # choice index -> its chunks so far
    async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            result.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
            return result
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                result.tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                if not choice["text"]:
                    continue
                now, index = time.perf_counter(), choice["index"]
                if index not in last:
                    result.ttft = result.ttft or now - start
                    result.ttft_all = now - start
                else:
                    result.itls.append(now - last[index])
                    if seen[index] == 1:
                        result.seconds.append(now - last[index])
                last[index] = now
                seen[index] = seen.get(index, 0) + 1
    result.e2e = time.perf_counter() - start
    return result


async def phase_totals(client: httpx.AsyncClient, url: str) -> dict[str, tuple[float, float]]:
    """The server's vLLM phase histograms: (sum of seconds, sequences) by phase, over every label
    (empty where it serves none)."""
    resp = await client.get(f"{url}/metrics")
    if resp.status_code != 200:
        return {}
    fields = {f"{name}{suffix}": (phase, i) for phase, name in PHASES.items() for i, suffix in enumerate(("_sum", "_count"))}
    totals: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            if sample.name in fields:
                phase, i = fields[sample.name]
                totals.setdefault(phase, [0.0, 0.0])[i] += sample.value
    return {phase: (total[0], total[1]) for phase, total in totals.items()}


def phase_means(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> str | None:
    """Each phase's mean over the sequences that finished between the two readings."""
    means = []
    for phase in PHASES:
        if phase in after:
            seconds, count = (a - b for a, b in zip(after[phase], before.get(phase, (0.0, 0.0))))
            if count:
                means.append(f"{phase} {seconds / count * 1e3:.1f} ms")
    return "  ".join(means) or None


def percentiles(values: list[float]) -> str:
    if not values:
        return "-"
    qs = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else [values[0]] * 99
    return f"p50 {qs[49] * 1e3:8.1f} ms  p90 {qs[89] * 1e3:8.1f} ms  p99 {qs[98] * 1e3:8.1f} ms"


def shard_concurrency(concurrency: int, clients: int, shard: int) -> int:
    """Client process ``shard``'s share of ``concurrency`` streams over ``clients`` processes."""
    return concurrency // clients + (shard < concurrency % clients)


async def timed(args: argparse.Namespace, client: httpx.AsyncClient, model: str, prompts: list,
                concurrency: int) -> dict:
    """``prompts``' requests, ``concurrency`` at once: their results, and this process's wall-clock
    start and end and CPU seconds."""
    gate = asyncio.Semaphore(concurrency)

    async def bounded(prompt: str | list[int]) -> Result:
        async with gate:
            return await one_request(client, args.url, model, prompt, args.max_tokens, args.n, args.temperature, args.regex)

    start, cpu_start = time.time(), time.process_time()
    results = await asyncio.gather(*(bounded(p) for p in prompts))
    return {"results": [asdict(r) for r in results], "start": start, "end": time.time(), "cpu": time.process_time() - cpu_start}


async def in_processes(args: argparse.Namespace) -> list[dict]:
    """The timed requests from ``args.clients`` processes of this script (``--shard``), started
    together once each is set up; what each reported (JSON on its stdout)."""
    argv = [sys.executable, __file__, *sys.argv[1:]]
    procs = [await asyncio.create_subprocess_exec(*argv, "--shard", str(i), stdin=asyncio.subprocess.PIPE,
                                                  stdout=asyncio.subprocess.PIPE) for i in range(args.clients)]
    for proc in procs:
        if await proc.stdout.readline() != b"ready\n":
            raise RuntimeError(f"client process {proc.pid} did not get ready (exit code {await proc.wait()})")
    for proc in procs:
        proc.stdin.write(b"go\n")
        await proc.stdin.drain()
    return [json.loads((await proc.communicate())[0]) for proc in procs]


async def run(args: argparse.Namespace) -> None:
    # A connection per stream (httpx's default pool stops at 100 connections).
    limits = httpx.Limits(max_connections=max(args.concurrency, args.warmup))
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as client:
        model = (await client.get(f"{args.url}/v1/models")).json()["data"][0]["id"]
        rng = random.Random(0)
        words = ["thou", "art", "the", "king", "my", "lord", "love", "night", "sweet", "death", "fair", "heaven"]
        if args.token_prompts:   # token ids (3 on: past a checkpoint's special ones), e.g. for a random-weight model
            prompts = [[rng.randrange(3, args.token_prompts) for _ in range(args.prompt_words)] for _ in range(args.requests)]
        else:
            prompts = [" ".join(rng.choice(words) for _ in range(args.prompt_words)) for _ in range(args.requests)]
        if args.shard is not None:   # one of several client processes: its share, when told to start
            print("ready", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            print(json.dumps(await timed(args, client, model, prompts[args.shard::args.clients],
                                         shard_concurrency(args.concurrency, args.clients, args.shard))))
            return
        # Untimed warm-up: the first requests of a GPU worker compile its kernels.
        await asyncio.gather(*(one_request(client, args.url, model, p, args.max_tokens, args.n, args.temperature, args.regex)
                               for p in prompts[: args.warmup]))
        phases_before = await phase_totals(client, args.url)
        if args.clients > 1:
            reports = await in_processes(args)
        else:
            reports = [await timed(args, client, model, prompts, args.concurrency)]
        phases = phase_means(phases_before, await phase_totals(client, args.url))
    results = [Result(**r) for report in reports for r in report["results"]]
    elapsed = max(r["end"] for r in reports) - min(r["start"] for r in reports)
    busy = " / ".join(f"{r['cpu'] / (r['end'] - r['start']):.0%}" for r in reports)
    ok = [r for r in results if r.error is None]
    for r in results:
        if r.error:
            print("error:", r.error)
    tokens = sum(r.tokens for r in ok)
    print(f"requests {len(ok)}/{len(results)} ok, concurrency {args.concurrency}, max_tokens {args.max_tokens}, n {args.n}")
    print(f"throughput  {len(ok) / elapsed:8.2f} req/s  {tokens / elapsed:10.1f} output tok/s  ({elapsed:.1f} s; "
          f"client process{'es' if len(reports) > 1 else ''} busy {busy} of a core)")
    print(f"TTFT  {percentiles([r.ttft for r in ok])}")
    if args.n > 1:
        print(f"TTFT n {percentiles([r.ttft_all for r in ok])}")
    print(f"ITL   {percentiles([i for r in ok for i in r.itls])}")
    print(f"2nd   {percentiles([s for r in ok for s in r.seconds])}")
    stalls = sorted((max(r.itls) for r in ok if r.itls), reverse=True)
    print(f"stall {percentiles(stalls)}  (each request's longest gap; the longest {', '.join(f'{s * 1e3:.0f}' for s in stalls[:6])} ms)")
    print(f"E2E   {percentiles([r.e2e for r in ok])}")
    if phases is not None:
        print(f"server means: {phases}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--prompt-words", type=int, default=32)
    p.add_argument("--token-prompts", type=int, metavar="VOCAB", help="prompts of random token ids below VOCAB, not words")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--n", type=int, default=1, help="choices a request (the gateway's max_n caps it)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--regex", help="constrain every output to this regular expression (structured output); make it "
                                   "admit at least --max-tokens tokens, or requests end early")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--warmup", type=int, default=4, help="untimed requests sent first")
    p.add_argument("--clients", type=int, default=1, metavar="P",
                   help="send from P processes, each an even share of the requests and streams (one process's event "
                        "loop can be the bound: see the busy share it prints)")
    p.add_argument("--shard", type=int, default=None, help=argparse.SUPPRESS)   # one of --clients' processes
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
