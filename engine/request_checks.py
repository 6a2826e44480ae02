"""What a request must satisfy before the engine takes it: pure checks, each a ValueError that
names the request and what is wrong (a worker answers it as INVALID_ARGUMENT).

A resumed request (``output_token_ids``: tokens it generated elsewhere) is one sequence with
fewer of them than ``max_tokens``. A cache salt (vLLM's ``cache_salt``) is None or a non-empty
string. A priority other than 0 needs the "priority" scheduling policy. Whether a named LoRA
adapter is loaded is the engine core's check (``UnknownLoRA``): the loaded set changes while
serving."""

from __future__ import annotations

from dataclasses import dataclass

from baton.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class RequestLimits:
    """What an engine serves: token ids below ``vocab_size``, prompt + ``max_tokens`` within
    ``max_model_len``, at most ``max_logprobs`` log-probs a token, and priorities or not."""

    vocab_size: int
    max_model_len: int
    max_logprobs: int
    priority_scheduling: bool


def check_request(
    request_id: str, prompt_token_ids: list[int], params: SamplingParams, output_token_ids: list[int],
    priority: int, cache_salt: str | None, limits: RequestLimits,
) -> None:
    """ValueError for a request ``limits`` can never serve."""
    if not prompt_token_ids:
        raise ValueError(f"request {request_id} has an empty prompt")
    named = [*prompt_token_ids, *output_token_ids, *(params.allowed_token_ids or ()),
             *(t for word in params.bad_words_token_ids for t in word),
             *(params.structured_output.reasoning_end if params.structured_output else ())]
    if any(not isinstance(t, int) or not 0 <= t < limits.vocab_size for t in named):
        raise ValueError(f"request {request_id}: token ids must be ints in [0, {limits.vocab_size})")
    if output_token_ids and (params.n != 1 or len(output_token_ids) >= params.max_tokens):
        raise ValueError(
            f"request {request_id}: a resumed request is one sequence (n=1) with fewer output tokens "
            f"({len(output_token_ids)}) than max_tokens ({params.max_tokens})"
        )
    for kind, k in (("sample", params.logprobs), ("prompt", params.prompt_logprobs)):
        if k is not None and k > limits.max_logprobs:
            raise ValueError(f"request {request_id}: requested {kind} logprobs of {k}, which is greater than max "
                             f"allowed: {limits.max_logprobs}")
    if cache_salt == "":
        raise ValueError(f"request {request_id}: a cache salt must not be empty (None: unsalted)")
    if priority and not limits.priority_scheduling:
        raise ValueError(f"request {request_id}: a priority needs the 'priority' scheduling policy "
                         f"(workers: --scheduling-policy priority)")
    total = len(prompt_token_ids) + params.max_tokens
    if total > limits.max_model_len:
        raise ValueError(
            f"request {request_id}: prompt ({len(prompt_token_ids)} tokens) + max_tokens ({params.max_tokens}) "
            f"= {total} exceeds max_model_len {limits.max_model_len}"
        )


def truncated_prompt(token_ids: list[int], keep: int | None, max_model_len: int, output_limit: int | None) -> list[int]:
    """vLLM's ``truncate_prompt_tokens`` (``keep``): the prompt's last ``keep`` tokens; None or 0,
    all of it (as vLLM reads 0); -1, as many as ``max_model_len`` leaves room for beside
    ``output_limit`` tokens out (at least one: the engine keeps one position past an embedded input
    too). ValueError for more than the context holds, as vLLM refuses it, or below -1."""
    if keep is not None and not -1 <= keep <= max_model_len:
        raise ValueError(f"truncate_prompt_tokens must be -1, 0 or up to the model's maximum context length "
                         f"({max_model_len}), got {keep}")
    if keep == -1:
        keep = max(1, max_model_len - max(1, output_limit or 0))
    return token_ids[-keep:] if keep else token_ids
