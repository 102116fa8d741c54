"""Counting XLA compilations per thread, so a caller can tell which of its calls compiled.

JAX reports every backend compilation through `jax.monitoring` on the thread that triggered it
(persistent-cache hits are not compilations). One listener, registered on import, keeps a count
and the seconds spent per thread; `CompileLog.track` attributes the compilations a call caused to
a named program shape and logs them.
"""

from __future__ import annotations

import contextlib
import logging
import threading

import jax

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
log = logging.getLogger("dspark_jax.compiles")


class _ThreadTotals(threading.local):
    count = 0
    seconds = 0.0


_totals = _ThreadTotals()


def _listener(event: str, duration_secs: float, **kwargs) -> None:
    if event == _COMPILE_EVENT:
        _totals.count += 1
        _totals.seconds += duration_secs


jax.monitoring.register_event_duration_secs_listener(_listener)


class CompileLog:
    """The compilations caused by the calls made under `track`, by program shape."""

    def __init__(self):
        self.count = 0
        self.seconds = 0.0
        self.shapes: list[str] = []  # one entry per call that compiled, in order

    @contextlib.contextmanager
    def track(self, shape: str):
        count, seconds = _totals.count, _totals.seconds
        try:
            yield
        finally:
            new = _totals.count - count
            if new:
                spent = _totals.seconds - seconds
                self.count += new
                self.seconds += spent
                self.shapes.append(shape)
                log.info("compiled %s (%d program%s, %.2f s)", shape, new, "s" * (new > 1), spent)
