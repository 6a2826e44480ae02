"""Several gateway processes on one port (``--api-server-count``): their supervisor, the command
line each gets, and their metrics summed over every process."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from baton.services.gateway import api_servers, metrics
from baton.services.gateway.__main__ import build_parser, main
from baton.services.launcher import free_port
from conftest import DEMO_MODEL
from processes import assert_gone, children_of

MODEL = DEMO_MODEL.name
DEAD = "127.0.0.1:9"   # nothing listens here


def _sample(text: str, line_start: str) -> float:
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(line_start + " ")]
    assert len(values) == 1, (line_start, text)
    return values[0]


def test_metrics_are_summed_over_every_api_server_process(tmp_path, monkeypatch) -> None:
    """What each process recorded, in its own files, reaches a scrape of any of them; the hit ratio
    is worked out from the sums, not averaged."""
    record = ("import sys, time; from baton.services.gateway import metrics\n"
              "prompt, cached = map(int, sys.argv[1:])\n"
              "metrics.record_prompt(prompt, cached)\n"
              "m = metrics.RequestMetrics(time.perf_counter()); m.on_tokens(0, 3); m.finish('success')\n")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for prompt, cached in ((10, 8), (30, 0)):
        subprocess.run([sys.executable, "-P", "-c", record, str(prompt), str(cached)], env=env, check=True)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    body, _ = metrics.render(MODEL, {"decode": 0.25})
    text = body.decode()
    assert _sample(text, "baton_prompt_tokens_total") == 40
    assert _sample(text, "baton_cached_prompt_tokens_total") == 8
    assert _sample(text, "baton_prefix_cache_hit_ratio") == pytest.approx(8 / 40)
    assert _sample(text, 'baton_requests_total{status="success"}') == 2
    assert _sample(text, "baton_generation_tokens_total") == 6
    assert _sample(text, "baton_time_to_first_token_seconds_count") == 2
    assert _sample(text, "baton_requests_running") == 0
    assert _sample(text, f'vllm:generation_tokens_total{{model_name="{MODEL}"}}') == 6
    assert _sample(text, f'vllm:kv_cache_usage_perc{{model_name="{MODEL}"}}') == 0.25


def test_each_api_server_serves_the_inherited_socket_with_the_supervisors_flags() -> None:
    argv = ["--model-dir", "m", "--api-server-count", "3", "--max-queue", "100", "--redis-url", "redis://r"]
    command = api_servers.child_command(argv, 7)
    assert command[:4] == [sys.executable, "-P", "-m", "baton.services.gateway"]
    args = build_parser().parse_args(command[4:])
    assert (args.api_server_count, args.listen_fd, args.max_queue, args.redis_url) == (1, 7, 100, "redis://r")
    assert args.supervisor_pid == os.getpid()


def test_several_api_servers_need_redis(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--model-dir", str(DEMO_MODEL), "--api-server-count", "2", "--prefill-addr", DEAD, "--decode-addr", DEAD])
    assert exc.value.code == 2 and api_servers.NEEDS_REDIS in capsys.readouterr().err


def _supervisor_command(port: int) -> list[str]:
    """A gateway with two API servers, against workers and a Redis that do not answer."""
    return [sys.executable, "-P", "-m", "baton.services.gateway", "--model-dir", str(DEMO_MODEL), "--port", str(port),
            "--prefill-addr", DEAD, "--decode-addr", DEAD, "--redis-url", f"redis://{DEAD}/0", "--api-server-count", "2",
            "--log-level", "warning"]


@contextmanager
def _supervisor(port: int) -> Iterator[tuple[subprocess.Popen, list[int]]]:
    """``_supervisor_command``'s supervisor, once its port answers, and its children; killed on the
    way out if still running."""
    proc = subprocess.Popen(_supervisor_command(port))
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        children = children_of(proc.pid)
        assert len(children) == 2, children
        yield proc, children
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _metrics_dirs() -> set[Path]:
    return set(Path(os.environ.get("TMPDIR", "/tmp")).glob("baton-gateway-metrics-*"))


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_api_servers_share_the_port_and_drain_on_sigterm() -> None:
    before = _metrics_dirs()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with _supervisor(port) as (proc, children):
        bad = {"model": MODEL, "prompt": "x", "temperature": -1}
        for _ in range(8):   # a connection each: the two processes take them as they come
            with httpx.Client() as client:
                assert client.post(f"{url}/v1/completions", json=bad, timeout=10).status_code == 400
        scraped = httpx.get(f"{url}/metrics", timeout=10).text
        assert _sample(scraped, 'baton_requests_total{status="rejected"}') == 8
        assert len(_metrics_dirs() - before) == 1
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        answer = httpx.get(f"{url}/ready", timeout=5)
        assert answer.status_code == 503 and answer.json()["draining"] is True
        assert proc.wait(timeout=30) == 0
    assert_gone(children)
    assert _metrics_dirs() == before


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_sigterm_while_the_api_servers_start_stops_them_cleanly() -> None:
    """Children the signal finds still starting (no handler of theirs yet; the second one maybe
    not yet known to the supervisor, which is then still starting it) end by it: the supervisor
    exits 0, as for a drain."""
    proc = subprocess.Popen(_supervisor_command(free_port()))
    try:
        deadline = time.monotonic() + 60
        while len(children := children_of(proc.pid)) < 2 and time.monotonic() < deadline:
            pass   # no sleep: the signal comes as soon as the second child is there
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert_gone(children)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_an_api_server_that_dies_stops_the_others_and_its_supervisor_fails() -> None:
    with _supervisor(free_port()) as (proc, children):
        os.kill(children[0], signal.SIGKILL)
        assert proc.wait(timeout=30) == 1
    assert_gone(children)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_api_servers_stop_when_their_supervisor_is_killed() -> None:
    before = _metrics_dirs()
    with _supervisor(free_port()) as (proc, children):
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 20
    while any(Path(f"/proc/{pid}").exists() for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert_gone(children)
    for left in _metrics_dirs() - before:   # a killed supervisor could not remove its directory
        shutil.rmtree(left)
