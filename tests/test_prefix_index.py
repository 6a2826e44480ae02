"""The Redis prefix index end to end: a worker's IndexPublisher writes, the
gateway's PrefixIndex reads, against a real redis-server on a free port."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import pytest
import redis.asyncio as aioredis

from baton.engine.block_manager import BlockRemoved, BlockStored
from baton.engine.hashing import block_extra, block_hashes
from baton.services.gateway.backend import EmbedRequest
from baton.services.gateway.backend_grpc import GrpcBackend
from baton.services.gateway.metrics import REDIS_ERRORS
from baton.services.gateway.prefix_index import PrefixIndex
from baton.services.index_publisher import IndexPublisher
from baton.services.launcher import free_port
from baton.services.redis_keys import WorkerRecord, block_key, lora_key, worker_key
from polling import until
from test_backend_grpc import FakeDecode, FakePrefill, collect, config, request, serve

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server"),
]

FP = "0123456789abcdef"


def start_redis(port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.02)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def stop_redis(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def redis_url() -> Iterator[str]:
    port = free_port()
    proc = start_redis(port)
    yield f"redis://127.0.0.1:{port}/0"
    stop_redis(proc)


def record(worker_id: str, role: str = "prefill", fingerprint: str = FP, block_size: int = 16) -> WorkerRecord:
    return WorkerRecord(worker_id, role, f"10.0.0.{len(worker_id)}:5005{len(worker_id)}", fingerprint, block_size)


def random_hashes(n: int) -> list[int]:
    return [random.getrandbits(64) for _ in range(n)]


class CountingConnection(aioredis.Connection):
    """Counts writes to the socket: one per round trip once connected."""

    writes = 0

    async def _send_packed_command(self, command) -> None:
        type(self).writes += 1
        await super()._send_packed_command(command)


async def test_publish_then_longest_prefixes_in_one_round_trip(redis_url: str) -> None:
    hashes = random_hashes(12)
    pub_a = IndexPublisher(redis_url, record("a"))
    pub_b = IndexPublisher(redis_url, record("bb"))
    await pub_a.start()
    await pub_b.start()
    pub_a.publish([BlockStored(hashes[:8])])
    pub_b.publish([BlockStored(hashes[:3]), BlockStored(hashes[4:10])])   # a gap at block 3
    pub_a.publish([BlockRemoved([hashes[6]])])                            # a holds 0..5, 7
    assert await pub_a.flush() and await pub_b.flush()

    pool = aioredis.ConnectionPool.from_url(redis_url, connection_class=CountingConnection)
    client = aioredis.Redis(connection_pool=pool)
    await client.ping()                                   # connect outside the count
    index = PrefixIndex(client, FP, block_size=16)
    before = CountingConnection.writes
    runs = await index.longest_prefixes(hashes, ["a", "bb", "ccc"])
    assert CountingConnection.writes - before == 1
    assert runs == {"a": 6, "bb": 3, "ccc": 0}

    capped = PrefixIndex(client, FP, max_blocks=2)
    assert await capped.longest_prefixes(hashes, ["a", "bb"]) == {"a": 2, "bb": 2}
    other_model = PrefixIndex(client, "f" * 16)
    assert await other_model.longest_prefixes(hashes, ["a"]) == {"a": 0}

    await pub_a.stop()
    assert await index.longest_prefixes(hashes, ["a", "bb"]) == {"a": 0, "bb": 3}
    assert await client.exists(worker_key("a")) == 0
    assert await client.smembers(block_key(FP, hashes[0])) == {b"bb"}
    await pub_b.stop()
    await index.close()


async def test_registry_lists_matching_workers_only(redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    good = [record("p1"), record("d1", role="decode")]
    bad = [record("x1", fingerprint="f" * 16), record("x2", block_size=32)]
    publishers = [IndexPublisher(redis_url, r) for r in good + bad]
    for pub in publishers:
        await pub.start()
    raw = aioredis.Redis.from_url(redis_url)
    await raw.set(worker_key("junk"), b"{not json")
    index = PrefixIndex(redis_url, FP, block_size=16)
    with caplog.at_level(logging.WARNING):
        first = await index.live_workers()
        second = await index.live_workers()
    by_id = lambda r: r.worker_id  # noqa: E731
    assert sorted(first, key=by_id) == sorted(good, key=by_id)
    assert sorted(second, key=by_id) == sorted(good, key=by_id)
    skipped = [rec.getMessage() for rec in caplog.records if "skipping registered worker" in rec.getMessage()]
    assert len(skipped) == 3                                  # once each, not once per refresh
    assert any("block size 32" in m for m in skipped) and any("fingerprint" in m for m in skipped)
    for pub in publishers:
        await pub.stop()
    assert await index.live_workers() == []
    await raw.aclose()
    await index.close()


HEARTBEAT_TTL_S = 1.0

_WORKER_SCRIPT = f"""
import asyncio, sys
from baton.services.index_publisher import IndexPublisher
from baton.services.redis_keys import WorkerRecord

async def main():
    pub = IndexPublisher(sys.argv[1], WorkerRecord("doomed", "prefill", "127.0.0.1:1", sys.argv[2], 16), {HEARTBEAT_TTL_S})
    await pub.start()
    print("up", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def live_ids(index: PrefixIndex) -> list[str]:
    return [r.worker_id for r in await index.live_workers()]


async def test_heartbeat_keeps_a_worker_alive_and_expiry_removes_it(redis_url: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _WORKER_SCRIPT, redis_url, FP], stdout=subprocess.PIPE, text=True)
    index = PrefixIndex(redis_url, FP, block_size=16)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
        watch_until = time.monotonic() + 2.5 * HEARTBEAT_TTL_S        # only heartbeats keep it that long
        while time.monotonic() < watch_until:
            assert await live_ids(index) == ["doomed"]
            await asyncio.sleep(0.1)
        proc.kill()                                                   # no deregistration
        proc.wait()
        killed = time.monotonic()
        while await live_ids(index) and time.monotonic() < killed + HEARTBEAT_TTL_S + 5.0:
            await asyncio.sleep(0.05)
        assert await live_ids(index) == []
    finally:
        await index.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_redis_down_gives_load_only_answers_and_counts_errors(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    index = PrefixIndex(url, FP, retry_after_s=0.0)
    errors_before = REDIS_ERRORS._value.get()
    with caplog.at_level(logging.WARNING):
        started = time.monotonic()
        assert await index.longest_prefixes([1, 2, 3], ["a", "b"]) == {"a": 0, "b": 0}
        assert await index.longest_prefixes([1, 2, 3], ["a"]) == {"a": 0}
        assert await index.live_workers() == []
        assert time.monotonic() - started < 2.0
    assert REDIS_ERRORS._value.get() - errors_before == 3
    outage_lines = [r for r in caplog.records if "Redis unavailable" in r.getMessage()]
    assert len(outage_lines) == 1

    backoff = PrefixIndex(url, FP, retry_after_s=30.0)
    errors_before = REDIS_ERRORS._value.get()
    for _ in range(5):
        assert await backoff.longest_prefixes([1], ["a"]) == {"a": 0}
    assert REDIS_ERRORS._value.get() - errors_before == 1       # later calls skip Redis

    # The worker side keeps going, then catches up once Redis is there.
    hashes = random_hashes(4)
    pub = IndexPublisher(url, record("w"), 5.0, timeout_s=0.2)
    await pub.start()                                            # does not raise
    pub.publish([BlockStored(hashes), BlockRemoved(hashes[3:])])
    assert await pub.flush() is False
    proc = start_redis(port)
    try:
        assert await pub.flush() is True
        reader = PrefixIndex(url, FP)
        assert await reader.longest_prefixes(hashes, ["w"]) == {"w": 3}
        with caplog.at_level(logging.INFO):
            assert await index.longest_prefixes(hashes, ["w"]) == {"w": 3}   # the index in outage recovers
        back = [r for r in caplog.records if r.getMessage() == "Redis is back (gateway prefix index)"]
        assert len(back) == 1
        assert await reader.live_workers() == [record("w")]     # the heartbeat re-registered
        await pub.stop()
        await reader.close()
    finally:
        stop_redis(proc)
    await index.close()
    await backoff.close()


@dataclass
class Lookalike:
    block_hashes: list[int]


def test_unknown_event_kind_is_refused() -> None:
    pub = IndexPublisher("redis://127.0.0.1:1/0", record("w"))
    with pytest.raises(TypeError, match="BlockStored or BlockRemoved, got Lookalike"):
        pub.publish([Lookalike([1, 2])])            # the right shape is not enough


@contextlib.asynccontextmanager
async def registered_cluster(redis_url: str, workers: list[tuple[str, str, object]]):
    """Fake workers ``(name, role, servicer)`` served on loopback and registered in Redis, and
    a gateway backend that found them; yields the publishers by name and the backend. A
    publisher the test pops from that dict is the test's to stop."""
    started = [await serve(servicer) for _, _, servicer in workers]
    publishers = {name: IndexPublisher(redis_url, WorkerRecord(name, role, addr, FP, 16))
                  for (name, role, _), (_, addr) in zip(workers, started)}
    for pub in publishers.values():
        await pub.start()
    backend = GrpcBackend(config([], [], redis_url=redis_url), fingerprint=FP)
    await backend.start()
    try:
        roles = [role for _, role, _ in workers]
        assert await backend.reachable() == {"prefill": roles.count("prefill"), "decode": roles.count("decode")}
        yield publishers, backend
    finally:
        await backend.close()
        for pub in publishers.values():
            await pub.stop()
        for server, _ in started:
            await server.stop(None)


async def test_gateway_discovers_registered_workers_and_routes_by_cached_prefix(redis_url: str) -> None:
    prefills, decode = [FakePrefill("p0"), FakePrefill("p1")], FakeDecode("d0")
    workers = [("p0", "prefill", prefills[0]), ("p1", "prefill", prefills[1]), ("d0", "decode", decode)]
    async with registered_cluster(redis_url, workers) as (publishers, backend):
        prompt = [random.randrange(1000) for _ in range(70)]
        hashes = block_hashes(prompt, 16, FP)
        for warm, cold in ((0, 1), (1, 0)):          # the whole prompt cached on one, then the other
            publishers[f"p{warm}"].publish([BlockStored(hashes)])
            publishers[f"p{cold}"].publish([BlockRemoved(hashes)])
            assert await publishers[f"p{warm}"].flush() and await publishers[f"p{cold}"].flush()
            for _ in range(3):
                await collect(backend.generate(request(prompt, max_tokens=1)))
            assert len(prefills[warm].requests) == 3 and prefills[cold].requests == []
            prefills[warm].requests.clear()
        await publishers.pop("d0").stop()             # the decode worker leaves the registry
        deadline = time.monotonic() + 5
        while (await backend.reachable())["decode"] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert await backend.reachable() == {"prefill": 2, "decode": 0}


async def test_a_lora_request_is_routed_by_the_blocks_computed_under_its_adapter(redis_url: str) -> None:
    """p0 holds the prompt's blocks computed under adapter "one" (hashed with its extra, as the
    workers hash them), p1 the base model's: each request goes where its own blocks are."""
    prefills, decode = [FakePrefill("p0"), FakePrefill("p1")], FakeDecode("d0", loras=frozenset({"one"}))
    workers = [("p0", "prefill", prefills[0]), ("p1", "prefill", prefills[1]), ("d0", "decode", decode)]
    async with registered_cluster(redis_url, workers) as (publishers, backend):
        prompt = [random.randrange(1000) for _ in range(70)]
        publishers["p0"].publish([BlockStored(block_hashes(prompt, 16, block_extra(FP, "one")))])
        publishers["p1"].publish([BlockStored(block_hashes(prompt, 16, FP))])
        assert await publishers["p0"].flush() and await publishers["p1"].flush()
        for _ in range(2):
            await collect(backend.generate(replace(request(prompt, max_tokens=1), lora="one")))
            await collect(backend.generate(request(prompt, max_tokens=1)))
        assert [r.lora for r in prefills[0].requests] == ["one"] * 2
        assert [r.lora for r in prefills[1].requests] == [""] * 2


async def test_runtime_lora_adapters_are_recorded_per_model_and_read_back(redis_url: str) -> None:
    index, other_model = PrefixIndex(redis_url, FP), PrefixIndex(redis_url, "f" * 16)
    assert await index.runtime_loras() == {}
    assert await index.put_lora("sql", "/a/sql", "d1") and await index.put_lora("poem", "/a/poem", "d2")
    assert await index.runtime_loras() == {"sql": ("/a/sql", "d1"), "poem": ("/a/poem", "d2")}
    assert await other_model.runtime_loras() == {}
    client = aioredis.Redis.from_url(redis_url)
    await client.hset(lora_key(FP), "broken", "{not json")
    assert await index.delete_lora("sql")
    assert await index.runtime_loras() == {"poem": ("/a/poem", "d2")}        # the unreadable entry skipped
    assert await index.delete_lora("poem", ("/a/poem", "d1"))   # answered; it records another load of the name
    assert await index.runtime_loras() == {"poem": ("/a/poem", "d2")}
    assert await index.delete_lora("poem", ("/a/poem", "d2"))
    assert await index.runtime_loras() == {}
    await client.aclose()
    await index.close()
    await other_model.close()
    down = PrefixIndex(f"redis://127.0.0.1:{free_port()}/0", FP, retry_after_s=0.0)
    assert await down.runtime_loras() is None and not await down.put_lora("sql", "/a", "d") and not await down.delete_lora("sql")
    await down.close()


async def test_gateways_share_the_lora_adapters_loaded_at_runtime(redis_url: str) -> None:
    """An adapter loaded through one gateway is served by another (started before or after) within
    a registry refresh, on the workers that hold it; unloaded through one, it is gone from the other;
    a gateway started after it was loaded serves it from the start."""
    prefill, decode = FakePrefill("p0"), FakeDecode("d0")
    async with registered_cluster(redis_url, [("p0", "prefill", prefill), ("d0", "decode", decode)]) as (_, first):
        second = GrpcBackend(config([], [], redis_url=redis_url), fingerprint=FP)
        await second.start()
        await first.load_lora("sql", "/a/sql")
        await until(lambda: "sql" in second.runtime_loras())
        await asyncio.sleep(0.5)                      # the polls after it send it to the workers (already there)
        req = replace(request(max_tokens=2), lora="sql")
        await collect(second.generate(req))
        assert decode.reserved[req.request_id][0].lora == "sql"
        late = GrpcBackend(config([], [], redis_url=redis_url), fingerprint=FP)
        await late.start()
        assert late.runtime_loras() == {"sql": "/a/sql"}
        await second.unload_lora("sql")
        assert "sql" not in decode.loras
        await until(lambda: "sql" not in first.runtime_loras() and "sql" not in late.runtime_loras())
        for backend in (second, late):
            await backend.close()


async def test_lora_loads_and_unloads_redis_missed_reach_the_other_gateways_once_it_answers(redis_url: str) -> None:
    """Redis paused (every command waits, so the gateway's time out) while one gateway unloads an
    adapter the other serves and loads another: once Redis answers again, both changes reach it
    and the other gateway follows."""
    prefill, decode = FakePrefill("p0"), FakeDecode("d0")
    async with registered_cluster(redis_url, [("p0", "prefill", prefill), ("d0", "decode", decode)]) as (_, first):
        second = GrpcBackend(config([], [], redis_url=redis_url), fingerprint=FP)
        await second.start()
        try:
            await first.load_lora("old", "/a/old")
            await until(lambda: "old" in second.runtime_loras())
            client = aioredis.Redis.from_url(redis_url)
            await client.execute_command("CLIENT", "PAUSE", 2000, "ALL")
            await first.unload_lora("old")
            await first.load_lora("sql", "/a/sql")
            await asyncio.sleep(0.5)
            assert second.runtime_loras() == {"old": "/a/old"}       # Redis is still paused
            await until(lambda: second.runtime_loras() == {"sql": "/a/sql"}, timeout_s=10)
            assert await client.hkeys(lora_key(FP)) == [b"sql"]
            assert first.runtime_loras() == {"sql": "/a/sql"}
            await client.aclose()
        finally:
            await second.close()


async def test_a_salted_request_is_routed_by_the_blocks_cached_under_its_salt(redis_url: str) -> None:
    """p0 holds the prompt's blocks salted with "tenant-a" (hashed with its extra, as the workers
    hash them), p1 the unsalted ones: each request, and each embedding, goes where its own blocks
    are; one under another salt finds none and goes by load alone."""
    prefills, decode = [FakePrefill("p0"), FakePrefill("p1")], FakeDecode("d0")
    workers = [("p0", "prefill", prefills[0]), ("p1", "prefill", prefills[1]), ("d0", "decode", decode)]
    async with registered_cluster(redis_url, workers) as (publishers, backend):
        prompt = [random.randrange(1000) for _ in range(70)]
        publishers["p0"].publish([BlockStored(block_hashes(prompt, 16, block_extra(FP, None, "tenant-a")))])
        publishers["p1"].publish([BlockStored(block_hashes(prompt, 16, FP))])
        assert await publishers["p0"].flush() and await publishers["p1"].flush()
        for i in range(2):
            await collect(backend.generate(replace(request(prompt, max_tokens=1), cache_salt="tenant-a")))
            await collect(backend.generate(request(prompt, max_tokens=1)))
            await backend.embed(EmbedRequest(f"e{i}", prompt, cache_salt="tenant-a"))
        assert [r.cache_salt for r in prefills[0].requests] == ["tenant-a"] * 4
        assert [r.cache_salt for r in prefills[1].requests] == [""] * 2
        assert set((await backend._place.cached_prefixes(prompt, set(), cache_salt="tenant-a")).values()) == {0, 4}
        assert set((await backend._place.cached_prefixes(prompt, set(), cache_salt="tenant-b")).values()) == {0}


async def test_gateway_reserves_on_the_decode_worker_holding_the_prompt(redis_url: str) -> None:
    # d0 has a little more free room, but d1 holds the prompt's 4 full blocks: 100 + 4 > 102.
    decodes = [FakeDecode("d0", free_blocks=102), FakeDecode("d1", free_blocks=100)]
    workers = [("p0", "prefill", FakePrefill("p0")), ("d0", "decode", decodes[0]), ("d1", "decode", decodes[1])]
    async with registered_cluster(redis_url, workers) as (publishers, backend):
        prompt = [random.randrange(1000) for _ in range(70)]
        publishers["d1"].publish([BlockStored(block_hashes(prompt, 16, FP))])
        assert await publishers["d1"].flush()
        await collect(backend.generate(request(prompt, max_tokens=1)))
        assert [len(d.reserved) for d in decodes] == [0, 1]
        await collect(backend.generate(request([7] * 70, max_tokens=1)))   # held nowhere: the roomier one
        assert [len(d.reserved) for d in decodes] == [1, 1]


async def test_gateway_serves_with_redis_down() -> None:
    prefills, decode = [FakePrefill("p0"), FakePrefill("p1")], FakeDecode("d0")
    started = [await serve(p) for p in prefills] + [await serve(decode)]
    addrs = [addr for _, addr in started]
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    backend = GrpcBackend(config(addrs[:2], addrs[2:], redis_url=dead_redis), fingerprint=FP)
    errors_before = REDIS_ERRORS._value.get()
    try:
        await backend.start()                          # the registry read fails: static workers only
        assert await backend.reachable() == {"prefill": 2, "decode": 1}
        chunks = await collect(backend.generate(request([random.randrange(1000) for _ in range(40)], max_tokens=2)))
        assert [c.finish_reason for c in chunks] == [None, "length"]
        assert REDIS_ERRORS._value.get() - errors_before >= 1
    finally:
        await backend.close()
        for server, _ in started:
            await server.stop(None)


async def test_gateways_share_stored_responses_through_redis() -> None:
    """With Redis, a response one gateway stored is read, gone on from and deleted through
    another (a load balancer's next pick), and expires; while Redis does not answer, going on
    from one is a 503 and a new response is answered, unstored, and says so."""
    import openai

    from baton.services.gateway.app import create_app
    from baton.services.gateway.tokenizer import GatewayTokenizer
    from test_gateway_api import DEMO_MODEL, MODEL, FakeBackend, client_for, make_config

    tok = GatewayTokenizer(DEMO_MODEL)
    port = free_port()
    proc = start_redis(port)
    try:
        config = make_config(redis_url=f"redis://127.0.0.1:{port}/0", responses_store_ttl_s=120)
        backends = [FakeBackend(tok), FakeBackend(tok)]
        apps = [create_app(config, backend, tok) for backend in backends]
        one, two = (openai.AsyncOpenAI(base_url="http://gateway/v1", api_key="unused", http_client=client_for(app),
                                       max_retries=0) for app in apps)
        first = await one.responses.create(model=MODEL, input="Speak.", max_output_tokens=6)
        assert (await two.responses.retrieve(first.id)).model_dump() == first.model_dump()
        second = await two.responses.create(model=MODEL, input="Again.", previous_response_id=first.id, max_output_tokens=6)
        assert backends[1].requests[0].prompt_token_ids == tok.encode_chat(
            [{"role": "user", "content": "Speak."}, {"role": "assistant", "content": first.output_text},
             {"role": "user", "content": "Again."}], add_generation_prompt=True)
        r = aioredis.Redis.from_url(config.redis_url)
        assert 0 < await r.ttl(f"baton:response:{second.id}") <= 120
        await r.aclose()
        async with client_for(apps[0]) as raw:
            assert (await raw.delete(f"/v1/responses/{second.id}")).json()["deleted"]
        with pytest.raises(openai.NotFoundError):
            await two.responses.retrieve(second.id)
    finally:
        stop_redis(proc)
    with pytest.raises(openai.APIStatusError) as down:
        await one.responses.create(model=MODEL, input="More.", previous_response_id=first.id, max_output_tokens=6)
    assert down.value.status_code == 503 and "Redis does not answer" in down.value.message
    unstored = await one.responses.create(model=MODEL, input="Speak.", max_output_tokens=6)
    streamed = [e async for e in await one.responses.create(model=MODEL, input="Speak.", max_output_tokens=6, stream=True)]
    assert unstored.output_text and not unstored.store and len(backends[0].requests) == 3
    assert streamed[-1].type == "response.incomplete" and not streamed[-1].response.store   # cut at 6 tokens
