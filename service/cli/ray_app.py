"""Ray Serve's application builder for `nlg serve --ray`'s application, for what starts Serve applications
by import path: KubeRay's RayService (`import_path: service.cli.ray_app:app`, `args: {argv: "..."}`) and
`serve run service.cli.ray_app:app argv="--model NAME --replicas 4"`. `argv` is `nlg serve`'s flags; the
host and port are Serve's own (`http_options`) there."""

from __future__ import annotations

import shlex

from service.cli.parser import parser
from service.cli.serving import ray_spec


def app(args: dict):
    """The application `nlg serve --ray auto ARGV` runs, on the cluster Serve runs on."""
    from model.registry import resolve
    from service.server.cluster import build, replica_cpus

    spec = ray_spec(parser().parse_args(["serve", "--ray", "auto", *shlex.split(str(args.get("argv", "")))]))
    resolve(spec.model)  # fetched and converted here first, as `nlg serve --ray` does
    return build(spec, replica_cpus(spec))
