from baton.protos import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TransferTicket(_message.Message):
    __slots__ = ("request_id", "transport", "address", "block_ids", "layout", "num_tokens", "cached_blocks")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    transport: str
    address: str
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    layout: _common_pb2.KVLayout
    num_tokens: int
    cached_blocks: int
    def __init__(self, request_id: _Optional[str] = ..., transport: _Optional[str] = ..., address: _Optional[str] = ..., block_ids: _Optional[_Iterable[int]] = ..., layout: _Optional[_Union[_common_pb2.KVLayout, _Mapping]] = ..., num_tokens: _Optional[int] = ..., cached_blocks: _Optional[int] = ...) -> None: ...

class KVChunk(_message.Message):
    __slots__ = ("request_id", "layout", "layer", "first_block", "num_blocks", "data", "last", "data_bytes")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    FIRST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    DATA_BYTES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    layout: _common_pb2.KVLayout
    layer: int
    first_block: int
    num_blocks: int
    data: bytes
    last: bool
    data_bytes: int
    def __init__(self, request_id: _Optional[str] = ..., layout: _Optional[_Union[_common_pb2.KVLayout, _Mapping]] = ..., layer: _Optional[int] = ..., first_block: _Optional[int] = ..., num_blocks: _Optional[int] = ..., data: _Optional[bytes] = ..., last: _Optional[bool] = ..., data_bytes: _Optional[int] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("bytes_received",)
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    bytes_received: int
    def __init__(self, bytes_received: _Optional[int] = ...) -> None: ...

class KVAck(_message.Message):
    __slots__ = ("ok", "code", "error", "bytes_received", "request_id")
    OK_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    code: str
    error: str
    bytes_received: int
    request_id: str
    def __init__(self, ok: _Optional[bool] = ..., code: _Optional[str] = ..., error: _Optional[str] = ..., bytes_received: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class PairRequest(_message.Message):
    __slots__ = ("chunk", "abort")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    chunk: KVChunk
    abort: str
    def __init__(self, chunk: _Optional[_Union[KVChunk, _Mapping]] = ..., abort: _Optional[str] = ...) -> None: ...

class PairReply(_message.Message):
    __slots__ = ("group", "ack", "broken")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    BROKEN_FIELD_NUMBER: _ClassVar[int]
    group: PairGroup
    ack: KVAck
    broken: KVAck
    def __init__(self, group: _Optional[_Union[PairGroup, _Mapping]] = ..., ack: _Optional[_Union[KVAck, _Mapping]] = ..., broken: _Optional[_Union[KVAck, _Mapping]] = ...) -> None: ...

class PairGroup(_message.Message):
    __slots__ = ("backend", "store_port", "prefix")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    STORE_PORT_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    backend: str
    store_port: int
    prefix: str
    def __init__(self, backend: _Optional[str] = ..., store_port: _Optional[int] = ..., prefix: _Optional[str] = ...) -> None: ...
