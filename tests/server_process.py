"""`python -m dspark_jax.serve` as a child process on an ephemeral loopback port, for the server tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Server:
    """A running server: its base URL, process, merged stdout/stderr log and config file."""

    url: str
    proc: subprocess.Popen
    log: Path
    config: Path

    def log_tail(self) -> str:
        return self.log.read_text()[-4000:]


def start_server(config: Path, workdir: Path, *args: str, timeout: float = 300) -> Server:
    """Launch the CLI on an ephemeral loopback port; return once /health answers 200."""
    log = workdir / "server.log"
    env = {**os.environ, "DSPARK_CACHE": str(workdir / "cache"), "JAX_PLATFORMS": "cpu"}
    with open(log, "w") as out:  # uvicorn's access log goes to stdout: a file never fills up like a pipe
        proc = subprocess.Popen([sys.executable, "-m", "dspark_jax.serve", "--config", str(config),
                                 "--host", "127.0.0.1", "--port", "0", *args],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = Server("", proc, log, config)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode} before answering:\n{server.log_tail()}")
        if not server.url:
            listening = [line for line in log.read_text().split("\n")[:-1] if line.startswith('{"listening"')]
            if listening:
                server.url = json.loads(listening[0])["listening"]
        else:
            try:
                if httpx.get(server.url + "/health", timeout=5).status_code == 200:
                    return server
            except httpx.TransportError:
                pass
        time.sleep(0.5)
    proc.kill()
    pytest.fail(f"server not healthy after {timeout}s:\n{server.log_tail()}")


def stop_server(server: Server) -> int:
    """SIGTERM (a graceful drain), SIGKILL after a minute; the exit status."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(60)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
    return server.proc.returncode
