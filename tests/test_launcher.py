"""``baton up`` as a user runs it: one command starts Redis, the workers and the
gateway, prints the URL once ready, serves, and stops everything on SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from baton.services import launcher
from baton.services.launcher import Plan, free_port, wait_ready
from processes import assert_gone, children_of

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def start_baton_up(port: int, *flags: str, command: str = "up") -> tuple[subprocess.Popen, list[int]]:
    """``baton up`` (or ``command``) on ``port`` (with ``flags``), once it says it is ready, and its
    child processes."""
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "baton.services.launcher", command, "--port", str(port), *flags],
        stdout=subprocess.PIPE, text=True, env=env,
    )
    ready = ""
    deadline = time.monotonic() + 240
    while "Baton is ready" not in ready and time.monotonic() < deadline and proc.poll() is None:
        ready = proc.stdout.readline()
    if f"://127.0.0.1:{port}/v1" not in ready:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=90)
        pytest.fail(f"baton up did not get ready: {ready!r}")
    return proc, children_of(proc.pid)


def test_baton_up_serves_and_stops_cleanly():
    port = free_port()
    proc, children = start_baton_up(port)
    try:
        assert len(children) == 4  # redis, prefill, decode, gateway
        body = {"model": "shakespeare-llama-5m", "prompt": "JULIET:\nO Romeo", "max_tokens": 8, "temperature": 0}
        resp = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60)
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["text"].startswith(", Romeo!")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=90)
    assert code == 0
    assert_gone(children)


def test_baton_up_with_two_api_servers_serves_from_both_and_stops_cleanly():
    """Two gateway processes on the port: requests on connections of their own reach either, and
    what one stored (a response) or counted (the metrics) is there for a request reaching the other."""
    port = free_port()
    proc, children = start_baton_up(port, "--api-server-count", "2")
    url = f"http://127.0.0.1:{port}/v1"
    gateways = children_of(children[-1])
    try:
        assert len(gateways) == 2
        body = {"model": "shakespeare-llama-5m", "prompt": "JULIET:\nO Romeo", "max_tokens": 8, "temperature": 0}
        for _ in range(6):
            with httpx.Client() as client:
                resp = client.post(f"{url}/completions", json=body, timeout=60)
                assert resp.status_code == 200, resp.text
                assert resp.json()["choices"][0]["text"].startswith(", Romeo!")
        previous = None
        for turn in range(4):
            with httpx.Client() as client:
                ask = {"model": "shakespeare-llama-5m", "input": f"Speak, turn {turn}.", "max_output_tokens": 4,
                       "temperature": 0, **({"previous_response_id": previous} if previous else {})}
                resp = client.post(f"{url}/responses", json=ask, timeout=60)
                assert resp.status_code == 200, resp.text
                previous = resp.json()["id"]
        with httpx.Client() as client:
            assert client.get(f"{url}/responses/{previous}", timeout=10).json()["id"] == previous
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        assert 'baton_requests_total{status="success"} 10.0' in text
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=90)
    assert code == 0
    assert_gone(children + gateways)


def test_baton_up_serves_over_tls_and_only_so(tmp_path):
    """``baton up --ssl-keyfile K --ssl-certfile C`` (vLLM's flags): the gateway answers HTTPS with
    that certificate, and plain HTTP not at all."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    port = free_port()
    proc, _ = start_baton_up(port, "--no-redis", "--ssl-keyfile", str(key), "--ssl-certfile", str(cert))
    try:
        body = {"prompt": "JULIET:\nO Romeo", "max_tokens": 8, "temperature": 0}
        trusted = ssl.create_default_context(cafile=str(cert))
        resp = httpx.post(f"https://127.0.0.1:{port}/v1/completions", json=body, timeout=60, verify=trusted)
        assert resp.status_code == 200 and resp.json()["choices"][0]["text"].startswith(", Romeo!")
        with pytest.raises(httpx.HTTPError):
            httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=10)
        with pytest.raises(httpx.ConnectError):    # a client that does not trust the certificate
            httpx.get(f"https://127.0.0.1:{port}/health", timeout=10)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0


def test_baton_up_serves_the_generation_configs_defaults(demo_model, tmp_path):
    """A checkpoint whose generation_config.json asks for greedy decoding and 7 new tokens: a
    request that leaves temperature and max_tokens out gets the engine's 7 greedy tokens (of
    prompts the model is unsure how to go on from, which sampling at temperature 1 would not give).
    Started as vLLM is: ``baton serve MODEL``."""
    from baton.engine.llm import LLM
    from baton.engine.sampling_params import SamplingParams

    model = tmp_path / "shakespeare-llama-5m"
    shutil.copytree(demo_model, model)
    config = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**config, "temperature": 0.0, "max_new_tokens": 7}))
    prompts = ["ROMEO:\n", "First Citizen:\n"]
    greedy = LLM(demo_model, num_blocks=32).generate(prompts, SamplingParams(temperature=0, max_tokens=7))
    port = free_port()
    proc, _ = start_baton_up(port, str(model), command="serve")
    try:
        body = {"model": "shakespeare-llama-5m", "prompt": prompts}
        resp = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60)
        assert resp.status_code == 200, resp.text
        out = resp.json()
        assert [c["text"] for c in out["choices"]] == [g.outputs[0].text for g in greedy]
        assert out["usage"]["completion_tokens"] == 14 and {c["finish_reason"] for c in out["choices"]} == {"length"}
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0


def test_baton_up_takes_the_tokenizer_from_another_directory(demo_model, split_checkpoint, capsys):
    """vLLM's ``--tokenizer``: a checkpoint without tokenizer files is refused at once, and served
    with one from elsewhere, which the gateway encodes and renders chats with and the workers
    compile grammars against: the same answers as the whole checkpoint's."""
    from baton.engine.llm import LLM
    from baton.engine.sampling_params import SamplingParams, StructuredOutputParams

    from baton.services.gateway.__main__ import main as gateway_main

    model, tokenizer = split_checkpoint
    assert launcher.main(["up", "--model", model, "--no-redis"]) == 2
    assert f"no tokenizer.json in {model}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gateway_main(["--model-dir", model])
    assert f"no tokenizer.json in {model}" in capsys.readouterr().err
    names = ["Romeo", "Juliet", "Mercutio"]
    messages = [{"role": "user", "content": "Who speaks?"}]
    expected = LLM(demo_model, num_blocks=32).chat(
        messages, SamplingParams(temperature=0, structured_output=StructuredOutputParams(choice=names)))[0].outputs[0].text
    port = free_port()
    proc, _ = start_baton_up(port, "--no-redis", "--model", model, "--tokenizer", tokenizer)
    try:
        body = {"prompt": "JULIET:\nO Romeo", "max_tokens": 8, "temperature": 0}
        resp = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60)
        assert resp.status_code == 200 and resp.json()["choices"][0]["text"].startswith(", Romeo!"), resp.text
        body = {"messages": messages, "temperature": 0, "structured_outputs": {"choice": names}}
        resp = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60)
        assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"] == expected, resp.text
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0


def test_the_model_is_given_once(capsys):
    assert launcher.main(["serve", "/a", "--model", "/b"]) == 2
    assert "give the model once" in capsys.readouterr().err


def test_a_second_sigterm_kills_what_is_left():
    """While ``baton up`` waits for the gateway to drain (at least a second), a second signal
    must not leave the workers and Redis running without it."""
    proc, children = start_baton_up(free_port())
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=90) == 0
    assert len(children) == 4
    assert_gone(children)


def test_baton_up_refuses_a_missing_model(capsys):
    from baton.services.launcher import main

    assert main(["up", "--model", "/nonexistent/checkpoint"]) == 2
    assert "'/nonexistent/checkpoint' is not a checkpoint directory" in capsys.readouterr().err


def test_tls_needs_both_the_key_and_the_certificate(capsys):
    from baton.services.launcher import main

    assert main(["up", "--ssl-keyfile", "/k.pem"]) == 2
    assert "both --ssl-keyfile and --ssl-certfile" in capsys.readouterr().err


def test_enable_auto_tool_choice_needs_a_parser_as_in_vllm(capsys):
    from baton.services.gateway.__main__ import main as gateway_main
    from baton.services.launcher import main

    assert main(["up", "--enable-auto-tool-choice"]) == 2
    assert "--enable-auto-tool-choice requires --tool-call-parser" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        gateway_main(["--model-dir", "/m", "--enable-auto-tool-choice"])
    assert exit_info.value.code == 2
    assert "--enable-auto-tool-choice requires --tool-call-parser" in capsys.readouterr().err


def test_ready_means_every_planned_worker_is_reachable():
    """``/ready`` answers 200 once one worker of each role answers the gateway; ``baton up``
    waits until it counts all that it started (or more: a shared registry lists others)."""
    answers = [(503, {"prefill": 1, "decode": 0}), (200, {"prefill": 1, "decode": 1}),
               (200, {"prefill": 2, "decode": 1}), (200, {"prefill": 3, "decode": 2})]
    served: list[int] = []

    class Ready(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, workers = answers[min(len(served), len(answers) - 1)]
            served.append(status)
            body = json.dumps({"ready": status == 200, "draining": False, "workers": workers}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Ready)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        plan = Plan(redis=None, redis_url="", prefill=[["p"], ["p"]], decode=[["d"]], url=f"http://127.0.0.1:{server.server_port}")
        wait_ready(plan, [], timeout=30)
        assert served == [503, 200, 200]
        dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
        dead.wait()
        with pytest.raises(RuntimeError, match="exited with code 3"):
            wait_ready(plan, [dead], timeout=30)
    finally:
        server.shutdown()


def test_free_ports_are_picked_below_the_ephemeral_range_where_there_is_room(monkeypatch):
    """Outgoing connections take local ports from the kernel's ephemeral range: a port picked
    there could be taken before ``baton up``'s worker binds it (a CI run lost a worker to a
    port in use by then). Each pick
    is free to bind, in [PORTS_FROM, the range's start), and none is handed out twice (one plan
    asks for many); with no room below, one of the kernel's."""
    start = launcher._ephemeral_ports_start()
    picks = [free_port() for _ in range(200)]
    assert all(launcher.PORTS_FROM <= port < start for port in picks) and len(set(picks)) == len(picks)
    for port in picks:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
    monkeypatch.setattr(launcher, "_ephemeral_ports_start", lambda: launcher.PORTS_FROM)
    assert free_port() >= start
