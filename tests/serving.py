"""Servers for tests: a real process on a free loopback port, with a bounded lifetime, stopped in a finally."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def running(argv: list[str], log: Path, env: dict[str, str] | None = None, lifetime: float = 900) -> Iterator[Server]:
    """Start `argv` (with {port} filled in), wait until it answers GET /api/version, yield it;
    kill it after `lifetime` seconds whatever happens. It runs in a process group of its own, which
    is ended with it (a launcher's processes too)."""
    port = free_port()
    with open(log, "w") as out:
        process = subprocess.Popen(
            [a.format(port=port) for a in argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    killer = threading.Timer(lifetime, _signal_group, (process, signal.SIGKILL))
    killer.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(f"{url}/api/version", timeout=2)
                break
            except httpx.TransportError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.2)
        yield Server(url, process, log)
    finally:
        killer.cancel()
        _signal_group(process, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(process, signal.SIGKILL)
        process.wait()


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)


def serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "mlxqwen.cli", "serve", "--port", "{port}", *args]
