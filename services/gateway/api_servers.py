"""Several API server processes on one port (``--api-server-count N``, vLLM's flag).

A gateway's event loop does per-token work for every stream it serves (gRPC reads, detokenizing,
SSE frames); under many streams it is the busiest thread of a deployment
(``bench/results/serving_h200.md``). N gateways on one listening socket spread that work over N
cores.

The supervisor (the process started with ``--api-server-count N``) binds the socket, then starts N
gateways as child processes, each given the socket (``--listen-fd``). The kernel hands each new
connection to a child that accepts it, so the children need not get even shares: each admits
``--max-queue`` requests (a share of it would turn a busier child's surplus into 429s). They share
what one request may need from an earlier one through Redis, as separate gateways do (stored
responses, runtime LoRA adapters, the prefix index), so N > 1 needs ``--redis-url``. Their metrics
are summed (prometheus-client's multiprocess mode, in a directory the supervisor makes and removes).

Signals: the children run in a session of their own, so SIGTERM or Ctrl-C reaches the supervisor
alone, which passes each one on as SIGTERM (the first drains, the second stops at once, as for one
gateway). A child that exits by itself stops the rest and the supervisor exits 1; a child whose
supervisor is gone stops too (``parent_gone``).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from types import FrameType

logger = logging.getLogger(__name__)

POLL_S = 0.2
NEEDS_REDIS = ("--api-server-count above 1 needs --redis-url: the API servers share stored responses and "
               "runtime LoRA adapters through Redis")


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket listening on ``host``:``port`` that child processes inherit."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=2048)
    sock.set_inheritable(True)
    return sock


def child_command(argv: list[str], fd: int) -> list[str]:
    """A child gateway's command line: the supervisor's own (``argv``), serving on inherited file
    descriptor ``fd`` (later flags override earlier)."""
    return [sys.executable, "-P", "-m", "baton.services.gateway", *argv, "--api-server-count", "1",
            "--listen-fd", str(fd), "--supervisor-pid", str(os.getpid())]


def parent_gone(supervisor: int) -> bool:
    """Whether this process's supervisor (pid ``supervisor``) has exited: it is no longer the
    parent, whenever that happened (before this process started, even)."""
    return os.getppid() != supervisor


def supervise(argv: list[str], host: str, port: int, count: int) -> int:
    """Serve ``host``:``port`` with ``count`` child gateways run from ``argv`` until a signal (0
    once every child has drained, or stopped if it was still starting) or a child's own exit (1)."""
    sock = listening_socket(host, port)
    metrics_dir = tempfile.mkdtemp(prefix="baton-gateway-metrics-")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    command = child_command(argv, sock.fileno())
    children: list[subprocess.Popen] = []
    signals = 0           # SIGTERMs and SIGINTs received
    failed = False        # a child exited by itself
    told: dict[int, int] = {}   # child pid -> SIGTERMs passed on to it

    def pass_on() -> None:
        """Bring each running child up to one SIGTERM per signal received (one at least once a
        child failed): a child started while a signal was being handled gets its share too."""
        wanted = max(signals, int(failed))
        for child in children:
            while child.poll() is None and told.get(child.pid, 0) < wanted:
                child.send_signal(signal.SIGTERM)
                told[child.pid] = told.get(child.pid, 0) + 1

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal signals
        signals += 1
        pass_on()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        for _ in range(count):
            if signals:   # stopped while starting: no more
                break
            children.append(subprocess.Popen(command, pass_fds=(sock.fileno(),), env=env, start_new_session=True))
            pass_on()
        sock.close()
        logger.info("serving on %s:%d with %d API server processes (pids %s)", host, port, count,
                    " ".join(str(child.pid) for child in children))
        while any(child.poll() is None for child in children):
            if not signals and not failed and any(child.returncode is not None for child in children):
                failed = True
                logger.error("an API server exited by itself (%s); stopping the others",
                             ", ".join(f"pid {c.pid}: code {c.returncode}" for c in children if c.returncode is not None))
            pass_on()
            time.sleep(POLL_S)
        # A child the signal found still starting (its handlers not yet set) ends by it: stopped, not failed.
        stopped = all(child.returncode in (0, -signal.SIGTERM) for child in children)
        return 0 if signals and not failed and stopped else 1
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
        sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
