"""`nlg serve --ray --tp 2`: a replica split over two tensor-parallel ranks (the Serve replica is rank 0 and
starts rank 1 as its own process) answers through the ingress exactly as one process does."""

from __future__ import annotations

import httpx
import pytest
from fastapi.testclient import TestClient

from service.cli.parser import parser

pytestmark = pytest.mark.heavy
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

ASKED = [
    {"question": "When did the dam open?", "passages": ["The dam on the river opened in 1936 after five years."]},
    {"question": "Who built it?", "max_tokens": 12},
]


def test_a_replica_of_two_ranks_answers_as_one_process_does(tiny):
    """The same questions through an ingress over one replica of 2 ranks and through one in-process app:
    the same answers, word for word."""
    from service.cli.serving import ray_spec
    from service.jobs.cluster import connect
    from service.server import cluster
    from service.server.app import build_app

    with TestClient(build_app(tiny)) as c:
        alone = [c.post("/v1/answer", json=body).json()["answer"] for body in ASKED]
    connect("local", cpus=2)
    try:
        argv = ["serve", "--model", "tiny-random", "--ray", "--replicas", "1", "--tp", "2", "--replica-cpus", "2"]
        url = cluster.start(ray_spec(parser().parse_args([*argv, "--port", str(cluster.free_serve_port())])))
        split = [httpx.post(f"{url}/v1/answer", json=body, timeout=120).json()["answer"] for body in ASKED]
    finally:
        serve.shutdown()
        ray.shutdown()
    assert split == alone
