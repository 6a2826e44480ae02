"""The Redis schema shared by workers (writers) and the gateway (reader).

- Worker registry: ``baton:worker:{worker_id}`` holds a ``WorkerRecord`` as JSON,
  written with a TTL and refreshed by the worker's heartbeat; an expired key
  means a dead worker.
- Prefix index: ``baton:blocks:{fingerprint}:{block_hash:016x}`` is a SET of the
  worker ids that hold that block in their prefix cache. Workers add on
  ``stored`` and remove on ``removed`` events, in pipelined batches.
- Runtime LoRA adapters: ``baton:loras:{fingerprint}`` is a HASH of the adapters
  loaded through a gateway's ``/v1/load_lora_adapter``, name to ``{"path", "digest"}``
  as JSON; gateways write it on a load or unload and adopt what others wrote.
- Stored Responses API answers: ``baton:response:{response_id}`` holds one as JSON, with a
  TTL (``services/gateway/response_store.py``).

The index is advisory: a stale entry costs a recomputation, never a wrong answer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
import json

WORKER_PREFIX = "baton:worker:"
BLOCKS_PREFIX = "baton:blocks:"
LORAS_PREFIX = "baton:loras:"
RESPONSE_PREFIX = "baton:response:"
DEFAULT_HEARTBEAT_TTL_S = 10.0


@dataclass(frozen=True)
class WorkerRecord:
    worker_id: str
    role: str            # "prefill" | "decode"
    address: str         # gRPC host:port
    fingerprint: str     # model fingerprint (baton.engine.hashing.model_fingerprint)
    block_size: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> "WorkerRecord":
        data = json.loads(raw)
        return cls(
            worker_id=str(data["worker_id"]),
            role=str(data["role"]),
            address=str(data["address"]),
            fingerprint=str(data["fingerprint"]),
            block_size=int(data["block_size"]),
        )


def worker_key(worker_id: str) -> str:
    return f"{WORKER_PREFIX}{worker_id}"


def block_key(fingerprint: str, block_hash: int) -> str:
    return f"{BLOCKS_PREFIX}{fingerprint}:{block_hash:016x}"


def lora_key(fingerprint: str) -> str:
    return f"{LORAS_PREFIX}{fingerprint}"


def response_key(response_id: str) -> str:
    return f"{RESPONSE_PREFIX}{response_id}"
