"""Block hashing and model fingerprint: golden vectors (shared with any other
implementation, e.g. the gateway's) and the chain properties."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys

import pytest
import xxhash

from baton.engine.hashing import block_extra, block_hashes, hash_block, model_fingerprint

pytestmark = pytest.mark.unit

# Computed once with the documented encoding and committed: other implementations
# must reproduce these exactly.
GOLDEN_BLOCKS = [
    ((None, [], ""), 3767706845506508887),
    ((None, [1, 2, 3, 4], ""), 15969733406514664653),
    ((None, [1, 2, 3, 4], "fp"), 11468261294548903622),
    ((2**64 - 1, [0, -1, 2**31 - 1], "modèle"), 13505937463019211327),
]
GOLDEN_CHAIN = (list(range(10)), 4, "abc", [15773259920907177949, 13846864136730621593])
# Blocks computed under a LoRA adapter: the adapter's name joins the fingerprint in ``extra``.
GOLDEN_LORA = ("0123456789abcdef", "sonnets", "0123456789abcdef+lora:sonnets", [7108457745286642992, 8422438619771919332])
# Blocks of a salted request (lora, cache_salt, extra, hashes of range(10) in blocks of 4): the salt,
# length-prefixed (UTF-8 bytes), follows the fingerprint; an adapter's name comes last.
GOLDEN_SALTED = [
    (None, "tenant-a", "0123456789abcdef+salt:8:tenant-a", [7373287859977743755, 2733607930422956617]),
    ("sonnets", "tenant-a", "0123456789abcdef+salt:8:tenant-a+lora:sonnets",
     [18210650508692365929, 9333618806317286949]),
    (None, "clé", "0123456789abcdef+salt:4:clé", [16345628854702421750, 14721131874225921371]),
]


@pytest.mark.parametrize(("args", "expected"), GOLDEN_BLOCKS)
def test_golden_block_hashes(args: tuple, expected: int) -> None:
    assert hash_block(*args) == expected


def test_golden_chain() -> None:
    tokens, block_size, extra, expected = GOLDEN_CHAIN
    assert block_hashes(tokens, block_size, extra) == expected


def test_golden_lora_extra() -> None:
    fingerprint, lora, extra, expected = GOLDEN_LORA
    assert block_extra(fingerprint, None) == fingerprint
    assert block_extra(fingerprint, lora) == extra
    assert block_hashes(list(range(10)), 4, block_extra(fingerprint, lora)) == expected
    assert set(expected).isdisjoint(block_hashes(list(range(10)), 4, fingerprint))


@pytest.mark.parametrize(("lora", "salt", "extra", "expected"), GOLDEN_SALTED)
def test_golden_salted_extra(lora: str | None, salt: str, extra: str, expected: list[int]) -> None:
    fingerprint = GOLDEN_LORA[0]
    assert block_extra(fingerprint, lora, salt) == extra
    assert block_hashes(list(range(10)), 4, extra) == expected
    unsalted = block_hashes(list(range(10)), 4, block_extra(fingerprint, lora))
    assert set(expected).isdisjoint(unsalted)


def test_no_salt_leaves_the_extra_unchanged() -> None:
    fingerprint, lora, extra, _ = GOLDEN_LORA
    assert block_extra(fingerprint, None, None) == fingerprint
    assert block_extra(fingerprint, lora, None) == extra


def test_salts_never_alias_adapters_or_other_salts() -> None:
    # Each pair would collide under a plain concatenation of the parts.
    cases = [(None, None), ("a", None), (None, "a"), ("b", "a"), (None, "a+lora:b"), ("a+salt:1:b", None),
             ("b", "1:a"), (None, "1:a+lora:b"), (None, "a" * 10), ("x", "a" * 10), (None, "é"), (None, "e")]
    extras = [block_extra("fp", lora, salt) for lora, salt in cases]
    assert len(set(extras)) == len(cases)


def test_encoding_matches_documentation() -> None:
    parent, tokens, extra = 12345, [7, 8, 9], "x"
    raw = b"\x01" + struct.pack("<Q", parent) + struct.pack("<I", 3) + struct.pack("<3i", *tokens)
    raw += struct.pack("<I", 1) + b"x"
    assert hash_block(parent, tokens, extra) == xxhash.xxh3_64_intdigest(raw)
    assert hash_block(None, [], "") == xxhash.xxh3_64_intdigest(b"\x00" + b"\x00" * 8)


def test_chain_property() -> None:
    tokens = [5, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]
    hashes = block_hashes(tokens, 4, "m")
    assert hashes[0] == hash_block(None, tokens[0:4], "m")
    assert hashes[1] == hash_block(hashes[0], tokens[4:8], "m")
    assert hashes[2] == hash_block(hashes[1], tokens[8:12], "m")
    assert block_hashes(tokens[4:], 4, "m", parent=hashes[0]) == hashes[1:]
    # Same block content under a different prefix hashes differently.
    other = block_hashes([0, 0, 0, 0] + tokens[4:8], 4, "m")
    assert other[1] != hashes[1]


def test_extra_changes_hashes() -> None:
    tokens = list(range(32))
    assert set(block_hashes(tokens, 16, "a")).isdisjoint(block_hashes(tokens, 16, "b"))


def test_fields_do_not_alias() -> None:
    # Moving bytes between the token field and the extra field changes the hash.
    assert hash_block(None, [0x41], "") != hash_block(None, [], "A\x00\x00\x00")
    assert hash_block(None, [1], "") != hash_block(1, [], "")


def test_partial_block_not_hashed() -> None:
    assert block_hashes(list(range(15)), 16, "") == []
    full = block_hashes(list(range(16)), 16, "")
    assert len(full) == 1
    assert block_hashes(list(range(31)), 16, "") == full


def test_bad_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="int32"):
        hash_block(None, [2**31], "")
    with pytest.raises(ValueError, match="64-bit"):
        hash_block(-1, [1], "")
    with pytest.raises(ValueError, match="block_size"):
        block_hashes([1, 2], 0, "")


def test_model_fingerprint(tmp_path) -> None:
    config = {"vocab_size": 1024, "hidden_size": 256, "name": "é"}
    (tmp_path / "config.json").write_text(json.dumps(config, indent=4))
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"))
    expected = hashlib.blake2b(canonical.encode(), digest_size=8).hexdigest()
    assert model_fingerprint(tmp_path) == expected
    assert model_fingerprint(str(tmp_path)) == expected
    assert expected == "9c11e924a025ab95"  # golden
    # The same config serialized any other way gives the same fingerprint.
    (tmp_path / "config.json").write_text(json.dumps(dict(reversed(config.items()))))
    assert model_fingerprint(tmp_path) == expected
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_size": 257}))
    assert model_fingerprint(tmp_path) != expected
    with pytest.raises(ValueError, match="config.json"):
        model_fingerprint(tmp_path / "missing")


def test_hashing_imports_no_torch() -> None:
    code = "import sys, baton.engine.hashing; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
