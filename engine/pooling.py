"""How an embedding request pools its prompt's final hidden states into one vector (vLLM's
pooling types), and where that is set: ``--pooler-config`` (vLLM's JSON) or, without it, the
checkpoint's sentence-transformers modules (``modules.json``), as vLLM reads them. Pure
Python: no torch, no files (``model_config.load_pooler_config`` reads them)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from typing import Any

POOLING_TYPES = ("LAST", "MEAN", "CLS")
ST_POOLING = "sentence_transformers.models.Pooling"
ST_NORMALIZE = "sentence_transformers.models.Normalize"
# A sentence-transformers Pooling module's modes, each as the pooling type it is (None: not supported here).
ST_POOLING_MODES = {
    "pooling_mode_cls_token": "CLS",
    "pooling_mode_mean_tokens": "MEAN",
    "pooling_mode_lasttoken": "LAST",
    "pooling_mode_max_tokens": None,
    "pooling_mode_mean_sqrt_len_tokens": None,
    "pooling_mode_weightedmean_tokens": None,
}


@dataclass(frozen=True)
class PoolerConfig:
    """An embedding is the final hidden state of the prompt's last token (LAST, as decoder
    embedding models such as Qwen3-Embedding are read), of its first (CLS), or their mean
    over every prompt token (MEAN); L2-normalized when ``normalize``."""

    pooling_type: str = "LAST"
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.pooling_type not in POOLING_TYPES:
            raise ValueError(f"pooling_type must be one of {', '.join(POOLING_TYPES)}, got {self.pooling_type!r}")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be true or false, got {self.normalize!r}")

    @property
    def needs_whole_prompt(self) -> bool:
        """MEAN and CLS read hidden states that a cached prefix does not keep (only its KV):
        every prompt token is computed."""
        return self.pooling_type != "LAST"

    @classmethod
    def from_json(cls, text: str) -> PoolerConfig:
        """From vLLM's ``--pooler-config`` JSON: ``{"pooling_type": "MEAN", "normalize": false}``
        (either key optional)."""
        try:
            fields = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"--pooler-config is not JSON: {exc}") from None
        known = {field.name for field in dataclasses.fields(cls)}
        if not isinstance(fields, dict) or set(fields) - known:
            got = sorted(fields) if isinstance(fields, dict) else text
            raise ValueError(f"--pooler-config must be an object with pooling_type and / or normalize, got {got}")
        return cls(**fields)

    def to_json(self) -> str:
        """What ``from_json`` reads back."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_sentence_transformers(cls, modules: list[dict[str, Any]], pooling: dict[str, Any]) -> PoolerConfig:
        """A sentence-transformers checkpoint's pooling: ``modules`` as its ``modules.json`` lists
        them, ``pooling`` the ``config.json`` of the Pooling module among them. Its one mode is
        the pooling type; the embedding is normalized when a Normalize module is listed."""
        modes = [name for name, on in pooling.items() if name.startswith("pooling_mode_") and on is True]
        if len(modes) != 1:
            raise ValueError(f"the checkpoint's sentence-transformers Pooling module sets {len(modes)} pooling modes "
                             f"({', '.join(modes) or 'none'}); one of {_supported_modes()} is supported")
        if ST_POOLING_MODES.get(modes[0]) is None:
            raise ValueError(f"the checkpoint's sentence-transformers pooling mode {modes[0]} is not supported "
                             f"(only {_supported_modes()}); choose one with --pooler-config")
        normalize = any(module.get("type") == ST_NORMALIZE for module in modules)
        return cls(ST_POOLING_MODES[modes[0]], normalize)


def pooling_module_path(modules: Any) -> str | None:
    """Where, in the checkpoint, the Pooling module that ``modules.json`` (``modules``) lists
    keeps its ``config.json``; None when it lists none."""
    if not isinstance(modules, list) or not all(isinstance(module, dict) for module in modules):
        raise ValueError("modules.json must be a list of objects")
    paths = [str(module.get("path", "")) for module in modules if module.get("type") == ST_POOLING]
    return paths[0] if paths else None


def _supported_modes() -> str:
    return ", ".join(name for name, pooling_type in ST_POOLING_MODES.items() if pooling_type is not None)


def pooler_config_arg(text: str) -> PoolerConfig:
    """``--pooler-config``'s argparse type: the parse error as the command line's."""
    try:
        return PoolerConfig.from_json(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
