"""What the kernel test modules share: the GQA shapes they sweep and a fresh,
printed seed per test (import ``fresh_seed`` to use it: it is autouse)."""

import os

import pytest
import torch

GQA = [(2, 2), (4, 2), (8, 2), (16, 2), (4, 1)]  # (heads, kv_heads): ratios 1, 2, 4, 8 and MQA


@pytest.fixture(autouse=True)
def fresh_seed() -> None:
    """New random inputs on every run; the seed is printed so a failure can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"torch seed {seed}")
    torch.manual_seed(seed)
