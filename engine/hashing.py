"""Block hashes and the model fingerprint: the keys of the prefix cache.

Pure Python (xxhash + hashlib), no torch: the gateway imports this module to
hash prompts the same way the workers do. Other implementations must follow the
byte encodings below exactly; ``tests/test_hashing.py`` holds golden vectors.

``hash_block(parent, token_ids, extra)`` is xxh3-64 (seed 0) over::

    parent   : 1 byte flag (0x00 = no parent, 0x01 = parent follows)
               + 8 bytes parent hash, unsigned little endian (only when the flag is 1)
    tokens   : 4 bytes count, unsigned LE, then each token id as int32 LE
    extra    : 4 bytes byte-length, unsigned LE, then ``extra`` encoded as UTF-8

The length prefixes keep the fields from aliasing one another. Blocks chain:
``h_0 = hash_block(None, block_0, extra)``, ``h_i = hash_block(h_{i-1}, block_i, extra)``;
only full blocks are hashed.

``block_extra(fingerprint, lora, cache_salt)`` is the ``extra`` of a sequence's blocks: the
model fingerprint, then ``f"+salt:{n}:{cache_salt}"`` for a request's cache salt (vLLM's
``cache_salt``; ``n`` its length in UTF-8 bytes, in decimal), then ``f"+lora:{lora}"`` under
LoRA adapter ``lora`` (its name). Each part is left out where it is None, so an unsalted
base-model block's ``extra`` is the fingerprint alone. The salt's length prefix ends it, and
the adapter's name runs to the end: no salt can pass for an adapter or for another salt, and
blocks computed under different adapters or salts never share a hash.

``model_fingerprint(model_dir)`` is the BLAKE2b digest (8 bytes, no key) of
``config.json`` re-serialized canonically (``json.dumps(config, sort_keys=True,
separators=(",", ":"), ensure_ascii=True)`` encoded as UTF-8), as 16 hex chars.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence
from pathlib import Path

import xxhash

_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_U64_MAX = 2**64 - 1


def _encode(parent: int | None, token_ids: Sequence[int], extra: str) -> bytes:
    if parent is None:
        head = b"\x00"
    elif 0 <= parent <= _U64_MAX:
        head = b"\x01" + _U64.pack(parent)
    else:
        raise ValueError(f"parent hash must be an unsigned 64-bit int, got {parent}")
    for token in token_ids:
        if not _INT32_MIN <= token <= _INT32_MAX:
            raise ValueError(f"token id {token} does not fit in int32")
    tokens = _U32.pack(len(token_ids)) + struct.pack(f"<{len(token_ids)}i", *token_ids)
    extra_bytes = extra.encode("utf-8")
    return head + tokens + _U32.pack(len(extra_bytes)) + extra_bytes


def hash_block(parent: int | None, token_ids: Sequence[int], extra: str) -> int:
    """The 64-bit hash of one block given its parent's hash (None for the first)."""
    return xxhash.xxh3_64_intdigest(_encode(parent, token_ids, extra))


def block_extra(fingerprint: str, lora: str | None, cache_salt: str | None = None) -> str:
    """The ``extra`` of blocks computed under LoRA adapter ``lora`` (None: the base model) for a
    request salted with ``cache_salt`` (None: unsalted); see the module docs."""
    salt = "" if cache_salt is None else f"+salt:{len(cache_salt.encode('utf-8'))}:{cache_salt}"
    adapter = "" if lora is None else f"+lora:{lora}"
    return f"{fingerprint}{salt}{adapter}"


def block_hashes(token_ids: Sequence[int], block_size: int, extra: str, parent: int | None = None) -> list[int]:
    """Chained hashes of the full blocks of ``token_ids`` (a trailing partial block
    is not hashed). ``parent`` continues a chain whose earlier blocks are known."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    hashes: list[int] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size], extra)
        hashes.append(parent)
    return hashes


def model_fingerprint(model_dir: str | Path) -> str:
    """16 hex chars identifying a model by its ``config.json`` (see module docs)."""
    config_path = Path(model_dir) / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ValueError(f"no config.json in {model_dir}") from err
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.blake2b(canonical.encode("utf-8"), digest_size=8).hexdigest()
