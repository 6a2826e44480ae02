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


def keepalive_options(interval_s: float, timeout_s: float) -> tuple[tuple[str, int], ...]:
    """Client channel options: ping the peer every ``interval_s`` while a call is open, however
    idle, and fail the call when a ping goes unanswered for ``timeout_s``. A peer that vanished
    without closing its connection (its host down, the network cut, its process stopped) is
    then found in seconds, not at the call's deadline. Its server takes ``ACCEPT_PINGS``."""
    return (
        ("grpc.keepalive_time_ms", round(interval_s * 1000)),
        ("grpc.keepalive_timeout_ms", round(timeout_s * 1000)),
        # Any ping's: the keepalive waits while another ping (gRPC's bandwidth probe) is out.
        ("grpc.http2.ping_timeout_ms", round(timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.max_pings_without_data", 0),
    )


# Server options: answer a client's keepalive pings however often they come on an idle stream
# (gRPC's default counts more than one in five minutes without data as abuse and, after two,
# closes the connection).
ACCEPT_PINGS = (("grpc.http2.max_ping_strikes", 0),)

# Trailing metadata of a Prefill call that failed because its KV could not reach the decode
# worker: the gateway then blames (and avoids) that decode worker, not the prefill worker.
FAILED_PEER_KEY, FAILED_PEER_DECODE = "baton-failed-peer", "decode"
