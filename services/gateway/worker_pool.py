"""The workers a gateway routes to, and what it knows of each: the static addresses and those
the Redis registry (``baton:worker:*``) lists, each with its gRPC stub, its polled load
(``GetLoad`` every ``load_poll_interval_s``; a worker is *down* until it answers), the
requests this gateway has in flight on it, its health, and the runtime LoRA adapters it holds
(``lora_registry`` syncs them as the polls find it answering). ``GrpcBackend`` routes over it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field, replace

import grpc

from baton.protos import (
    MAX_MESSAGE_BYTES, RECONNECT_OPTIONS, common_pb2, decode_pb2_grpc, keepalive_options, prefill_pb2_grpc,
)
from baton.services.gateway.config import GatewayConfig
from baton.services.gateway.lora_fanout import SyncBackoff
from baton.services.gateway.lora_registry import LoRARegistry
from baton.services.gateway.prefix_index import PrefixIndex
from baton.services.gateway.router import Health, Load

logger = logging.getLogger(__name__)

CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    *keepalive_options(interval_s=30.0, timeout_s=10.0),
    *RECONNECT_OPTIONS,
)
DISCOVERY_INTERVAL_S = 1.0

Stub = prefill_pb2_grpc.PrefillStub | decode_pb2_grpc.DecodeStub


@dataclass
class Worker:
    address: str
    role: str                 # "prefill" | "decode"
    stub: Stub
    static: bool              # from the config (never dropped) or the registry
    worker_id: str = ""       # the registry's id, else learned from GetLoad
    answering: bool | None = None   # its last GetLoad answered (None: not polled yet)
    loras: set[str] = field(default_factory=set)   # the runtime LoRA adapters it is known to hold
    lora_error: str | None = None   # why the last sync of those left some out
    lora_backoff: SyncBackoff = field(default_factory=SyncBackoff)   # when to send it those again

    def may_have_lost_loras(self) -> None:
        """It may have restarted without the runtime adapters: the next sync sends them all, at once."""
        self.loras.clear()
        self.lora_backoff.clear()


class WorkerPool:
    """``config``'s static workers, and with ``index`` those the registry lists; ``loras``: the
    runtime LoRA adapters to keep them in sync with."""

    def __init__(self, config: GatewayConfig, index: PrefixIndex | None, loras: LoRARegistry) -> None:
        self.config, self.index, self.loras = config, index, loras
        self.workers: dict[str, Worker] = {}
        self.loads: dict[str, Load] = {}
        self.in_flight: Counter[str] = Counter()            # the requests this gateway runs on each
        self._in_flight_at_poll: Counter[str] = Counter()   # as it was when the worker's last load was asked for
        self.health = Health()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._task: asyncio.Task[None] | None = None
        for role, addrs in (("prefill", config.prefill_addrs), ("decode", config.decode_addrs)):
            for address in addrs:
                self.add(address, role, static=True)

    def answering(self) -> list[Worker]:
        """The workers whose last ``GetLoad`` answered."""
        return [w for w in self.workers.values() if w.answering]

    async def start(self) -> None:
        """A first round (the registry read), then the background polling (``run``)."""
        await self.refresh(discover=True)
        self._task = asyncio.create_task(self.run(), name="worker-pool-poll")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await asyncio.gather(*(channel.close() for channel in self._channels.values()))
        self._channels.clear()

    def add(self, address: str, role: str, *, static: bool, worker_id: str = "") -> None:
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        channel = self._channels[address]
        stub: Stub = prefill_pb2_grpc.PrefillStub(channel) if role == "prefill" else decode_pb2_grpc.DecodeStub(channel)
        self.workers[address] = Worker(address, role, stub, static, worker_id)
        self.health.mark_down(address)                    # until its first GetLoad answer

    def healthy(self, role: str, avoid: set[str], lora: str | None = None) -> list[str]:
        """The workers of ``role`` routing may use for a request under LoRA adapter ``lora``: up, not
        avoided, and holding ``lora`` where the gateway loaded it at runtime (a worker still without
        it serves the base model and the other adapters)."""
        runtime = lora in self.loras
        candidates = (a for a, w in self.workers.items()
                      if w.role == role and a not in avoid and (not runtime or lora in w.loras))
        return self.health.healthy(candidates, time.monotonic())

    def kv_cache_usage(self) -> dict[str, float]:
        """Each role's share of KV cache blocks that requests hold, over its answering workers' last
        polled loads (a role with none is left out)."""
        usage = {}
        for role in ("prefill", "decode"):
            loads = [self.loads[w.address] for w in self.answering() if w.role == role and w.address in self.loads]
            total = sum(load.total_blocks for load in loads)
            if total:
                usage[role] = sum(load.used_blocks for load in loads) / total
        return usage

    def routing_loads(self) -> dict[str, Load]:
        """The polled loads, with the requests this gateway started or ended on each worker
        since its poll was sent: a burst must not follow a figure some requests ago."""
        loads = {}
        for address in self.workers:
            load = self.loads.get(address, Load())
            since = self.in_flight[address] - self._in_flight_at_poll[address]
            loads[address] = replace(load, running=max(load.running + since, 0), in_flight=self.in_flight[address])
        return loads

    async def run(self) -> None:
        """Poll every worker's load each ``load_poll_interval_s``, and about once a second read the registry."""
        next_discovery = time.monotonic() + DISCOVERY_INTERVAL_S
        while True:
            await asyncio.sleep(self.config.load_poll_interval_s)
            discover = time.monotonic() >= next_discovery
            if discover:
                next_discovery = time.monotonic() + DISCOVERY_INTERVAL_S
            try:
                await self.refresh(discover)
            except Exception:       # the loop must outlive any one bad round
                logger.exception("worker discovery / load polling round failed")

    async def refresh(self, discover: bool) -> None:
        """One round: with ``discover``, the registry (workers, runtime LoRA adapters) first; then every worker's load."""
        if discover and self.index is not None:
            await self._discover(self.index)
            await self.loras.refresh(self.workers.values())
        await asyncio.gather(*(self._poll(w) for w in list(self.workers.values())))

    async def _discover(self, index: PrefixIndex) -> None:
        records = await index.live_workers()
        for record in records:
            known = self.workers.get(record.address)
            if known is None:
                logger.info("discovered %s worker %s at %s", record.role, record.worker_id, record.address)
                self.add(record.address, record.role, static=False, worker_id=record.worker_id)
            elif known.role == record.role:
                self._identify(known, record.worker_id)
        live = {record.address for record in records}
        for address, worker in list(self.workers.items()):
            if not worker.static and address not in live:
                logger.info("%s worker %s at %s left the registry", worker.role, worker.worker_id, address)
                del self.workers[address]
                self.loads.pop(address, None)
                self.health.forget(address)

    @staticmethod
    def _identify(worker: Worker, worker_id: str) -> None:
        """Record ``worker``'s id; another id than before is a restarted process, without the
        runtime LoRA adapters."""
        if worker.worker_id and worker_id and worker_id != worker.worker_id:
            logger.info("%s worker %s restarted as %s", worker.role, worker.address, worker_id)
            worker.may_have_lost_loras()
        worker.worker_id = worker_id or worker.worker_id

    async def _poll(self, worker: Worker) -> None:
        address = worker.address
        # Requests started while the poll is on its way may be missing from the answer: they
        # count as started since (the load errs high, never low, for that round trip).
        in_flight = self.in_flight[address]
        try:
            load = await worker.stub.GetLoad(common_pb2.LoadRequest(), timeout=self.config.control_timeout_s)
        except grpc.aio.AioRpcError as err:
            if worker.answering is not False:
                logger.warning("%s worker %s is not answering: %s", worker.role, address, err.code().name)
            worker.answering = False
            worker.may_have_lost_loras()
            self.health.mark_down(address)
            return
        if worker.answering is False:
            logger.info("%s worker %s answers again", worker.role, address)
        self._identify(worker, load.worker_id)
        await self.loras.sync(worker)
        worker.answering = True
        self.health.mark_up(address)
        self.loads[address] = Load(load.running, load.waiting, load.free_blocks, load.total_blocks,
                                   used_blocks=load.used_blocks)
        self._in_flight_at_poll[address] = in_flight
