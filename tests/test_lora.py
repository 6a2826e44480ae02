"""LoRA adapters on the demo checkpoint: each request's greedy output equals the engine's on a
checkpoint with its adapter merged in (and differs from the base model's), in mixed batches,
under chunked prefill and preemption, through the prefill and decode roles; the prefix cache
never shares blocks across adapters; the loader refuses what it cannot apply."""

from __future__ import annotations

import json
from collections.abc import Awaitable
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file

from baton.engine.beam_search import BeamSearchParams
from baton.engine.block_manager import BlockRemoved, BlockStored
from baton.engine.config import EngineConfig, SpeculativeConfig, parse_lora_modules
from baton.engine.cuda_graph import is_graph_step
from baton.engine.engine_api import LoRAConflict, LoRAInUse, UnknownLoRA
from baton.engine.hashing import block_extra, block_hashes, model_fingerprint
from baton.engine.llm import LLM, LoRARequest
from baton.engine.lora_loader import adapter_digest, load_adapter
from baton.engine.model_config import load_model_config
from baton.engine.sampling_params import SamplingParams
from baton.engine.sequence import ScheduledChunk, Sequence
from baton.protos import common_pb2
from baton.services.engine_loop import EngineLoop
from baton.services.worker import WorkerRPCs
from lora_adapters import make_adapter, merge_adapter
from roles import prefill_then_decode

pytestmark = pytest.mark.model

PROMPTS = ["JULIET:\nO Romeo", "ROMEO:\nBut, soft! what light through yonder", "First Citizen:\nBefore we proceed"]
GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


@pytest.fixture(scope="module")
def adapters(demo_model, tmp_path_factory) -> dict[str, Path]:
    """"one": every projection, rank 8; "two": q/v/down of some layers, rank 4, rsLoRA."""
    root = tmp_path_factory.mktemp("lora")
    return {
        "one": make_adapter(demo_model, root / "one", std=0.05),
        "two": make_adapter(demo_model, root / "two", rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"),
                            use_rslora=True, seed=1, std=0.08, layers=range(1, 5)),
    }


@pytest.fixture(scope="module")
def references(demo_model, adapters, tmp_path_factory) -> dict[str | None, list[list[int]]]:
    """Greedy outputs of PROMPTS per adapter (None: the base model), each on its merged checkpoint."""
    root = tmp_path_factory.mktemp("merged")
    models = {None: demo_model, **{name: str(merge_adapter(demo_model, path, root / name)) for name, path in adapters.items()}}
    return {name: [out.outputs[0].token_ids for out in LLM(model).generate(PROMPTS, GREEDY)] for name, model in models.items()}


@pytest.fixture(scope="module")
def lora_llm(demo_model, adapters) -> LLM:
    return LLM(demo_model, lora_modules={name: str(path) for name, path in adapters.items()}, max_loras=2)


def _token_ids(outputs) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in outputs]


def test_adapter_equals_merged_checkpoint(lora_llm, references) -> None:
    for name in ("one", "two"):
        assert _token_ids(lora_llm.generate(PROMPTS, GREEDY, lora=name)) == references[name]
        assert references[name] != references[None]
    assert _token_ids(lora_llm.generate(PROMPTS, GREEDY)) == references[None]


def test_mixed_batch_each_equals_its_reference(lora_llm, references) -> None:
    names = [None, "one", "two", "two", None, "one"]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(names))]
    outputs = _token_ids(lora_llm.generate(prompts, GREEDY, lora=names))
    assert outputs == [references[name][i % len(PROMPTS)] for i, name in enumerate(names)]


@pytest.mark.parametrize("config", [
    {"max_num_batched_tokens": 8, "block_size": 4},                        # chunked prefill
    {"num_blocks": 24, "block_size": 4, "max_num_seqs": 3},                # tight pool: preemption
    {"num_blocks": 24, "block_size": 4, "max_num_seqs": 3, "async_scheduling": True},
    {"speculative": SpeculativeConfig(num_speculative_tokens=3)},          # drafts verified under the adapter
], ids=["chunked", "preempted", "async", "speculative"])
def test_chunked_prefill_preemption_async_and_speculation(demo_model, adapters, references, config) -> None:
    llm = LLM(demo_model, lora_modules={name: str(path) for name, path in adapters.items()}, max_loras=2, **config)
    names = ["one", None, "two", "one", "two", None]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(names))]
    outputs = _token_ids(llm.generate(prompts, GREEDY, lora=names))
    assert outputs == [references[name][i % len(PROMPTS)] for i, name in enumerate(names)]
    assert llm.core.spec_stats.proposed_tokens > 0 or "speculative" not in config


def test_rslora_scales_by_sqrt_rank(demo_model, adapters, references, tmp_path) -> None:
    """The same weights read without rsLoRA (scale alpha / r, here half of alpha / sqrt(r)) give
    another output: the reference holds the rsLoRA scale."""
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "adapter_model.safetensors").write_bytes((adapters["two"] / "adapter_model.safetensors").read_bytes())
    peft = json.loads((adapters["two"] / "adapter_config.json").read_text())
    (plain / "adapter_config.json").write_text(json.dumps({**peft, "use_rslora": False}))
    assert load_adapter("two", adapters["two"], load_model_config(Path(demo_model)), 16).scale == pytest.approx(4.0)
    assert load_adapter("plain", plain, load_model_config(Path(demo_model)), 16).scale == pytest.approx(2.0)
    llm = LLM(demo_model, lora_modules={"plain": str(plain)})
    assert _token_ids(llm.generate(PROMPTS, GREEDY, lora="plain")) != references["two"]


def test_prefix_cache_never_shared_across_adapters(demo_model, adapters) -> None:
    llm = LLM(demo_model, lora_modules={name: str(path) for name, path in adapters.items()}, max_loras=2, block_size=4)
    prompt = PROMPTS[1]
    assert llm.generate(prompt, GREEDY, lora="one")[0].num_cached_tokens == 0
    # The blocks go to the prefix index under the hashes the gateway computes for the adapter.
    stored = [h for event in llm.core.drain_block_events() if isinstance(event, BlockStored) for h in event.block_hashes]
    expected = block_hashes(llm.tokenizer(prompt).input_ids, 4, block_extra(model_fingerprint(demo_model), "one"))
    assert stored[: len(expected)] == expected
    assert llm.generate(prompt, GREEDY, lora="one")[0].num_cached_tokens >= 8     # same adapter: reused
    assert llm.generate(prompt, GREEDY, lora="two")[0].num_cached_tokens == 0     # another adapter
    assert llm.generate(prompt, GREEDY)[0].num_cached_tokens == 0                 # the base model
    assert llm.generate(prompt, GREEDY)[0].num_cached_tokens >= 8


def test_prefill_and_decode_roles_with_an_adapter(demo_model, adapters, references) -> None:
    prompt = LLM(demo_model).tokenizer(PROMPTS[0]).input_ids
    modules = {"one": str(adapters["one"])}
    seq, _ = prefill_then_decode(demo_model, prompt, GREEDY, lora="one", lora_modules=modules)
    assert seq.output_token_ids == references["one"][0]


def test_unknown_adapter_is_refused(lora_llm) -> None:
    with pytest.raises(UnknownLoRA, match="'three' is not loaded here"):
        lora_llm.generate(PROMPTS[0], GREEDY, lora="three")
    # A request wrong in two ways hears of the unknown adapter (the gateway's 404) first.
    with pytest.raises(UnknownLoRA, match="'three' is not loaded here"):
        lora_llm.generate(PROMPTS[0], SamplingParams(max_tokens=4, logprobs=10_000), lora="three")


def test_lora_decode_steps_are_graph_steps() -> None:
    """A decode step with LoRA sequences is one the CUDA-graph path replays (from the graphs with
    adapters, see the GPU tests); a prompt chunk under an adapter is not, as without one."""
    base = Sequence("a", [1, 2, 3], SamplingParams(), num_computed_tokens=2)
    adapted = Sequence("b", [1, 2, 3], SamplingParams(), num_computed_tokens=2, lora="one")
    prompt = Sequence("c", [1, 2, 3], SamplingParams(), lora="one")
    assert is_graph_step([ScheduledChunk(base, 1), ScheduledChunk(adapted, 1)])
    assert not is_graph_step([ScheduledChunk(adapted, 1), ScheduledChunk(prompt, 3)])


# -- loading: what is refused, and how it says so -----------------------------------------

def _rewrite(adapter: Path, directory: Path, config: dict | None = None, tensors: dict | None = None) -> Path:
    directory.mkdir()
    peft = json.loads((adapter / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps({**peft, **(config or {})}))
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    save_file({**weights, **(tensors or {})}, str(directory / "adapter_model.safetensors"))
    return directory


def test_loader_refusals(demo_model, adapters, tmp_path) -> None:
    config = load_model_config(Path(demo_model))
    one = adapters["one"]
    cases = [
        ({"target_modules": ["q_proj", "lm_head"]}, None, "target module.s. lm_head not supported"),
        (None, {"base_model.model.model.embed_tokens.lora_A.weight": torch.zeros(8, 1024)},
         "tensor base_model.model.model.embed_tokens.lora_A.weight is not a LoRA weight of a supported module"),
        ({"r": 32}, None, "rank 32 is above max_lora_rank=16"),
        (None, {"base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight": torch.zeros(256, 8)},
         r"layer 0 k_proj.lora_B has shape \(256, 8\), expected \(128, 8\)"),
        ({"use_dora": True}, None, "use_dora not supported"),
    ]
    for i, (peft, tensors, message) in enumerate(cases):
        bad = _rewrite(one, tmp_path / str(i), peft, tensors)
        with pytest.raises(ValueError, match=f"LoRA adapter 'bad' .*{message}"):
            load_adapter("bad", bad, config, max_rank=16)


def test_too_many_adapters_and_bad_flags_are_refused(adapters) -> None:
    with pytest.raises(ValueError, match=r"2 LoRA adapters given \(one, two\) but max_loras=1"):
        EngineConfig(lora_modules={name: str(path) for name, path in adapters.items()})
    assert parse_lora_modules(["a=/x", "b=/y=z"]) == {"a": "/x", "b": "/y=z"}
    as_json = ['{"name": "c", "path": "/z", "base_model_name": "m"}', ' {"name": "d", "path": "/w"}']
    assert parse_lora_modules(["a=/x", *as_json], "m") == {"a": "/x", "c": "/z", "d": "/w"}
    assert parse_lora_modules(as_json) == {"c": "/z", "d": "/w"}     # a worker: any base model's name
    for specs, message in ((["a"], "takes name=path or a JSON object"), (["a=/x", "a=/y"], "names adapter 'a' twice"),
                           (['{"name": "a"'], "is not JSON"), (['{"name": "a", "path": "/x", "rank": 8}'], "takes"),
                           (['{"name": "", "path": "/x"}'], "must be non-empty strings"),
                           (['{"name": "a", "path": "/x"}', "a=/y"], "names adapter 'a' twice")):
        with pytest.raises(ValueError, match=message):
            parse_lora_modules(specs)
    with pytest.raises(ValueError, match="adapter 'c' names base model 'm', but the model served is 'other'"):
        parse_lora_modules(as_json, "other")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp32_on_cuda_equals_the_cpu_engine_and_replays_graphs_for_lora_steps(demo_model, adapters, references) -> None:
    """On CUDA (graphs captured, async scheduling): base-only decode steps replay the plain graphs,
    steps with LoRA sequences those captured with the adapters; every output equals the CPU
    engine's reference."""
    llm = LLM(demo_model, device="cuda", dtype="float32", num_blocks=256, max_num_seqs=8,
              lora_modules={name: str(path) for name, path in adapters.items()}, max_loras=2)
    graphs = llm.runner.cuda_graphs
    assert graphs is not None and llm.core.async_scheduling
    replayed: list[tuple[list[str | None], bool]] = []
    replay = graphs.replay
    graphs.replay = lambda chunks, shape, fed=None: replayed.append(([c.seq.lora for c in chunks], shape[2])) or replay(chunks, shape, fed)
    assert _token_ids(llm.generate(PROMPTS, GREEDY)) == references[None]
    assert len(replayed) >= GREEDY.max_tokens - 2 and not any(adapted for _, adapted in replayed)
    replayed.clear()
    names = ["one", None, "two", "two", None, "one"]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(names))]
    assert _token_ids(llm.generate(prompts, GREEDY, lora=names)) == [references[n][i % len(PROMPTS)] for i, n in enumerate(names)]
    assert len(replayed) >= GREEDY.max_tokens - 2                  # the decode steps: graphs with adapters
    assert all(adapted == any(loras) for loras, adapted in replayed) and {"one", "two"} <= {n for loras, _ in replayed for n in loras}


# -- loading and unloading while serving -----------------------------------------------------

def test_an_adapter_loaded_at_runtime_equals_one_loaded_at_start(demo_model, adapters, references) -> None:
    llm = LLM(demo_model, max_loras=2)
    with pytest.raises(UnknownLoRA):
        llm.generate(PROMPTS[0], GREEDY, lora="one")
    assert llm.load_lora("one", str(adapters["one"]))
    assert _token_ids(llm.generate(PROMPTS, GREEDY, lora="one")) == references["one"]
    assert not llm.load_lora("one", str(adapters["one"]))           # the same adapter: nothing changes
    with pytest.raises(LoRAConflict, match="'one' is loaded here with other weights"):
        llm.load_lora("one", str(adapters["two"]))
    assert llm.load_lora("two", str(adapters["two"]))
    assert _token_ids(llm.generate(PROMPTS, GREEDY, lora=["two", None, "one"])) == [
        references["two"][0], references[None][1], references["one"][2]]
    llm.unload_lora("one")
    with pytest.raises(UnknownLoRA, match="'one' is not loaded here"):
        llm.generate(PROMPTS[0], GREEDY, lora="one")
    with pytest.raises(UnknownLoRA, match="'one' is not loaded here"):
        llm.unload_lora("one")
    assert _token_ids(llm.generate(PROMPTS, GREEDY, lora="two")) == references["two"]


def test_vllms_lora_request_loads_its_adapter_on_first_use(demo_model, adapters, references) -> None:
    """``generate(..., lora_request=LoRARequest(name, id, path))``, as vLLM takes it: the adapter
    loads the first time, is used as loaded after, and other weights under its name are refused."""
    llm = LLM(demo_model, enable_lora=True, max_loras=2)
    one, two = LoRARequest("one", 1, str(adapters["one"])), LoRARequest("two", 2, str(adapters["two"]))
    assert _token_ids(llm.generate(PROMPTS, GREEDY, lora_request=one)) == references["one"]
    loaded = llm.runner.adapters["one"]
    outputs = _token_ids(llm.generate(PROMPTS, GREEDY, lora_request=[None, one, two]))
    assert outputs == [references[None][0], references["one"][1], references["two"][2]]
    assert llm.runner.adapters["one"] is loaded and llm.runner.lora_names == {"one", "two"}
    with pytest.raises(LoRAConflict, match="'one' is loaded here with other weights"):
        llm.generate(PROMPTS[0], GREEDY, lora_request=LoRARequest("one", 1, str(adapters["two"])))
    with pytest.raises(ValueError, match="not both"):
        llm.generate(PROMPTS[0], GREEDY, lora="one", lora_request=one)


def test_vllms_lora_request_serves_chat_and_beam_search_too(demo_model, adapters) -> None:
    """``chat`` and ``beam_search`` take vLLM's ``lora_request`` as ``generate`` does: the adapter loads
    on first use, and the outputs are those under its name (not the base model's)."""
    llm = LLM(demo_model, enable_lora=True, max_loras=1)
    one = LoRARequest("one", 1, str(adapters["one"]))
    chat = [{"role": "user", "content": "Speak, Romeo."}]
    tuned = _token_ids(llm.chat(chat, GREEDY, lora_request=one))
    assert llm.runner.lora_names == {"one"}
    assert tuned == _token_ids(llm.chat(chat, GREEDY, lora="one")) != _token_ids(llm.chat(chat, GREEDY))

    def beams(**adapter) -> list[list[int]]:
        (out,) = llm.beam_search(PROMPTS[0], BeamSearchParams(beam_width=2, max_tokens=8, ignore_eos=True), **adapter)
        return [b.tokens for b in out.sequences]

    assert beams(lora_request=one) == beams(lora="one") != beams()
    with pytest.raises(ValueError, match="not both"):
        beams(lora="one", lora_request=one)


def test_a_runtime_load_is_checked_as_at_start(demo_model, adapters, tmp_path) -> None:
    llm = LLM(demo_model, lora_modules={"one": str(adapters["one"])})
    with pytest.raises(ValueError, match=r"LoRA adapter 'two': 1 adapters are loaded \(one\) and max_loras=1"):
        llm.load_lora("two", str(adapters["two"]))
    llm.unload_lora("one")
    with pytest.raises(ValueError, match="LoRA adapter 'big' .*rank 32 is above max_lora_rank=16"):
        llm.load_lora("big", str(_rewrite(adapters["one"], tmp_path / "big", {"r": 32})))
    with pytest.raises(ValueError, match="LoRA adapter 'lm' .*target module.s. lm_head not supported"):
        llm.load_lora("lm", str(_rewrite(adapters["one"], tmp_path / "lm", {"target_modules": ["lm_head"]})))
    with pytest.raises(FileNotFoundError, match="LoRA adapter 'none' .*needs adapter_config.json"):
        llm.load_lora("none", str(tmp_path / "missing"))
    assert llm.runner.lora_names == frozenset()
    assert llm.load_lora("two", str(adapters["two"]))


def test_an_adapter_in_use_is_not_unloaded(demo_model, adapters, references) -> None:
    """Running, waiting, a later sample of ``n`` or reserved (a decode worker awaiting its KV): the
    unload is refused, and the requests finish under the adapter; once none is left it goes."""
    llm = LLM(demo_model, lora_modules={"one": str(adapters["one"])}, max_num_seqs=1)
    core = llm.core
    prompt = llm.tokenizer(PROMPTS[0]).input_ids
    (a,) = core.add_request("a", prompt, GREEDY, lora="one")
    core.add_request("b", prompt, SamplingParams(temperature=0, max_tokens=20, n=2), lora="one")
    core.step()
    with pytest.raises(LoRAInUse, match=r"'one' is in use by 3 unfinished sequence\(s\)"):
        core.unload_lora("one")
    while core.has_unfinished():
        core.step()
    assert a.output_token_ids == references["one"][0]
    reserved = core.reserve("r", prompt, GREEDY, lora="one")
    with pytest.raises(LoRAInUse, match=r"in use by 1 unfinished"):
        core.unload_lora("one")
    core.abort(reserved.seq_id)
    core.unload_lora("one")
    assert llm.runner.lora_names == frozenset()


def test_other_weights_loaded_under_the_same_name_never_reuse_the_old_blocks(demo_model, adapters, references) -> None:
    """Block hashes carry the adapter's name only: an unload drops the blocks cached under it (and
    tells the index), so neither a prompt nor a decode worker's reservation finds them afterwards."""
    llm = LLM(demo_model, lora_modules={"x": str(adapters["one"])}, block_size=4)
    prompt = llm.tokenizer(PROMPTS[1]).input_ids
    assert _token_ids(llm.generate(prompt, GREEDY, lora="x")) == [references["one"][1]]
    assert llm.generate(prompt, GREEDY, lora="x")[0].num_cached_tokens >= 8
    stored = {h for event in llm.core.drain_block_events() if isinstance(event, BlockStored) for h in event.block_hashes}
    llm.unload_lora("x")
    removed = {h for event in llm.core.drain_block_events() if isinstance(event, BlockRemoved) for h in event.block_hashes}
    assert removed == stored
    llm.load_lora("x", str(adapters["two"]))
    assert llm.core.reserve("d", prompt, GREEDY, lora="x").num_cached_tokens == 0
    llm.core.abort("d")
    again = llm.generate(prompt, GREEDY, lora="x")[0]
    assert again.num_cached_tokens == 0
    assert again.outputs[0].token_ids == references["two"][1]


class _Aborted(Exception):
    """What ``context.abort`` raises in a real servicer, with the status it was given."""


class _Context:
    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Aborted(code, details)


async def test_the_workers_lora_rpcs_answer_with_statuses(demo_model, adapters, tmp_path) -> None:
    """``LoadLoRA`` / ``UnloadLoRA`` of either role, on a running engine loop: each refusal is its
    status with the engine's message; a reserved request (a decode worker awaiting its KV) holds
    the adapter."""
    llm = LLM(demo_model)
    rpcs = WorkerRPCs()
    rpcs._ctx = SimpleNamespace(runner=llm.runner, core=llm.core)
    rpcs.engine = engine = EngineLoop(llm.core, on_outputs=lambda updates: None)
    engine.start()

    async def status(call) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(_Aborted) as err:
            await call
        return err.value.args

    def load(name: str, path: Path | str, digest: str = "") -> Awaitable:
        return rpcs.LoadLoRA(common_pb2.LoadLoRARequest(name=name, path=str(path), digest=digest), _Context())

    def unload(name: str) -> Awaitable:
        return rpcs.UnloadLoRA(common_pb2.UnloadLoRARequest(name=name), _Context())

    try:
        reply = await load("one", adapters["one"])
        assert not reply.already_loaded and reply.digest == adapter_digest(adapters["one"])
        assert (await load("one", adapters["one"], reply.digest)).already_loaded
        assert (await status(load("one", adapters["two"])))[0] == grpc.StatusCode.ALREADY_EXISTS
        code, message = await status(load("two", adapters["two"]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_loras=1" in message
        code, message = await status(load("two", adapters["two"], digest="0" * 16))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "not 0000000000000000" in message
        code, message = await status(load("big", _rewrite(adapters["one"], tmp_path / "big", {"r": 32})))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "rank 32 is above max_lora_rank=16" in message
        prompt = llm.tokenizer(PROMPTS[0]).input_ids
        await engine.call(lambda: llm.core.reserve("r", prompt, GREEDY, lora="one"))
        code, message = await status(unload("one"))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "in use by 1 unfinished" in message
        engine.abort("r")
        assert (await unload("one")).path == str(adapters["one"])
        assert (await status(unload("one")))[0] == grpc.StatusCode.NOT_FOUND
    finally:
        engine.stop()
