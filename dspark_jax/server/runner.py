"""Running the app under uvicorn on a socket bound here (so `--port 0` has a known port)."""

from __future__ import annotations

import json
import logging
import socket

import uvicorn
from fastapi import FastAPI


def run_server(app: FastAPI, *, host: str, port: int, drain_timeout: float, log_level: str = "info") -> int:
    """Serve until SIGINT/SIGTERM; returns the process exit status (0, or 3 if start-up failed).

    Prints one JSON line {"listening": URL} once the port is bound; /health turns 200 when the engine
    has warmed up (requests sent earlier wait for it). On SIGTERM uvicorn stops
    accepting, lets running requests finish for up to `drain_timeout` seconds, cancels the rest
    (which aborts them in the engine), then the app's shutdown drains and stops the engine.
    """
    # the engine's log (warm-up, compilations after it, failures) beside uvicorn's
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    url = f"http://[{host}]:{bound}" if ":" in host else f"http://{host}:{bound}"
    print(json.dumps({"listening": url}), flush=True)
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level=log_level,
                                           timeout_graceful_shutdown=drain_timeout))
    server.run(sockets=[sock])
    return 0 if server.started else 3
