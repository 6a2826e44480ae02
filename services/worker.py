"""What the prefill and decode workers share: command-line flags, building the
engine, the grpc.aio server with health and reflection, and running it until
SIGTERM/SIGINT (health turns NOT_SERVING at once, in-flight RPCs get a grace
period, then the process exits). RPCs still running when the grace ends are
cancelled UNAVAILABLE, which the gateway answers by retrying them elsewhere: a
decode worker's streams resume on another decode worker after their tokens so far.

Both roles load and unload LoRA adapters while serving (``LoadLoRA``, ``UnloadLoRA``): the
adapter is read and checked in a worker thread, then added to (or dropped from) the engine on
its own thread between steps (``EngineCore.add_lora``, ``unload_lora``). ``ResetPrefixCache``
runs there too (``EngineCore.reset_prefix_cache``); the engine loop publishes the removed blocks."""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import gc
import logging
import signal
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from baton.engine.config import (
    DTYPE_NAMES, SCHEDULING_POLICIES, EngineConfig, add_engine_switches, add_lora_switches, parse_lora_modules,
    speculative_config_arg,
)
from baton.engine.engine_api import LoRAConflict, LoRAInUse, UnknownLoRA
from baton.engine.engine_core import EngineCore
from baton.engine.hashing import model_fingerprint
from baton.engine.sampling_params import DEFAULT_MAX_LOGPROBS, SamplingParams, StructuredOutputParams
from baton.engine.model_runner import ModelRunner
from baton.engine.pooling import PoolerConfig, pooler_config_arg
from baton.engine.structured_output import StructuredOutputs, mask_logits
from baton.kvtransfer import KVLayout, warm_up_block_copies
from baton.protos import ACCEPT_PINGS, MAX_MESSAGE_BYTES, common_pb2
from baton.services.engine_loop import EngineLoop
from baton.services.index_publisher import IndexPublisher
from baton.services.redis_keys import WorkerRecord
from baton.services.worker_metrics import EngineMetrics, log_stats, serve_metrics

log = logging.getLogger(__name__)

SHUTDOWN_STACKS_AFTER_S = 15.0   # past the grace: a shutdown this slow is stuck; its stacks go to stderr
COMPILE_MARGIN_S = 0.5   # of an RPC's deadline, kept to answer after a grammar's compilation

GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.http2.max_pings_without_data", 0),
    # The gateway pings while a long prefill runs, and prefill workers while their KV goes out.
    *ACCEPT_PINGS,
]


def worker_arg_parser(role: str, default_port: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m baton.services.{role}", description=f"Baton {role} worker")
    p.add_argument("--model", required=True, help="Hugging Face model directory or hub id")
    p.add_argument("--tokenizer", default=None,
                   help="the tokenizer's directory or hub id, where it is not --model's (vLLM's; structured outputs "
                        "compile their grammars against it)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind")
    p.add_argument("--port", type=int, default=default_port)
    p.add_argument("--advertise-host", default=None, help="host others use to reach this worker (default: --host)")
    p.add_argument("--worker-id", default=None)
    p.add_argument("--redis-url", default=None, help="register and publish the prefix index here")
    p.add_argument("--heartbeat-ttl", type=float, default=10.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=DTYPE_NAMES,
                   help="the weights' and activations' dtype (vLLM's names; default, auto: the checkpoint's)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=None)
    p.add_argument("--kv-cache-memory-mb", type=int, default=256)
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="CUDA: size the KV cache to fill this share of the GPU's memory, beside the weights and the "
                        "activations of the largest step (vLLM's; default: --kv-cache-memory-mb)")
    p.add_argument("--max-logprobs", type=int, default=DEFAULT_MAX_LOGPROBS,
                   help="the most log-probs a request may ask for each token (vLLM's; -1: the whole vocabulary)")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="launch each step before reading the last one's tokens back (default: on with --device cuda)")
    add_engine_switches(p)
    p.add_argument(
        "--shutdown-grace", type=float, default=30.0,
        help="seconds in-flight RPCs get after SIGTERM (then the gateway resumes what is left elsewhere)",
    )
    p.add_argument("--scheduling-policy", choices=SCHEDULING_POLICIES, default="fcfs",
                   help="fcfs: arrival order; priority: each request's priority (lower first), then arrival")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port (default: off)")
    add_lora_switches(p, "LoRA adapters (PEFT directories) to load, all resident; a request names one in its model "
                         "(prefill and decode workers must load the same ones)")
    if role == "decode":
        p.add_argument("--kv-transport", choices=["grpc", "ucx", "nccl"], default="grpc",
                       help="how prefill workers send KV here: a gRPC stream on --port, UCX on --kv-port, or NCCL "
                            "(gloo between CPU caches) pair groups set up over --kv-port")
        p.add_argument("--kv-port", type=int, default=0,
                       help="the UCX listener's or NCCL control port (0: any free port); NCCL's listens on --host, "
                            "UCX's (and NCCL's store) on every interface")
        p.add_argument("--speculative-config", type=speculative_config_arg, default=None,
                       help='speculative decoding by n-gram lookup, as vLLM takes it: \'{"method": "ngram", '
                            '"num_speculative_tokens": 4, "prompt_lookup_max": 4}\' (default: off)')
    else:   # the prefill role computes the embeddings
        p.add_argument("--pooler-config", type=pooler_config_arg, default=None,
                       help='how embeddings pool the prompt\'s final hidden states, as vLLM takes it: \'{"pooling_type": '
                            '"MEAN", "normalize": false}\' (LAST, MEAN or CLS; default: the checkpoint\'s '
                            'sentence-transformers pooling, else LAST, normalized)')
    return p


@dataclass
class WorkerContext:
    worker_id: str
    address: str
    runner: ModelRunner
    core: EngineCore
    layout: KVLayout
    fingerprint: str
    publisher: IndexPublisher | None     # registry heartbeat + prefix-index events (with --redis-url)
    engine_metrics: EngineMetrics | None  # with --metrics-port


def engine_config(args: argparse.Namespace, role: str) -> EngineConfig:
    """The engine configuration a worker of ``role`` runs with, from its command line."""
    return EngineConfig(
        block_size=args.block_size,
        num_blocks=args.num_blocks,
        kv_cache_memory_bytes=args.kv_cache_memory_mb * 1024 * 1024,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        max_logprobs=args.max_logprobs,
        device=args.device,
        dtype=args.dtype,
        kv_cache_dtype=args.kv_cache_dtype,
        quantization=args.quantization,
        tokenizer=args.tokenizer,
        revision=args.revision,
        download_dir=args.download_dir,
        async_scheduling=args.async_scheduling,
        scheduling_policy=args.scheduling_policy,
        speculative=getattr(args, "speculative_config", None),
        # A decode worker never pools: it does not read (nor fail on) the checkpoint's pooling.
        pooler=args.pooler_config if role == "prefill" else PoolerConfig(),
        lora_modules=parse_lora_modules(args.lora_modules),
        max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank,
        # A prefill worker's every step pushes its KV layer by layer (a hook), which no CUDA graph
        # replays: capturing decode graphs there would only cost start-up time and memory.
        enforce_eager=args.enforce_eager or role == "prefill",
        seed=args.seed,
        enable_prefix_caching=args.enable_prefix_caching,
        **({"cuda_graph_batch_sizes": args.cuda_graph_sizes} if args.cuda_graph_sizes else {}),
    )


def build_worker(args: argparse.Namespace, role: str, keep_finished_blocks: bool) -> WorkerContext:
    config = engine_config(args, role)
    runner = ModelRunner(args.model, config)
    fingerprint = model_fingerprint(runner.model_dir)
    core = EngineCore(
        runner,
        config,
        eos_token_ids=runner.model_config.eos_token_ids,
        hash_extra=fingerprint,
        keep_finished_blocks=keep_finished_blocks,
        structured_outputs=StructuredOutputs(runner.tokenizer_dir, runner.vocab_size, runner.model_config.eos_token_ids),
    )
    warm_up(core, config.block_size)
    gc.freeze()   # the model and library objects leave the collector's full scans (see engine/llm.py)
    layout = KVLayout.from_caches(runner.kv_caches, fingerprint, runner.model_config.quantization)
    worker_id = args.worker_id or f"{role}-{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
    address = f"{args.advertise_host or args.host}:{args.port}"
    publisher = None
    if args.redis_url:
        record = WorkerRecord(worker_id, role, address, fingerprint, config.block_size)
        publisher = IndexPublisher(args.redis_url, record, args.heartbeat_ttl)
    metrics = EngineMetrics(CollectorRegistry()) if args.metrics_port is not None else None
    return WorkerContext(worker_id, address, runner, core, layout, fingerprint, publisher, metrics)


def warm_up(core: EngineCore, block_size: int) -> None:
    """Run two short requests through the engine and a block through the KV transfer's
    pack and unpack before serving, so that a GPU worker's kernels are compiled before
    the first real request needs them (one more under a LoRA adapter, whose steps run other
    kernels); then load the tokenizer for structured output and mask a row of logits by a
    grammar (compiling the mask's kernel)."""
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    runs = [(block_size + 1, None), (2 * block_size, None), *((block_size + 1, name) for name in sorted(core.runner.lora_names)[:1])]
    for i, (length, lora) in enumerate(runs):
        request_id, tokens = f"warm-up-{i}", [1 + t % (core.vocab_size - 1) for t in range(length)]
        if core.runner.generates:
            core.add_request(request_id, tokens, params, lora=lora)
        else:   # a base model: embeddings only
            core.add_embedding_request(request_id, tokens)
        while core.has_unfinished():
            core.step()
        core.abort(request_id)  # the prefill role keeps finished blocks until released
    core.drain_block_events()  # nothing of the warm-up belongs in the global index
    warm_up_block_copies(core.runner.kv_caches[0])
    try:
        grammar = core.structured_outputs.grammar(StructuredOutputParams(json_object=True))
        mask_logits(torch.zeros(1, core.vocab_size, device=core.runner.kv_caches[0].device), [grammar])
    except Exception as exc:  # xgrammar may not take an unusual tokenizer: serve the rest anyway
        log.warning("structured output is unavailable with this tokenizer: %s", exc)


async def serve(
    args: argparse.Namespace,
    ctx: WorkerContext,
    role: str,
    register: Callable[[grpc.aio.Server], tuple[list[str], EngineLoop]],
) -> None:
    """Run a worker's gRPC server until SIGTERM/SIGINT. ``register`` adds the
    role's servicers and returns their full service names and the engine loop."""
    server = grpc.aio.server(options=GRPC_OPTIONS)
    names, engine = register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    server.add_insecure_port(f"{args.host}:{args.port}")
    await server.start()
    engine.start()
    if ctx.engine_metrics is not None:
        serve_metrics(args.metrics_port, args.host, lambda: engine.stats, ctx.engine_metrics.registry)
    if ctx.publisher is not None:
        await ctx.publisher.start()
    stats_log = None if args.disable_log_stats else asyncio.create_task(
        log_stats(lambda: engine.stats, f"{role} worker {ctx.worker_id}"))
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    runner = ctx.runner
    quantized = f" (linear layers {runner.model_config.quantization})" if runner.model_config.quantization else ""
    log.info("%s worker %s serving on %s: %s in %s%s; KV cache of %d blocks of %d tokens in %s (%.2f GiB)", role,
             ctx.worker_id, ctx.address, runner.model_config.architecture, str(runner.dtype).removeprefix("torch."), quantized,
             runner.num_blocks, runner.block_size, str(runner.kv_dtype).removeprefix("torch."),
             runner.num_blocks * runner.block_bytes() / 2**30)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("%s worker %s draining (grace %.0fs)", role, ctx.worker_id, args.shutdown_grace)
    # A worker still shutting down well past its grace writes where every thread is to stderr.
    faulthandler.dump_traceback_later(args.shutdown_grace + SHUTDOWN_STACKS_AFTER_S, exit=False)
    await health_servicer.enter_graceful_shutdown()
    await server.stop(args.shutdown_grace)
    if stats_log is not None:
        stats_log.cancel()
    engine.stop()
    if ctx.publisher is not None:
        await ctx.publisher.stop()
    log.info("%s worker %s stopped", role, ctx.worker_id)


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


async def compile_grammar(ctx: WorkerContext, params: SamplingParams, context: grpc.aio.ServicerContext) -> None:
    """Compile a request's structured-output grammar, if it has one, in a worker thread: neither
    the event loop nor the engine waits on a large schema (the engine then finds it compiled).
    ``ValueError`` naming what is wrong with it, or that it did not compile before the RPC's
    deadline (less a margin to answer): a client's error, not this worker's, so the gateway
    does not blame the worker for a slow grammar. The compilation goes on and is cached."""
    if params.structured_output is None:
        return
    seconds = max(time_remaining(context) - COMPILE_MARGIN_S, 0.0)
    compiling = asyncio.to_thread(ctx.core.structured_outputs.compile, params.structured_output)
    try:
        await asyncio.wait_for(compiling, seconds)
    except TimeoutError:
        raise ValueError(f"the structured output's grammar did not compile within {seconds:.1f} s") from None


def time_remaining(context: grpc.aio.ServicerContext, default: float = 60.0) -> float:
    """Seconds left before the RPC's deadline (``default`` when it has none)."""
    remaining = context.time_remaining()
    return default if remaining is None else max(remaining, 0.0)


class WorkerRPCs:
    """The RPCs both roles answer alike (statuses: ``common.proto``): a servicer mixes it in, with
    its ``role``, its context ``_ctx`` and its ``engine`` loop. A LoRA adapter is read and checked
    in a worker thread, then added to (or dropped from) the engine on its thread between steps; a
    prefix-cache reset runs there too."""

    role: str
    _ctx: WorkerContext
    engine: EngineLoop

    async def GetLoad(self, request: common_pb2.LoadRequest, context) -> common_pb2.WorkerLoad:
        s = self.engine.stats
        return common_pb2.WorkerLoad(
            worker_id=self._ctx.worker_id,
            role=self.role,
            running=s.running,
            waiting=s.waiting,
            total_blocks=s.total_blocks,
            free_blocks=s.free_blocks,
            used_blocks=s.used_blocks,
            cached_blocks=s.cached_blocks,
        )

    async def LoadLoRA(self, request: common_pb2.LoadLoRARequest, context) -> common_pb2.LoadLoRAReply:
        name, path = request.name, request.path
        if not name or not path:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a LoRA adapter needs a name and a path")
        try:
            adapter = await asyncio.to_thread(self._ctx.runner.read_lora, name, path)
        except (OSError, ValueError) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if request.digest and adapter.digest != request.digest:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"LoRA adapter {name!r}: {path} here has digest {adapter.digest}, not {request.digest} "
                                "(the files differ from those the other workers loaded)")
        try:
            added = await self.engine.call(lambda: self._ctx.core.add_lora(adapter))
        except LoRAConflict as exc:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc))
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if added:
            log.info("loaded LoRA adapter %r from %s (digest %s)", name, path, adapter.digest)
        return common_pb2.LoadLoRAReply(digest=adapter.digest, already_loaded=not added)

    async def UnloadLoRA(self, request: common_pb2.UnloadLoRARequest, context) -> common_pb2.UnloadLoRAReply:
        try:
            adapter = await self.engine.call(lambda: self._ctx.core.unload_lora(request.name))
        except UnknownLoRA as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except LoRAInUse as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        log.info("unloaded LoRA adapter %r", request.name)
        return common_pb2.UnloadLoRAReply(path=str(adapter.path), digest=adapter.digest)

    async def ResetPrefixCache(self, request: common_pb2.ResetPrefixCacheRequest,
                               context) -> common_pb2.ResetPrefixCacheReply:
        reset = await self.engine.call(self.engine.core.reset_prefix_cache)
        log.info("prefix cache reset: %d cached blocks freed, %d held by requests uncached",
                 reset.freed_blocks, reset.held_blocks)
        return common_pb2.ResetPrefixCacheReply(freed_blocks=reset.freed_blocks, held_blocks=reset.held_blocks)
