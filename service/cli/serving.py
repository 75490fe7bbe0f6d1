"""`nlg serve`: the HTTP service on one model (tensor-parallel ranks and the loading page included), or with
`--ray` replicas of it on a Ray cluster (`service.server.cluster`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from service.cli import commands


def cmd_serve(args) -> None:
    import threading

    import uvicorn

    from model.registry import cache_dir, resolve
    from parallel.launch import abort
    from service.server.app import build_app
    from service.server.connections import guarded
    from service.server.loading import Loading
    from service.server.streams import DRAIN_S

    if args.ray:
        from service.server.cluster import serve_on_ray

        return serve_on_ray(ray_spec(args))
    resolve(args.model)  # fetch/convert first: a missing model is an error now, not a 503 later
    keys = api_keys(args)
    origins = allowed_origins(args)
    jobs = args.jobs_db or str(cache_dir() / "jobs.sqlite")
    Path(jobs).parent.mkdir(parents=True, exist_ok=True)
    failed = threading.Event()

    def fatal() -> None:
        """The engine failed (its cause is printed) and every request in flight has its error: let the
        server send those replies, then exit non-zero. A shutdown that hangs is cut short."""
        print("nlg: error: the engine failed; answering the requests in flight, then exiting", file=sys.stderr)
        failed.set()
        server.should_exit = True
        timer = threading.Timer(DRAIN_S + 5, abort)
        timer.daemon = True
        timer.start()

    def load():
        gen = commands.load(args)
        gen.name = args.served_model_name or gen.name  # what clients name in "model" and /v1/models lists
        print(f"nlg: {args.model} loaded in {gen.load_s:.1f} s; ready", file=sys.stderr, flush=True)
        return build_app(
            gen,
            fatal,
            keys,
            args.slots,
            args.max_waiting,
            jobs,
            args.request_timeout,
            args.score_traffic,
            allowed_origins=origins,
        )

    url = f"http://{args.host}:{args.port}"
    print(
        f"nlg: serving {args.model} at {url}  (API docs: {url}/docs; /ready turns 200 once loaded)",
        file=sys.stderr,
        flush=True,
    )
    config = uvicorn.Config(
        Loading(load, fatal),
        host=args.host,
        port=args.port,
        log_level="info",
        timeout_graceful_shutdown=DRAIN_S,  # the streams' own grace: one number for both
        **guarded(),  # a deadline for request heads, a cap on connections
    )
    server = uvicorn.Server(config)
    server.run()
    if failed.is_set():
        abort()  # exit 1 now, taking any other tensor-parallel ranks down with this one


def ray_spec(args):
    """`nlg serve --ray`'s deployments, from its command line (`service.server.cluster.Spec`)."""
    from model.registry import cache_dir
    from service.server.cluster import Spec

    return Spec(
        args.ray,
        args.host,
        args.port,
        args.model,
        commands.load_options(args),
        args.replicas,
        args.replica_cpus,
        str(args.device).startswith("cuda"),
        args.tp,
        args.routing,
        args.served_model_name,
        api_keys(args),
        args.slots,
        args.max_waiting,
        args.jobs_db or str(cache_dir() / "jobs.sqlite"),
        args.request_timeout,
        args.score_traffic,
        allowed_origins(args),
    )


def allowed_origins(args) -> list[str]:
    """`--allowed-origins`, each given once or separated by commas."""
    return [o.strip() for given in args.allowed_origins or [] for o in given.split(",") if o.strip()]


def api_keys(args) -> list[str]:
    """Every key the server takes: `--api-key` (repeated), the lines of `--api-key-file` (but blank ones and
    comments), or else NLG_API_KEY (separated by commas). None: the API is open."""
    keys = list(args.api_key or [])
    if args.api_key_file:
        lines = Path(args.api_key_file).read_text().splitlines()
        keys += [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]
    if not keys:
        keys = [k.strip() for k in os.environ.get("NLG_API_KEY", "").split(",") if k.strip()]
    return keys
