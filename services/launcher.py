"""``baton up``: the whole system as local processes.

Starts Redis (a private redis-server on a free port unless ``REDIS_URL`` /
``--redis-url`` names one; none with ``--no-redis``), N prefill and M decode workers, and the gateway;
waits until the gateway's ``/ready`` counts every worker reachable; prints the URL; on Ctrl-C or
SIGTERM stops everything, gateway first, each with a grace period.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from baton.engine.config import (
    DTYPE_NAMES, SCHEDULING_POLICIES, add_engine_switches, add_lora_switches, engine_switches, parse_lora_modules,
    speculative_config_arg,
)
from baton.engine.loader import resolve_model_dir
from baton.engine.pooling import pooler_config_arg
from baton.engine.sampling_params import DEFAULT_MAX_LOGPROBS
from baton.services.gateway import sampling_defaults, serving_flags
from baton.services.gateway.config import GatewayConfig
from baton.services.gateway.tokenizer import GatewayTokenizer
from baton.services.gateway.tool_parsers import AUTO_TOOL_CHOICE_NEEDS_PARSER

DEMO_MODEL = "shakespeare-llama-5m"
READY_TIMEOUT_S = 300.0
PORTS_FROM = 20000   # free_port's picks: from here to the ephemeral range, clear of well-known and common ports
_HANDED_OUT: set[int] = set()   # free_port's picks so far: a plan's workers never share one


def default_model() -> str | None:
    """The demo checkpoint in ``../shared/models`` beside the checkout (or the cwd)."""
    roots = [Path(__file__).resolve().parents[1], Path.cwd()]
    for root in roots:
        candidate = root.parent / "shared" / "models" / DEMO_MODEL
        if (candidate / "config.json").exists():
            return str(candidate)
    return None


def free_port() -> int:
    """A port free now on 127.0.0.1 that this process has not handed out before, for a process
    started next to listen on. Picked below the kernel's ephemeral range where there is room:
    outgoing connections take their local ports from that range, and one could take a port
    picked there before its server binds it."""
    low = _ephemeral_ports_start()
    for port in random.sample(range(PORTS_FROM, low), min(64, max(low - PORTS_FROM, 0))):
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ephemeral_ports_start() -> int:
    """The first port of the kernel's ephemeral range (Linux's; 32768, its default, elsewhere)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


@dataclass
class Plan:
    """Every process ``baton up`` starts, as argument lists (tests read this too)."""

    redis: list[str] | None
    redis_url: str             # "" with --no-redis
    prefill: list[list[str]] = field(default_factory=list)
    decode: list[list[str]] = field(default_factory=list)
    gateway: list[str] = field(default_factory=list)
    url: str = ""
    metrics: dict[tuple[str, str], str] = field(default_factory=dict)   # (role, address) -> Prometheus URL (--worker-metrics)


def make_plan(args: argparse.Namespace) -> Plan:
    # -P: the working directory stays off sys.path. Run from a checkout, its top-level folders
    # (kernels/, engine/) would shadow installed packages of those names, such as the
    # ``kernels`` package that transformers imports; Baton's own code is imported as baton.*.
    py = sys.executable
    redis_url = "" if args.no_redis else args.redis_url or os.environ.get("REDIS_URL") or None
    redis_cmd = None
    if redis_url is None:
        port = free_port()
        redis_cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        redis_url = f"redis://127.0.0.1:{port}/0"
    with_redis = ["--redis-url", redis_url] if redis_url else []
    tokenizer = ["--tokenizer", args.tokenizer] if args.tokenizer else []
    common = ["--model", args.model, *tokenizer, *with_redis, "--device", args.device, "--block-size", str(args.block_size),
              "--scheduling-policy", args.scheduling_policy, "--max-logprobs", str(args.max_logprobs)]
    if args.dtype:
        common += ["--dtype", args.dtype]
    common += engine_switches(args)
    if args.gpu_memory_utilization is not None:   # every worker shares the one device
        common += ["--gpu-memory-utilization", f"{args.gpu_memory_utilization / (args.prefill + args.decode):.6g}"]
    loras = ["--lora-modules", *args.lora_modules] if args.lora_modules else []
    if loras or args.allow_runtime_lora_updating:
        common += [*loras, "--max-loras", str(args.max_loras), "--max-lora-rank", str(args.max_lora_rank)]
    plan = Plan(redis=redis_cmd, redis_url=redis_url)
    prefill_addrs, decode_addrs = [], []
    for role, count, addrs, cmds in (("prefill", args.prefill, prefill_addrs, plan.prefill), ("decode", args.decode, decode_addrs, plan.decode)):
        for _ in range(count):
            port = free_port()
            addrs.append(f"127.0.0.1:{port}")
            kv = ["--kv-transport", args.kv_transport] if role == "decode" else []
            if role == "decode" and args.speculative_config is not None:
                kv += ["--speculative-config", args.speculative_config.to_json()]
            if role == "prefill" and args.pooler_config is not None:
                kv += ["--pooler-config", args.pooler_config.to_json()]
            metrics = []
            if args.worker_metrics:
                metrics_port = free_port()
                metrics = ["--metrics-port", str(metrics_port)]
                plan.metrics[(role, addrs[-1])] = f"http://127.0.0.1:{metrics_port}/metrics"
            cmds.append([py, "-P", "-m", f"baton.services.{role}", "--port", str(port), *common, *kv, *metrics])
    plan.gateway = [
        py, "-P", "-m", "baton.services.gateway",
        "--model-dir", args.model, *tokenizer,
        "--served-model-name", *(args.served_model_name or [Path(args.model).name]),
        "--host", args.host, "--port", str(args.port),
        *with_redis,
        "--block-size", str(args.block_size),
        "--max-logprobs", str(args.max_logprobs),
        *(["--max-model-len", str(args.max_model_len)] if args.max_model_len is not None else []),
        *[a for addr in prefill_addrs for a in ("--prefill-addr", addr)],
        *[a for addr in decode_addrs for a in ("--decode-addr", addr)],
        *[a for key in args.api_key for a in ("--api-key", key)],
        *loras,
        *serving_flags.forwarded(args),
    ]
    plan.url = f"{'https' if args.ssl_certfile else 'http'}://{args.host}:{args.port}"
    return plan


def wait_ready(plan: Plan, procs: list[subprocess.Popen], timeout: float) -> None:
    """Until the gateway's ``/ready`` answers 200 and counts every planned worker reachable (more,
    where a shared Redis registry lists others too)."""
    want = {"prefill": len(plan.prefill), "decode": len(plan.decode)}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"{' '.join(dead[0].args[:4])} exited with code {dead[0].returncode}")
        try:
            # The gateway just started is probed, not trusted: its certificate may name another host.
            context = ssl._create_unverified_context() if plan.url.startswith("https") else None
            with urllib.request.urlopen(f"{plan.url}/ready", timeout=2, context=context) as resp:
                reachable = json.load(resp)["workers"]
                if resp.status == 200 and all(reachable[role] >= count for role, count in want.items()):
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the gateway at {plan.url} did not reach all {want} workers within {timeout:.0f}s")


def stop_all(procs: list[subprocess.Popen], grace: float = 30.0) -> None:
    """SIGTERM in reverse start order (gateway first), then SIGKILL stragglers. An interrupt
    while waiting (a second Ctrl-C or SIGTERM) kills every process left at once, then
    propagates: none is left running."""
    try:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    except KeyboardInterrupt:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for proc in procs:
            proc.wait()
        raise


def up(args: argparse.Namespace) -> int:
    if args.model_tag is not None:
        if args.model != default_model():
            print("baton up: give the model once, as MODEL or as --model", file=sys.stderr)
            return 2
        args.model = args.model_tag
    if args.model is None:
        print("baton up: no --model given and the demo checkpoint was not found", file=sys.stderr)
        return 2
    if args.no_redis and args.redis_url:
        print("baton up: --no-redis and --redis-url exclude each other", file=sys.stderr)
        return 2
    if args.no_redis and args.api_server_count > 1:
        print("baton up: --api-server-count above 1 needs Redis (leave out --no-redis): the API servers share stored "
              "responses and runtime LoRA adapters through it", file=sys.stderr)
        return 2
    if not args.no_redis and args.redis_url is None and not os.environ.get("REDIS_URL") and shutil.which("redis-server") is None:
        print("baton up: redis-server is not installed; install it, pass --redis-url, or run without the prefix "
              "index (--no-redis)", file=sys.stderr)
        return 2
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        print(f"baton up: {AUTO_TOOL_CHOICE_NEEDS_PARSER}", file=sys.stderr)
        return 2
    if (args.ssl_keyfile is None) != (args.ssl_certfile is None):
        print("baton up: TLS needs both --ssl-keyfile and --ssl-certfile", file=sys.stderr)
        return 2
    if args.served_model_name is None:
        args.served_model_name = [Path(args.model).name if Path(args.model).is_dir() else args.model]
    try:
        taken = set(args.served_model_name) & set(parse_lora_modules(args.lora_modules, args.served_model_name[0]))
        if taken:
            raise ValueError(f"LoRA adapter {sorted(taken)[0]!r} takes a served model's name")
    except ValueError as exc:
        print(f"baton up: {exc}", file=sys.stderr)
        return 2
    try:
        # A hub id is downloaded once, here: the workers and the gateway get the local directory.
        args.model = str(resolve_model_dir(args.model, args.revision, args.download_dir))
        if args.tokenizer:
            args.tokenizer = str(resolve_model_dir(args.tokenizer, args.revision, args.download_dir))
        GatewayTokenizer(args.tokenizer or args.model)   # a missing or broken tokenizer stops the start
        sampling_defaults.load(args.model, args.generation_config, args.override_generation_config)
    except (OSError, ValueError) as exc:
        print(f"baton up: {exc}", file=sys.stderr)
        return 2
    plan = make_plan(args)
    procs: list[subprocess.Popen] = []
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        for cmd in ([plan.redis] if plan.redis else []) + plan.prefill + plan.decode + [plan.gateway]:
            procs.append(subprocess.Popen(cmd))
        wait_ready(plan, procs, READY_TIMEOUT_S)
        if args.api_server_count > 1:
            # One API server answered /ready; each of the others sees the workers at its next poll of them.
            time.sleep(2 * GatewayConfig.model_fields["load_poll_interval_s"].default)
        print(f"Baton is ready: {plan.url}/v1 (model {', '.join(args.served_model_name)}; Ctrl-C stops)", flush=True)
        for (role, addr), metrics_url in plan.metrics.items():
            print(f"  {role} worker {addr}: metrics at {metrics_url}", flush=True)
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        print("baton up: a process exited; stopping the rest", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except RuntimeError as exc:
        print(f"baton up: {exc}", file=sys.stderr)
        return 1
    finally:
        try:
            stop_all(procs)
        except KeyboardInterrupt:  # a second signal: the rest were killed, not drained
            print("baton up: stopped without waiting for the processes to drain", file=sys.stderr)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="baton", description="Baton: disaggregated prefill/decode LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("up", aliases=["serve"],
                       help="start Redis, the workers and the gateway as local processes (serve: vLLM's name)")
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="the model, as `vllm serve MODEL` takes it (or --model)")
    p.add_argument("--model", default=default_model(), help="HF model directory or hub id (default: the demo checkpoint)")
    p.add_argument("--tokenizer", default=None,
                   help="the tokenizer's directory or hub id, where it is not --model's (vLLM's)")
    p.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="the model's names for clients, the first in responses (vLLM's; default: the directory's name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--prefill", type=int, default=1, help="number of prefill workers")
    p.add_argument("--decode", type=int, default=1, help="number of decode workers")
    p.add_argument("--redis-url", default=None, help="use this Redis (default: $REDIS_URL, else a private redis-server)")
    p.add_argument("--no-redis", action="store_true",
                   help="no Redis: the gateway routes by load alone, not by the prefix caches (no global index)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=DTYPE_NAMES,
                   help="the workers' dtype (vLLM's names; default, auto: the checkpoint's)")
    add_engine_switches(p)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="CUDA: the share of the GPU's memory all the workers together size their KV caches to (each "
                        "worker gets an equal part, as they share the device; default: each worker's 256 MiB)")
    p.add_argument("--kv-transport", choices=["grpc", "ucx", "nccl"], default="grpc", help="how KV moves from prefill to decode")
    p.add_argument("--scheduling-policy", choices=SCHEDULING_POLICIES, default="fcfs",
                   help="the workers' order: fcfs (arrival) or priority (each request's priority, lower first)")
    p.add_argument("--speculative-config", type=speculative_config_arg, default=None,
                   help='the decode workers\' speculative decoding by n-gram lookup, as vLLM takes it: '
                        '\'{"method": "ngram", "num_speculative_tokens": 4}\' (default: off)')
    p.add_argument("--pooler-config", type=pooler_config_arg, default=None,
                   help='how the prefill workers pool embeddings, as vLLM takes it: \'{"pooling_type": "MEAN", '
                        '"normalize": false}\' (default: the checkpoint\'s sentence-transformers pooling, else LAST)')
    p.add_argument("--max-logprobs", type=int, default=DEFAULT_MAX_LOGPROBS,
                   help="the most log-probs a request may ask for each token (vLLM's; -1: the whole vocabulary)")
    p.add_argument("--api-key", action="append", default=[], help="require this Bearer key (repeatable)")
    add_lora_switches(p, "LoRA adapters (PEFT directories) every worker loads; a request names one as its model")
    serving_flags.add(p)
    p.add_argument("--worker-metrics", action="store_true",
                   help="serve each worker's Prometheus metrics on a free port (printed once ready)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return up(args)


if __name__ == "__main__":
    sys.exit(main())
