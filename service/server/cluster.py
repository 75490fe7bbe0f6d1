"""`nlg serve --ray [ADDRESS] --replicas N`: the service on a Ray cluster, through Ray Serve.

Deployments (one Serve application, `nlg`):

- `replica-0` ... `replica-{N-1}`: one replica each, the whole app of `nlg serve` (`build_app`) over its
  own model, `--replica-cpus` cores for its torch threads (or one GPU per rank with `--device cuda`),
  `--tp` ranks started as the batch replicas start theirs (`service.jobs.ranks`). It takes each request
  whole from the ingress and runs it through the app in process (`inprocess.respond`), streaming the
  response back as it is sent. A replica whose engine failed says so to Serve's health check, and Serve
  restarts it, as it restarts one whose process died.
- `ingress`: the HTTP entry point (Serve's proxy on every node, `--host`/`--port`). It routes each request
  to one replica (named in the response's `x-nlg-replica` header) by the leading span of its prompt
  (`service.server.routing`); files, batches and jobs always go to `replica-0` (their store is there); the
  rest are tried in the router's order and a 429 from one sends the request to the next, so a client gets
  429 only when every replica's queue is full. A replica that dies mid-stream ends its streams with an
  error event; a probe every `PROBE_S` keeps dead replicas out of the order until Serve has them back.
  `/health` is the ingress's, `/ready` asks every replica (200 with the count while one is ready),
  `/metrics` is every replica's series with a `replica` label, their sums with `replica="all"`, and the
  ingress's own (`nlg_routed_total` by replica and reason, `nlg_replicas_up`).

Separate deployments rather than one of N replicas: Serve picks among a deployment's replicas itself, and
this routing needs to name the replica.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from service.server.http_errors import body as error_json
from service.server.inprocess import request_of, respond
from service.server.routes.jobs import MAX_JOB_BYTES
from service.server.routes.uploads import MAX_UPLOAD_BYTES
from service.server.routing import HOME_PATHS, PrefixRouter, prompt_text, span_keys

PROBE_S = 1.0  # how often the ingress probes each replica
PROBE_TIMEOUT_S = 5.0  # a probe unanswered this long marks the replica down
FAN_OUT_TIMEOUT_S = 3.0  # /ready and /metrics wait this long for each replica
MAX_ONGOING = 4096  # requests Serve hands a deployment at once: the app's own queue answers 429 before
NOT_SUMMED = ("_created", "_start_time_seconds", "_max_fds")  # series whose sum over replicas means nothing
MAX_BODY = max(MAX_JOB_BYTES, MAX_UPLOAD_BYTES)  # the largest body any route takes: the ingress refuses more at once


@dataclass
class Spec:
    """What `nlg serve --ray` starts (`service.cli.serving.ray_spec` makes it from the command line): where,
    how many replicas of what (`options`: `TextGenerator.load`'s), and the settings of each one's app
    (`build_app`'s)."""

    address: str
    host: str
    port: int
    model: str
    options: dict
    replicas: int = 1
    cpus: float | None = None  # per replica; default the cluster's / replicas
    gpus: bool = False  # one GPU per rank
    tp: int = 1
    routing: str = "prefix"
    served_name: str | None = None
    api_keys: list[str] = field(default_factory=list)
    slots: int = 16
    max_waiting: int = 64
    jobs_db: str = ":memory:"  # replica-0's store
    request_timeout: float | None = 600.0
    score_traffic: bool = False
    allowed_origins: list[str] = field(default_factory=list)


class ReplicaServer:
    """One replica: the app of `nlg serve` over its own model (module doc)."""

    async def __init__(self, spec: Spec, home: bool, threads: int):
        import torch

        from service.engine.generator import TextGenerator
        from service.jobs import ranks
        from service.server.app import build_app

        torch.set_num_threads(threads)
        tp = spec.tp
        self.ranks = ranks.start(tp, spec.model, spec.options, max(1, threads // tp)) if tp > 1 else []
        self.failure: str | None = None
        gen = await asyncio.to_thread(TextGenerator.load, spec.model, **spec.options)
        gen.name = spec.served_name or gen.name
        jobs = spec.jobs_db if home else ":memory:"
        if jobs != ":memory:":
            Path(jobs).parent.mkdir(parents=True, exist_ok=True)
        self.app = build_app(
            gen,
            self._failed,
            spec.api_keys,
            spec.slots,
            spec.max_waiting,
            jobs,
            spec.request_timeout,
            spec.score_traffic,
            allowed_origins=spec.allowed_origins,
        )
        self.lifespan = self.app.router.lifespan_context(self.app)
        await self.lifespan.__aenter__()

    def _failed(self) -> None:
        self.failure = "the replica's engine failed"

    async def forward(self, request: dict):
        """The request run through the app: its response's start, then its body's pieces."""
        async for item in respond(self.app, request):
            yield item

    def pid(self) -> int:
        return os.getpid()

    def check_health(self) -> None:
        """Serve's health check: an engine that failed makes Serve restart this replica."""
        if self.failure:
            raise RuntimeError(self.failure)


class Ingress:
    """The HTTP entry point: routes each request to a replica (module doc)."""

    def __init__(self, replicas: list, bound: int, by_prefix: bool = True):
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.replicas = replicas
        self.router = PrefixRouter(len(replicas), bound, by_prefix)
        self.registry = CollectorRegistry()
        why = ["replica", "reason"]
        self.routed = Counter("nlg_routed", "Requests sent to each replica, and why", why, registry=self.registry)
        self.up = Gauge("nlg_replicas_up", "Replicas the ingress's last probe found up", registry=self.registry)
        self.up.set(len(replicas))
        self.prober: asyncio.Task | None = None

    async def __call__(self, request):
        from starlette.responses import JSONResponse

        if self.prober is None:
            self.prober = asyncio.create_task(self._probe_forever())
        path = request.url.path
        if path == "/health":
            return JSONResponse({"status": "ok", "replicas": len(self.replicas)})
        if path == "/ready":
            return await self._ready()
        if path == "/metrics":
            return await self._metrics()
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                return _error(413, f"the body is over {MAX_BODY} bytes", "too_large")
        return await self._forward(request_of(request.scope, bytes(body)), request.headers.get("content-type", ""))

    async def _forward(self, req: dict, content_type: str):
        from starlette.responses import StreamingResponse

        if req["path"].startswith(HOME_PATHS):
            keys, order, reason = [], [0], "home"
        else:
            keys = span_keys(prompt_text(req["path"], req["body"], content_type))
            order, reason = self.router.order(keys)
        for n, i in enumerate(order):
            stream = self.replicas[i].options(stream=True).forward.remote(req)
            self.router.load[i] += 1
            try:
                start = await stream.__anext__()
            except Exception as e:  # the replica died, or Serve could not reach it
                self.router.load[i] -= 1
                self.router.up[i] = False
                print(f"nlg: replica-{i} failed a request: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                continue
            if start["status"] == 429 and n + 1 < len(order):  # its queue is full: the next one
                stream.cancel()
                self.router.load[i] -= 1
                continue
            self.routed.labels(str(i), reason if n == 0 else "retry").inc()
            if start["status"] < 400:
                self.router.served(keys, i)
            response = StreamingResponse(self._rest(stream, i, start), status_code=start["status"])
            response.raw_headers = [*start["headers"], (b"x-nlg-replica", str(i).encode())]
            return response
        if reason == "home":
            message = "replica-0, which keeps the files, batches and jobs, is down; Ray Serve is restarting it"
        else:
            message = "no replica is up; Ray Serve is restarting them"
        return _error(503, message, "no_replica", retry=True)

    async def _rest(self, stream, i: int, start: dict):
        """The body's pieces; a replica that dies mid-stream ends an event stream with an error event."""
        finished = False
        try:
            async for chunk in stream:
                yield chunk
            finished = True
        except Exception as e:
            self.router.up[i] = False
            print(f"nlg: replica-{i} died mid-response: {type(e).__name__}", file=sys.stderr, flush=True)
            if any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in start["headers"]):
                message = f"replica-{i} stopped during the stream; retry the request"
                yield f"data: {json.dumps(error_json(503, message, code='replica_lost'))}\n\n".encode()
            finished = True
        finally:
            self.router.load[i] -= 1
            if not finished:  # the client left: the replica's app sees it leave too
                stream.cancel()

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.gather(*(self._probe(i) for i in range(len(self.replicas))))
            self.up.set(sum(self.router.up))
            await asyncio.sleep(PROBE_S)

    async def _probe(self, i: int) -> None:
        try:
            await asyncio.wait_for(self.replicas[i].pid.remote(), PROBE_TIMEOUT_S)
            self.router.up[i] = True
        except Exception:
            self.router.up[i] = False

    async def _each(self, path: str) -> list[tuple[int, bytes] | None]:
        """GET `path` from every replica that is up: (status, body) each, None where none came in time."""

        async def one(i: int):
            if not self.router.up[i]:
                return None
            req = request_of({"method": "GET", "path": path}, b"")

            async def read():
                status, body = 0, b""
                async for item in self.replicas[i].options(stream=True).forward.remote(req):
                    if isinstance(item, dict):
                        status = item["status"]
                    else:
                        body += item
                return status, body

            try:
                return await asyncio.wait_for(read(), FAN_OUT_TIMEOUT_S)
            except Exception:
                return None

        return await asyncio.gather(*(one(i) for i in range(len(self.replicas))))

    async def _ready(self):
        from starlette.responses import JSONResponse

        ready = sum(r is not None and r[0] == 200 for r in await self._each("/ready"))
        if ready:
            return JSONResponse({"status": "ready", "replicas": ready, "of": len(self.replicas)})
        return _error(503, f"no replica of {len(self.replicas)} is ready", "not_ready", retry=True)

    async def _metrics(self):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        from starlette.responses import Response

        texts = {str(i): r[1].decode() for i, r in enumerate(await self._each("/metrics")) if r and r[0] == 200}
        return Response(merged_metrics(texts) + generate_latest(self.registry).decode(), media_type=CONTENT_TYPE_LATEST)


def merged_metrics(texts: dict[str, str]) -> str:
    """Prometheus text of every replica's series (`replica` -> its /metrics text), each with a `replica`
    label, and their sums with `replica="all"` (but of times and limits, `NOT_SUMMED`)."""
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, tuple[str, str, dict]] = {}
    for replica, text in texts.items():
        for family in text_string_to_metric_families(text):
            _, _, samples = families.setdefault(family.name, (family.type, family.documentation, {}))
            for s in family.samples:
                labels = tuple(sorted(s.labels.items()))
                samples.setdefault((s.name, labels), {})[replica] = s.value
    lines = []
    for name, (kind, doc, samples) in families.items():
        lines += [f"# HELP {name} {_escape(doc, help_text=True)}", f"# TYPE {name} {kind}"]
        for (sample, labels), values in samples.items():
            for replica, value in values.items():
                lines.append(_sample(sample, labels + (("replica", replica),), value))
            if not sample.endswith(NOT_SUMMED):
                lines.append(_sample(sample, labels + (("replica", "all"),), sum(values.values())))
    return "\n".join(lines) + "\n" if lines else ""


def _sample(name: str, labels: tuple, value: float) -> str:
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
    return f"{name}{{{inner}}} {value!r}"


def _escape(value: str, help_text: bool = False) -> str:
    value = value.replace("\\", "\\\\").replace("\n", "\\n")
    return value if help_text else value.replace('"', '\\"')


def _error(status: int, message: str, code: str, retry: bool = False):
    from starlette.responses import JSONResponse

    return JSONResponse(error_json(status, message, code=code), status, headers={"Retry-After": "5"} if retry else None)


def build(spec: Spec, cpus: float):
    """The Serve application: `spec.replicas` replicas of `cpus` cores each, behind the ingress."""
    from ray import serve

    from service.server.streams import DRAIN_S

    resources = {"num_gpus": spec.tp, "num_cpus": 1} if spec.gpus else {"num_cpus": cpus}
    replica = serve.deployment(ReplicaServer).options(
        num_replicas=1,
        ray_actor_options=resources,
        max_ongoing_requests=MAX_ONGOING,
        health_check_period_s=2,
        health_check_timeout_s=30,
        graceful_shutdown_timeout_s=DRAIN_S,
    )
    handles = [replica.options(name=f"replica-{i}").bind(spec, i == 0, max(1, int(cpus))) for i in range(spec.replicas)]
    ingress = serve.deployment(Ingress).options(
        name="ingress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=MAX_ONGOING
    )
    return ingress.bind(handles, spec.slots, spec.routing == "prefix")


def free_serve_port() -> int:
    """A TCP port free now in 20000-32767, where a local Ray cluster's own processes take none (its workers
    use 10002-19999, the rest the system's ephemeral ports): a port picked among the ephemeral ones was
    taken by Ray before Serve's proxy bound it ("Failed to bind"). For tests and benchmarks."""
    import random
    import socket

    for port in random.sample(range(20000, 32768), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32767")


def replica_cpus(spec: Spec) -> float:
    """The cores each replica reserves: `spec.cpus`, else the connected cluster's over the replicas."""
    import ray

    return spec.cpus or max(1.0, ray.cluster_resources().get("CPU", 1) // spec.replicas)


def start(spec: Spec) -> str:
    """Start the application on the cluster at `spec.address` (a local one for "local"); its URL once
    every replica has loaded."""
    from ray import serve

    from model.registry import resolve
    from service.jobs.cluster import connect

    resolve(spec.model)  # fetch/convert first: a local cluster's replicas find it made
    connect(spec.address)
    serve.start(http_options={"host": spec.host, "port": spec.port})
    url = f"http://{spec.host}:{spec.port}"
    print(f"nlg: starting {spec.replicas} replicas of {spec.model} on Ray Serve at {url}", file=sys.stderr, flush=True)
    serve.run(build(spec, replica_cpus(spec)), name="nlg", route_prefix="/")
    return url


def serve_on_ray(spec: Spec) -> None:
    """`start`, then serve until SIGINT or SIGTERM, then shut the application down."""
    from ray import serve

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    url = start(spec)
    print(f"nlg: serving at {url} (/ready counts the replicas that serve)", file=sys.stderr, flush=True)
    stop.wait()
    serve.shutdown()
