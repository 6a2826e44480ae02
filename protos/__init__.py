"""Generated gRPC / protobuf modules of Baton's internal plane (see ``generate.py``)."""

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # the size limit of every message on the internal plane
