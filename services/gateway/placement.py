"""Where one request runs: how much of its prompt each worker holds cached (one Redis round trip),
whether a decode worker computes the prompt itself (Dynamo's conditional disaggregation), and
which decode and prefill workers take it: beside a sibling where the request asks (``colocate``),
else by ``router``'s rules over the polled loads (``worker_pool``). Reads only: the backend
(``backend_grpc``) counts the request in flight where it places it."""

from __future__ import annotations

from baton.engine.hashing import block_extra, block_hashes
from baton.services.gateway.backend import BackendError, GenerationRequest
from baton.services.gateway.config import GatewayConfig
from baton.services.gateway.prefix_index import PrefixIndex
from baton.services.gateway.router import choose_decode, choose_prefill
from baton.services.gateway.worker_pool import Worker, WorkerPool


class Placement:
    """Placement decisions over ``pool``'s workers, with ``index`` (None: no Redis, no cached
    prefixes known) for the model of ``fingerprint``."""

    def __init__(self, config: GatewayConfig, pool: WorkerPool, index: PrefixIndex | None, fingerprint: str) -> None:
        self.config = config
        self.pool = pool
        self.index = index
        self.fingerprint = fingerprint

    def local_limit(self, request: GenerationRequest) -> int:
        """The most tokens past its cached prefix a decode worker computes itself for ``request``:
        ``max_local_prefill_length``, or the request's own ``local_prefill_limit`` where larger."""
        return max(self.config.max_local_prefill_length, request.local_prefill_limit)

    def local_prefill(self, request: GenerationRequest) -> bool:
        """Whether a decode worker may compute ``request``'s prompt itself (``local_decode``)."""
        return bool(self.local_limit(request) or self.config.max_prefill_queue_size)

    def local_decode(self, request: GenerationRequest, avoid: set[str], cached: dict[str, int]) -> Worker | None:
        """The decode worker that computes ``request``'s prompt itself (no prefill worker, no KV moved),
        by Dynamo's conditional disaggregation: the one routing picks, where the tokens it would compute
        (past the prefix its cache holds) are at most ``local_limit``, or where every healthy prefill
        worker has ``max_prefill_queue_size`` prompts or more (running and waiting), or none answers;
        None: a prefill worker computes them."""
        if not self.local_prefill(request):
            return None
        address = self.pick_decode(request, self.pool.healthy("decode", avoid, request.lora), cached)
        if address is None:
            return None
        limit = self.local_limit(request)
        short = limit and len(request.token_ids) - cached.get(address, 0) * self.config.block_size <= limit
        return self.pool.workers[address] if short or self._prefill_queues_full(avoid, request.lora) else None

    def _prefill_queues_full(self, avoid: set[str], lora: str | None) -> bool:
        cap = self.config.max_prefill_queue_size
        loads = self.pool.routing_loads()
        return bool(cap) and all(loads[a].queued >= cap for a in self.pool.healthy("prefill", avoid, lora))

    async def cached_prefixes(
        self, token_ids: list[int], avoid: set[str], lora: str | None = None, cache_salt: str | None = None,
        local: bool = False,
    ) -> dict[str, int]:
        """How many of ``token_ids``' leading blocks (computed under LoRA adapter ``lora``, salted with
        ``cache_salt``) each healthy worker holds, by address: one Redis round trip for both roles (none
        where neither has a choice to make; ``local``: a decode worker may compute the prompt itself)."""
        by_role = [self.pool.healthy(role, avoid, lora) for role in ("prefill", "decode")]
        num_blocks = len(token_ids) // self.config.block_size
        # A lone decode worker's cached prefix still decides where the prompt is computed.
        choices = max(map(len, by_role)) > 1 or (local and by_role[1])
        if self.index is None or not choices or num_blocks == 0:
            return {}
        by_id = {self.pool.workers[a].worker_id: a for healthy in by_role for a in healthy if self.pool.workers[a].worker_id}
        head = token_ids[: self.index.max_blocks * self.config.block_size]
        hashes = block_hashes(head, self.config.block_size, block_extra(self.fingerprint, lora, cache_salt))
        runs = await self.index.longest_prefixes(hashes, list(by_id))
        return {by_id[worker_id]: n for worker_id, n in runs.items()}

    def pick_decode(self, request: GenerationRequest, healthy: list[str], cached: dict[str, int]) -> str | None:
        """Beside a sibling where asked (``colocate``), else by load, room and cached prefix; see ``router``."""
        return _colocated(request.colocate, 1, healthy) or choose_decode(healthy, cached, self.pool.routing_loads())

    def choose_prefill(
        self, token_ids: list[int], avoid: set[str], cached: dict[str, int], colocate: tuple[str, ...] = (),
        lora: str | None = None,
    ) -> Worker:
        """Beside a sibling where asked (``colocate``), else by cached prefix against load; see ``router``."""
        num_blocks = len(token_ids) // self.config.block_size
        healthy = self.pool.healthy("prefill", avoid, lora)
        address = _colocated(colocate, 0, healthy) or choose_prefill(healthy, cached, self.pool.routing_loads(), num_blocks)
        if address is None:
            raise BackendError("no healthy prefill worker", 503)
        return self.pool.workers[address]


def _colocated(colocate: tuple[str, ...], role: int, healthy: list[str]) -> str | None:
    """The worker of ``role`` (0 prefill, 1 decode) that a request's ``colocate`` names, if healthy."""
    if len(colocate) == 2 and colocate[role] in healthy:
        return colocate[role]
    return None
