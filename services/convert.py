"""Conversions between the engine's dataclasses and their protobuf messages.

Shared by the gateway (which builds requests) and the workers (which read them),
so both ends agree field by field. No torch, no grpc: only ``baton.protos``
messages and the engine's plain dataclasses.

``SamplingParams``: every field is written explicitly; the proto's ``optional``
fields (``seed``, ``logprobs``, ``prompt_logprobs``) and ``structured_output`` only
when set, so ``None`` survives the round trip. ``n`` is not on the wire: the gateway fans out ``n > 1``
itself and each wire request is one sequence. Reading, the proto's documented
zero defaults map to "off" (``top_p`` 0 -> 1.0, ``repetition_penalty`` 0 -> 1.0, no
``allowed_token_ids`` -> None);
anything else invalid raises ``ValueError`` from ``SamplingParams`` with a
message naming the field, which a worker should answer with INVALID_ARGUMENT.
"""

from __future__ import annotations

from baton.engine.sampling_params import SamplingParams, StructuredOutputParams
from baton.engine.sequence import TokenLogprob
from baton.protos import common_pb2


def params_to_proto(params: SamplingParams) -> common_pb2.SamplingParams:
    """The wire form of ``params`` (``params.n`` is not sent)."""
    msg = common_pb2.SamplingParams(
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        min_p=params.min_p,
        repetition_penalty=params.repetition_penalty,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        stop_token_ids=params.stop_token_ids,
        ignore_eos=params.ignore_eos,
        max_tokens=params.max_tokens,
        min_tokens=params.min_tokens,
        logit_bias=params.logit_bias,
        allowed_token_ids=params.allowed_token_ids or [],
        bad_words=[common_pb2.TokenIds(ids=word) for word in params.bad_words_token_ids],
    )
    if params.seed is not None:
        msg.seed = params.seed
    if params.logprobs is not None:
        msg.logprobs = params.logprobs
    if params.prompt_logprobs is not None:
        msg.prompt_logprobs = params.prompt_logprobs
    if params.structured_output is not None:
        msg.structured_output.CopyFrom(structured_output_to_proto(params.structured_output))
    return msg


def structured_output_to_proto(spec: StructuredOutputParams) -> common_pb2.StructuredOutput:
    msg = common_pb2.StructuredOutput(disable_any_whitespace=spec.disable_any_whitespace, reasoning_end=spec.reasoning_end)
    if spec.json is not None:
        msg.json_schema = spec.json
    elif spec.json_object:
        msg.json_object = True
    elif spec.regex is not None:
        msg.regex = spec.regex
    elif spec.choice is not None:
        msg.choice.choices.extend(spec.choice)
    elif spec.structural_tag is not None:
        msg.structural_tag = spec.structural_tag
    else:
        msg.grammar = spec.grammar
    return msg


def structured_output_from_proto(msg: common_pb2.StructuredOutput) -> StructuredOutputParams:
    """``ValueError`` when no kind is set (or a choice holds none)."""
    kind = msg.WhichOneof("kind")
    if kind is None:
        raise ValueError("structured_output names no kind (json_schema, json_object, regex, choice, grammar or "
                         "structural_tag)")
    if kind == "choice":
        value = tuple(msg.choice.choices)
    else:
        value = getattr(msg, kind)
    field = {"json_schema": "json"}.get(kind, kind)
    return StructuredOutputParams(**{field: value}, disable_any_whitespace=msg.disable_any_whitespace,
                                  reasoning_end=tuple(msg.reasoning_end))


def params_from_proto(msg: common_pb2.SamplingParams) -> SamplingParams:
    """Validated ``SamplingParams`` (n = 1) from the wire; ``ValueError`` if invalid."""
    return SamplingParams(
        n=1,
        max_tokens=msg.max_tokens,
        min_tokens=msg.min_tokens,
        temperature=msg.temperature,
        top_p=msg.top_p if msg.top_p != 0 else 1.0,
        top_k=msg.top_k,
        min_p=msg.min_p,
        repetition_penalty=msg.repetition_penalty if msg.repetition_penalty != 0 else 1.0,
        presence_penalty=msg.presence_penalty,
        frequency_penalty=msg.frequency_penalty,
        seed=msg.seed if msg.HasField("seed") else None,
        stop_token_ids=list(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        logprobs=msg.logprobs if msg.HasField("logprobs") else None,
        prompt_logprobs=msg.prompt_logprobs if msg.HasField("prompt_logprobs") else None,
        logit_bias=dict(msg.logit_bias),
        structured_output=structured_output_from_proto(msg.structured_output) if msg.HasField("structured_output") else None,
        allowed_token_ids=list(msg.allowed_token_ids) or None,
        bad_words_token_ids=[list(word.ids) for word in msg.bad_words],
    )


def logprob_to_proto(logprob: TokenLogprob) -> common_pb2.TokenLogprob:
    return common_pb2.TokenLogprob(
        token_id=logprob.token_id,
        logprob=logprob.logprob,
        top=[common_pb2.TopLogprob(token_id=t, logprob=lp) for t, lp in logprob.top],
        rank=logprob.rank or 0,
    )


def logprob_from_proto(msg: common_pb2.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(
        token_id=msg.token_id,
        logprob=msg.logprob,
        top=[(t.token_id, t.logprob) for t in msg.top],
        rank=msg.rank or None,
    )
