"""Generated gRPC / protobuf modules of Baton's internal plane (see ``generate.py``)."""

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # the size limit of every message on the internal plane
# Trailing metadata of a Prefill call that failed because its KV could not reach the decode
# worker: the gateway then blames (and avoids) that decode worker, not the prefill worker.
FAILED_PEER_KEY, FAILED_PEER_DECODE = "baton-failed-peer", "decode"
