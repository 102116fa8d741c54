"""HTTP request counting for /metrics, in the engine's registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


class HTTPMetrics:
    """ASGI middleware: counts finished HTTP requests by route template, method and status.

    The route is the matched path template (/v1/completions), never the raw path, so unknown paths
    cannot grow the label set; they count as route="unmatched". A request whose handler raised
    counts as 500 unless a response had already started.
    """

    def __init__(self, app, registry: CollectorRegistry):
        self.app = app
        self.requests = Counter("dspark_http_requests", "HTTP requests answered, by route, method and status",
                                ["route", "method", "status"], registry=registry)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_and_note_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            route = scope.get("route")
            self.requests.labels(getattr(route, "path", "unmatched"), scope["method"], str(status)).inc()
