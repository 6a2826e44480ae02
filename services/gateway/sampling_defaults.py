"""The model's sampling defaults in the gateway: vLLM's ``--generation-config`` and
``--override-generation-config`` (``engine/generation_config.py`` reads them).

Each value is checked at start as a request's field of that name is (``--generation-config``'s
file's and the override's apart, each error naming its origin). A completion, chat completion or
response request then takes a default for each field it left out: one absent from its
``model_fields_set`` (sent as null counts as left out, as in vLLM); a field the client sent, even
as its usual value, is the client's. ``max_new_tokens`` is the default output limit (chat: when
neither ``max_tokens`` nor ``max_completion_tokens`` is sent; responses: ``max_output_tokens``),
cut to the room the prompt leaves in the context (``default_limit``); where vLLM makes it a
server-wide cap, it also caps a limit the client sent (``capped``).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from baton.engine.generation_config import (
    PARAM_NAMES, GenerationDefaults, as_params, load_generation_defaults, parse_override,
)
from baton.services.gateway.protocol import BaseGenerationRequest

logger = logging.getLogger(__name__)
GENERATION_NAMES = {param: key for key, param in PARAM_NAMES.items()}   # max_tokens -> max_new_tokens

RequestT = TypeVar("RequestT", bound=BaseModel)


def load(model_dir: str | Path, source: str, override: dict[str, Any]) -> GenerationDefaults:
    """The defaults of ``--generation-config`` ``source`` and ``--override-generation-config``
    ``override`` for the model in ``model_dir``, each checked as a request's field; ValueError
    naming the flag (and the file) whose value a request would have refused."""
    return load_generation_defaults(model_dir, source, override, check_as_request_fields,
                                    ("--generation-config", "--override-generation-config"))


def log_defaults(defaults: GenerationDefaults) -> None:
    """Say once, at start, which sampling defaults the generation config set."""
    if not defaults.values:
        logger.info("the generation config (--generation-config %s) sets no sampling defaults", defaults.source)
        return
    cap = defaults.max_tokens_cap
    logger.info("sampling defaults for requests that leave them out, from %s: %s%s", defaults.describe(),
                defaults.values, "" if cap is None else f"; no request writes more than {cap} tokens")


def check_as_request_fields(values: dict[str, Any]) -> None:
    """ValueError naming the key unless each value passes as a request's field of its name."""
    try:
        BaseGenerationRequest.model_validate({"model": "", **as_params(values)})
    except ValidationError as exc:
        error = exc.errors()[0]
        key = str(error["loc"][0])
        raise ValueError(f"{GENERATION_NAMES.get(key, key)}: {error['msg']}, got {error['input']!r}") from None


def override_generation_config_arg(text: str) -> dict[str, Any]:
    """``--override-generation-config``'s argparse type: a JSON object of sampling keys, each
    value one a request's field would take."""
    try:
        values = parse_override(text)
        check_as_request_fields(values)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return values


def with_defaults(req: RequestT, defaults: GenerationDefaults) -> RequestT:
    """``req`` with each sampling field it left out set to the model's default (the output limit
    is ``capped`` and ``default_limit``'s)."""
    fields = type(req).model_fields
    update = {name: value for name, value in defaults.values.items()
              if name in fields and name not in GENERATION_NAMES and name not in req.model_fields_set}
    return req.model_copy(update=update) if update else req


def capped(requested: int | None, defaults: GenerationDefaults) -> int | None:
    """The output limit a request sent (None: none) under vLLM's server-wide cap, where there is one."""
    cap = defaults.max_tokens_cap
    return requested if requested is None or cap is None else min(requested, cap)


def default_limit(room: int, defaults: GenerationDefaults) -> int:
    """The output limit of a request that sent none: the model's default cut to the ``room`` the
    prompt leaves in the context, else that room."""
    default = defaults.values.get("max_tokens")
    return room if default is None else min(default, room)
