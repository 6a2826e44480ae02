"""``baton up`` as a user runs it: one command starts Redis, the workers and the
gateway, prints the URL once ready, serves, and stops everything on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from baton.services.launcher import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def children_of(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def test_baton_up_serves_and_stops_cleanly():
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "baton.services.launcher", "up", "--port", str(port)],
        stdout=subprocess.PIPE, text=True, env=env,
    )
    children: list[int] = []
    try:
        ready = ""
        deadline = time.monotonic() + 240
        while "Baton is ready" not in ready and time.monotonic() < deadline and proc.poll() is None:
            ready = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/v1" in ready, ready
        children = children_of(proc.pid)
        assert len(children) == 4  # redis, prefill, decode, gateway
        body = {"model": "shakespeare-llama-5m", "prompt": "JULIET:\nO Romeo", "max_tokens": 8, "temperature": 0}
        resp = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60)
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["text"].startswith(", Romeo!")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=90)
    assert code == 0
    for child in children:
        assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]


def test_baton_up_refuses_a_missing_model(capsys):
    from baton.services.launcher import main

    assert main(["up", "--model", "/nonexistent/checkpoint"]) == 2
    assert "'/nonexistent/checkpoint' is not a checkpoint directory" in capsys.readouterr().err
