"""compose.yaml parses and agrees with the launcher: the same services, the
same modules, flags each service's own parser accepts, and the default ports."""

import argparse
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from baton.engine.config import SpeculativeConfig
from baton.engine.pooling import PoolerConfig
from baton.services import launcher
from baton.services.worker import worker_arg_parser

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def _resolve(value: str) -> str:
    """Compose's ``${VAR:-default}`` as the default it falls back to."""
    match = re.fullmatch(r"\$\{\w+:-(.*)\}", value)
    return match.group(1) if match else value


def _argv(service: dict, **env_overrides: str) -> list[str]:
    """The service's command as argv, its ``$$VAR`` references filled from its environment (as sh
    fills them: a quoted one is one word; an unquoted one as many words as its value has between
    whitespace, quotes in it kept as they are)."""
    command = service["command"]
    assert command.startswith("sh -c '"), command
    inner = command.removeprefix("sh -c '").removesuffix("'")
    env = {k: _resolve(v) for k, v in service["environment"].items()} | env_overrides
    inner = re.sub(r'"\$\$(\w+)"', lambda m: shlex.quote(env[m.group(1)]), inner)
    words = shlex.split(re.sub(r"\$\$(\w+)", r"@@\1@@", inner))
    expanded = [w for word in words for w in (env[word[2:-2]].split() if re.fullmatch(r"@@\w+@@", word) else [word])]
    return expanded[1:]  # drop "exec"


def _plan() -> launcher.Plan:
    args = launcher.build_parser().parse_args(["up", "--model", "/models/m", "--redis-url", "redis://r:6379/0"])
    return launcher.make_plan(args)


def test_services_match_launcher(compose):
    assert set(compose["services"]) == {"redis", "gateway", "prefill", "decode"}
    plan = _plan()
    commands = {"prefill": plan.prefill[0], "decode": plan.decode[0], "gateway": plan.gateway}
    for name, command in commands.items():
        argv = _argv(compose["services"][name])
        assert command[1:3] == ["-P", "-m"] and argv[:4] == ["python", *command[1:4]]


@pytest.mark.parametrize("role,port", [("prefill", 50051), ("decode", 50061)])
def test_worker_commands_parse_with_default_ports(compose, role, port):
    service = compose["services"][role]
    args = worker_arg_parser(role, default_port=port).parse_args(_argv(service)[4:])
    assert args.port == port and args.model == "/models/shakespeare-llama-5m" and args.redis_url == "redis://redis:6379/0"
    assert args.dtype == "bfloat16" and args.device == "cuda"
    metrics = {"prefill": 9100, "decode": 9101}[role]
    assert args.metrics_port == metrics and args.scheduling_policy == "fcfs"
    priority = worker_arg_parser(role, default_port=port).parse_args(_argv(service, SCHEDULING_POLICY="priority")[4:])
    assert priority.scheduling_policy == "priority"
    assert args.kv_cache_dtype == "auto"
    fp8 = worker_arg_parser(role, default_port=port).parse_args(_argv(service, KV_CACHE_DTYPE="fp8")[4:])
    assert fp8.kv_cache_dtype == "fp8"
    if role == "decode":  # KV arrives over gRPC on the worker's port unless KV_TRANSPORT picks UCX or NCCL on 50062
        assert (args.kv_transport, args.kv_port, args.speculative_config) == ("grpc", 50062, None)
        nccl = worker_arg_parser(role, default_port=port).parse_args(_argv(service, KV_TRANSPORT="nccl")[4:])
        assert (nccl.kv_transport, nccl.kv_port) == ("nccl", 50062)
        spec = '{"method":"ngram","num_speculative_tokens":4}'
        more = worker_arg_parser(role, default_port=port).parse_args(_argv(service, DECODE_FLAGS=f"--speculative-config {spec}")[4:])
        assert more.speculative_config == SpeculativeConfig(num_speculative_tokens=4)
        assert service["ports"] == [f"{port}:{port}", "50062:50062", f"{metrics}:{metrics}"]
    else:
        assert args.pooler_config is None
        pooler = '{"pooling_type":"MEAN","normalize":false}'
        more = worker_arg_parser(role, default_port=port).parse_args(_argv(service, PREFILL_FLAGS=f"--pooler-config {pooler}")[4:])
        assert more.pooler_config == PoolerConfig("MEAN", normalize=False)
        assert service["ports"] == [f"{port}:{port}", f"{metrics}:{metrics}"]
    assert worker_arg_parser(role, default_port=port).parse_args(["--model", "m"]).port == port
    assert service["environment"]["MODEL"].startswith("${MODEL:-")
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert "healthcheck" in service


def test_gateway_command_parses_and_names_workers(compose):
    from baton.services.gateway.__main__ import build_parser

    service = compose["services"]["gateway"]
    args = build_parser().parse_args(_argv(service)[4:])
    assert args.port == 8000 and service["ports"] == ["8000:8000"]
    assert args.prefill_addr == ["prefill:50051"] and args.decode_addr == ["decode:50061"]
    assert set(service["depends_on"]) == {"prefill", "decode"}
    launcher_flags = {a for a in _plan().gateway if a.startswith("--")}
    assert launcher_flags <= {a.option_strings[0] for a in build_parser()._actions if a.option_strings}
    assert service["environment"]["GATEWAY_FLAGS"] == "${GATEWAY_FLAGS:-}"
    flags = "--tool-call-parser hermes --reasoning-parser qwen3"
    args = build_parser().parse_args(_argv(service, GATEWAY_FLAGS=flags)[4:])
    assert (args.tool_call_parser, args.reasoning_parser, args.port) == ("hermes", "qwen3", 8000)
    args = build_parser().parse_args(_argv(service, GATEWAY_FLAGS="--api-server-count 4")[4:])
    assert args.api_server_count == 4 and args.redis_url   # several API servers need the compose Redis


def test_workers_keep_compiled_kernels_in_a_named_volume(compose):
    for role in ("prefill", "decode"):
        service = compose["services"][role]
        cache = service["environment"]["TRITON_CACHE_DIR"]
        assert f"triton-cache:{cache}" in service["volumes"]
    assert "triton-cache" in compose["volumes"]


def test_redis_service(compose):
    redis = compose["services"]["redis"]
    assert redis["ports"] == ["6379:6379"] and "healthcheck" in redis
    for role in ("prefill", "decode", "gateway"):
        assert compose["services"][role]["environment"]["REDIS_URL"] == "redis://redis:6379/0"


def test_launcher_plan_spawns_redis_only_without_url(monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    args = launcher.build_parser().parse_args(["up", "--model", "/m", "--prefill", "2", "--decode", "3"])
    plan = launcher.make_plan(argparse.Namespace(**{**vars(args), "redis_url": None}))
    assert plan.redis is not None and plan.redis[0] == "redis-server"
    assert len(plan.prefill) == 2 and len(plan.decode) == 3
    assert plan.gateway.count("--prefill-addr") == 2 and plan.gateway.count("--decode-addr") == 3


def test_launcher_plan_without_redis_starts_none_and_names_none(monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://elsewhere:6379/0")
    plan = launcher.make_plan(launcher.build_parser().parse_args(["up", "--model", "/m", "--no-redis"]))
    assert plan.redis is None and plan.redis_url == ""
    assert all("--redis-url" not in cmd for cmd in [*plan.prefill, *plan.decode, plan.gateway])
    assert plan.gateway.count("--prefill-addr") == plan.gateway.count("--decode-addr") == 1


def test_baton_up_refuses_no_redis_with_a_redis_url_and_names_no_redis_without_redis_server(monkeypatch, capsys):
    monkeypatch.delenv("REDIS_URL", raising=False)
    assert launcher.main(["up", "--no-redis", "--redis-url", "redis://r/0"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    monkeypatch.setattr(launcher.shutil, "which", lambda name: None)
    assert launcher.main(["up"]) == 2
    assert "--no-redis" in capsys.readouterr().err


def test_baton_up_hands_the_api_server_count_to_the_gateway_and_refuses_it_without_redis(capsys):
    from baton.services.gateway.__main__ import build_parser

    argv = ["up", "--model", "/m", "--redis-url", "redis://r/0", "--api-server-count", "4"]
    gateway = launcher.make_plan(launcher.build_parser().parse_args(argv)).gateway
    assert build_parser().parse_args(gateway[4:]).api_server_count == 4
    assert launcher.main(["up", "--no-redis", "--api-server-count", "2"]) == 2
    assert "--api-server-count above 1 needs Redis" in capsys.readouterr().err


def test_launcher_plan_gives_each_worker_a_metrics_port_on_request():
    argv = ["up", "--model", "/m", "--redis-url", "redis://r/0", "--prefill", "2"]
    plan = launcher.make_plan(launcher.build_parser().parse_args(argv))
    assert plan.metrics == {} and not any("--metrics-port" in cmd for cmd in plan.prefill + plan.decode)
    plan = launcher.make_plan(launcher.build_parser().parse_args([*argv, "--worker-metrics"]))
    urls = {}
    for role, cmds in (("prefill", plan.prefill), ("decode", plan.decode)):
        for cmd in cmds:
            worker = worker_arg_parser(role, default_port=50051).parse_args(cmd[4:])
            urls[(role, f"127.0.0.1:{worker.port}")] = f"http://127.0.0.1:{worker.metrics_port}/metrics"
    assert plan.metrics == urls and len(set(urls.values())) == 3


def test_baton_up_hands_the_gateway_every_served_name_and_keeps_them_from_adapters(monkeypatch, capsys):
    from baton.services.gateway.__main__ import build_parser, config_from_args

    argv = ["up", "--model", "/m", "--redis-url", "redis://r/0", "--served-model-name", "bard", "poet"]
    config = config_from_args(build_parser().parse_args(launcher.make_plan(launcher.build_parser().parse_args(argv)).gateway[4:]))
    assert (config.served_model_name, config.served_model_aliases) == ("bard", ["poet"])
    monkeypatch.setattr(launcher.shutil, "which", lambda name: "/usr/bin/redis-server")
    assert launcher.main([*argv, "--lora-modules", "poet=/a"]) == 2
    assert "'poet' takes a served model's name" in capsys.readouterr().err


def test_baton_up_hands_the_cors_flags_the_response_role_and_the_response_store_to_the_gateway():
    from baton.services.gateway.__main__ import build_parser, config_from_args

    argv = ["up", "--model", "/m", "--redis-url", "redis://r/0"]
    for extra, want in (([], (["*"], False)), (["--allowed-origins", '["https://a", "https://b"]', "--allow-credentials"],
                                             (["https://a", "https://b"], True))):
        plan = launcher.make_plan(launcher.build_parser().parse_args([*argv, *extra]))
        config = config_from_args(build_parser().parse_args(plan.gateway[4:]))
        assert (config.allowed_origins, config.allow_credentials) == want
    extra = ["--response-role", "narrator", "--responses-store-ttl", "60", "--responses-store-mb", "0"]
    plan = launcher.make_plan(launcher.build_parser().parse_args([*argv, *extra]))
    config = config_from_args(build_parser().parse_args(plan.gateway[4:]))
    assert (config.response_role, config.responses_store_ttl_s, config.responses_store_mb) == ("narrator", 60, 0)


def test_baton_up_hands_the_tokenizer_to_the_gateway_and_every_worker():
    from baton.services.gateway.__main__ import build_parser, config_from_args
    from baton.services.worker import engine_config

    argv = ["up", "--model", "/m", "--redis-url", "redis://r/0"]
    plan = launcher.make_plan(launcher.build_parser().parse_args(argv))
    assert config_from_args(build_parser().parse_args(plan.gateway[4:])).tokenizer_dir == "/m"
    plan = launcher.make_plan(launcher.build_parser().parse_args([*argv, "--tokenizer", "/t"]))
    assert config_from_args(build_parser().parse_args(plan.gateway[4:])).tokenizer_dir == "/t"
    for role, cmds in (("prefill", plan.prefill), ("decode", plan.decode)):
        assert [engine_config(worker_arg_parser(role, default_port=50051).parse_args(cmd[4:]), role).tokenizer
                for cmd in cmds] == ["/t"]
    with pytest.raises(SystemExit):
        launcher.build_parser().parse_args([*argv, "--allowed-origins", "https://a"])   # not JSON


def test_launcher_plan_hands_vllms_engine_switches_and_disable_log_stats_to_every_worker():
    from baton.services.gateway.__main__ import build_parser
    from baton.services.worker import engine_config

    argv = ["up", "--model", "/m", "--redis-url", "redis://r/0", "--prefill", "2"]
    for extra, want in (([], (False, True, [1, 2, 4, 8, 16, 32, 64, 128, 256], None, False, None, 128, 2048)),
                        (["--enforce-eager", "--no-enable-prefix-caching", "--cuda-graph-sizes", "1", "3", "8",
                          "--seed", "7", "--disable-log-stats", "--max-model-len", "512", "--max-num-seqs", "32",
                          "--max-num-batched-tokens", "1024"], (True, False, [1, 3, 8], 7, True, 512, 32, 1024))):
        plan = launcher.make_plan(launcher.build_parser().parse_args([*argv, *extra]))
        for role, cmds in (("prefill", plan.prefill), ("decode", plan.decode)):
            for cmd in cmds:
                args = worker_arg_parser(role, default_port=50051).parse_args(cmd[4:])
                config = engine_config(args, role)
                eager, *rest = want
                assert (config.enforce_eager, config.enable_prefix_caching, config.cuda_graph_batch_sizes, config.seed,
                        args.disable_log_stats, config.max_model_len, config.max_num_seqs,
                        config.max_num_batched_tokens) == (eager or role == "prefill", *rest)   # no decode graphs to prefill
        assert build_parser().parse_args(plan.gateway[4:]).max_model_len == want[5]   # the gateway checks it too


def test_launcher_plan_passes_the_output_parsers_to_the_gateway():
    from baton.services.gateway.__main__ import build_parser

    argv = ["up", "--model", "/m", "--redis-url", "redis://r/0"]
    for extra, parsers in (([], (None, None)), (["--enable-auto-tool-choice", "--tool-call-parser", "llama3_json",
                                                  "--reasoning-parser", "qwen3"], ("llama3_json", "qwen3"))):
        plan = launcher.make_plan(launcher.build_parser().parse_args([*argv, *extra]))
        args = build_parser().parse_args(plan.gateway[4:])
        assert (args.tool_call_parser, args.reasoning_parser) == parsers


@pytest.mark.parametrize("transport", ["ucx", "nccl"])
def test_launcher_plan_passes_the_kv_transport_to_decode_workers(transport):
    args = launcher.build_parser().parse_args(["up", "--model", "/m", "--redis-url", "redis://r/0", "--kv-transport", transport])
    plan = launcher.make_plan(args)
    decode = worker_arg_parser("decode", default_port=50061).parse_args(plan.decode[0][4:])
    assert decode.kv_transport == transport
    assert "--kv-transport" not in plan.prefill[0]  # the decode worker's ticket names the transport


def test_launcher_plan_hands_the_lora_modules_to_both_roles_and_the_gateway():
    from baton.services.gateway.__main__ import build_parser, config_from_args

    argv = ["up", "--model", "/m", "--redis-url", "redis://r/0", "--lora-modules", "one=/a/one", "two=/a/two",
            "--max-loras", "2", "--max-lora-rank", "32"]
    plan = launcher.make_plan(launcher.build_parser().parse_args(argv))
    for role, cmd in (("prefill", plan.prefill[0]), ("decode", plan.decode[0])):
        worker = worker_arg_parser(role, default_port=50051).parse_args(cmd[4:])
        assert (worker.lora_modules, worker.max_loras, worker.max_lora_rank) == (["one=/a/one", "two=/a/two"], 2, 32)
    gateway = config_from_args(build_parser().parse_args(plan.gateway[4:]))
    assert gateway.lora_modules == {"one": "/a/one", "two": "/a/two"}
    assert "--lora-modules" not in launcher.make_plan(launcher.build_parser().parse_args(argv[:5])).gateway


def test_vllms_enable_lora_is_taken_by_baton_up_and_by_a_worker():
    """vLLM serves adapters only with ``--enable-lora``; here LoRA is always on, and a vLLM
    command line with the flag starts the same system as one without it."""
    argv = ["up", "--model", "/m", "--redis-url", "redis://r/0", "--lora-modules", "one=/a/one", "--max-loras", "2"]
    plan = launcher.make_plan(launcher.build_parser().parse_args([*argv, "--enable-lora"]))
    for role, cmd in (("prefill", plan.prefill[0]), ("decode", plan.decode[0])):
        worker = worker_arg_parser(role, default_port=50051).parse_args(cmd[4:])
        assert (worker.lora_modules, worker.max_loras) == (["one=/a/one"], 2)
        assert worker_arg_parser(role, default_port=50051).parse_args([*cmd[4:], "--enable-lora"]).enable_lora


def test_vllm_command_lines_flags_that_change_nothing_here_are_taken_and_parallel_sizes_past_1_refused(capsys):
    """A ``vllm serve`` command line's --enable-chunked-prefill, --trust-remote-code, -tp 1 / -pp 1 and --disable-log-requests
    start the same system as without them; a tensor or pipeline parallel size past 1 is refused at once."""
    from baton.services.gateway.__main__ import build_parser

    argv = ["up", "--model", "/m", "--redis-url", "redis://r/0"]
    extra = ["--enable-chunked-prefill", "--trust-remote-code", "--kv-cache-dtype", "auto", "-tp", "1", "--pipeline-parallel-size", "1", "--disable-log-requests"]
    plain, vllm = (launcher.make_plan(launcher.build_parser().parse_args(a)) for a in (argv, [*argv, *extra]))
    assert [cmd[6:] for cmd in vllm.prefill + vllm.decode] == [cmd[6:] for cmd in plain.prefill + plain.decode]  # past --port
    assert not build_parser().parse_args(vllm.gateway[4:]).enable_log_requests
    worker = worker_arg_parser("decode", default_port=50061)
    worker.parse_args([*plain.decode[0][4:], "--enable-chunked-prefill", "--trust-remote-code", "-tp", "1"])
    for parser, args in ((launcher.build_parser(), argv), (worker, plain.decode[0][4:])):
        with pytest.raises(SystemExit):
            parser.parse_args([*args, "--tensor-parallel-size", "2"])
        assert "runs its model on one device" in capsys.readouterr().err
        with pytest.raises(SystemExit):
            parser.parse_args([*args, "--kv-cache-dtype", "int8"])
        assert "invalid choice: 'int8'" in capsys.readouterr().err


def test_baton_up_hands_its_kv_cache_dtype_and_quantization_to_every_worker():
    from baton.services.worker import engine_config

    argv = ["up", "--model", "/m", "--redis-url", "redis://r/0", "--prefill", "2", "--kv-cache-dtype", "fp8", "-q", "fp8"]
    plan = launcher.make_plan(launcher.build_parser().parse_args(argv))
    roles = [(role, worker_arg_parser(role, default_port=50061).parse_args(cmd[4:]))
             for role, cmds in (("prefill", plan.prefill), ("decode", plan.decode)) for cmd in cmds]
    assert [(args.kv_cache_dtype, engine_config(args, role).quantization) for role, args in roles] == [("fp8", "fp8")] * 3
    plan = launcher.make_plan(launcher.build_parser().parse_args(argv[:-2]))
    assert all("--quantization" not in cmd for cmd in [*plan.prefill, *plan.decode])


def test_launcher_plan_lets_the_gateway_load_adapters_at_runtime_and_sizes_the_workers_for_them(monkeypatch):
    from baton.services.gateway.__main__ import build_parser, config_from_args

    monkeypatch.delenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", raising=False)
    argv = ["up", "--model", "/m", "--redis-url", "redis://r/0", "--max-loras", "3", "--max-lora-rank", "64"]
    plan = launcher.make_plan(launcher.build_parser().parse_args([*argv, "--allow-runtime-lora-updating"]))
    assert config_from_args(build_parser().parse_args(plan.gateway[4:])).allow_runtime_lora_updating
    for role, cmd in (("prefill", plan.prefill[0]), ("decode", plan.decode[0])):
        worker = worker_arg_parser(role, default_port=50051).parse_args(cmd[4:])
        assert (worker.lora_modules, worker.max_loras, worker.max_lora_rank) == ([], 3, 64)
    plain = launcher.make_plan(launcher.build_parser().parse_args(argv))
    assert not config_from_args(build_parser().parse_args(plain.gateway[4:])).allow_runtime_lora_updating


def test_launcher_plan_hands_the_dev_mode_to_the_gateway(monkeypatch):
    from baton.services.gateway.__main__ import build_parser, config_from_args

    monkeypatch.delenv("VLLM_SERVER_DEV_MODE", raising=False)
    argv = ["up", "--model", "/m", "--redis-url", "redis://r/0"]
    for flags, on in (([], False), (["--dev-mode"], True)):
        plan = launcher.make_plan(launcher.build_parser().parse_args([*argv, *flags]))
        assert config_from_args(build_parser().parse_args(plan.gateway[4:])).dev_mode is on


def test_launcher_plan_splits_the_gpu_memory_utilization_between_the_workers():
    argv = ["up", "--model", "/m", "--redis-url", "redis://r/0", "--device", "cuda", "--prefill", "2"]
    plan = launcher.make_plan(launcher.build_parser().parse_args([*argv, "--gpu-memory-utilization", "0.9"]))
    shares = [worker_arg_parser(role, default_port=50051).parse_args(cmd[4:]).gpu_memory_utilization
              for role, cmds in (("prefill", plan.prefill), ("decode", plan.decode)) for cmd in cmds]
    assert shares == [pytest.approx(0.3)] * 3
    plan = launcher.make_plan(launcher.build_parser().parse_args(argv))
    assert worker_arg_parser("decode", default_port=50061).parse_args(plan.decode[0][4:]).gpu_memory_utilization is None


def test_launcher_plan_hands_the_chat_template_and_token_ids_flag_to_the_gateway(tmp_path):
    from baton.services.gateway.__main__ import build_parser, config_from_args

    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (tmp_path / "chat.jinja").write_text(template)
    argv = ["up", "--model", "/m", "--redis-url", "redis://r/0"]
    plan = launcher.make_plan(launcher.build_parser().parse_args([*argv, "--chat-template", str(tmp_path / "chat.jinja")]))
    assert config_from_args(build_parser().parse_args(plan.gateway[4:])).chat_template == template
    plan = launcher.make_plan(launcher.build_parser().parse_args(argv))
    assert config_from_args(build_parser().parse_args(plan.gateway[4:])).chat_template is None
    assert not config_from_args(build_parser().parse_args(plan.gateway[4:])).return_tokens_as_token_ids
    plan = launcher.make_plan(launcher.build_parser().parse_args([*argv, "--return-tokens-as-token-ids"]))
    assert config_from_args(build_parser().parse_args(plan.gateway[4:])).return_tokens_as_token_ids


def test_launcher_plan_hands_the_request_template_trust_to_the_gateway():
    from baton.services.gateway.__main__ import build_parser, config_from_args

    argv = ["up", "--model", "/m", "--redis-url", "redis://r/0"]
    for extra, trusted in (([], False), (["--trust-request-chat-template"], True)):
        plan = launcher.make_plan(launcher.build_parser().parse_args([*argv, *extra]))
        assert config_from_args(build_parser().parse_args(plan.gateway[4:])).trust_request_chat_template is trusted


def test_launcher_plan_hands_max_logprobs_to_every_process():
    from baton.services.gateway.__main__ import build_parser, config_from_args

    argv = ["up", "--model", "/m", "--redis-url", "redis://r/0", "--max-logprobs", "-1"]
    plan = launcher.make_plan(launcher.build_parser().parse_args(argv))
    assert config_from_args(build_parser().parse_args(plan.gateway[4:])).max_logprobs == -1
    for role, cmd in (("prefill", plan.prefill[0]), ("decode", plan.decode[0])):
        assert worker_arg_parser(role, default_port=50051).parse_args(cmd[4:]).max_logprobs == -1


def test_launcher_plan_hands_the_local_prefill_rules_to_the_gateway():
    from baton.services.gateway.__main__ import build_parser, config_from_args

    argv = ["up", "--model", "/m", "--redis-url", "redis://r/0"]
    for extra, rules in (([], (0, 0)), (["--max-local-prefill-length", "64", "--max-prefill-queue-size", "8"], (64, 8))):
        plan = launcher.make_plan(launcher.build_parser().parse_args([*argv, *extra]))
        config = config_from_args(build_parser().parse_args(plan.gateway[4:]))
        assert (config.max_local_prefill_length, config.max_prefill_queue_size) == rules
def test_launcher_hands_the_generation_config_flags_to_the_gateway(compose, tmp_path, capsys):
    from baton.services.gateway.__main__ import build_parser, config_from_args

    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.2}))
    argv = ["up", "--model", "/m", "--redis-url", "redis://r/0"]

    def gateway_config(*flags: str):
        plan = launcher.make_plan(launcher.build_parser().parse_args([*argv, *flags]))
        return config_from_args(build_parser().parse_args(plan.gateway[4:]))

    assert (gateway_config().generation_config, gateway_config().override_generation_config) == ("auto", {})
    gateway = gateway_config("--generation-config", str(tmp_path),
                             "--override-generation-config", '{"top_k": 4, "max_new_tokens": null}')
    assert gateway.generation_config == str(tmp_path)
    assert gateway.override_generation_config == {"top_k": 4, "max_new_tokens": None}
    with pytest.raises(SystemExit):
        launcher.build_parser().parse_args([*argv, "--override-generation-config", '{"temperature": -1}'])
    assert "argument --override-generation-config: temperature: Input should be greater" in capsys.readouterr().err
    # compose: through GATEWAY_FLAGS (JSON without spaces: the shell splits the flags at whitespace)
    service = compose["services"]["gateway"]
    args = build_parser().parse_args(_argv(service, GATEWAY_FLAGS='--override-generation-config {"temperature":0.5}')[4:])
    assert config_from_args(args).override_generation_config == {"temperature": 0.5}


def test_baton_up_refuses_a_generation_config_a_request_would_refuse_before_starting_anything(
    demo_model, tmp_path, capsys, monkeypatch,
):
    def start(args):
        raise AssertionError("baton up went on to start the processes")

    monkeypatch.setattr(launcher, "make_plan", start)
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (model / name).write_bytes((Path(demo_model) / name).read_bytes())
    (model / "generation_config.json").write_text(json.dumps({"top_p": 0}))
    assert launcher.main(["up", "--model", str(model), "--redis-url", "redis://127.0.0.1:1/0"]) == 2
    err = capsys.readouterr().err
    assert f"baton up: --generation-config auto: {model}/generation_config.json: top_p: Input should be greater" in err


def test_lora_modules_in_vllms_json_form_reach_every_process_and_a_foreign_base_model_is_refused(demo_model, capsys):
    from baton.services.gateway.__main__ import build_parser, config_from_args, main as gateway_main

    spec = '{"name": "sonnets", "path": "/a/sonnets", "base_model_name": "shakespeare-llama-5m"}'
    argv = ["up", "--model", demo_model, "--redis-url", "redis://r/0", "--lora-modules", spec]
    plan = launcher.make_plan(launcher.build_parser().parse_args(argv))
    assert config_from_args(build_parser().parse_args(plan.gateway[4:])).lora_modules == {"sonnets": "/a/sonnets"}
    for role, cmd in (("prefill", plan.prefill[0]), ("decode", plan.decode[0])):
        assert worker_arg_parser(role, default_port=50051).parse_args(cmd[4:]).lora_modules == [spec]
    foreign = spec.replace("shakespeare-llama-5m", "llama-3-8b")
    assert launcher.main([*argv[:-1], foreign]) == 2
    assert "names base model 'llama-3-8b', but the model served is 'shakespeare-llama-5m'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gateway_main(["--model-dir", demo_model, "--lora-modules", foreign])
    assert "names base model 'llama-3-8b'" in capsys.readouterr().err


def test_launcher_plan_hands_the_request_id_headers_flag_to_the_gateway():
    from baton.services.gateway.__main__ import build_parser, config_from_args

    argv = ["up", "--model", "/m", "--redis-url", "redis://r/0"]
    for extra, enabled in (([], False), (["--enable-request-id-headers"], True)):
        plan = launcher.make_plan(launcher.build_parser().parse_args([*argv, *extra]))
        assert config_from_args(build_parser().parse_args(plan.gateway[4:])).enable_request_id_headers is enabled


def test_vllms_dtype_names_reach_the_workers_as_the_engine_takes_them():
    from baton.engine.config import EngineConfig
    from baton.services.worker import engine_config

    for name, want in (("auto", None), ("half", "float16"), ("float", "float32"), ("bfloat16", "bfloat16")):
        plan = launcher.make_plan(launcher.build_parser().parse_args(["up", "--model", "/m", "--no-redis", "--dtype", name]))
        for role, cmds in (("prefill", plan.prefill), ("decode", plan.decode)):
            assert engine_config(worker_arg_parser(role, default_port=1).parse_args(cmds[0][4:]), role).dtype == want
        assert EngineConfig(dtype=name).dtype == want
    with pytest.raises(ValueError, match="dtype must be one of auto, half"):
        EngineConfig(dtype="fp8")
    with pytest.raises(SystemExit):
        launcher.build_parser().parse_args(["up", "--dtype", "fp8"])


def test_the_uvicorn_log_level_reaches_the_gateways_http_server(demo_model, monkeypatch):
    from baton.services.gateway import __main__ as gateway_main

    levels = []

    async def serve(config, tokenizer, log_level, listen_fd, supervisor):
        levels.append(log_level)

    monkeypatch.setattr(gateway_main, "serve", serve)
    argv = ["up", "--model", demo_model, "--no-redis"]
    for extra in ([], ["--uvicorn-log-level", "warning"]):
        gateway_main.main(launcher.make_plan(launcher.build_parser().parse_args([*argv, *extra])).gateway[4:])
    assert levels == ["info", "warning"]
