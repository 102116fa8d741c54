"""The server as a child process on an ephemeral loopback port (benchmarks and tests drive it so)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import dspark_jax


class ServerProcess:
    """`python -m dspark_jax.serve --config CONFIG --host 127.0.0.1 --port 0 ARGS...`, stdout+stderr to `log`.

    The log is a file, not a pipe: uvicorn writes an access line per request to stdout, and a pipe
    nobody reads would fill and stall the server under load.
    """

    def __init__(self, config: str | Path, log: Path, *args: str, env: dict | None = None,
                 program: tuple[str, ...] = ("-m", "dspark_jax.serve")):
        """`program`: what Python runs (a script taking dspark_jax.serve's arguments may stand in)."""
        self.config = Path(config)
        self.log = log
        self.url = ""
        # the child imports the dspark_jax this process runs, installed or not
        source_root = str(Path(dspark_jax.__file__).resolve().parent.parent)
        python_path = os.pathsep.join(p for p in (source_root, os.environ.get("PYTHONPATH")) if p)
        with open(log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, *program, "--config", str(config),
                                          "--host", "127.0.0.1", "--port", "0", *args],
                                         env={**os.environ, "PYTHONPATH": python_path, **(env or {})},
                                         stdout=out, stderr=subprocess.STDOUT)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def wait_healthy(self, timeout: float = 300) -> ServerProcess:
        """Return once /health answers 200 (the engine has warmed up); RuntimeError with the log otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before it was healthy:\n"
                                   f"{self.log_tail()}")
            if not self.url:
                lines = self.log.read_text(errors="replace").split("\n")[:-1]  # complete lines only
                self.url = next((json.loads(line)["listening"] for line in lines
                                 if line.startswith('{"listening"')), "")
            else:
                try:
                    with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                        if r.status == 200:
                            return self
                except urllib.error.HTTPError as e:  # 503 while warming up; "failed" will not get better
                    if json.loads(e.read() or b"{}").get("status") == "failed":
                        self.stop()
                        raise RuntimeError(f"the engine failed during warm-up:\n{self.log_tail()}") from None
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    pass
            time.sleep(0.5)
        self.proc.kill()
        raise RuntimeError(f"server not healthy after {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (a graceful drain), SIGKILL if it has not exited after `timeout`; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
