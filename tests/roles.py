"""The worker roles in one process: a request through a prefill-role engine and a decode-role
one, its KV copied between their caches as the transfer would put it (the prompt's blocks,
layer by layer)."""

from __future__ import annotations

from baton.engine.engine_core import EngineCore
from baton.engine.llm import LLM
from baton.engine.sampling_params import SamplingParams
from baton.engine.sequence import Sequence
from baton.services.prefill.server import prefill_params


def prefill_then_decode(demo_model, prompt: list[int], params: SamplingParams, lora: str | None = None,
                        lora_modules: dict[str, str] | None = None, cache_salt: str | None = None,
                        **decode_config) -> tuple[Sequence, EngineCore]:
    """The decode side's finished sequence, and its engine (built with ``decode_config``), for a
    request under LoRA adapter ``lora`` (both engines load ``lora_modules``) salted with
    ``cache_salt``. Both engines are left holding no blocks."""
    loras = {"lora_modules": lora_modules or {}}
    prefill_llm, decode_llm = LLM(demo_model, block_size=4, **loras), LLM(demo_model, block_size=4, **loras, **decode_config)
    c = prefill_llm.core
    prefill = EngineCore(c.runner, c.config, sorted(c.eos_token_ids), "demo", keep_finished_blocks=True,
                         structured_outputs=c.structured_outputs)
    (first,) = prefill.add_request("r", prompt, prefill_params(params), lora=lora, cache_salt=cache_salt)
    while prefill.has_unfinished():
        prefill.step()
    decode = decode_llm.core
    reserved = decode.reserve("r", prompt, params, lora=lora, cache_salt=cache_salt)
    blocks = -(-len(prompt) // 4)
    for src, dst in zip(prefill.runner.kv_caches, decode.runner.kv_caches):
        dst[reserved.block_table[:blocks]] = src[first.block_table[:blocks]]
    prefill.release("r")
    seq = decode.activate("r", first.output_logprobs[0])
    while decode.has_unfinished():
        decode.step()
    assert prefill.stats().used_blocks == decode.stats().used_blocks == 0
    return seq, decode
