"""Shared fixtures: the demo checkpoint (``BATON_DEMO_MODEL`` overrides where it is)."""

import os
from pathlib import Path

import pytest

DEMO_MODEL = Path(os.environ.get("BATON_DEMO_MODEL", Path(__file__).resolve().parents[2] / "shared" / "models" / "shakespeare-llama-5m"))


@pytest.fixture(scope="session")
def demo_model() -> str:
    assert (DEMO_MODEL / "config.json").exists(), f"demo checkpoint missing at {DEMO_MODEL}"
    return str(DEMO_MODEL)
