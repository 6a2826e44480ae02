"""Shared fixtures: the demo checkpoint (``BATON_DEMO_MODEL`` overrides where it is)."""

import os
import shutil
from pathlib import Path

import pytest

DEMO_MODEL = Path(os.environ.get("BATON_DEMO_MODEL", Path(__file__).resolve().parents[2] / "shared" / "models" / "shakespeare-llama-5m"))


@pytest.fixture(scope="session")
def demo_model() -> str:
    assert (DEMO_MODEL / "config.json").exists(), f"demo checkpoint missing at {DEMO_MODEL}"
    return str(DEMO_MODEL)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
MISTRAL_MARKERS = ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]", "[THINK]", "[/THINK]")


def marked_tokenizer(directory: Path) -> Path:
    """The demo tokenizer in ``directory``, with Mistral's tool-call and thinking markers added as
    special tokens, as Mistral's tokenizers have them."""
    from tokenizers import AddedToken, Tokenizer

    tokenizer = Tokenizer.from_file(str(DEMO_MODEL / "tokenizer.json"))
    tokenizer.add_special_tokens([AddedToken(m, special=True, normalized=False) for m in MISTRAL_MARKERS])
    tokenizer.save(str(directory / "tokenizer.json"))
    shutil.copy(DEMO_MODEL / "tokenizer_config.json", directory / "tokenizer_config.json")
    return directory


@pytest.fixture
def split_checkpoint(tmp_path) -> tuple[str, str]:
    """The demo checkpoint as two directories: the model without its tokenizer, and the tokenizer
    (its files and chat template) alone."""
    model, tokenizer = tmp_path / "model", tmp_path / "tokenizer"
    model.mkdir()
    tokenizer.mkdir()
    for path in DEMO_MODEL.iterdir():
        (tokenizer if path.name in TOKENIZER_FILES else model).joinpath(path.name).symlink_to(path)
    return str(model), str(tokenizer)
