"""Generated gRPC / protobuf modules of Baton's internal plane (see ``generate.py``)."""

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # the size limit of every message on the internal plane
# Client channels on the internal plane retry a refused connection within a second. gRPC's
# default backoff grows to two minutes, so a worker that came up (or back) after a few
# failed attempts stayed out of reach for seconds to minutes.
RECONNECT_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)
# Trailing metadata of a Prefill call that failed because its KV could not reach the decode
# worker: the gateway then blames (and avoids) that decode worker, not the prefill worker.
FAILED_PEER_KEY, FAILED_PEER_DECODE = "baton-failed-peer", "decode"
