"""Sampling defaults from a model's generation config, as vLLM (0.9 and later) takes them.

``source`` (vLLM's ``--generation-config``): ``"auto"`` reads the checkpoint's own
``generation_config.json`` (none there: no defaults), ``"vllm"`` reads none, and anything else
is a folder whose ``generation_config.json`` is read. The override (vLLM's
``--override-generation-config``, a JSON object) sets values on top; a null there removes the
file's. Only the sampling keys become defaults (``SAMPLING_KEYS``), ``max_new_tokens`` as the
default ``max_tokens``; the file's other keys (``do_sample``, ``eos_token_id``, ...) do not
(``model_config`` reads the EOS ids). A request's own value always wins over a default; only
``max_tokens_cap`` (see ``GenerationDefaults``) limits what a request may ask for.

Pure Python. Types are checked here; ranges by each reader as its requests' are (the gateway as
a request's fields, the offline ``LLM`` as ``SamplingParams``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GENERATION_CONFIG_FILE = "generation_config.json"
SOURCES = ("auto", "vllm")
SAMPLING_KEYS = {"repetition_penalty": float, "temperature": float, "top_k": int, "top_p": float, "min_p": float,
                 "max_new_tokens": int}
PARAM_NAMES = {"max_new_tokens": "max_tokens"}   # a generation config's name -> the sampling parameter's

Number = float | int


@dataclass(frozen=True)
class GenerationDefaults:
    """The sampling keys the generation config at ``path`` sets (``file``; ``path`` None: none read)
    and those the override sets (``override``; None: removed), by their generation-config names."""

    source: str = "auto"
    path: Path | None = None
    file: dict[str, Number] = field(default_factory=dict)
    override: dict[str, Number | None] = field(default_factory=dict)

    @property
    def values(self) -> dict[str, Number]:
        """Each sampling parameter's default, by the parameter's name (``max_tokens``)."""
        return as_params({**self.file, **self.override})

    @property
    def max_tokens_cap(self) -> int | None:
        """What vLLM's serving makes a server-wide limit on a request's output, not only its
        default: the override's ``max_new_tokens``, or with a folder as ``source`` the one it
        takes from there too. The checkpoint's own (``"auto"``) is a default only."""
        if self.source in SOURCES:
            return self.override.get("max_new_tokens")
        return self.values.get("max_tokens")

    def describe(self) -> str:
        """Where the defaults come from, for the log."""
        return " and ".join([str(self.path)] * bool(self.file) + ["the override"] * bool(self.override))


def as_params(values: dict[str, Number | None]) -> dict[str, Number]:
    """Generation-config values as sampling parameters: renamed (``PARAM_NAMES``), nulls dropped."""
    return {PARAM_NAMES.get(key, key): value for key, value in values.items() if value is not None}


def load_generation_defaults(
    model_dir: str | Path, source: str = "auto", override: dict[str, Any] | None = None,
    check: Callable[[dict[str, Number | None]], None] = lambda values: None,
    names: tuple[str, str] = ("generation_config", "override_generation_config"),
) -> GenerationDefaults:
    """The defaults of ``source`` for the model in ``model_dir``, ``override`` on top. ``check``:
    the reader's own check of the values' ranges (ValueError). A ValueError names the source or
    the override (as ``names`` calls them) and the file: a folder that holds no generation
    config, a file that is not JSON, an unknown key in the override, a value of the wrong type or
    one ``check`` refuses."""
    try:
        path = generation_config_path(model_dir, source)
        file = {} if path is None else _read_sampling_keys(path)
        _check_from(check, file, f"{path}: ")
    except ValueError as exc:
        raise ValueError(f"{names[0]} {source}: {exc}") from None
    try:
        override = check_override(override or {})
        check(override)
    except ValueError as exc:
        raise ValueError(f"{names[1]}: {exc}") from None
    return GenerationDefaults(source, path, file, override)


def _read_sampling_keys(path: Path) -> dict[str, Number]:
    """The sampling keys a generation config file sets."""
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object")
    _check_types(config, f"{path}: ")
    return {key: config[key] for key in SAMPLING_KEYS if config.get(key) is not None}


def _check_from(check: Callable[[dict[str, Number | None]], None], values: dict[str, Number], where: str) -> None:
    """``check(values)``, its ValueError's message opening with ``where``."""
    try:
        check(values)
    except ValueError as exc:
        raise ValueError(f"{where}{exc}") from None


def generation_config_path(model_dir: str | Path, source: str) -> Path | None:
    """The generation config file ``source`` names (None: none is read)."""
    if source == "vllm":
        return None
    if source == "auto":
        path = Path(model_dir) / GENERATION_CONFIG_FILE
        return path if path.is_file() else None
    folder = Path(source)
    if not folder.is_dir():
        raise ValueError(f"{source!r} is not a folder (give 'auto', 'vllm' or a folder holding "
                         f"{GENERATION_CONFIG_FILE})")
    if not (folder / GENERATION_CONFIG_FILE).is_file():
        raise ValueError(f"the folder {source!r} holds no {GENERATION_CONFIG_FILE}")
    return folder / GENERATION_CONFIG_FILE


def check_override(values: dict[str, Any]) -> dict[str, Number | None]:
    """An override: sampling keys only (anything else would change nothing), each a number of its
    key's kind or null. ValueError otherwise."""
    unknown = sorted(set(values) - set(SAMPLING_KEYS))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(map(repr, unknown))}: it takes {', '.join(SAMPLING_KEYS)}")
    _check_types(values)
    return values


def parse_override(text: str) -> dict[str, Number | None]:
    """An override given as JSON text (``check_override``)."""
    try:
        values = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(values, dict):
        raise ValueError('must be a JSON object, e.g. \'{"temperature": 0.5}\'')
    return check_override(values)


def generation_config_arg(value: str) -> str:
    """``--generation-config``'s argparse type: ``auto``, ``vllm``, or a folder holding a generation config."""
    if value not in SOURCES:
        try:
            generation_config_path(".", value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _check_types(values: dict[str, Any], where: str = "") -> None:
    """ValueError (its message opening with ``where``) unless each sampling key's value is null
    or a number of its kind (an integer for ``top_k`` and ``max_new_tokens``)."""
    for key, kind in SAMPLING_KEYS.items():
        value = values.get(key)
        number = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
        if value is not None and not number:
            raise ValueError(f"{where}{key} must be {'a number' if kind is float else 'an integer'}, got {value!r}")
