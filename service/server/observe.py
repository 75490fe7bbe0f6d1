"""`Observed`: ASGI middleware that counts each `/v1` request once, by route and status
(`nlg_http_requests_total`, 401s and 413s refused by other middleware included), and observes the
end-to-end latency of each successful generation request, to its last byte (streams too):
`vllm:e2e_request_latency_seconds`. A task that runs several generations is one request here."""

from __future__ import annotations

import time

from service.engine.metrics import Metrics

GENERATES = ("/v1/completions", "/v1/chat/completions", "/v1/answer", "/v1/summarize")  # e2e latency of these


class Observed:
    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1"):
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def sending(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            m = self.metrics
            route = getattr(scope.get("route"), "path", "unmatched")  # the template: /v1/jobs/{job}
            m.http.labels(m.model_name, route, str(status)).inc()
            if status < 400 and route in GENERATES:
                m.latency.observe(time.perf_counter() - start)
